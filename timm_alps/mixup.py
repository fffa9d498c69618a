"""ALPSMixup: the input side of ALPS, shaped like `timm.data.Mixup`.

ALPS perturbs each sample towards a random partner, x~ = lam * x + (1 - lam) * x', with lam ~ Beta(alpha, beta)
whose mode is near 1, and keeps the sample's *own* label, which is then moved adversarially inside an L1 ball
(see `timm_alps.labels`). Swap `Mixup` for `ALPSMixup` and `SoftTargetCrossEntropy` for
`ALPSSoftTargetCrossEntropy` (or call `mixup_fn.make_loss()`), nothing else in a timm pipeline changes.
"""
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from .labels import adversarial_label, validate_target
from .loss import ALPSSoftTargetCrossEntropy

__all__ = ['ALPSMixup']

_MODES = ('elem', 'pair', 'batch')


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP's forward would register gradient-sync hooks and broadcast buffers; the label forward must do neither.
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


class ALPSMixup:
    """ALPS perturbation of a batch: mix every sample with a random partner, keep (and adversarially shift) its label.

    Args:
        alps_alpha: alpha of the Beta(alpha, beta) distribution of the mixing weight lam of the sample itself.
        alps_beta: beta of that distribution; the paper puts the mode (alpha-1)/(alpha+beta-2) in (0.75, 1),
            e.g. Beta(8, 2) has mode 0.875.
        alps_eps: L1 radius of the adversarial label ball in [0, 2] (paper: (0, 0.5)).
        prob: probability that a sample (`elem`), pair (`pair`) or the batch (`batch`) is mixed at all. The
            adversarial label applies to every sample: in ALPS the label ball is independent of the input mix.
        mode: 'elem' draws lam per sample, 'pair' per pair of partners (each mixes with the other), 'batch' once.
        label_smoothing: smoothing of the base label before the adversarial shift, as in timm's Mixup.
        num_classes: number of classes K of the targets.
        model: optional model handle. When given, k* comes from one extra forward of the mixed batch under
            `torch.no_grad()` (buffers such as BatchNorm statistics are restored afterwards) and the returned target
            is already adversarial; pair it with `make_loss()`. When None (recommended, zero extra cost), the target
            is the base label and `ALPSSoftTargetCrossEntropy` applies the shift from the training forward.
        seed: seed of the private generator for lam, partners and `prob`; None draws one from torch's global RNG on
            first use (so `torch.manual_seed` and per-rank seeding control it).
    """

    def __init__(
            self,
            alps_alpha: float = 8.0,
            alps_beta: float = 2.0,
            alps_eps: float = 0.3,
            prob: float = 1.0,
            mode: str = 'elem',
            label_smoothing: float = 0.0,
            num_classes: int = 1000,
            model: Optional[nn.Module] = None,
            seed: Optional[int] = None,
    ):
        for name, value in (('alps_alpha', alps_alpha), ('alps_beta', alps_beta)):
            if not value > 0:
                raise ValueError(f'{name}={value} must be > 0 (a Beta distribution parameter)')
        if not 0.0 <= alps_eps <= 2.0:
            raise ValueError(f'alps_eps={alps_eps} is outside [0, 2]: it is an L1 radius between label distributions')
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f'prob={prob} is outside [0, 1]')
        if mode not in _MODES:
            raise ValueError(f"mode={mode!r} is unknown; use one of {', '.join(map(repr, _MODES))}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f'label_smoothing={label_smoothing} is outside [0, 1)')
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f'num_classes={num_classes!r} must be an integer >= 2')
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f'model must be an nn.Module or None, got {type(model).__name__}')
        self.alps_alpha = float(alps_alpha)
        self.alps_beta = float(alps_beta)
        self.alps_eps = float(alps_eps)
        self.prob = float(prob)
        self.mode = mode
        self.label_smoothing = float(label_smoothing)
        self.num_classes = num_classes
        self.model = model
        self.seed = seed
        self.mixup_enabled = True  # as in timm: set False to stop mixing (e.g. for the last epochs)
        self._generator: Optional[torch.Generator] = None
        self._pending_state: Optional[torch.Tensor] = None

    def set_model(self, model: Optional[nn.Module]) -> None:
        """Switch to (model) or away from (None) the model-handle path, e.g. after wrapping the model in DDP."""
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f'model must be an nn.Module or None, got {type(model).__name__}')
        self.model = model

    def make_loss(self) -> ALPSSoftTargetCrossEntropy:
        """The criterion that matches this mixer: the fused ALPS loss, or eps=0 when targets are already adversarial."""
        return ALPSSoftTargetCrossEntropy(eps=0.0 if self.model is not None else self.alps_eps)

    # -- random state -------------------------------------------------------------------------------------------
    def _rng(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            generator = torch.Generator(device=device)
            if self._pending_state is not None:
                generator.set_state(self._pending_state)
                self._pending_state = None
            else:
                seed = self.seed if self.seed is not None else int(torch.randint(2 ** 62, (1,)).item())
                generator.manual_seed(seed)
            self._generator = generator
        return self._generator

    def state_dict(self) -> Dict[str, Any]:
        """Generator state, so a resumed run draws the same lam and partners."""
        state = self._generator.get_state() if self._generator is not None else self._pending_state
        return {'generator': state, 'device': str(self._generator.device) if self._generator is not None else None}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._generator = None
        self._pending_state = state_dict.get('generator')

    def _beta(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        # Beta(a, b) = Ga / (Ga + Gb); torch.distributions cannot take a generator, _standard_gamma can.
        ga = torch._standard_gamma(torch.full((n,), self.alps_alpha, device=device), generator=generator)
        gb = torch._standard_gamma(torch.full((n,), self.alps_beta, device=device), generator=generator)
        return ga / (ga + gb)

    def _keep_mask(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=device) < self.prob

    def sample(self, batch_size: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Draw (lam, partner) for a batch: lam (B,) in [0, 1] (1 where not mixed), partner (B,) indices."""
        g = self._rng(device)
        if self.mode == 'pair':
            # Pair up a random permutation; an odd batch leaves one sample paired with itself (unmixed).
            perm = torch.randperm(batch_size, generator=g, device=device)
            n = batch_size // 2
            first, second = perm[:n], perm[n:2 * n]
            partner = torch.arange(batch_size, device=device)
            partner[first], partner[second] = second, first
            lam_pair = torch.where(self._keep_mask(n, g, device), self._beta(n, g, device), 1.0)
            lam = torch.ones(batch_size, device=device)
            lam[first], lam[second] = lam_pair, lam_pair
            return lam, partner
        partner = torch.randperm(batch_size, generator=g, device=device)
        n = batch_size if self.mode == 'elem' else 1
        lam = torch.where(self._keep_mask(n, g, device), self._beta(n, g, device), 1.0)
        return lam.expand(batch_size), partner

    # -- labels -------------------------------------------------------------------------------------------------
    def base_target(self, target: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The sample's own label as a (B, K) float32 distribution, smoothed as in timm's Mixup."""
        target = target.to(device)
        if target.ndim == 1:
            off = self.label_smoothing / self.num_classes
            soft = torch.full((target.shape[0], self.num_classes), off, device=device)
            return soft.scatter_(1, target.view(-1, 1), 1.0 - self.label_smoothing + off)
        soft = target.float()
        return soft * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes

    @torch.no_grad()
    def _label_logits(self, x: torch.Tensor) -> torch.Tensor:
        module = _unwrap(self.model)
        buffers = list(module.buffers())
        saved = [b.clone() for b in buffers]
        try:
            return module(x)
        finally:
            # BatchNorm in train mode updates running stats and num_batches_tracked: put them back untouched.
            if buffers:
                torch._foreach_copy_(buffers, saved)

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Perturb a batch.

        Args:
            x: float images (B, C, H, W) (any shape with the batch first).
            target: class indices (B,) or label distributions (B, K).

        Returns:
            (x_mixed, soft_target): soft_target is (B, K) float32; already adversarial when a model handle is set.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'x must be a torch.Tensor, got {type(x).__name__}')
        if not x.is_floating_point():
            raise TypeError(f'ALPSMixup needs floating-point images, got dtype {x.dtype}: convert first, '
                            f'e.g. x.float().div(255) and normalise')
        if x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(f'x must be a non-empty batch with the batch dimension first, got shape {tuple(x.shape)}')
        validate_target(target, self.num_classes, x.shape[0])

        if self.mixup_enabled:
            lam, partner = self.sample(x.shape[0], x.device)
            lam = lam.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
            x = torch.lerp(x[partner], x, lam)  # lam * x + (1 - lam) * x[partner]
        soft = self.base_target(target, x.device)
        if self.model is not None and self.alps_eps > 0:
            soft = adversarial_label(self._label_logits(x).float(), soft, self.alps_eps)
        return x, soft
