"""ALPS losses: a soft-target loss evaluated at the adversarial label of the very forward being trained.

`ALPSSoftTargetCrossEntropy` and `ALPSBinaryCrossEntropy` are timm's `SoftTargetCrossEntropy` and
`BinaryCrossEntropy` with an `eps`; `ALPSLoss` wraps any other soft-target loss. The least likely class comes from
the detached logits of the training forward (the "fused" path: no extra forward pass), and the label from
`timm_alps.labels` (one exact rule, torch ops on every device).

The radius is the loss's own validated attribute `eps`; it may change during training (`EpsWarmup`, or
`loss.eps = ...`). A loss made by `mixup_fn.make_loss()` is also set by the mixer's `alps_eps`.

Exactly once: `ALPSMixup(model=...)` applies the label itself and returns targets marked as already adversarial
(`is_adversarial_target`). The mark is best effort (it lives on the tensor object the mixer returns; a copy does not
carry it) and only makes a misuse louder: an ALPS loss with eps > 0 refuses a marked target instead of shifting it
a second time. `mixup_fn.make_loss()` always returns the matching criterion, which is what decides the result.

All ALPS losses compute in (at least) float32: half-precision logits are upcast and autocast is off inside the loss,
so the loss is returned in float32 as timm's losses are under CUDA autocast.
"""
import contextlib
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import bool_arg, check_weight_length, choice_arg, eps_arg, real_arg, weight_arg
from .labels import check_logits, label_from_checked, validate_target

__all__ = ['ALPSSoftTargetCrossEntropy', 'ALPSBinaryCrossEntropy', 'ALPSLoss', 'is_adversarial_target']

_MARK = '_alps_adversarial'  # best-effort guard set by ALPSMixup(model=...) on the targets it made adversarial


def mark_adversarial(target: torch.Tensor) -> torch.Tensor:
    """Mark `target` as already adversarial (done by `ALPSMixup` on its model-handle path)."""
    setattr(target, _MARK, True)
    return target


def is_adversarial_target(target: torch.Tensor) -> bool:
    """True for targets `ALPSMixup(model=...)` already moved to the adversarial label.

    Best effort: the mark lives on the tensor object the mixer returns (timm's train.py passes it on as is). A copy
    (`.clone()`, `.to()` onto another device or dtype, indexing) does not carry it.
    """
    return bool(getattr(target, _MARK, False))


class _ALPSRadius(nn.Module):
    """Base of the ALPS losses: the radius `eps`, validated whenever it is set (at construction or later)."""

    @property
    def eps(self) -> float:
        """L1 radius of the label ball in [0, 2].

        It may be changed between steps, e.g. ramped in over the first updates by `EpsWarmup` (the remedy for the
        ALPS start stall). The value is validated as at construction; a failed set leaves the loss as it was.
        """
        return self._eps

    @eps.setter
    def eps(self, value) -> None:
        self._eps = self._check_eps(eps_arg('eps', value))

    def _check_eps(self, eps: float) -> float:
        """Constraints between eps and the loss's other arguments (none here)."""
        return eps


