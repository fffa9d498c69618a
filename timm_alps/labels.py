"""Adversarial labels: the closed-form inner maximisation of ALPS (Theorem 1 of Guo et al., 2021).

For logits f(x) and a label distribution y, ALPS trains on the label

    rho = argmax_{t in simplex, ||t - y||_1 <= eps}  sum_k t_k * CE(f(x), k)

The objective is linear in t, so moving mass d from class j to class k changes it by d * (CE_k - CE_j) and
spends 2d of the L1 budget. The best destination is therefore the least likely class k* = argmin logits, and the
best sources are the classes with the smallest loss (largest logit) that still hold mass: a fractional knapsack
solved exactly by taking greedily in that order until eps / 2 has moved. For a one-hot y this is Theorem 1:
rho = (1 - eps/2) y + (eps/2) onehot(k*).

The greedy order is the stable descending order of the logits (among equal logits the lower index gives first);
classes tied with the minimum logit give nothing (moving mass between them gains nothing), and k* is the lowest
index among them.

Cost. A general row needs that order, i.e. a sort. The rows ALPS actually sees do not: class indices, label-smoothed
one-hot rows, and MixUp/CutMix rows (two classes plus uniform smoothing) all have the form

    y = u + a * onehot(i) + b * onehot(j)        (u >= 0 the row minimum, a, b >= 0)

Along the greedy order such a row is a run of classes holding u each, the "special" class i, another run of u's,
j, and a last run. The greedy cut falls either on i or j (a partial take there, every class before it drained
completely: one comparison against the special's logit finds them) or strictly inside a run of u's, or past
every donor. Only the run case needs to know which classes of the run come first, i.e. a sort; those rows (for
instance smoothing s > eps/2 with many classes ranked above the true one) fall back to the sorted path, every
other row costs a handful of O(K) passes.
"""
import operator
from typing import Optional, Tuple

import torch

__all__ = ['adversarial_label', 'validate_target']

# Tolerance on the row sums of a soft target, by the target's dtype: fp16 rows of a smoothed 1000-class label sum
# to 1 only within ~1e-3, bf16 ones within ~1e-2.
_ROW_SUM_ATOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2}
_DEFAULT_ATOL = 1e-4
# The fast path encodes class indices as floats of the compute dtype: exact below 2**24 in fp32.
_MAX_FAST_CLASSES = 2 ** 24


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


