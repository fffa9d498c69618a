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

Every device runs the same torch ops: class indices cost a few O(K) passes per row (Theorem 1), soft rows about
a dozen (`_structured_label`), with no sort and no host sync. Rows of the last case, and rows of any other form, are
then sorted (`_sorted_label`): on CPU those rows alone; on an accelerator, where picking them out would cost a host
sync per step, every soft row is sorted as well and `torch.where` keeps the sorted label where it is needed.
"""
from typing import Optional, Tuple

import torch

from ._validate import eps_arg, int_arg

__all__ = ['adversarial_label', 'validate_target']

# Tolerance on the row sums of a soft target, by the target's dtype: fp16 rows of a smoothed 1000-class label sum
# to 1 only within ~1e-3, bf16 ones within ~1e-2.
_ROW_SUM_ATOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2}
_DEFAULT_ATOL = 1e-4


def _check(cond: torch.Tensor, message: str) -> None:
    """Raise ValueError if `cond` is False, without a host sync on accelerators.

    On CPU reading the result is free, so it raises a proper ValueError. On an accelerator, reading it back would
    stall the stream every step; `torch._assert_async` checks on the device instead and fails the next sync.
    """
    if cond.device.type == 'cpu':
        if not bool(cond):
            raise ValueError(message)
    else:
        torch._assert_async(cond, message)


def _is_index_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def validate_target(target: torch.Tensor, num_classes: int, batch_size: Optional[int] = None,
                    against_logits: bool = False) -> torch.Tensor:
    """Check a target as timm accepts it and return it as (B,) int64 class indices or (B, K) rows.

    Class indices may be (B,) or (B, 1) of any integer dtype; soft rows must be non-negative and sum to 1 within
    1e-4 (1e-2 for fp16, 2e-2 for bf16 targets, whose rounding is that coarse). On an accelerator the value checks
    run on the device without a host sync (see `_check`).

    Args:
        target: the target as the user passed it.
        num_classes: K.
        batch_size: B, when known.
        against_logits: K and B come from the (B, K) logits (a loss), not from the user's `num_classes` and input
            batch (a mixer); the error messages say which.

    Raises:
        TypeError: the target is neither integer indices nor a floating-point distribution.
        ValueError: wrong shape, an index outside [0, num_classes), or a soft row that is negative or does not sum
            to 1.
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f'target must be a torch.Tensor, got {type(target).__name__}')
    if batch_size is not None and (target.ndim == 0 or target.shape[0] != batch_size):
        batch_of = 'the logits have' if against_logits else 'the input batch has'
        raise ValueError(f'target has batch size {tuple(target.shape)[:1]} but {batch_of} {batch_size} rows')
    classes = f'the logits have {num_classes} classes' if against_logits else f'num_classes={num_classes}'
    if target.ndim == 1 or (target.ndim == 2 and target.shape[1] == 1 and not target.is_floating_point()):
        if not _is_index_dtype(target.dtype):
            raise TypeError(f'a (B,) or (B, 1) target must hold integer class indices, got dtype {target.dtype}')
        target = target.reshape(-1).long()
        if target.numel():
            low, high = torch.aminmax(target)
            _check((low >= 0) & (high < num_classes),
                   f'class index out of range: targets must lie in [0, {num_classes}) ({classes})')
        return target
    if target.ndim != 2:
        raise ValueError(f'target must be class indices (B,) or soft labels (B, K), got shape {tuple(target.shape)}')
    if not target.is_floating_point():
        raise TypeError(f'a 2-D (soft) target must be floating point, got dtype {target.dtype}')
    if target.shape[1] != num_classes:
        raise ValueError(f'soft target has {target.shape[1]} classes but {classes}')
    if target.numel():
        stats_dtype = torch.promote_types(target.dtype, torch.float32)
        rows = target.detach()
        low = rows.amin().to(stats_dtype)  # NaN propagates: a NaN row fails the check
        sums = rows.sum(dim=1, dtype=stats_dtype)
        atol = _ROW_SUM_ATOL.get(target.dtype, _DEFAULT_ATOL)
        _check((low >= 0) & ((sums - 1).abs().amax() <= atol),
               'soft target rows must be non-negative and sum to 1 (a probability distribution per sample)')
    return target


# Class indices are handled as floats of the label's dtype in the O(B*K) passes (so every pass is a vectorised
# float op writing into a buffer that is already there; a fresh (B, K) tensor costs more than the pass itself on CPU).
# Sums of two indices stay exact in float32 below 2**23 classes; beyond that the label is computed in float64.
_MAX_FLOAT32_CLASSES = 2 ** 23


