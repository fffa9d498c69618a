""" L-infinity adversarial attacks and robustness evaluation in pixel space

The ALPS paper (Guo et al., IJCAI 2021, Section 5.3, Tables 5-6) measures top-1 error under FGSM (radius 4/255 per
pixel) and 10-step PGD (step 1/255, radius 4/255), white-box (attack the model itself) and black-box (examples
crafted on the ERM model, evaluated on the others). Label smoothing and friends are known to mask gradients, so this
module adds the step-size-free APGD-CE of Croce & Hein (ICML 2020) and the unbounded-PGD sanity check of
Verma et al. (2019) that the paper quotes.

Every attack takes a model fed with pixels in [0, 1]; normalisation lives inside the model (`NormalizedModel`),
so `eps=4/255` means 4 grey levels per pixel. Attacks run in fp32 with the model in eval mode, never touch its
parameters or buffers, and put every module's train/eval mode back afterwards.

* `fgsm`, `pgd`, `apgd_ce`, `unbounded_pgd`: return adversarial images for one batch.
* `evaluate_robustness`: white-box and black-box (transfer) top-1 error for several models in one pass over data.
* `transfer_attack`: black-box only: craft on a source model, evaluate every target on the same examples.
* `NormalizedModel`, `load_checkpoint_model`: a [0, 1]-pixel model from a `train_timm.py` checkpoint.
* AutoAttack (standard version) and its sanity flags: `timm_alps.autoattack`.
"""
import argparse
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import _torch_load

__all__ = [
    'NormalizedModel', 'load_checkpoint_model', 'fgsm', 'pgd', 'apgd_ce', 'unbounded_pgd',
    'evaluate_robustness', 'transfer_attack', 'RobustnessResult', 'gradient_masking_suspected',
    'UNBOUNDED_MAX_ACCURACY',
]

AttackFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

# Accuracy (%) above which the unbounded PGD check reports gradient masking. Any honest classifier falls to ~0%
# once the perturbation may cover the whole image; the paper calls 0.22% (ALPS on SVHN) a pass.
UNBOUNDED_MAX_ACCURACY = 1.0


