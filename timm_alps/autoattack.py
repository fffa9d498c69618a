""" AutoAttack, standard version (Croce & Hein, ICML 2020), with its sanity flags, on models fed [0, 1] pixels

The standard version runs four attacks one after the other, each only on the samples still robust after the previous
ones (as `autoattack.AutoAttack.run_standard_evaluation` of github.com/fra31/auto-attack does):

1. APGD-CE: 100 iterations, 1 restart, rho 0.75;
2. APGD-T: targeted DLR loss, 100 iterations, 1 restart, the 9 highest-scoring other classes as targets;
3. FAB-T: 100 iterations, 1 restart, 9 target classes (alpha_max 0.1, eta 1.05, beta 0.9);
4. Square: 5,000 queries, p_init 0.8, no schedule rescaling (black-box, margin loss).

The four attacks are `torchattacks` 3.5.1's (the `timm-alps[robustness]` extra), configured here to the reference's
standard settings: `torchattacks.AutoAttack(version='standard')` itself does NOT run them (it leaves APGD, APGD-T and
FAB at 10 iterations, uses n_classes - 1 targets (99 on CIFAR-100) and Square's rescaled schedule, and attacks the
clean-misclassified samples too), so it is not used.

Guarantees as for `timm_alps.attacks`: fp32, eval mode (every module's mode restored), parameters and buffers
untouched, the caller's global RNG state untouched (torchattacks reseeds the global generator; we fork it), eps in
pixel units, every returned image in [0, 1] and inside the eps-ball (outputs are projected back before they are
counted, so a numerical overshoot of an attack can never count as a success).

Sanity flags (the reference's `autoattack/checks.py`, reported instead of warned):
* `randomized`: two forward passes of the same images differ (stochastic defence: use the 'rand' version with EOT);
* `zero_gradients`: samples whose input gradient of the cross-entropy is exactly zero (gradient-based attacks are
  blind there: gradient masking);
* `square_stronger`: Square, the black-box attack, breaks more than 0.2% of the samples the three white-box attacks
  left robust (the white-box attacks are being fooled: gradient masking).
"""
import math
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attacks import _attack_mode, _check_batch, _check_labels

__all__ = ['autoattack', 'AutoAttack', 'AutoAttackResult', 'STANDARD_ATTACKS', 'NORMS']

STANDARD_ATTACKS = ('apgd-ce', 'apgd-t', 'fab-t', 'square')
NORMS = ('Linf', 'L2')
# the reference's thresholds (autoattack/checks.py)
_RANDOMIZED_TOL = 1e-4
_SQUARE_TOL = 0.002


@dataclass
class AutoAttackResult:
    """What `autoattack` found on one batch (or, summed with `+`, on a data set).

    Attributes:
        n_examples: images attacked.
        clean_correct: images classified correctly before any attack.
        robust: attack name -> images still classified correctly after it and every earlier one (cumulative, in
            the order run; the last value is AutoAttack's robust count).
        zero_gradients: clean-correct images whose input gradient is exactly zero.
        randomized: two forward passes of the same images gave different outputs.
        seconds: attack name -> wall time.
        adversarial: the adversarial images of the batch (`None` once results are summed).
    """
    n_examples: int
    clean_correct: int
    robust: Dict[str, int] = field(default_factory=dict)
    zero_gradients: int = 0
    randomized: bool = False
    seconds: Dict[str, float] = field(default_factory=dict)
    adversarial: Optional[torch.Tensor] = None

    @property
    def clean_acc(self) -> float:
        """Clean accuracy (%)."""
        return 100.0 * self.clean_correct / self.n_examples

    @property
    def autoattack_acc(self) -> float:
        """Robust accuracy (%) after every attack run."""
        last = list(self.robust.values())[-1] if self.robust else self.clean_correct
        return 100.0 * last / self.n_examples

    def acc_after(self, attack: str) -> float:
        """Robust accuracy (%) after `attack` and the ones before it."""
        return 100.0 * self.robust[attack] / self.n_examples

    @property
    def square_stronger(self) -> bool:
        """Square broke more than 0.2% of the images the white-box attacks left robust."""
        names = list(self.robust)
        if 'square' not in names or names.index('square') == 0:
            return False
        before = self.robust[names[names.index('square') - 1]]
        return (before - self.robust['square']) / self.n_examples > _SQUARE_TOL

    @property
    def flags(self) -> Dict[str, object]:
        """The sanity flags: `randomized`, `zero_gradients` (count), `square_stronger`."""
        return dict(randomized=self.randomized, zero_gradients=self.zero_gradients,
                    square_stronger=self.square_stronger)

    def __add__(self, other: 'AutoAttackResult') -> 'AutoAttackResult':
        if list(self.robust) != list(other.robust):
            raise ValueError(f'cannot add results of different attack lists {list(self.robust)} and '
                             f'{list(other.robust)}')
        return AutoAttackResult(
            n_examples=self.n_examples + other.n_examples, clean_correct=self.clean_correct + other.clean_correct,
            robust={k: v + other.robust[k] for k, v in self.robust.items()},
            zero_gradients=self.zero_gradients + other.zero_gradients,
            randomized=self.randomized or other.randomized,
            seconds={k: v + other.seconds.get(k, 0.0) for k, v in self.seconds.items()})