def _is_index_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _check_target(
        target: torch.Tensor,
        num_classes: int,
        batch_size: Optional[int],
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Validate a target; return it as (B,) indices, or as (B, K) rows together with their minimum (B, 1) fp32+."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f'target must be a torch.Tensor, got {type(target).__name__}')
    if batch_size is not None and (target.ndim == 0 or target.shape[0] != batch_size):
        raise ValueError(f'target has batch size {tuple(target.shape)[:1]} but the input batch has {batch_size} rows')
    if target.ndim == 1 or (target.ndim == 2 and target.shape[1] == 1 and not target.is_floating_point()):
        # Class indices, (B,) or (B, 1) as some loaders return them; any integer dtype, as timm accepts.
        if not _is_index_dtype(target.dtype):
            raise TypeError(f'a (B,) or (B, 1) target must hold integer class indices, got dtype {target.dtype}')
        target = target.reshape(-1)
        if target.numel():
            low, high = torch.aminmax(target)
            _check((low >= 0) & (high < num_classes),
                   f'class index out of range: targets must lie in [0, {num_classes}) (num_classes={num_classes})')
        return target, None
    if target.ndim != 2:
        raise ValueError(f'target must be class indices (B,) or soft labels (B, K), got shape {tuple(target.shape)}')
    if not target.is_floating_point():
        raise TypeError(f'a 2-D (soft) target must be floating point, got dtype {target.dtype}')
    if target.shape[1] != num_classes:
        raise ValueError(f'soft target has {target.shape[1]} classes but num_classes={num_classes}')
    stats_dtype = torch.promote_types(target.dtype, torch.float32)
    row_min = target.amin(dim=1, keepdim=True).to(stats_dtype)  # NaN propagates, so NaN rows fail below
    if target.numel():
        atol = _ROW_SUM_ATOL.get(target.dtype, _DEFAULT_ATOL)
        row_sum = target.sum(dim=1, dtype=stats_dtype)
        _check((row_min.min() >= 0) & ((row_sum - 1).abs().max() <= atol),
               'soft target rows must be non-negative and sum to 1 (a probability distribution per sample)')
    return target, row_min


def validate_target(target: torch.Tensor, num_classes: int, batch_size: Optional[int] = None) -> None:
    """Check class indices (B,) or (B, 1) (any integer dtype) or a soft (B, K) target against `num_classes`.

    Soft rows must be non-negative and sum to 1 within 1e-4 (1e-2 for fp16, 2e-2 for bf16 targets, whose rounding
    is that coarse). On an accelerator the value checks run on the device without a host sync (see `_check`).

    Raises:
        TypeError: the target is neither integer indices nor a floating-point distribution.
        ValueError: wrong shape, an index outside [0, num_classes), or a soft row that is negative or does not sum
            to 1.
    """
    _check_target(target, num_classes, batch_size)


def _first_argmin(z: torch.Tensor, z_min: torch.Tensor, work: torch.Tensor, index_from_k: torch.Tensor):
    """Lowest index of each row's minimum and the number of classes tied with it, using `work` as scratch.

    `torch.argmin(dim=1)` is not vectorised on CPU (about 8 memory passes' worth); an equality mask times
    (index - K) reduced with amin gives the first minimum in 3 passes, ties included.
    """
    torch.eq(z, z_min, out=work)
    n_min = work.sum(dim=1)
    k_star = work.mul_(index_from_k).amin(dim=1).add_(z.shape[1]).long()
    return k_star, n_min


def _sorted_label(z: torch.Tensor, soft: torch.Tensor, budget: float, k_star: torch.Tensor) -> torch.Tensor:
    """The greedy transfer for arbitrary rows: sort by logit (stable, descending) and take along that order."""
    order = z.argsort(dim=1, descending=True, stable=True)
    donors = z > z.gather(1, k_star.view(-1, 1))  # classes tied with the minimum give nothing
    mass = (soft * donors).gather(1, order)
    taken_before = mass.cumsum(dim=1) - mass
    take = (budget - taken_before).clamp(min=0).minimum(mass)
    take = torch.zeros_like(soft).scatter_(1, order, take)
    label = soft - take
    return label.scatter_add_(1, k_star.view(-1, 1), take.sum(dim=1, keepdim=True))


def _not_before(z: torch.Tensor, index: torch.Tensor, ar: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[b, c] = 1.0 where class c does NOT come before class index[b] in the stable descending logit order.

    c comes before s iff z_c > z_s, or z_c == z_s and c < s. Both cases are one comparison z_c <= thr_c against
    thr_c = z_s for c >= s and the next float below z_s for c < s; thr is built in `out` and compared in place.
    """
    z_s = z.gather(1, index)
    below = torch.nextafter(z_s, torch.full_like(z_s, -float('inf'))) - z_s  # exact: adjacent floats
    torch.lt(ar, index.to(z.dtype), out=out)
    torch.addcmul(z_s, out, below, out=out)
    return torch.le(z, out, out=out)


def _structured_label(z: torch.Tensor, soft: torch.Tensor, row_min: torch.Tensor, budget: float, host: bool):
    """The exact label for rows of the form u + a e_i + b e_j, without sorting.

    Returns (label, sorted_rows, k_star): `sorted_rows` (B,) is True where the row has another form or the cut falls
    strictly inside a run of classes holding u; those rows of `label` are not valid and must come from
    `_sorted_label`. `k_star` (B,) is the first minimum of each row.
    """
    batch, k = z.shape
    ar = torch.arange(k, device=z.device, dtype=z.dtype)
    work = torch.empty_like(z)

    # The special classes: those holding more than the row minimum u (the true class, a mixing partner).
    torch.gt(soft, row_min, out=work)
    n_above = work.sum(dim=1)
    weighted = work.mul_(ar)
    last = weighted.amax(dim=1)  # the highest special index (0 if none)
    # On CPU a sync is free: when no row has two specials, skip the second. On accelerators always two.
    n_special = 1 if host and int(n_above.max()) <= 1 else 2
    if n_special == 1:
        specials = last.long().view(-1, 1)
    else:
        # With two above the minimum the other is (index sum - last); with fewer, pad with a class holding u,
        # which is exact: treating one of a run's classes as a special splits the run in two. (Rows with more
        # than two go to the sort; any valid index will do for them.)
        first = torch.where(n_above == 2, weighted.sum(dim=1) - last, torch.remainder(last + 1, k))
        specials = torch.stack([first, last], dim=1).long()
    z_min = z.amin(dim=1, keepdim=True)
    if host:
        k_star, n_min = _first_argmin(z, z_min, work, ar - k)
    else:
        k_star, n_min = z.argmin(dim=1), torch.eq(z, z_min, out=work).sum(dim=1)
    n_donors = (k - n_min).view(-1, 1)

    # For each special s: the mask of classes not before s, and the number of classes before s.
    masks = torch.empty((n_special,) + z.shape, dtype=z.dtype, device=z.device)
    for m in range(n_special):
        _not_before(z, specials[:, m:m + 1], ar, masks[m])
    before = (k - masks.sum(dim=2)).t()  # (B, n_special)
    z_s, t_s = z.gather(1, specials), soft.gather(1, specials)
    donor = (z_s > z_min).to(z.dtype)
    before = torch.where(donor > 0, before, n_donors)  # a non-donor special comes after every donor
    mass = t_s * donor

    # Put the specials in greedy order: pos[:, r] is the column of the r-th special along the order.
    if n_special == 2:
        swap = (z_s[:, 1] > z_s[:, 0]) | ((z_s[:, 1] == z_s[:, 0]) & (specials[:, 1] < specials[:, 0]))
        pos = torch.stack([swap.long(), 1 - swap.long()], dim=1)
        before, mass, donor = before.gather(1, pos), mass.gather(1, pos), donor.gather(1, pos)
    else:
        pos = torch.zeros((batch, 1), dtype=torch.long, device=z.device)
    # The order is: run_0, special_0, run_1, special_1, run_2, where run_r holds the u-only donors between.
    prev_before = torch.cat([torch.zeros_like(before[:, :1]), before[:, :-1] + donor[:, :-1]], dim=1)
    run_mass = (before - prev_before) * row_min  # the runs before each special
    last_run_mass = (n_donors - before[:, -1:] - donor[:, -1:]) * row_min
    special_end = torch.cumsum(run_mass + mass, dim=1)
    special_start = special_end - mass
    total = special_end[:, -1:] + last_run_mass
    everything = budget >= total  # every donor is drained completely
    # The cut is the first special whose mass reaches the budget, unless the budget runs out inside a run.
    reaches = budget <= special_end
    cut = reaches.long().argmax(dim=1, keepdim=True)
    cut_start = special_start.gather(1, cut)
    in_run = ~everything & (~reaches[:, -1:] | (budget < cut_start))
    sorted_rows = in_run.view(-1) | (n_above > 2)

    # label = soft without everything before the cut special, minus the remainder at the cut special; all to k*.
    column = pos.gather(1, cut).view(-1)
    keep = masks[0] if n_special == 1 else masks.view(-1, k).index_select(
        0, column * batch + torch.arange(batch, device=z.device))
    label = torch.mul(soft, keep, out=work)
    cut_class = specials.gather(1, column.view(-1, 1))
    take = (budget - cut_start).clamp(min=0).minimum(mass.gather(1, cut))
    taken = torch.where(everything, total, torch.full_like(total, budget))
    take = torch.where(everything, torch.zeros_like(take), take)
    if host:
        if bool(everything.any()):
            rows = everything.view(-1).nonzero().view(-1)
            label[rows] = soft[rows] * (z[rows] == z_min[rows])
    else:
        label = torch.where(everything, soft * (z == z_min), label)
    label.scatter_add_(1, cut_class, -take)
    label.scatter_add_(1, k_star.view(-1, 1), taken)
    return label, sorted_rows, k_star


def adversarial_label(
        logits: torch.Tensor,
        target: torch.Tensor,
        eps: float,
        num_classes: Optional[int] = None,
) -> torch.Tensor:
    """The exact worst-case label in the L1 ball of radius `eps` around `target` (ALPS, Theorem 1).

    Moves up to eps / 2 of probability mass onto the least likely class k* = argmin(logits) (ties: lowest index),
    taking it from the classes with the largest logit first (ties: lowest index first) and only where the target
    has mass. A one-hot target becomes (1 - eps/2) at its class and eps/2 at k*; if k* is the target class the
    label is unchanged. Costs O(B * K) for class indices, smoothed one-hot rows and two-class mixtures with
    smoothing (see the module docstring); other rows are sorted.

    Args:
        logits: (B, K) predictions of the model on the (perturbed) inputs. Only their order matters; no gradient
            flows into the label.
        target: class indices (B,) or (B, 1) of any integer dtype, or label distributions (B, K), e.g.
            label-smoothed or MixUp/CutMix targets.
        eps: L1 radius in [0, 2]; the paper uses eps in (0, 0.5).
        num_classes: K; defaults to logits.shape[1] and must agree with it when given.

    Returns:
        (B, K) label distributions on the device of `logits`, in at least float32: fp16/bf16 logits give a float32
        label (computed in float32, so rows sum to 1 to float32 precision; cast the logits to float32 for the
        loss as well, as timm's losses do under autocast), float64 logits a float64 label. Rows whose logits are
        not finite raise a ValueError on CPU; on an accelerator they become NaN (so the loss is NaN and the
        training loop stops) instead of costing a host sync per step.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.ndim != 2:
        raise TypeError(f'logits must be a floating-point (B, K) tensor, got '
                        f'{getattr(logits, "dtype", type(logits).__name__)} of shape {tuple(getattr(logits, "shape", ()))}')
    if isinstance(eps, torch.Tensor) and eps.numel() != 1:
        raise ValueError(f'eps must be a single number, got a tensor of shape {tuple(eps.shape)}')
    if not 0.0 <= float(eps) <= 2.0:
        raise ValueError(f'eps={float(eps)} is outside [0, 2]: it is an L1 radius between label distributions')
    batch_size, k = logits.shape
    if num_classes is not None:
        try:
            num_classes = operator.index(num_classes)  # int, numpy or 0-d torch integers
        except TypeError:
            raise TypeError(f'num_classes must be an integer, got {num_classes!r}') from None
        if num_classes != k:
            raise ValueError(f'num_classes={num_classes} but logits have {k} classes')
    target, row_min = _check_target(target, k, batch_size)

    dtype = torch.promote_types(logits.dtype, torch.float32)
    host = logits.device.type == 'cpu'
    z = logits.detach().to(dtype)
    finite = torch.isfinite(z.amin(dim=1, keepdim=True)) & torch.isfinite(z.amax(dim=1, keepdim=True))
    if host and not bool(finite.all()):
        raise ValueError('logits contain NaN or inf: the least likely class is undefined (check the model/loss scale)')
    budget = float(eps) / 2

    if row_min is None:  # class indices: Theorem 1, no sort
        index = target.to(z.device, torch.long).view(-1, 1)
        label = torch.zeros_like(z).scatter_(1, index, 1.0)
        if budget > 0 and batch_size:
            if host:
                k_star, _ = _first_argmin(z, z.amin(dim=1, keepdim=True), torch.empty_like(z), torch.arange(
                    k, dtype=dtype) - k)
            else:
                k_star = z.argmin(dim=1)
            moved = budget * (k_star != index.view(-1)).to(dtype).view(-1, 1)
            label.scatter_add_(1, index, -moved).scatter_add_(1, k_star.view(-1, 1), moved)
    else:
        soft = target.detach().to(device=z.device, dtype=dtype)
        row_min = row_min.to(device=z.device, dtype=dtype)
        if budget == 0 or not batch_size:
            label = soft.clone()
        elif k >= _MAX_FAST_CLASSES and dtype == torch.float32:
            label = _sorted_label(z, soft, budget, z.argmin(dim=1))
        else:
            label, sorted_rows, k_star = _structured_label(z, soft, row_min, budget, host)
            if host:
                if bool(sorted_rows.any()):
                    rows = sorted_rows.nonzero().view(-1)
                    label[rows] = _sorted_label(z[rows], soft[rows], budget, k_star[rows])
            else:  # no host sync: compute the sorted label for the batch and keep it where needed
                label = torch.where(sorted_rows.view(-1, 1), _sorted_label(z, soft, budget, k_star), label)
    # NaN-poison rows with non-finite logits (only reachable on accelerators, see above).
    return label if host else torch.where(finite, label, torch.full_like(label, float('nan')))
