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
j, and a last run. The greedy cut falls on i or j (a partial take there, every class before it drained
completely: one comparison against the special's logit finds them), past every donor, or strictly inside a run
of u's. Only the last case needs to know which classes of the run come first, i.e. a sort: smoothing s > eps/2
with many classes ranked above the true one, or a MixUp partner holding less than eps/2 followed by a run.

On CPU, class indices cost a few O(K) passes per row (Theorem 1) and soft rows about fifteen, no sort; the rows of
the last case alone are then sorted. On accelerators finding those rows would cost a host sync per step, so soft
rows are all sorted there (one sync-free, exact pass of a few kernels); class indices still use Theorem 1.
"""
import numbers
import operator
from typing import Optional, Tuple

import numpy as np
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
    row_min = target.detach().amin(dim=1, keepdim=True).to(stats_dtype)  # NaN propagates: NaN rows fail below
    if target.numel():
        atol = _ROW_SUM_ATOL.get(target.dtype, _DEFAULT_ATOL)
        row_sum = target.detach().sum(dim=1, dtype=stats_dtype)
        message = 'soft target rows must be non-negative and sum to 1 (a probability distribution per sample)'
        if target.device.type == 'cpu':  # the same test on (B,) numpy arrays: no torch dispatch per small op
            if not (row_min.numpy().min() >= 0 and np.abs(row_sum.numpy() - 1).max() <= atol):
                raise ValueError(message)
        else:
            _check((row_min.min() >= 0) & ((row_sum - 1).abs().max() <= atol), message)
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


def _first_argmin(z: torch.Tensor, z_min: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Lowest index of each row's minimum, (B, 1) int64, using `out` as scratch.

    On CPU `torch.argmin(dim=1)` is not vectorised (about ten memory passes' worth of time); an equality mask times
    (index - K), reduced with amin, gives the first minimum in three vectorised passes, ties included.
    """
    k = z.shape[1]
    k_star = torch.eq(z, z_min, out=out).mul_(torch.arange(-k, 0, dtype=z.dtype)).amin(dim=1, keepdim=True)
    return k_star.long().add_(k)


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


def _not_before(z: torch.Tensor, index: np.ndarray, z_s: np.ndarray, donor: np.ndarray,
                out: torch.Tensor) -> torch.Tensor:
    """out[b, c] = 1.0 where class c does NOT come before the special class index[b] in the greedy order.

    c comes before s iff z_c > z_s, or z_c == z_s and c < s: one comparison z_c <= thr_c against thr_c = z_s for
    c >= s and the next float below z_s for c < s, built in `out` and compared in place. For a special tied with
    the minimum (donor 0) thr is z_min everywhere: the mask keeps exactly the classes that give nothing.
    """
    below = (np.nextafter(z_s, -np.inf) - z_s) * donor  # exact: adjacent floats
    ar = torch.arange(z.shape[1], dtype=z.dtype)
    torch.lt(ar, torch.from_numpy(index.astype(z_s.dtype)), out=out)
    out.mul_(torch.from_numpy(below)).add_(torch.from_numpy(z_s))
    return torch.le(z, out, out=out)


def _one_class_label(z: torch.Tensor, y: np.ndarray, u, v,
                     budget: float) -> Tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The exact label of rows u + (v - u) e_y without sorting (CPU; `z` must be finite).

    Class indices (u = 0, v = 1) and smoothed one-hot rows have this form: every ALPSMixup target on the fused
    path. Along the greedy order such a row is r classes holding u (those ranked before y), then y, then classes
    holding u. If the r classes fit in the budget (r u <= eps/2), they are drained completely and the rest of eps/2
    comes from y; all of it goes to k*. So

        rho = u * kept + (v - u - take) e_y + moved e_k*,     kept = 1 on every class not ranked before y

    (`_not_before`, ties included), with no mask at all when u = 0. y tied with the minimum gives nothing (its mask
    then keeps the classes that give nothing, and every donor is drained). A row is solved unless the budget
    reaches past y into the classes after it (r u > eps/2, or eps/2 > r u + v with u > 0): there the order among
    equal masses matters, and the caller must take those rows from the general path (`_structured_label`,
    `_sorted_label`); their rows of the returned label are not valid.

    Args:
        z: (B, K) float32/64 logits.
        y: (B,) integer classes.
        u, v: the off and on values, (B,) arrays or scalars shared by every row, in z's dtype.
        budget: eps / 2.

    Returns:
        (label (B, K), k_star (B,) first minimum, solved (B,) bool).
    """
    batch, k = z.shape
    rows = np.arange(batch)
    z_np = z.numpy()
    k_star = z_np.argmin(axis=1)  # the first minimum; numpy's is vectorised on CPU, torch's is not
    z_y = z_np[rows, y]
    donor = z_y > z_np[rows, k_star]
    mass = v * donor
    if np.any(u > 0):
        label = _not_before(z, y[:, None], z_y[:, None], donor[:, None].astype(z_np.dtype), out=torch.empty_like(z))
        start = (k - label.sum(dim=1).numpy()) * u  # the r classes before y hold u each
        label.mul_(torch.from_numpy(np.asarray(u, dtype=z_np.dtype)).view(-1, 1) if np.ndim(u) else float(u))
        take = np.minimum(np.maximum(budget - start, 0), mass)
        moved = np.minimum(start + mass, budget)
        solved = (start <= budget) & ((budget <= start + mass) | ~donor | (u == 0))
    else:  # one-hot rows: Theorem 1, y gives min(eps/2, v) unless tied with the minimum
        label = torch.zeros_like(z)
        take = moved = np.minimum(mass, budget)
        solved = np.ones(batch, dtype=bool)
    label_np = label.numpy()
    label_np[rows, y] += v - u - take
    label_np[rows, k_star] += moved
    return label, k_star, solved


def _structured_label(z: torch.Tensor, soft: torch.Tensor, row_min: torch.Tensor, z_min: torch.Tensor,
                      budget: float) -> Tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The exact label of rows u + a e_i + b e_j, without sorting (CPU tensors).

    Returns (label, sorted_rows, k_star). `sorted_rows` (B,) marks the rows this does not solve: rows of another
    form, and rows whose greedy cut falls strictly inside a run of classes holding u (which of them go first needs
    the order); their rows of `label` are not valid and must come from `_sorted_label`. `k_star` (B,) is the
    first minimum of each row. The O(B K) passes are torch ops on one (B, K) tensor, the label, used as scratch
    before; the per-row arithmetic runs in numpy on (B, 2) arrays, where an operation costs a microsecond, not a
    dispatch.
    """
    batch, k = z.shape
    rows = np.arange(batch)[:, None]
    label = torch.empty_like(z)

    # The special classes: those holding more than the row minimum u (the true class, a mixing partner).
    above = torch.gt(soft, row_min, out=label)
    n_above = above.sum(dim=1).numpy()
    weighted = above.mul_(torch.arange(k, dtype=z.dtype))
    last = weighted.amax(dim=1, keepdim=True).numpy().astype(np.int64)  # the highest special index (0 if none)
    if n_above.max() <= 1:
        specials = last
    else:
        # The other special is (index sum - last). A row with fewer than two is padded with a class holding u,
        # which is exact: a class of a run taken as a special splits the run in two. (Rows with more than two
        # are sorted; any valid index will do for them here.)
        first = weighted.sum(dim=1, keepdim=True).numpy().astype(np.int64) - last
        first = np.where(n_above[:, None] == 2, first, (last + 1) % k)
        specials = np.concatenate([first, last], axis=1)
    k_star = _first_argmin(z, z_min, out=label).numpy()

    z_np, u = z.numpy(), row_min.numpy()
    z_s, t_s = z_np[rows, specials], soft.numpy()[rows, specials]
    donor = (z_s > z_min.numpy()).astype(z_s.dtype)
    if specials.shape[1] == 2:  # walk them in greedy order: (0, 1) or (1, 0)
        swap = (z_s[:, 1] > z_s[:, 0]) | ((z_s[:, 1] == z_s[:, 0]) & (specials[:, 1] < specials[:, 0]))
        order = np.stack([swap, ~swap], axis=1).astype(np.int64)
        specials, z_s, t_s, donor = (np.take_along_axis(x, order, axis=1) for x in (specials, z_s, t_s, donor))
    # Classes before each special (a special tied with the minimum: every donor), counted from its mask.
    before = np.concatenate([
        k - _not_before(z, specials[:, m:m + 1], z_s[:, m:m + 1], donor[:, m:m + 1], out=label)
        .sum(dim=1, keepdim=True).numpy() for m in range(specials.shape[1])], axis=1)
    # Along the order: run_0, special_0[, run_1, special_1], last run; runs hold u per class.
    mass = t_s * donor
    runs = before.copy()
    runs[:, 1:] -= before[:, :-1] + donor[:, :-1]
    ends = np.cumsum(runs * u + mass, axis=1, dtype=z_s.dtype)
    starts = ends - mass
    reach = budget <= ends
    if reach.any(axis=1).all():
        last_run = np.zeros_like(mass[:, :1])  # the budget ends at a special in every row: the last run is moot
    else:  # donors after the last special: every donor but those before it and itself
        n_min = (z == z_min).sum(dim=1, keepdim=True).numpy()
        last_run = (k - n_min - before[:, -1:] - donor[:, -1:]) * u
    # The cut is at the first special whose end reaches the budget, if every donor before it fits in the budget.
    # Past the last special, only an empty last run (u = 0 or no donor left) is solved: everything is drained.
    if specials.shape[1] == 1:
        reached, start, mass_cut, cut_class = reach, starts, mass, specials
    else:
        reached = reach.any(axis=1, keepdims=True)
        cut = np.where(reached, reach.argmax(axis=1)[:, None], 1)  # none reached: the last special
        start, mass_cut, cut_class = (np.take_along_axis(x, cut, axis=1) for x in (starts, mass, specials))
    solved = (start <= budget) & (reached | (last_run <= 0))
    sorted_rows = ~solved[:, 0] | (n_above > 2)
    take = np.minimum(np.maximum(budget - start, 0), mass_cut)
    moved = np.minimum(ends[:, -1:] + last_run, budget)
    if specials.shape[1] == 2:  # the mask of the cut special (with one special, it is still in `label`)
        _not_before(z, cut_class, np.take_along_axis(z_s, cut, axis=1), np.take_along_axis(donor, cut, axis=1),
                    out=label)

    # label = soft without every class before the cut, minus the remainder at the cut; all of it to k*.
    label_np = label.mul_(soft).numpy()
    label_np[rows, cut_class] -= take
    label_np[rows, k_star] += moved
    return label, sorted_rows, k_star[:, 0]


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
    if isinstance(eps, torch.Tensor):
        if eps.numel() != 1:
            raise ValueError(f'eps must be a single number, got a tensor of shape {tuple(eps.shape)}')
    elif isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f'eps must be a real number in [0, 2], got {eps!r} ({type(eps).__name__})')
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
    z_min, z_max = z.amin(dim=1, keepdim=True), z.amax(dim=1, keepdim=True)  # NaN propagates into both
    if host:
        if not (np.isfinite(z_min.numpy()).all() and np.isfinite(z_max.numpy()).all()):
            raise ValueError('logits contain NaN or inf: the least likely class is undefined '
                             '(check the model/loss scale)')
    else:
        finite = torch.isfinite(z_min) & torch.isfinite(z_max)
    budget = float(eps) / 2

    if row_min is None:  # class indices: Theorem 1, no sort
        index = target.to(z.device, torch.long).view(-1, 1)
        label = torch.zeros_like(z)
        k_star = _first_argmin(z, z_min, out=label) if host else z.argmin(dim=1, keepdim=True)
        label.zero_().scatter_(1, index, 1.0)
        if budget > 0:
            moved = (k_star != index).to(dtype).mul_(budget)
            label.scatter_add_(1, index, -moved).scatter_add_(1, k_star, moved)
    else:
        soft = target.detach().to(device=z.device, dtype=dtype)
        if budget == 0 or not batch_size:
            label = soft.clone()
        elif host and k < _MAX_FAST_CLASSES:
            label, sorted_rows, k_star = _structured_label(z, soft, row_min.to(z.device, dtype), z_min, budget)
            if sorted_rows.any():
                rows = torch.from_numpy(sorted_rows.nonzero()[0])
                label[rows] = _sorted_label(z[rows], soft[rows], budget, torch.from_numpy(k_star)[rows])
        else:
            # On accelerators the rows needing the sort cannot be picked out without a host sync, and the sort-free
            # path is several small kernels per row statistic: sort every row (exact, one sync-free pass).
            label = _sorted_label(z, soft, budget, z.argmin(dim=1))
    # NaN-poison rows with non-finite logits (only reachable on accelerators, see above).
    return label if host else torch.where(finite, label, torch.full_like(label, float('nan')))