def _fp32(x: torch.Tensor) -> torch.Tensor:
    # at least float32: fp16/bf16 logits are upcast, float64 stays
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _no_autocast(x: torch.Tensor):
    # Inside an autocast region the loss would run in half precision: turn it off (entering costs ~10 us, so only
    # when autocast is on).
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def soft_label(x: torch.Tensor, target: torch.Tensor, eps: float, order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The (B, K) training label of an ALPS loss: adversarial for eps > 0, the dense target for eps = 0.

    Validates the target the same way for every eps and refuses a target marked as already adversarial.

    Args:
        x: (B, K) float32 logits.
        target: class indices (B,) / (B, 1) or distributions (B, K).
        eps: L1 radius.
        order: per-class scores whose order ranks the classes for the adversary (default: the logits).
    """
    if eps > 0 and is_adversarial_target(target):
        raise ValueError(
            f'the target is already adversarial (it comes from ALPSMixup(model=...), which applied the ALPS label), '
            f'and this loss would shift it again with eps={eps}: build the loss with mixup_fn.make_loss() once the '
            f'model handle is set (it returns eps=0 on that path), or pass eps=0, so the label is applied once')
    target = validate_target(target, x.shape[1], x.shape[0], against_logits=True)
    if eps > 0:
        return label_from_checked(x if order is None else order, target, eps).to(x.dtype)
    if target.ndim == 1:
        return torch.zeros_like(x).scatter_(1, target.view(-1, 1).to(x.device), 1.0)
    return target.to(x.device, x.dtype)


class ALPSSoftTargetCrossEntropy(_ALPSRadius):
    """Drop-in for timm's `SoftTargetCrossEntropy` that trains on the ALPS adversarial label.

    The least likely class k* is read from the detached logits of the forward being trained, so ALPS costs no
    extra forward pass (the "fused" path). Pair it with `ALPSMixup(model=None)` or `FastCollateALPSMixup`, which
    return the plain (optionally smoothed) label of each sample; `mixup_fn.make_loss()` builds it for you.

    Args:
        eps: L1 radius of the label ball in [0, 2]; the paper uses (0, 0.5). eps=0 is exactly
            `SoftTargetCrossEntropy` (targets validated all the same).
    """

    def __init__(self, eps: float = 0.3):
        super().__init__()
        self.eps = eps  # validated by the property

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of -sum_k rho_k log softmax(x)_k, in float32.

        Args:
            x: (B, K) logits.
            target: class indices (B,) or (B, 1), or label distributions (B, K).
        """
        check_logits(x)
        with _no_autocast(x):
            x = _fp32(x)
            rho = soft_label(x.detach(), target, self.eps)
            # timm's sum(-rho * log_softmax(x)).mean() as one dot product: no (B, K) product to allocate
            return -torch.dot(rho.reshape(-1), F.log_softmax(x, dim=-1).reshape(-1)) / x.shape[0]

    def extra_repr(self) -> str:
        return f'eps={self.eps}'


class ALPSBinaryCrossEntropy(_ALPSRadius):
    """timm's `BinaryCrossEntropy` evaluated at the ALPS adversarial label.

    Per class, BCE is linear in the target with coefficient c_k = w_k (p_k softplus(-z_k) - softplus(z_k)), which
    is -z_k without `weight`/`pos_weight`. So over the L1 ball on the simplex the exact maximiser is the same
    greedy label as for cross-entropy, ranked by c_k: mass moves from the classes with the largest logit to the least
    likely class (with a per-class `weight` or `pos_weight`, the ranking uses c_k itself).

    Index targets are smoothed as timm does (on 1 - s + s/K, off s/K) before the shift. `target_threshold`
    binarises the base target as in timm and the ball is then taken around the binarised label: a smoothed one-hot
    becomes one-hot, then (1 - eps/2) on the class and eps/2 on k*, the exact worst case around the thresholded
    label (thresholding after the shift would erase the eps/2 mass). With eps > 0 every binarised row must hold
    exactly one class above the threshold; multi-hot rows (MixUp/CutMix targets) are not distributions and are
    refused.

    Args:
        eps: L1 radius of the label ball in [0, 2]; eps=0 is exactly timm's `BinaryCrossEntropy`.
        smoothing: label smoothing applied to class-index targets (timm's default 0.1).
        target_threshold: binarise the base targets above this value (see above).
        weight: per-class rescaling weight, as in `F.binary_cross_entropy_with_logits`.
        reduction: 'mean', 'sum' or 'none'.
        sum_classes: sum over classes before averaging over the batch (timm's `--bce-sum`).
        pos_weight: weight of positive examples, a number or a per-class tensor.
        smooth_dense: timm's multi-label smoothing of dense targets towards 0.5; multi-label rows are not
            distributions, so it is only accepted with eps=0.
    """

    def __init__(
            self,
            eps: float = 0.3,
            smoothing: float = 0.1,
            target_threshold: Optional[float] = None,
            weight: Optional[torch.Tensor] = None,
            reduction: str = 'mean',
            sum_classes: bool = False,
            pos_weight: Optional[Union[torch.Tensor, float]] = None,
            smooth_dense: bool = False,
    ):
        super().__init__()
        self.smooth_dense = bool_arg('smooth_dense', smooth_dense)
        self.eps = eps  # validated by the property, after smooth_dense (which rules out eps > 0)
        self.smoothing = real_arg('smoothing', smoothing, 0.0, 1.0, high_open=True)
        self.target_threshold = None if target_threshold is None else real_arg(
            'target_threshold', target_threshold, 0.0, 1.0, high_open=True)
        self.reduction = choice_arg('reduction', reduction, ('mean', 'sum', 'none'))
        self.sum_classes = bool_arg('sum_classes', sum_classes)
        # numbers, sequences and numpy arrays become float tensors, as timm does for pos_weight
        self.register_buffer('weight', weight_arg('weight', weight))
        self.register_buffer('pos_weight', weight_arg('pos_weight', pos_weight, low=0.0))
        # Without a weight (or with one pos_weight, which is >= 0) c_k is decreasing in z_k, so the logits rank the
        # classes exactly and no coefficient needs computing. Decided here, from the values the user passed.
        self._rank_by_logits = self.weight is None and (self.pos_weight is None or self.pos_weight.numel() == 1)

    def _check_eps(self, eps: float) -> float:
        if eps > 0 and self.smooth_dense:
            raise ValueError(f'eps={eps} with smooth_dense=True: smooth_dense smooths multi-label targets towards '
                             f'0.5; those rows are not label distributions, so ALPS has no ball around them: use '
                             f'smooth_dense=False or eps=0')
        return eps

    def base_target(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The (B, K) target timm's BinaryCrossEntropy would train on (smoothed, thresholded), before the shift."""
        batch_size, num_classes = x.shape
        if not (isinstance(target, torch.Tensor) and target.is_floating_point()):
            # class indices (or an error naming why not)
            target = validate_target(target, num_classes, batch_size, against_logits=True)
        if target.ndim == 1:
            off = self.smoothing / num_classes
            target = torch.full_like(x, off).scatter_(1, target.view(-1, 1).to(x.device), 1.0 - self.smoothing + off)
        else:
            if target.shape != x.shape:  # dense rows, multi-label ones included (no distribution check here)
                raise ValueError(f'target has shape {tuple(target.shape)} but the logits have {tuple(x.shape)}')
            target = target.to(x.device, x.dtype)
            if self.smooth_dense and self.smoothing:
                target = target * (1.0 - self.smoothing) + 0.5 * self.smoothing
        if self.target_threshold is not None:
            target = target.gt(self.target_threshold).to(x.dtype)
            if self.eps > 0 and target.device.type == 'cpu' and not bool((target.sum(1) == 1).all()):
                # (on accelerators the label's own row-sum check catches it without a host sync)
                raise ValueError(
                    f'target_threshold={self.target_threshold} leaves a row with no class or several classes above '
                    f'the threshold; ALPS needs one class per row (a distribution) to take the ball around: use a '
                    f'threshold between the smoothed off and on values, or target_threshold=None')
        return target

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """BCE-with-logits of x against the adversarial label, in float32.

        Args:
            x: (B, K) logits.
            target: class indices (B,) or (B, 1), or label distributions (B, K).
        """
        check_logits(x)
        check_weight_length('weight', self.weight, x.shape[1])
        check_weight_length('pos_weight', self.pos_weight, x.shape[1])
        if self.eps > 0 and is_adversarial_target(target):
            soft_label(x, target, self.eps)  # raises the "already adversarial" error
        with _no_autocast(x):
            x = _fp32(x)
            weight = None if self.weight is None else _fp32(self.weight)
            pos_weight = None if self.pos_weight is None else _fp32(self.pos_weight)
            target = self.base_target(x, target)
            if self.eps > 0:
                order = None
                if not self._rank_by_logits:
                    z = x.detach()
                    coef = (F.softplus(-z) if pos_weight is None else pos_weight * F.softplus(-z)) - F.softplus(z)
                    order = -(coef if weight is None else weight * coef)
                target = soft_label(x, target, self.eps, order=order)
            loss = F.binary_cross_entropy_with_logits(
                x, target, weight, pos_weight=pos_weight, reduction='none' if self.sum_classes else self.reduction)
            if self.sum_classes:
                loss = loss.sum(-1).mean()
            return loss

    def extra_repr(self) -> str:
        return (f'eps={self.eps}, smoothing={self.smoothing}, target_threshold={self.target_threshold}, '
                f'reduction={self.reduction!r}, sum_classes={self.sum_classes}')


class ALPSLoss(_ALPSRadius):
    """Any soft-target loss ``base_loss(logits, soft_target)`` evaluated at the ALPS adversarial label.

    The label is the exact worst case for cross-entropy (and for BCE, see `ALPSBinaryCrossEntropy`); for another
    loss it is the cross-entropy adversary, which is exact whenever the loss is linear in the target with a
    per-class coefficient ordered like the cross-entropy's (-log softmax).

    Args:
        base_loss: callable taking (float32 logits (B, K), float32 target distributions (B, K)). It must not
            transform the target itself (timm's `BinaryCrossEntropy` with `target_threshold` would erase the
            adversarial mass: use `ALPSBinaryCrossEntropy`).
        eps: L1 radius of the label ball in [0, 2].
    """

    def __init__(self, base_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], eps: float = 0.3):
        super().__init__()
        if not callable(base_loss):
            raise TypeError(f'base_loss must be a callable (logits, soft_target) -> loss, got '
                            f'{type(base_loss).__name__}')
        if isinstance(base_loss, (ALPSSoftTargetCrossEntropy, ALPSBinaryCrossEntropy, ALPSLoss)):
            raise ValueError(f'base_loss is already an ALPS loss ({type(base_loss).__name__}): wrapping it would '
                             f'shift the label twice; use it directly')
        if getattr(base_loss, 'target_threshold', None) is not None:
            raise ValueError(f'base_loss binarises its targets (target_threshold={base_loss.target_threshold}), '
                             f'which erases the adversarial eps/2 mass: use '
                             f'ALPSBinaryCrossEntropy(target_threshold=...)')
        self.eps = eps  # validated by the property
        self.base_loss = base_loss

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_logits(x)
        with _no_autocast(x):
            x = _fp32(x)
            return self.base_loss(x, soft_label(x, target, self.eps))

    def extra_repr(self) -> str:
        return f'eps={self.eps}'