class NormalizedModel(nn.Module):
    """Wrap a model that expects normalised inputs so it takes pixels in [0, 1].

    Args:
        model: classifier fed with `(x - mean) / std`.
        mean: per-channel mean in [0, 1] units (e.g. `(0.4914, 0.4822, 0.4465)`).
        std: per-channel standard deviation in [0, 1] units.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean_t.numel() != std_t.numel():
            raise ValueError(f'mean {tuple(mean)} and std {tuple(std)} must have one value per channel each')
        if not bool(torch.all(torch.isfinite(mean_t))) or not bool(torch.all(torch.isfinite(std_t) & (std_t > 0))):
            raise ValueError(f'mean must be finite and std finite and positive per channel, got mean {tuple(mean)}, '
                             f'std {tuple(std)}')
        self.model = model
        # non-persistent: the wrapper's state_dict stays the wrapped model's (prefixed 'model.')
        self.register_buffer('mean', mean_t.reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', std_t.reshape(1, -1, 1, 1), persistent=False)

    @property
    def num_classes(self) -> Optional[int]:
        return getattr(self.model, 'num_classes', None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = self.mean.shape[1]
        if x.dim() != 4 or (channels != 1 and x.shape[1] != channels):
            raise ValueError(f'NormalizedModel has mean/std for {channels} channel(s) but got images of shape '
                             f'{tuple(x.shape)}; expected (B, {channels}, H, W)')
        return self.model((x - self.mean) / self.std)


def load_checkpoint_model(
        path: Union[str, Path],
        device: Union[str, torch.device] = 'cpu',
        use_ema: bool = False,
        model_name: Optional[str] = None,
        num_classes: Optional[int] = None,
) -> NormalizedModel:
    """Rebuild a `train_timm.py` checkpoint as an eval-mode model that takes [0, 1] pixels.

    The architecture, `num_classes`, `model_kwargs`, `in_chans`, mean and std come from the checkpoint's `args`;
    `model_name` / `num_classes` override them (and must then match the stored weights). The returned
    `NormalizedModel` carries the checkpoint's `args` as `.checkpoint_args` and the path as `.checkpoint_path`.

    Args:
        path: checkpoint file (a dict with 'state_dict', 'args', 'arch', 'epoch', maybe 'state_dict_ema').
        device: where to put the model.
        use_ema: load 'state_dict_ema' instead of 'state_dict'.
        model_name: timm model name to build instead of the checkpoint's `arch`.
        num_classes: classifier size to build instead of the checkpoint's `args.num_classes`.

    Raises:
        ValueError: the file is not such a checkpoint, has no EMA weights when `use_ema` is set, or its weights do
            not fit the model (wrong architecture or num_classes).
    """
    import timm
    from timm.data import resolve_data_config
    from timm.models import clean_state_dict
    try:
        import timm_alps.models  # noqa: F401  (registers the CIFAR models with timm)
    except ModuleNotFoundError as e:
        if e.name != 'timm_alps.models':
            raise

    path = Path(path)
    if path.is_dir():
        raise ValueError(f'checkpoint {str(path)!r} is a folder, not a checkpoint file; pass the .pth.tar inside it '
                         '(e.g. last.pth.tar or model_best.pth.tar)')
    if not path.is_file():
        raise ValueError(f'checkpoint {str(path)!r} does not exist')
    try:
        ckpt = _torch_load(str(path))
    except Exception as e:  # zip, pickle (e.g. `KeyError: 101` for a text file) and unpickling errors all mean this
        raise ValueError(f'cannot read checkpoint {str(path)!r}: not a checkpoint written by torch.save '
                         f'({type(e).__name__}: {e})') from e
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt:
        raise ValueError(
            f'{str(path)!r} is not a train_timm.py checkpoint: expected a dict with a "state_dict" key, '
            f'got {type(ckpt).__name__}' + (f' with keys {sorted(ckpt)[:8]}' if isinstance(ckpt, dict) else ''))
    args = ckpt.get('args')
    if args is None:
        args = argparse.Namespace()
    key = 'state_dict_ema' if use_ema else 'state_dict'
    if key not in ckpt:
        raise ValueError(f'checkpoint {str(path)!r} has no {key!r} (keys: {sorted(ckpt)}); drop the EMA flag')
    arch = model_name or ckpt.get('arch') or getattr(args, 'model', None)
    if not arch:
        raise ValueError(f'checkpoint {str(path)!r} names no architecture (no "arch" nor args.model); pass model_name')
    if num_classes is None:
        num_classes = getattr(args, 'num_classes', None)

    create_kwargs = dict(getattr(args, 'model_kwargs', None) or {})
    if num_classes is not None:
        create_kwargs['num_classes'] = num_classes
    for name, value in (('in_chans', getattr(args, 'in_chans', None)), ('global_pool', getattr(args, 'gp', None))):
        if value is not None:
            create_kwargs.setdefault(name, value)
    try:
        model = timm.create_model(arch, **create_kwargs)
    except RuntimeError as e:
        raise ValueError(f'cannot build model {arch!r} for checkpoint {str(path)!r}: {e}') from e

    state = clean_state_dict(ckpt[key])
    _check_state_dict(model, state, f'checkpoint {str(path)!r} ({key})', arch, num_classes)
    model.load_state_dict(state)

    config = resolve_data_config(vars(args), model=model)
    wrapped = NormalizedModel(model, config['mean'], config['std']).to(device).eval()
    wrapped.checkpoint_args = args
    wrapped.checkpoint_path = str(path)
    return wrapped


def _check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str, arch: str, num_classes) -> None:
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [
        f'{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}'
        for k in expected.keys() & state.keys() if tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append('shape mismatch for ' + '; '.join(sorted(wrong)[:5]))
        if missing:
            parts.append(f'missing keys {missing[:5]}' + (' ...' if len(missing) > 5 else ''))
        if unexpected:
            parts.append(f'unexpected keys {unexpected[:5]}' + (' ...' if len(unexpected) > 5 else ''))
        raise ValueError(
            f'{what} does not match model {arch!r} with num_classes={num_classes}: ' + ', '.join(parts)
            + '. Build the model the checkpoint was trained with (model name, num_classes, model_kwargs).')


# ---------------------------------------------------------------------------------------------------------------
# input checks and the attack context


def _check_eps(eps: float, allow_inf: bool = True) -> float:
    if isinstance(eps, torch.Tensor) or not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise TypeError(f'eps must be a Python float (pixel units, e.g. 4/255), got {type(eps).__name__}')
    eps = float(eps)
    if math.isinf(eps) and eps > 0:
        if not allow_inf:
            raise ValueError('eps=inf is not supported by this attack; use unbounded_pgd for the unbounded check')
        return eps
    if not 0 <= eps <= 1:  # also NaN
        raise ValueError(f'eps must be >= 0 and <= 1 ([0, 1] pixel units, e.g. 4/255 for 4 grey levels), got {eps}'
                         + (f'; did you mean {eps:g}/255?' if 1 < eps <= 255 else ''))
    return eps


def _check_positive(name: str, value, integer: bool = False):
    if integer:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f'{name} must be an int >= 1, got {value!r}')
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or math.isinf(value):
        raise ValueError(f'{name} must be a finite float > 0, got {value!r}')
    return float(value)


def _check_batch(images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(
            f'images must be a floating point tensor of pixels in [0, 1], got '
            f'{images.dtype if isinstance(images, torch.Tensor) else type(images).__name__}')
    if (not isinstance(labels, torch.Tensor) or labels.dim() != 1
            or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool):
        raise TypeError(f'labels must be a 1-d integer tensor of class indices, got '
                        f'{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}'
                        f'{" " + str(labels.dtype) if isinstance(labels, torch.Tensor) else ""}')
    if images.dim() < 2 or images.shape[0] != labels.shape[0]:
        raise ValueError(f'images {tuple(images.shape)} and labels {tuple(labels.shape)} must share the batch size')
    if images.shape[0] == 0:
        raise ValueError('empty batch: images has batch size 0')
    lo, hi = torch.aminmax(images.detach())
    lo, hi = float(lo), float(hi)
    if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
        raise ValueError(
            f'images must be pixels in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; attacks work in pixel space, '
            'so pass un-normalised images and put the normalisation inside the model (NormalizedModel)')
    return images.detach().float(), labels.long()


def _check_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    num_classes = logits.shape[-1]
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f'labels must lie in [0, {num_classes - 1}] for a model with {num_classes} outputs, '
                         f'got labels in [{lo}, {hi}]')


@contextmanager
def _attack_mode(model: nn.Module, device_type: str) -> Iterator[None]:
    """Eval mode, frozen parameters, gradients on, autocast off; everything restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    # frozen parameters: autograd then builds no graph towards the weights, and no .grad is ever written
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        with torch.enable_grad(), torch.autocast(device_type=device_type, enabled=False):
            yield
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


