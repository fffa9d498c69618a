"""ALPS losses: a soft-target loss evaluated at the adversarial label of the very forward being trained.

`ALPSSoftTargetCrossEntropy` and `ALPSBinaryCrossEntropy` are timm's `SoftTargetCrossEntropy` and
`BinaryCrossEntropy` with an `eps`; `ALPSLoss` wraps any other soft-target loss. The least likely class comes from
the detached logits of the training forward (the "fused" path: no extra forward pass).

Exactly once: `ALPSMixup(model=...)` returns targets that are already adversarial and marks them
(`is_adversarial_target`); every ALPS loss with eps > 0 refuses a marked target with a ValueError instead of shifting
it a second time. `mixup_fn.make_loss()` always returns the matching criterion.

The radius is a validated attribute that may change during training (`loss.eps = ...`, e.g. a ramp from 0 over the
first updates). With a mixer, set the mixer's `alps_eps` instead: it reaches the loss `make_loss()` made on the
fused path, and on the model path the mixer applies it while the loss keeps eps 0.

All ALPS losses compute in (at least) float32: half-precision logits are upcast and autocast is off inside the loss,
so the loss is returned in float32 as timm's losses are under CUDA autocast.

Cost. On CPU, `ALPSSoftTargetCrossEntropy` labels rows u + (v - u) e_y (one-hot or smoothed one-hot: every target
`ALPSMixup` and `FastCollateALPSMixup` return on the fused path) without sorting: a scatter, plus with smoothing
one "ranked before the true class" mask (`labels._one_class_label` owns the rule). The mixers note each row's class
on the targets they return (`mark_one_class`), so the loss does not re-derive it; without a note (a copy, a target
moved between devices, a user's own one-hot rows) the loss validates the rows and finds each row's class itself.
Every other row (mixtures, arbitrary distributions, eps/2 beyond the classes ranked before the true one) is
labelled by `adversarial_label`. The loss is then one dot product with log_softmax, whose backward is timm's. On
accelerators the whole label comes from `adversarial_label`.
"""
import contextlib
import math
import numbers
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .labels import _check_target, _one_class_label, adversarial_label, validate_target

__all__ = ['ALPSSoftTargetCrossEntropy', 'ALPSBinaryCrossEntropy', 'ALPSLoss', 'is_adversarial_target']

_MARK = '_alps_adversarial'  # attribute ALPSMixup(model=...) sets on the targets it already made adversarial
_ONE_CLASS = '_alps_one_class'  # attribute the mixers set on their fused-path targets (see `mark_one_class`)


def mark_adversarial(target: torch.Tensor) -> torch.Tensor:
    """Mark `target` as already adversarial (done by `ALPSMixup` on its model-handle path)."""
    setattr(target, _MARK, True)
    return target


def is_adversarial_target(target: torch.Tensor) -> bool:
    """True for targets `ALPSMixup(model=...)` already moved to the adversarial label.

    The mark lives on the tensor object the mixer returns: pass it on as is (timm's train.py does). A copy
    (`.clone()`, `.to()` onto another device or dtype, indexing) does not carry it.
    """
    return bool(getattr(target, _MARK, False))


def real_arg(name: str, value, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a finite float in the given range, or a ValueError/TypeError naming the argument.

    A Python or numpy real number or a one-element tensor is accepted; bools, strings, None and larger tensors are not.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f'{name} must be a number or a one-element tensor, got a tensor of shape '
                             f'{tuple(value.shape)}')
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f'{name} must be a real number, got {value!r} ({type(value).__name__})')
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if not math.isfinite(value):
        raise ValueError(f'{name}={value} must be a finite number in {interval}')
    if below or above:
        raise ValueError(f'{name}={value} is outside {interval}')
    return value


def eps_arg(name: str, eps) -> float:
    """Validate an L1 radius of the label ball."""
    if eps is None:
        raise TypeError(f'{name} must be a number in [0, 2], got None (use 0 to turn the adversarial label off)')
    try:
        return real_arg(name, eps, 0.0, 2.0)
    except ValueError as e:
        raise ValueError(f'{e}: it is an L1 radius between label distributions') from None


class _ALPSRadius(nn.Module):
    """Base of the ALPS losses: the radius `eps`, validated whenever it is set (at construction or later)."""

    @property
    def eps(self) -> float:
        """L1 radius of the label ball in [0, 2].

        It may be changed between steps, e.g. to ramp the radius in over the first updates (the remedy for the
        ALPS start stall, see the README): ``train_loss_fn.eps = 0.3 * min(1, step / warmup_updates)``. The value
        is validated as at construction (a ValueError/TypeError names it). A loss made by ``mixup_fn.make_loss()``
        follows the mixer's ``alps_eps`` on the fused path: set that instead.
        """
        return self._eps

    @eps.setter
    def eps(self, value) -> None:
        self._eps = self._check_eps(eps_arg('eps', value))

    def _check_eps(self, eps: float) -> float:
        """Constraints between eps and the loss's other arguments (none here)."""
        return eps