def _torchattacks():
    try:
        import torchattacks
    except ImportError as e:
        raise ImportError('AutoAttack uses the attacks of the torchattacks package: '
                          'pip install "timm-alps[robustness]" (or torchattacks==3.5.1)') from e
    return torchattacks


def _check_config(eps, norm: str, attacks: Sequence[str], n_target_classes: int, steps: int, n_queries: int,
                  seed: int) -> Tuple[float, Tuple[str, ...]]:
    if norm not in NORMS:
        raise ValueError(f'norm must be one of {NORMS}, got {norm!r}')
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f'eps must be a Python float in pixel units (e.g. 8/255), got {type(eps).__name__}')
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0 or (norm == 'Linf' and eps > 1):
        bound = '[0, 1] (pixel units, e.g. 8/255)' if norm == 'Linf' else '>= 0 and finite (pixel units, e.g. 0.5)'
        raise ValueError(f'eps must be {bound} for norm {norm!r}, got {eps}')
    attacks = tuple(attacks)
    unknown = [a for a in attacks if a not in STANDARD_ATTACKS]
    if unknown or not attacks or len(set(attacks)) != len(attacks):
        raise ValueError(f'attacks must be distinct names from {STANDARD_ATTACKS}, got {list(attacks)}')
    for name, value in (('n_target_classes', n_target_classes), ('steps', steps), ('n_queries', n_queries)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be an int >= 1, got {value!r}')
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f'seed must be an int >= 0, got {seed!r}')
    return eps, attacks


def _build(name: str, model: nn.Module, eps: float, norm: str, n_classes: int, n_target_classes: int, steps: int,
           n_queries: int, seed: int, device: torch.device):
    ta = _torchattacks()
    targets = min(n_target_classes, n_classes - 1)
    if name == 'apgd-ce':
        atk = ta.APGD(model, norm=norm, eps=eps, steps=steps, n_restarts=1, seed=seed, loss='ce', rho=0.75)
    elif name == 'apgd-t':
        atk = ta.APGDT(model, norm=norm, eps=eps, steps=steps, n_restarts=1, seed=seed, rho=0.75,
                       n_classes=n_classes)
        atk.n_target_classes = targets
    elif name == 'fab-t':
        atk = ta.FAB(model, norm=norm, eps=eps, steps=steps, n_restarts=1, seed=seed, multi_targeted=True,
                     n_classes=n_classes, alpha_max=0.1, eta=1.05, beta=0.9)
        atk.n_target_classes = targets
    else:
        atk = ta.Square(model, norm=norm, eps=eps, n_queries=n_queries, n_restarts=1, p_init=0.8, loss='margin',
                        resc_schedule=False, seed=seed)
    atk.set_device(device)
    return atk


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    delta = x_adv.float() - x
    if norm == 'Linf':
        delta = delta.clamp(-eps, eps)
    else:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * (eps / norms).clamp(max=1.0).reshape(-1, *([1] * (x.dim() - 1)))
    return (x + delta).clamp(0.0, 1.0)


@torch.no_grad()
def _randomized(model: nn.Module, x: torch.Tensor) -> bool:
    a, b = model(x).float(), model(x).float()
    a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
    b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
    return bool((a.argmax(1) != b.argmax(1)).any()) or float((a - b).norm(dim=1).max()) > _RANDOMIZED_TOL


def _zero_gradients(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> int:
    if x.shape[0] == 0:
        return 0
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x).float(), labels, reduction='sum')
    grad, = torch.autograd.grad(loss, x)
    return int((grad.flatten(1).abs().sum(1) == 0).sum())