def _loss_and_grad(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, check_labels: bool = False):
    x = x.detach().requires_grad_(True)
    logits = model(x).float()
    if check_labels:
        _check_labels(logits, labels)
    loss = F.cross_entropy(logits, labels, reduction='none')
    grad, = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad, logits.detach()


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    if not math.isinf(eps):
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    return x_adv.clamp(0.0, 1.0)


def _per_sample(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1, *([1] * (like.dim() - 1)))


# ---------------------------------------------------------------------------------------------------------------
# attacks


def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast Gradient Sign Method (Goodfellow et al., 2015): `clip(x + eps * sign(grad_x CE), 0, 1)`.

    Args:
        model: classifier taking pixels in [0, 1].
        images: (B, C, H, W) float pixels in [0, 1].
        labels: (B,) int64 true classes.
        eps: L-infinity radius in pixel units (4/255 in the paper).

    Returns:
        Adversarial images, fp32, with `||x_adv - images||_inf <= eps` and values in [0, 1].
    """
    eps = _check_eps(eps, allow_inf=False)
    x, labels = _check_batch(images, labels)
    with _attack_mode(model, x.device.type):
        loss, grad, logits = _loss_and_grad(model, x, labels, check_labels=True)
        return _project(x + eps * grad.sign(), x, eps).detach()


def pgd(
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        eps: float,
        step_size: float,
        steps: int,
        random_start: bool = False,
        keep_best: bool = True,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Projected Gradient Descent with sign steps (Madry et al., 2018), L-infinity ball intersected with [0, 1].

    The paper's PGD is `steps=10, step_size=1/255, eps=4/255`. `eps=inf` lifts the ball (only [0, 1] remains).

    Args:
        model: classifier taking pixels in [0, 1].
        images: (B, C, H, W) float pixels in [0, 1].
        labels: (B,) int64 true classes.
        eps: L-infinity radius in pixel units (`math.inf` for no bound).
        step_size: sign-step length in pixel units.
        steps: number of gradient steps.
        random_start: start from a uniform point of the eps-ball instead of the clean image.
        keep_best: return, per sample, the iterate (of steps 1..`steps`) with the highest cross-entropy rather
            than the last one, so more steps can never weaken the attack. `False` gives textbook PGD.
        generator: random generator for the random start (on the images' device).

    Returns:
        Adversarial images, fp32, within the eps-ball of `images` and in [0, 1]. With `steps=1`,
        `step_size=eps` and no random start this is exactly `fgsm(model, images, labels, eps)`.
    """
    eps = _check_eps(eps)
    step_size = _check_positive('step_size', step_size)
    steps = _check_positive('steps', steps, integer=True)
    x, labels = _check_batch(images, labels)
    if eps == 0:
        return x.clone()
    x_adv = x.clone()
    if random_start:
        radius = min(eps, 1.0)
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_adv = _project(x + (2 * noise - 1) * radius, x, eps)
    with _attack_mode(model, x.device.type):
        best, best_loss = x_adv, None
        for i in range(steps):
            loss, grad, logits = _loss_and_grad(model, x_adv, labels, check_labels=i == 0)
            if i > 0 and keep_best:
                best, best_loss = _keep_higher(best, best_loss, x_adv, loss)
            x_adv = _project(x_adv + step_size * grad.sign(), x, eps)
        if not keep_best:
            return x_adv.detach()
        with torch.no_grad():
            loss = F.cross_entropy(model(x_adv).float(), labels, reduction='none')
        best, _ = _keep_higher(best, best_loss, x_adv, loss)
    return best.detach()