def as_class_target(target: torch.Tensor) -> torch.Tensor:
    """Accept targets as timm does: (B, 1) class indices become (B,), and any integer dtype becomes int64."""
    if isinstance(target, torch.Tensor) and not target.is_floating_point() and target.dtype != torch.bool:
        if target.ndim == 2 and target.shape[1] == 1:
            target = target.view(-1)
        if target.ndim == 1 and target.dtype != torch.int64:
            target = target.long()
    return target


def _check_logits(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 2:
        raise TypeError(f'logits must be a floating-point (B, K) tensor, got '
                        f'{getattr(x, "dtype", type(x).__name__)} of shape {tuple(getattr(x, "shape", ()))}')


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

    Validates the target the same way for every eps and refuses a target that is already adversarial.

    Args:
        x: (B, K) float32 logits.
        target: class indices (B,) / (B, 1) or distributions (B, K).
        eps: L1 radius.
        order: per-class scores whose order ranks the classes for the adversary (default: the logits).
    """
    target = as_class_target(target)
    if eps > 0:
        _refuse_adversarial(target, eps)
        label = adversarial_label(x if order is None else order, target, eps)
        return label if label.dtype == x.dtype else label.to(x.dtype)
    validate_target(target, x.shape[1], x.shape[0])
    if target.ndim == 1:
        return torch.zeros_like(x).scatter_(1, target.view(-1, 1), 1.0)
    return target.to(x.dtype)


def _refuse_adversarial(target: torch.Tensor, eps: float) -> None:
    if is_adversarial_target(target):
            raise ValueError(
                f'the target is already adversarial (it comes from ALPSMixup(model=...), which applied the ALPS '
                f'label), and this loss would shift it again with eps={eps}: build the loss with '
                f'mixup_fn.make_loss() once the model handle is set (it returns eps=0 on that path), or pass eps=0, '
                f'so the label is applied once')


def mark_one_class(target: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Note on the (B, K) `target` (done by the mixers) that row b is u + (v - u) e_index[b]: one class each.

    u and v are read from the target itself (row 0), so the note holds exactly the stored values.

    The fused loss then skips re-deriving each row's class from the dense target (validation, detection, argmax).
    The note holds the tensor's version counter, so an in-place change of the target voids it; copies do not carry
    it (they take the general path, with the same result).
    """
    if target.shape[0] and target.device.type == 'cpu':  # (only the CPU loss reads the note)
        index = index.numpy().copy()  # a copy: the caller may reuse its index tensor
        first = int(index[0])
        on, off = target[0, first].item(), target[0, (first + 1) % target.shape[1]].item()
        setattr(target, _ONE_CLASS, (target._version, index, off, on))
    return target


def _noted_one_class(target: torch.Tensor, shape: torch.Size):
    """(index (B,) numpy, off, on) from `mark_one_class`, or None if there is no valid note for this target."""
    note = getattr(target, _ONE_CLASS, None)
    if note is None or note[0] != target._version or target.shape != shape:
        return None
    return note[1:]


def _one_class_label_and_logp(x: torch.Tensor, y: np.ndarray, u, v, form: Optional[np.ndarray], budget: float):
    """log_softmax(x) and the ALPS label of rows u + (v - u) e_y (CPU, float32/64 logits), for the fused loss.

    The label comes from `labels._one_class_label` (no sort; it owns the rule). Rows it does not solve, and rows
    outside `form` (a (B,) bool mask of the rows of this form; None: all), are returned unsolved: the caller fills
    their label rows from the general path. Returns (label, logp, solved); the loss is -<label, logp> / B.
    """
    logp = F.log_softmax(x, dim=1)  # with autograd: its backward is timm's
    label, k_star, solved = _one_class_label(x.detach(), y, u, v, budget)
    # A NaN or -inf logit is the row minimum; a +inf one makes the whole log_softmax row NaN.
    if not np.isfinite(logp.detach().numpy()[np.arange(x.shape[0]), k_star]).all():
        raise ValueError('logits contain NaN or inf: the least likely class is undefined '
                         '(check the model/loss scale)')
    if form is not None:
        solved &= form
    return label, logp, solved


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
        _check_logits(x)
        with _no_autocast(x):
            x = _fp32(x)
            target = as_class_target(target)
            batch, k = x.shape
            if (self.eps > 0 and x.device.type == 'cpu' and isinstance(target, torch.Tensor) and target.ndim == 2
                    and target.is_floating_point() and batch):
                # Rows u + (v - u) e_y (every ALPSMixup target on the fused path) without the dense label; any other
                # row takes the dense path below. Same validation and errors as adversarial_label.
                _refuse_adversarial(target, self.eps)
                label, logp, solved = _one_class_label_and_logp(x, *self._one_class_form(x, target), self.eps / 2)
                if not solved.all():  # the other rows from the general path
                    index = torch.from_numpy((~solved).nonzero()[0])
                    label[index] = soft_label(x[index].detach(), target[index], self.eps)
                # one dot product over the batch: the same value and gradient as timm's sum(-label * logp).mean()
                return -torch.dot(label.view(-1), logp.view(-1)) / batch
            return self._dense_rows(x, target).mean()

    @staticmethod
    def _one_class_form(x: torch.Tensor, target: torch.Tensor):
        """(y, u, v, form) per row, numpy (B,): each row read as u + (v - u) e_y, `form` marking the rows that are.

        From the mixer's note when there is one (nothing to check: the mixer built the rows, all of this form,
        form None); otherwise the target is validated and each row's class found (rows of another form take the
        dense path).
        """
        batch, k = x.shape
        dtype = x.detach().numpy().dtype
        note = _noted_one_class(target, x.shape)
        if note is not None:
            index, off, on = note
            return index, dtype.type(off), dtype.type(on), None
        target, row_min = _check_target(target, k, batch)
        soft, row_min = target.detach().to(x.device, x.dtype), row_min.to(x.device, x.dtype)
        soft_np, u = soft.numpy(), row_min.numpy()[:, 0]
        one_class = torch.gt(soft, row_min, out=torch.empty_like(soft)).sum(dim=1).numpy() == 1
        y = soft_np.argmax(axis=1)
        return y, u, soft_np[np.arange(batch), y], one_class

    def _dense_rows(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        rho = soft_label(x, target, self.eps)
        return torch.sum(-rho * F.log_softmax(x, dim=-1), dim=-1)

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
        self.smooth_dense = bool(smooth_dense)
        self.eps = eps  # validated by the property, after smooth_dense (which rules out eps > 0)
        self.smoothing = real_arg('smoothing', smoothing, 0.0, 1.0, high_open=True)
        self.target_threshold = None if target_threshold is None else real_arg(
            'target_threshold', target_threshold, 0.0, 1.0, high_open=True)
        if reduction not in ('mean', 'sum', 'none'):
            raise ValueError(f"reduction={reduction!r} is unknown; use 'mean', 'sum' or 'none'")
        # numbers, sequences and numpy arrays become float tensors, as timm does for pos_weight
        if pos_weight is not None and not isinstance(pos_weight, torch.Tensor):
            pos_weight = torch.as_tensor(pos_weight, dtype=torch.float32)
        if weight is not None and not isinstance(weight, torch.Tensor):
            weight = torch.as_tensor(weight, dtype=torch.float32)
        self.reduction = reduction
        self.sum_classes = bool(sum_classes)
        self.register_buffer('weight', weight)
        self.register_buffer('pos_weight', pos_weight)
        # Without weights (or with one non-negative pos_weight) c_k is decreasing in z_k, so the logits rank the
        # classes exactly and no coefficient needs computing. Decided here, from the values the user passed.
        self._rank_by_logits = weight is None and (
            pos_weight is None or (pos_weight.numel() == 1 and float(pos_weight) >= 0))

    def _check_eps(self, eps: float) -> float:
        if eps > 0 and self.smooth_dense:
            raise ValueError(f'eps={eps} with smooth_dense=True: smooth_dense smooths multi-label targets towards '
                             f'0.5; those rows are not label distributions, so ALPS has no ball around them: use '
                             f'smooth_dense=False or eps=0')
        return eps

    def base_target(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The (B, K) target timm's BinaryCrossEntropy would train on (smoothed, thresholded), before the shift."""
        target = as_class_target(target)
        batch_size, num_classes = x.shape
        if target.ndim == 1:
            validate_target(target, num_classes, batch_size)
            off = self.smoothing / num_classes
            target = torch.full_like(x, off).scatter_(1, target.view(-1, 1), 1.0 - self.smoothing + off)
        else:
            if not target.is_floating_point():
                raise TypeError(f'a 2-D (soft) target must be floating point, got dtype {target.dtype}')
            target = target.to(x.dtype)
            if self.smooth_dense and self.smoothing:
                target = target * (1.0 - self.smoothing) + 0.5 * self.smoothing
        if self.target_threshold is not None:
            target = target.gt(self.target_threshold).to(x.dtype)
            if self.eps > 0 and target.device.type == 'cpu' and not bool((target.sum(1) == 1).all()):
                # (on accelerators adversarial_label's own check catches it without a host sync)
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
        _check_logits(x)
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
        _check_logits(x)
        with _no_autocast(x):
            x = _fp32(x)
            return self.base_loss(x, soft_label(x, target, self.eps))

    def extra_repr(self) -> str:
        return f'eps={self.eps}'