def _first_argmin(z: torch.Tensor, z_min: torch.Tensor, out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lowest index of each row's minimum (B, 1) int64, count of classes tied with the minimum (B, 1)).

    `out` is scratch. `argmin(dim=1)` is not vectorised on CPU (several times slower than a pass); an equality mask
    times (index - K), reduced with amin, gives the first minimum in three vectorised passes, ties included.
    """
    k = z.shape[1]
    at_min = torch.eq(z, z_min, out=out)
    n_min = at_min.sum(dim=1, keepdim=True)
    offsets = torch.arange(-k, 0, device=z.device, dtype=z.dtype)
    return at_min.mul_(offsets).amin(dim=1, keepdim=True).long().add_(k), n_min


def _not_before(z: torch.Tensor, special: torch.Tensor, z_s: torch.Tensor, donor: torch.Tensor,
                out: torch.Tensor) -> torch.Tensor:
    """`out` (B, K) = 1.0 where class c does NOT come before `special` (B, 1) in the greedy order, else 0.0.

    c comes before s iff z_c > z_s, or z_c == z_s and c < s: one comparison z_c <= thr_c against thr_c = z_s for
    c >= s and the next float below z_s for c < s (z_s plus an exact one-ulp step). For a special tied with the
    minimum (not a donor) thr is z_s everywhere: the mask then keeps exactly the classes that give nothing, so
    every donor counts as before it.
    """
    step = torch.where(donor, torch.nextafter(z_s, torch.full_like(z_s, -float('inf'))) - z_s, 0.0)
    classes = torch.arange(z.shape[1], device=z.device, dtype=z.dtype)
    thr = torch.addcmul(z_s, torch.lt(classes, special.to(z.dtype), out=out), step, out=out)
    return torch.le(z, thr, out=out)


def _sorted_label(z: torch.Tensor, soft: torch.Tensor, budget: float, k_star: torch.Tensor) -> torch.Tensor:
    """The greedy transfer for arbitrary rows: sort by logit (stable, descending) and take along that order."""
    order = z.argsort(dim=1, descending=True, stable=True)
    donors = z > z.gather(1, k_star)  # classes tied with the minimum give nothing
    mass = (soft * donors).gather(1, order)
    taken_before = mass.cumsum(dim=1) - mass
    take = (budget - taken_before).clamp(min=0).minimum(mass)
    take = torch.zeros_like(soft).scatter_(1, order, take)
    return (soft - take).scatter_add_(1, k_star, take.sum(dim=1, keepdim=True))


def _structured_label(z: torch.Tensor, soft: torch.Tensor, budget: float, k_star: torch.Tensor, n_donors: torch.Tensor,
                      buf: torch.Tensor, pick_rows: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The exact label of rows u + a e_i + b e_j without sorting; returns (label, solved (B,) bool).

    Rows of another form, and rows whose greedy cut falls strictly inside a run of classes holding u, are not
    solved: their rows of `label` are not valid and must come from `_sorted_label`. The (B, 1) arithmetic walks
    the two "special" classes in greedy order: run_0, special_0, run_1, special_1, last run (runs hold u each).
    `buf` is a (B, K) scratch tensor. With `pick_rows` (CPU, where reading a mask is free) the passes that no row
    needs are skipped: the masks when every run is empty (u = 0), the second mask when no cut is past special_0.
    """
    k = z.shape[1]
    u = soft.amin(dim=1, keepdim=True)
    # The special classes (the own class, a mixing partner) hold more than u: their count, the highest index, and
    # the other one as (index sum - highest). Rows with fewer than two are padded with classes holding u (exact: a
    # class of a run taken as a special splits the run in two): none -> (1, 0), one -> (it + 1, it).
    above = torch.gt(soft, u, out=buf)
    n_above = above.sum(dim=1, keepdim=True)
    indices = above.mul_(torch.arange(k, device=z.device, dtype=z.dtype))
    last = indices.amax(dim=1, keepdim=True)
    first = torch.where(n_above == 2, indices.sum(dim=1, keepdim=True) - last, torch.remainder(last + 1, k))
    specials = torch.cat([first, last], dim=1).long()
    z_s = z.gather(1, specials)
    swap = (z_s[:, 1:] > z_s[:, :1]) | ((z_s[:, 1:] == z_s[:, :1]) & (specials[:, 1:] < specials[:, :1]))
    order = torch.cat([swap, ~swap], dim=1).long()  # the two in greedy order: (0, 1) or (1, 0)
    specials, z_s = specials.gather(1, order), z_s.gather(1, order)
    donor = z_s > z.gather(1, k_star)
    donor_f = donor.to(z.dtype)
    mass = soft.gather(1, specials) * donor_f
    no_runs = pick_rows and not bool(u.any())  # every run holds 0: no class outside the specials gives anything

    # Special_0: the classes before it (its mask, kept in buf), and whether the budget reaches past it.
    if no_runs:
        before_0, mask_0 = torch.zeros_like(u), None
    else:
        mask_0 = _not_before(z, specials[:, :1], z_s[:, :1], donor[:, :1], out=buf)
        before_0 = k - mask_0.sum(dim=1, keepdim=True)
    past_0 = before_0 * u + mass[:, :1] < budget  # the cut is at special_1 or beyond
    # The cut special's mask is the label's mask: every class before the cut is drained.
    if no_runs:
        before_1 = torch.zeros_like(u)
        label = soft.clone().scatter_add_(1, specials[:, :1], -(past_0 * mass[:, :1]))
    elif pick_rows and not bool(past_0.any()):
        before_1, label = before_0, mask_0.mul_(soft)
    else:
        cut = past_0.long()
        mask = _not_before(z, specials.gather(1, cut), z_s.gather(1, cut), donor.gather(1, cut), out=buf)
        before_1 = k - mask.sum(dim=1, keepdim=True)  # where past_0; elsewhere the count of special_0 again
        label = mask.mul_(soft)
    start_1 = before_1 * u + mass[:, :1] - donor_f[:, :1] * u  # run_0, special_0 and run_1 drained
    end_1 = start_1 + mass[:, 1:]
    last_run = (n_donors - before_1 - donor_f[:, 1:]) * u  # donor mass after special_1
    start = torch.where(past_0, start_1, before_0 * u)
    cut_class = torch.where(past_0, specials[:, 1:], specials[:, :1])
    # Solved: every donor before the cut fits in the budget, and the budget ends at the cut, or (past special_1)
    # nothing is left after it.
    solved = (start <= budget) & (~past_0 | (end_1 >= budget) | (last_run <= 0)) & (n_above <= 2)
    take = (budget - start).clamp(min=0).minimum(torch.where(past_0, mass[:, 1:], mass[:, :1]))
    moved = torch.where(past_0, (end_1 + last_run).clamp(max=budget), torch.full_like(u, budget))
    label.scatter_add_(1, cut_class, -take).scatter_add_(1, k_star, moved)
    return label, solved.view(-1)


def _soft_label(z: torch.Tensor, soft: torch.Tensor, budget: float, k_star: torch.Tensor, n_donors: torch.Tensor,
                buf: torch.Tensor, pick_rows: bool) -> torch.Tensor:
    """The adversarial label of (B, K) rows: the sort-free path, the sort for the rows it leaves.

    `pick_rows` (where reading a mask is free, on CPU) sorts only those rows; otherwise every row is sorted and
    `torch.where` picks, which costs no host sync.
    """
    label, solved = _structured_label(z, soft, budget, k_star, n_donors, buf, pick_rows)
    if pick_rows:
        if not bool(solved.all()):
            rows = (~solved).nonzero().view(-1)
            label[rows] = _sorted_label(z[rows], soft[rows], budget, k_star[rows])
        return label
    return torch.where(solved.view(-1, 1), label, _sorted_label(z, soft, budget, k_star))


def check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.ndim != 2:
        raise TypeError(f'logits must be a floating-point (B, K) tensor, got '
                        f'{getattr(logits, "dtype", type(logits).__name__)} of shape {tuple(getattr(logits, "shape", ()))}')


def label_from_checked(scores: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """`adversarial_label` for arguments already checked: `target` from `validate_target`, `eps` a float.

    `scores` rank the classes for the adversary (the logits, or BCE's per-class coefficients); the label is built
    in their dtype, at least float32.
    """
    z = scores.detach()
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    out_dtype = z.dtype
    if z.dtype == torch.float32 and z.shape[1] >= _MAX_FLOAT32_CLASSES:
        z = z.double()  # class indices as exact floats (see _first_argmin)
    z_min, z_max = z.amin(dim=1, keepdim=True), z.amax(dim=1, keepdim=True)  # NaN propagates into both
    finite = torch.isfinite(z_min) & torch.isfinite(z_max)
    if z.device.type == 'cpu' and not bool(finite.all()):
        raise ValueError('logits contain NaN or inf: the least likely class is undefined (check the model/loss scale)')
    budget = eps / 2
    buf = torch.empty_like(z)
    k_star, n_min = _first_argmin(z, z_min, out=buf)
    if target.ndim == 1:  # class indices: Theorem 1
        index = target.to(z.device, torch.long).view(-1, 1)
        label = buf.zero_().scatter_(1, index, 1.0)
        if budget > 0:
            moved = (k_star != index).to(z.dtype) * budget
            label.scatter_add_(1, index, -moved).scatter_add_(1, k_star, moved)
    else:
        soft = target.detach().to(device=z.device, dtype=z.dtype)
        if budget > 0 and z.shape[0]:
            label = _soft_label(z, soft, budget, k_star, z.shape[1] - n_min, buf, pick_rows=z.device.type == 'cpu')
        else:
            label = soft.clone()
    # On an accelerator rows with non-finite logits become NaN (the loss is NaN and the training loop stops) instead
    # of costing a host sync per step.
    label = label.to(out_dtype)
    return label if z.device.type == 'cpu' else torch.where(finite, label, torch.full_like(label, float('nan')))


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
        label, float64 logits a float64 label. Rows whose logits are not finite raise a ValueError on CPU; on an
        accelerator they become NaN instead of costing a host sync per step.
    """
    check_logits(logits)
    eps = eps_arg('eps', eps)
    if num_classes is not None and int_arg('num_classes', num_classes, 2) != logits.shape[1]:
        raise ValueError(f'num_classes={num_classes} but logits have {logits.shape[1]} classes')
    target = validate_target(target, logits.shape[1], logits.shape[0], against_logits=True)
    return label_from_checked(logits, target, eps)