def _keep_higher(best, best_loss, x_new, loss):
    if best_loss is None:
        return x_new, loss
    better = loss > best_loss
    return torch.where(_per_sample(better, x_new), x_new, best), torch.where(better, loss, best_loss)


def unbounded_pgd(
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        steps: int = 200,
        step_size: float = 0.01,
) -> torch.Tensor:
    """Unbounded PGD sanity check (Verma et al., 2019; ALPS Section 5.3): `eps=inf`, 200 steps of 0.01.

    With the perturbation free to cover the image, an honestly evaluated classifier must fall to about 0%
    accuracy; if it does not, its gradients are masked and bounded white-box numbers flatter it
    (see `gradient_masking_suspected`).

    Args:
        model: classifier taking pixels in [0, 1].
        images: (B, C, H, W) float pixels in [0, 1].
        labels: (B,) int64 true classes.
        steps: number of sign steps.
        step_size: step length in pixel units.

    Returns:
        Adversarial images in [0, 1].
    """
    return pgd(model, images, labels, eps=math.inf, step_size=step_size, steps=steps, random_start=False)


def gradient_masking_suspected(unbounded_accuracy: float, max_accuracy: float = UNBOUNDED_MAX_ACCURACY) -> bool:
    """True when accuracy (%) under `unbounded_pgd` stays above `max_accuracy` (%), i.e. gradients look masked."""
    return unbounded_accuracy > max_accuracy


