"""Adversarial labels: the closed-form inner maximisation of ALPS (Theorem 1 of Guo et al., 2021).

For logits f(x) and a label distribution y, ALPS trains on the label

    rho = argmax_{t in simplex, ||t - y||_1 <= eps}  sum_k t_k * CE(f(x), k)

The objective is linear in t, so moving mass d from class j to class k changes it by d * (CE_k - CE_j) and
spends 2d of the L1 budget. The best destination is therefore the least likely class k* = argmin logits, and the
best sources are the classes with the smallest loss (largest logit) that still hold mass: a fractional knapsack
solved exactly by taking greedily in that order until eps / 2 has moved. For a one-hot y this is Theorem 1:
rho = (1 - eps/2) y + (eps/2) onehot(k*).
"""
from typing import Optional

import torch

__all__ = ['adversarial_label', 'validate_target']

# Tolerance on the row sums of a soft target: fp16 rows of a smoothed 1000-class label sum to 1 within ~1e-3.
_ROW_SUM_ATOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _check(cond: torch.Tensor, message: str) -> None:
    """Raise ValueError if `cond` is False, without a host sync on accelerators.

    On CPU the check is free, so it raises a proper ValueError. On an accelerator, reading the result back would
    stall the stream every step; `torch._assert_async` checks on the device instead and fails the next sync.
    """
    if cond.device.type == 'cpu':
        if not bool(cond):
            raise ValueError(message)
    else:
        torch._assert_async(cond, message)


def validate_target(target: torch.Tensor, num_classes: int, batch_size: Optional[int] = None) -> None:
    """Check a class-index (B,) or soft (B, K) target against `num_classes` (and the batch size if given).

    Raises:
        TypeError: the target is neither integer indices nor a floating-point distribution.
        ValueError: wrong shape, an index outside [0, num_classes), or a soft row that is negative or does not sum
            to 1.
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f'target must be a torch.Tensor, got {type(target).__name__}')
    if batch_size is not None and (target.ndim == 0 or target.shape[0] != batch_size):
        raise ValueError(f'target has batch size {tuple(target.shape)[:1]} but the input batch has {batch_size} rows')
    if target.ndim == 1:
        if target.is_floating_point() or target.dtype == torch.bool:
            raise TypeError(f'a 1-D target must hold integer class indices, got dtype {target.dtype}')
        if target.numel():
            _check((target.min() >= 0) & (target.max() < num_classes),
                   f'class index out of range: targets must lie in [0, {num_classes}) (num_classes={num_classes})')
    elif target.ndim == 2:
        if not target.is_floating_point():
            raise TypeError(f'a 2-D (soft) target must be floating point, got dtype {target.dtype}')
        if target.shape[1] != num_classes:
            raise ValueError(f'soft target has {target.shape[1]} classes but num_classes={num_classes}')
        if target.numel():
            atol = _ROW_SUM_ATOL.get(target.dtype, 1e-4)
            sums = target.float().sum(dim=1)
            _check((target.min() >= 0) & ((sums - 1).abs().max() <= atol),
                   'soft target rows must be non-negative and sum to 1 (a probability distribution per sample)')
    else:
        raise ValueError(f'target must be class indices (B,) or soft labels (B, K), got shape {tuple(target.shape)}')


def adversarial_label(
        logits: torch.Tensor,
        target: torch.Tensor,
        eps: float,
        num_classes: Optional[int] = None,
) -> torch.Tensor:
    """The exact worst-case label in the L1 ball of radius `eps` around `target` (ALPS, Theorem 1).

    Moves up to eps / 2 of probability mass onto the least likely class k* = argmin(logits) (ties: lowest index),
    taking it from the classes with the largest logit first and only where the target has mass. A one-hot target
    becomes (1 - eps/2) at its class and eps/2 at k*; if k* is the target class the label is unchanged.

    Args:
        logits: (B, K) predictions of the model on the (perturbed) inputs. Only their order matters; no gradient
            flows into the label.
        target: class indices (B,) or label distributions (B, K), e.g. label-smoothed or MixUp/CutMix targets.
        eps: L1 radius in [0, 2]; the paper uses eps in (0, 0.5).
        num_classes: K; defaults to logits.shape[1] and must agree with it when given.

    Returns:
        (B, K) tensor of label distributions with the dtype and device of `logits`. Rows whose logits are not
        finite raise a ValueError on CPU; on an accelerator they become NaN (so the loss is NaN and the training
        loop stops) instead of costing a host sync per step.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.ndim != 2:
        raise TypeError(f'logits must be a floating-point (B, K) tensor, got '
                        f'{getattr(logits, "dtype", type(logits).__name__)} of shape {tuple(getattr(logits, "shape", ()))}')
    if not 0.0 <= float(eps) <= 2.0:
        raise ValueError(f'eps={eps} is outside [0, 2]: it is an L1 radius between label distributions')
    batch_size, k = logits.shape
    if num_classes is not None and num_classes != k:
        raise ValueError(f'num_classes={num_classes} but logits have {k} classes')
    validate_target(target, k, batch_size)

    logits = logits.detach()
    finite = torch.isfinite(logits).all(dim=1, keepdim=True)
    if logits.device.type == 'cpu' and not bool(finite.all()):
        raise ValueError('logits contain NaN or inf: the least likely class is undefined (check the model/loss scale)')

    least_likely = logits.argmin(dim=1, keepdim=True)  # first minimum: deterministic ties
    budget = float(eps) / 2
    if target.ndim == 1:
        # One-hot fast path (Theorem 1), no sort needed.
        label = torch.zeros_like(logits).scatter_(1, target.view(-1, 1), 1.0)
        moved = budget * (least_likely.view(-1) != target).to(logits.dtype)
        label.scatter_add_(1, target.view(-1, 1), -moved.view(-1, 1))
        label.scatter_add_(1, least_likely, moved.view(-1, 1))
    else:
        # Compute the greedy transfer in at least fp32 so fp16/bf16 rows still sum to 1.
        soft = target.detach().to(device=logits.device, dtype=torch.promote_types(logits.dtype, torch.float32))
        order = logits.argsort(dim=1, descending=True, stable=True)
        # Classes tied with the minimum logit lose nothing by giving mass to k*: leave them alone.
        donors = logits > logits.gather(1, least_likely)
        mass = (soft * donors).gather(1, order)
        taken_before = mass.cumsum(dim=1) - mass
        take = (budget - taken_before).clamp(min=0).minimum(mass)
        take = torch.zeros_like(soft).scatter_(1, order, take)
        label = soft - take
        label.scatter_add_(1, least_likely, take.sum(dim=1, keepdim=True))
        label = label.to(logits.dtype)
    # NaN-poison rows with non-finite logits (only reachable on accelerators, see above).
    return torch.where(finite, label, torch.full_like(label, float('nan')))