def autoattack(
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        eps: float,
        norm: str = 'Linf',
        attacks: Sequence[str] = STANDARD_ATTACKS,
        n_target_classes: int = 9,
        steps: int = 100,
        n_queries: int = 5000,
        seed: int = 0,
) -> AutoAttackResult:
    """AutoAttack (standard version by default) on one batch, with the reference's sanity flags.

    Args:
        model: classifier taking pixels in [0, 1] (wrap a normalising model in `NormalizedModel`).
        images: (B, C, H, W) float pixels in [0, 1].
        labels: (B,) int64 true classes.
        eps: radius in pixel units: L-inf in [0, 1] (8/255 on CIFAR in RobustBench), or L2 (0.5).
        norm: 'Linf' or 'L2'.
        attacks: the attacks to run, in order (default: the standard four). A model with fewer than 4 classes
            cannot run APGD-T's targeted DLR loss: drop 'apgd-t' then.
        n_target_classes: target classes of APGD-T and FAB-T (9 in the standard version; capped at classes - 1).
        steps: iterations of APGD-CE, APGD-T and FAB-T (100 in the standard version).
        n_queries: Square's query budget (5,000 in the standard version).
        seed: seed of the attacks' random starts (the caller's RNG state is left untouched).

    Returns:
        `AutoAttackResult`; `.adversarial` holds, per image, the first successful adversarial example found (the
        clean image where none was), within the eps-ball and in [0, 1].

    Raises:
        ValueError: bad eps / norm / attack names / counts, images outside [0, 1], labels out of range, a model
            with fewer than 4 classes asked to run APGD-T.
        ImportError: torchattacks is not installed.
    """
    eps, attacks = _check_config(eps, norm, attacks, n_target_classes, steps, n_queries, seed)
    x, labels = _check_batch(images, labels)
    if x.dim() != 4:
        raise ValueError(f'images must be (B, C, H, W), got shape {tuple(x.shape)}')
    _torchattacks()
    device = x.device
    fork_devices = [device] if device.type == 'cuda' else []
    with _attack_mode(model, device.type), torch.random.fork_rng(devices=fork_devices):
        with torch.no_grad():
            logits = model(x).float()
        _check_labels(logits, labels)
        n_classes = logits.shape[1]
        if 'apgd-t' in attacks and n_classes < 4:
            raise ValueError(f'APGD-T needs at least 4 classes (targeted DLR loss), the model has {n_classes}; '
                             f'run attacks={tuple(a for a in attacks if a != "apgd-t")}')
        if ('apgd-t' in attacks or 'fab-t' in attacks) and n_classes < 2:
            raise ValueError(f'targeted attacks need at least 2 classes, the model has {n_classes}')
        robust = logits.argmax(1) == labels
        result = AutoAttackResult(n_examples=x.shape[0], clean_correct=int(robust.sum()))
        result.randomized = _randomized(model, x)
        result.zero_gradients = _zero_gradients(model, x[robust], labels[robust])
        adversarial = x.clone()
        for name in attacks:
            t0 = time.perf_counter()
            idx = robust.nonzero().squeeze(1)
            if idx.numel() > 0 and eps > 0:
                atk = _build(name, model, eps, norm, n_classes, n_target_classes, steps, n_queries, seed, device)
                x_adv = _project(atk(x[idx], labels[idx]).detach(), x[idx], eps, norm)
                with torch.no_grad():
                    fooled = model(x_adv).float().argmax(1) != labels[idx]
                adversarial[idx[fooled]] = x_adv[fooled]
                robust[idx[fooled]] = False
            result.robust[name] = int(robust.sum())
            result.seconds[name] = time.perf_counter() - t0
    result.adversarial = adversarial
    return result


class AutoAttack:
    """AutoAttack as an attack function for `evaluate_robustness`, keeping each model's totals and flags.

    `AutoAttack(eps=8/255)(model, images, labels)` returns adversarial images like `fgsm`/`pgd`;
    `.result(model)` is that model's `AutoAttackResult` summed over every batch attacked so far.

    Args:
        eps, norm, attacks, n_target_classes, steps, n_queries, seed: as in `autoattack` (checked here, once).
    """

    def __init__(self, eps: float, norm: str = 'Linf', attacks: Sequence[str] = STANDARD_ATTACKS,
                 n_target_classes: int = 9, steps: int = 100, n_queries: int = 5000, seed: int = 0):
        eps, attacks = _check_config(eps, norm, attacks, n_target_classes, steps, n_queries, seed)
        self.kwargs = dict(eps=eps, norm=norm, attacks=attacks, n_target_classes=n_target_classes, steps=steps,
                           n_queries=n_queries, seed=seed)
        self._results: Dict[int, AutoAttackResult] = {}

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        res = autoattack(model, images, labels, **self.kwargs)
        adversarial, res.adversarial = res.adversarial, None
        key = id(model)
        self._results[key] = self._results[key] + res if key in self._results else res
        return adversarial

    def result(self, model: nn.Module) -> Optional[AutoAttackResult]:
        """The model's totals so far (None if it was never attacked)."""
        return self._results.get(id(model))