def apgd_ce(
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        eps: float,
        steps: int = 100,
        n_restarts: int = 1,
        rho: float = 0.75,
        random_start: bool = True,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Auto-PGD on the cross-entropy, L-infinity (Croce & Hein, ICML 2020, Algorithm 1).

    Step-size free: starts at `2 * eps`, moves with momentum 0.75, and at checkpoints `w_j = ceil(p_j * steps)`
    (`p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`) halves a sample's step and restarts it
    from its best point when (1) its loss rose in at most `rho` of the steps since the last checkpoint, or
    (2) its step was not halved at the last checkpoint and its best loss has not improved since. Restarts
    (random starts) attack only the samples not yet misclassified, as in the reference code.

    Args:
        model: classifier taking pixels in [0, 1].
        images: (B, C, H, W) float pixels in [0, 1].
        labels: (B,) int64 true classes.
        eps: L-infinity radius in pixel units (finite).
        steps: iterations per restart (100 in the paper).
        n_restarts: number of runs; each later run needs `random_start`.
        rho: fraction of loss-increasing steps below which the step size is halved.
        random_start: start from a random point of the eps-ball (reference behaviour) or from the clean image.
        generator: random generator for the random starts (on the images' device).

    Returns:
        Adversarial images within the eps-ball and in [0, 1]: per sample, a misclassified iterate when one was
        found (the highest-loss one among them), else the highest-loss iterate.
    """
    eps = _check_eps(eps, allow_inf=False)
    steps = _check_positive('steps', steps, integer=True)
    n_restarts = _check_positive('n_restarts', n_restarts, integer=True)
    if not 0 < rho < 1:
        raise ValueError(f'rho must be in (0, 1), got {rho!r}')
    if n_restarts > 1 and not random_start:
        raise ValueError('n_restarts > 1 repeats the same deterministic run without random_start=True')
    x, labels = _check_batch(images, labels)
    if eps == 0:
        return x.clone()
    with _attack_mode(model, x.device.type):
        out, out_loss, out_fooled = _apgd_run(model, x, labels, eps, steps, rho, random_start, generator)
        for _ in range(n_restarts - 1):
            idx = (~out_fooled).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            new, new_loss, new_fooled = _apgd_run(
                model, x[idx], labels[idx], eps, steps, rho, random_start, generator)
            take = new_fooled | (new_loss > out_loss[idx])
            out[idx] = torch.where(_per_sample(take, new), new, out[idx])
            out_loss[idx] = torch.where(take, new_loss, out_loss[idx])
            out_fooled[idx] = new_fooled
    return out.detach()


def _apgd_run(model, x, labels, eps, steps, rho, random_start, generator):
    if random_start:
        t = 2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1
        t_max = t.abs().reshape(x.shape[0], -1).amax(dim=1)
        x_adv = _project(x + eps * t / (_per_sample(t_max, x) + 1e-12), x, eps)
    else:
        x_adv = x.clone()
    loss, grad, logits = _loss_and_grad(model, x_adv, labels, check_labels=True)
    fooled = logits.argmax(dim=1) != labels
    # x_best / loss_best drive the step-size schedule; out / out_loss / out_fooled are what we return
    x_best, loss_best, grad_best = x_adv, loss, grad
    out, out_loss, out_fooled = x_adv, loss, fooled

    step = torch.full_like(loss, 2 * eps)
    window = max(int(0.22 * steps), 1)
    window_min, window_decr = max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    since_check, n_rises = 0, torch.zeros_like(loss)
    prev_loss = loss
    best_at_check, halved_at_check = loss_best, torch.ones_like(fooled)
    x_prev = x_adv
    for i in range(steps):
        momentum = 1.0 if i == 0 else 0.75
        z = _project(x_adv + _per_sample(step, x) * grad.sign(), x, eps)
        x_new = _project(x_adv + momentum * (z - x_adv) + (1 - momentum) * (x_adv - x_prev), x, eps)
        x_prev, x_adv = x_adv, x_new

        loss, grad, logits = _loss_and_grad(model, x_adv, labels)
        fooled = logits.argmax(dim=1) != labels
        improved = loss > loss_best
        x_best = torch.where(_per_sample(improved, x), x_adv, x_best)
        grad_best = torch.where(_per_sample(improved, x), grad, grad_best)
        loss_best = torch.where(improved, loss, loss_best)
        take = (fooled & ~out_fooled) | ((fooled == out_fooled) & (loss > out_loss))
        out = torch.where(_per_sample(take, x), x_adv, out)
        out_loss = torch.where(take, loss, out_loss)
        out_fooled = out_fooled | fooled

        n_rises += (loss > prev_loss).float()
        prev_loss = loss
        since_check += 1
        if since_check == window:
            # `<=` as in the reference implementation (the paper writes `<`)
            halve = (n_rises <= rho * window) | (~halved_at_check & (best_at_check >= loss_best))
            step = torch.where(halve, step / 2, step)
            x_adv = torch.where(_per_sample(halve, x), x_best, x_adv)
            grad = torch.where(_per_sample(halve, x), grad_best, grad)
            halved_at_check, best_at_check = halve, loss_best
            n_rises = torch.zeros_like(n_rises)
            since_check = 0
            window = max(window - window_decr, window_min)
    return out, out_loss, out_fooled


# ---------------------------------------------------------------------------------------------------------------
# evaluation over a data set


@dataclass
class RobustnessResult:
    """Top-1 error (%) per model and setting, from `evaluate_robustness`.

    `errors[model][setting]` with settings 'clean', 'white-box/<attack>' and 'black-box/<attack>'.
    """
    num_samples: int
    errors: Dict[str, Dict[str, float]] = field(default_factory=dict)


def _progress(iterable, enabled: Optional[bool], desc: str):
    from tqdm.auto import tqdm
    if enabled is None:
        enabled = sys.stderr.isatty()
    total = len(iterable) if hasattr(iterable, '__len__') else None
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False)


def _correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with _attack_mode(model, images.device.type), torch.no_grad():
        logits = model(images).float()
    _check_labels(logits, labels)
    return logits.argmax(dim=1) == labels


def evaluate_robustness(
        models: Mapping[str, nn.Module],
        loader: Iterable[Tuple[torch.Tensor, torch.Tensor]],
        attacks: Optional[Mapping[str, AttackFn]] = None,
        source: Optional[nn.Module] = None,
        transfer_attacks: Optional[Mapping[str, AttackFn]] = None,
        device: Optional[Union[str, torch.device]] = None,
        progress: Optional[bool] = None,
) -> RobustnessResult:
    """Clean, white-box and black-box top-1 error of several models in one pass over the data.

    For each batch: every model's clean prediction; each white-box attack run on each model; each transfer attack
    crafted once on `source` and evaluated on every model.

    Args:
        models: name -> classifier taking pixels in [0, 1].
        loader: iterable of (images in [0, 1], int64 labels) batches.
        attacks: name -> `fn(model, images, labels) -> adversarial images` for white-box attacks.
        source: model the black-box examples are crafted on (needs `transfer_attacks`).
        transfer_attacks: name -> attack function for black-box examples crafted on `source`.
        device: device to move batches to (default: each batch stays where it is).
        progress: tqdm progress bar; None shows it only when stderr is a terminal.

    Returns:
        `RobustnessResult` with errors in %.

    Raises:
        ValueError: no model, a source without transfer attacks (or the reverse), an empty data set, models whose
            numbers of classes differ from each other or from the source, labels out of range.
    """
    attacks = dict(attacks or {})
    transfer_attacks = dict(transfer_attacks or {})
    if not models:
        raise ValueError('models is empty: pass at least one name -> model')
    if (source is None) != (not transfer_attacks):
        raise ValueError('black-box evaluation needs both a source model and transfer_attacks (or neither)')
    correct: Dict[str, Dict[str, torch.Tensor]] = {name: {} for name in models}
    count = 0

    def add(name: str, setting: str, hits: torch.Tensor) -> None:
        total = hits.sum()
        correct[name][setting] = correct[name].get(setting, 0) + total

    for images, labels in _progress(loader, progress, 'robustness'):
        if device is not None:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        images, labels = _check_batch(images, labels)
        if count == 0:
            _check_num_classes(models, source, images)
        count += images.shape[0]
        for name, model in models.items():
            add(name, 'clean', _correct(model, images, labels))
            for attack_name, attack in attacks.items():
                x_adv = _check_output(attack(model, images, labels), images, attack_name)
                add(name, f'white-box/{attack_name}', _correct(model, x_adv, labels))
        for attack_name, attack in transfer_attacks.items():
            x_adv = _check_output(attack(source, images, labels), images, attack_name)
            for name, model in models.items():
                add(name, f'black-box/{attack_name}', _correct(model, x_adv, labels))
    if count == 0:
        raise ValueError('the data set is empty: the loader yielded no batch')
    errors = {
        name: {setting: 100.0 * (1.0 - float(hits) / count) for setting, hits in settings.items()}
        for name, settings in correct.items()}
    return RobustnessResult(num_samples=count, errors=errors)


def _check_output(x_adv, images: torch.Tensor, attack_name: str) -> torch.Tensor:
    """An attack's output must be images like its input, in [0, 1]: anything else would be scored silently."""
    if not isinstance(x_adv, torch.Tensor) or not x_adv.is_floating_point() or x_adv.shape != images.shape:
        got = (f'{tuple(x_adv.shape)} {x_adv.dtype}' if isinstance(x_adv, torch.Tensor) else type(x_adv).__name__)
        raise ValueError(f'attack {attack_name!r} must return float images of shape {tuple(images.shape)}, got {got}')
    lo, hi = torch.aminmax(x_adv.detach())
    lo, hi = float(lo), float(hi)
    if not (lo >= 0.0 and hi <= 1.0):  # also NaN
        raise ValueError(f'attack {attack_name!r} returned values in [{lo:.4g}, {hi:.4g}], outside the [0, 1] pixel '
                         'range: clamp its output (attacks work in pixel space)')
    return x_adv.detach()


def _check_num_classes(models: Mapping[str, nn.Module], source: Optional[nn.Module], images: torch.Tensor) -> None:
    probe = images[:1]
    sizes = {name: _correct_width(model, probe) for name, model in models.items()}
    if source is not None:
        sizes['<source>'] = _correct_width(source, probe)
    if len(set(sizes.values())) > 1:
        listing = ', '.join(f'{name}: {k}' for name, k in sizes.items())
        raise ValueError(f'models must share one number of classes, got {listing}; a black-box source must be '
                         'trained on the same label set as its targets')


def _correct_width(model: nn.Module, probe: torch.Tensor) -> int:
    with _attack_mode(model, probe.device.type), torch.no_grad():
        return int(model(probe).shape[-1])


def transfer_attack(
        source: nn.Module,
        targets: Mapping[str, nn.Module],
        loader: Iterable[Tuple[torch.Tensor, torch.Tensor]],
        attacks: Mapping[str, AttackFn],
        device: Optional[Union[str, torch.device]] = None,
        progress: Optional[bool] = None,
) -> RobustnessResult:
    """Black-box (transfer) evaluation: craft each attack on `source`, evaluate every target on it, one pass.

    Args:
        source: model whose gradients craft the examples (the ERM model in the paper).
        targets: name -> model evaluated on the transferred examples.
        loader: iterable of (images in [0, 1], int64 labels) batches.
        attacks: name -> `fn(model, images, labels) -> adversarial images`.
        device: device to move batches to.
        progress: tqdm progress bar; None shows it only when stderr is a terminal.

    Returns:
        `RobustnessResult` with 'clean' and 'black-box/<attack>' errors (%) per target.
    """
    if not attacks:
        raise ValueError('attacks is empty: pass at least one name -> attack function')
    return evaluate_robustness(
        targets, loader, source=source, transfer_attacks=attacks, device=device, progress=progress)
