"""Properties of the exact adversarial label (Theorem 1 and its soft-target generalisation)."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from scipy.optimize import linprog

from timm_alps import adversarial_label
from timm_alps.labels import _sorted_label, _structured_label, validate_target


def make_case(seed: int, batch: int, k: int, soft: bool, ties: bool):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, k, generator=g, dtype=torch.float64) * 3
    if ties:  # few distinct values: many ties, including at the minimum
        logits = logits.round()
    if soft:
        # sparse-ish distributions: some classes without mass, as MixUp/CutMix targets have
        raw = torch.rand(batch, k, generator=g, dtype=torch.float64) * (torch.rand(batch, k, generator=g) < 0.5)
        raw[torch.arange(batch), torch.randint(k, (batch,), generator=g)] += 1.0
        target = raw / raw.sum(1, keepdim=True)
    else:
        target = torch.randint(k, (batch,), generator=g)
    return logits, target


def objective(logits, label):
    return (label * -F.log_softmax(logits, dim=1)).sum(1)


cases = st.tuples(st.integers(0, 2 ** 31), st.integers(1, 6), st.integers(2, 1000), st.booleans(), st.booleans())
radii = st.floats(0.0, 2.0)


@settings(max_examples=150, deadline=None)
@given(case=cases, eps=radii)
def test_rows_are_distributions_and_move_at_most_eps(case, eps):
    logits, target = make_case(*case)
    rho = adversarial_label(logits, target, eps)
    y = target if target.ndim == 2 else F.one_hot(target, logits.shape[1]).double()
    assert rho.shape == logits.shape and rho.dtype == logits.dtype
    assert (rho >= 0).all()
    torch.testing.assert_close(rho.sum(1), torch.ones(len(rho), dtype=rho.dtype))
    # every unit moved off the donors lands on k*: the L1 distance is twice the mass gained by k*
    k_star = logits.argmin(1)
    gained = rho[torch.arange(len(rho)), k_star] - y[torch.arange(len(rho)), k_star]
    distance = (rho - y).abs().sum(1)
    torch.testing.assert_close(distance, 2 * gained)
    assert (distance <= eps + 1e-9).all()
    # only k* gains mass, and only classes with mass give it
    delta = rho - y
    delta[torch.arange(len(rho)), k_star] = 0
    assert (delta <= 1e-12).all()
    # classes without mass never give any
    assert ((rho - y).clamp(max=0)[y == 0] == 0).all()


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2 ** 31), batch=st.integers(1, 8), k=st.integers(2, 1000), eps=radii)
def test_one_hot_is_theorem_1(seed, batch, k, eps):
    logits, target = make_case(seed, batch, k, soft=False, ties=False)
    rho = adversarial_label(logits, target, eps)
    k_star = logits.argmin(1)
    rows = torch.arange(batch)
    expected = F.one_hot(target, k).double()
    moved = (k_star != target).double() * (eps / 2)
    expected[rows, target] -= moved
    expected[rows, k_star] += moved
    torch.testing.assert_close(rho, expected, rtol=0, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(case=cases)
def test_eps_zero_is_identity(case):
    logits, target = make_case(*case)
    rho = adversarial_label(logits, target, 0.0)
    y = target if target.ndim == 2 else F.one_hot(target, logits.shape[1]).double()
    torch.testing.assert_close(rho, y, rtol=0, atol=0)


def lp_optimum(logits_row, y_row, eps):
    """max_t c.t s.t. t >= 0, sum t = 1, ||t - y||_1 <= eps, as an LP over (t, u) with u >= |t - y|."""
    k = len(y_row)
    c = -F.log_softmax(logits_row, 0).numpy()
    eye = np.eye(k)
    a_ub = np.block([[eye, -eye], [-eye, -eye], [np.zeros((1, k)), np.ones((1, k))]])
    b_ub = np.concatenate([y_row.numpy(), -y_row.numpy(), [eps]])
    a_eq = np.concatenate([np.ones(k), np.zeros(k)])[None]
    res = linprog(np.concatenate([-c, np.zeros(k)]), A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=[1.0],
                  bounds=[(0, None)] * (2 * k), method='highs')
    assert res.status == 0
    return -res.fun


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2 ** 31), k=st.integers(2, 8), soft=st.booleans(), ties=st.booleans(), eps=radii)
def test_optimal_against_linear_program(seed, k, soft, ties, eps):
    logits, target = make_case(seed, 3, k, soft, ties)
    rho = adversarial_label(logits, target, eps)
    y = target if target.ndim == 2 else F.one_hot(target, k).double()
    achieved = objective(logits, rho)
    for i in range(3):
        # HiGHS honours constraints to ~1e-7, which can buy its solution ~1e-6 of objective at these logit scales
        assert achieved[i] >= lp_optimum(logits[i], y[i], eps) - 1e-5


@pytest.mark.parametrize('k', [2, 3, 4])
def test_one_hot_beats_every_feasible_vertex(k):
    # Vertices of {t in simplex, ||t - y||_1 <= eps} for one-hot y: move eps/2 (or everything if it fits) from y
    # to one other class, or nothing.
    logits = torch.randn(1, k, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    for y, eps in itertools.product(range(k), [0.1, 0.3, 0.5, 1.0]):
        rho = adversarial_label(logits, torch.tensor([y]), eps)
        best = objective(logits, rho)[0]
        for j in range(k):
            vertex = F.one_hot(torch.tensor([y]), k).double()
            vertex[0, y] -= eps / 2
            vertex[0, j] += eps / 2
            assert best >= objective(logits, vertex)[0] - 1e-12


def test_ties_are_deterministic_and_lowest_index():
    logits = torch.tensor([[1.0, -2.0, 0.5, -2.0], [0.0, 0.0, 0.0, 0.0]])
    target = torch.tensor([0, 3])
    rho = adversarial_label(logits, target, 0.4)
    torch.testing.assert_close(rho[0], torch.tensor([0.8, 0.2, 0.0, 0.0]))
    torch.testing.assert_close(rho[1], torch.tensor([0.2, 0.0, 0.0, 0.8]))
    assert torch.equal(rho, adversarial_label(logits, target, 0.4))
    # a soft target spread over classes tied at the minimum is left alone: moving mass between them gains nothing
    soft = torch.tensor([[0.0, 0.5, 0.0, 0.5]])
    torch.testing.assert_close(adversarial_label(logits[:1], soft, 0.4), soft)


def test_soft_target_takes_from_largest_logit_first():
    logits = torch.tensor([[3.0, 1.0, 2.0, -1.0]])
    target = torch.tensor([[0.1, 0.6, 0.3, 0.0]])
    rho = adversarial_label(logits, target, 0.6)  # budget 0.3: 0.1 from class 0, then 0.2 from class 2
    torch.testing.assert_close(rho, torch.tensor([[0.0, 0.6, 0.1, 0.3]]))


def test_no_gradient_flows_into_the_label():
    logits = torch.randn(4, 10, requires_grad=True)
    rho = adversarial_label(logits, torch.tensor([1, 2, 3, 4]), 0.3)
    assert not rho.requires_grad


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('soft', [False, True])
def test_low_precision_logits_give_a_float32_label(dtype, soft):
    logits, target = make_case(7, 16, 1000, soft=soft, ties=False)
    rho = adversarial_label(logits.to(dtype), target.float() if soft else target, 0.3)
    assert rho.dtype == torch.float32
    torch.testing.assert_close(rho.sum(1), torch.ones(16), atol=1e-5, rtol=0)
    # the label of the half logits, computed in float32: the same as for those logits cast to float32
    torch.testing.assert_close(rho, adversarial_label(logits.to(dtype).float(), target.float() if soft else target,
                                                      0.3), atol=0, rtol=0)
    if not soft:  # Theorem 1 exactly: 0.85 / 0.15 (bf16 arithmetic gave 0.8516 / 0.1504)
        values = rho.unique()
        assert all(torch.isclose(values, torch.tensor(v), rtol=0, atol=1e-7).any() for v in (0.0, 0.85, 0.15))
        assert ((values - torch.tensor([[0.0], [0.15], [0.85], [1.0]])).abs().amin(0) < 1e-7).all()


def test_half_targets_keep_their_row_sum_tolerance():
    logits, target = structured_case(3, 8, 1000, 0.1, 'uniform', 'plain')
    target = target.bfloat16()  # bf16 rounding: rows sum to 1 only within ~1e-2
    assert (target.float().sum(1) - 1).abs().max() > 1e-4
    rho = adversarial_label(logits.float(), target, 0.3)
    assert rho.dtype == torch.float32
    with pytest.raises(ValueError, match='sum to 1'):  # the same rows in float32 are refused
        adversarial_label(logits.float(), target.float(), 0.3)


# -- the sort-free path: rows u + a e_i + b e_j (index, smoothed one-hot, MixUp/CutMix mixtures) --------------------

def structured_case(seed: int, batch: int, k: int, smoothing: float, mix: str, logit_kind: str):
    """Targets as ALPSMixup / timm's mixup_target build them, logits with the ties low precision produces."""
    g = torch.Generator().manual_seed(seed)
    own, partner = torch.randint(k, (batch,), generator=g), torch.randint(k, (batch,), generator=g)
    lam = {'one_hot': torch.ones(batch), 'uniform': torch.rand(batch, generator=g), 'half': torch.full((batch,), 0.5),
           'near_one': 1 - torch.rand(batch, generator=g) * 1e-3, 'near_zero': torch.rand(batch, generator=g) * 1e-3,
           }[mix].double().view(-1, 1)
    target = lam * F.one_hot(own, k) + (1 - lam) * F.one_hot(partner, k)
    target = target * (1 - smoothing) + smoothing / k
    logits = torch.randn(batch, k, generator=g, dtype=torch.float64) * 3
    if logit_kind == 'rounded':  # few distinct values: ties everywhere, also with the special classes
        logits = logits.round()
    elif logit_kind == 'bf16':
        logits = logits.to(torch.bfloat16).double()
    elif logit_kind == 'constant':  # zero-initialised head: every class tied with the minimum
        logits = torch.zeros_like(logits)
    elif logit_kind == 'own_tied_min':  # the true class tied with the minimum: it gives nothing
        logits[torch.arange(batch), own] = logits.min(1).values
    return logits, target


structures = st.tuples(st.integers(0, 2 ** 31), st.integers(1, 12), st.integers(2, 300),
                       st.sampled_from([0.0, 0.0, 0.1, 0.3, 0.9]),
                       st.sampled_from(['one_hot', 'uniform', 'half', 'near_one', 'near_zero']),
                       st.sampled_from(['plain', 'rounded', 'bf16', 'constant', 'own_tied_min']))


def general_label(logits, target, eps):
    return _sorted_label(logits, target, eps / 2, logits.argmin(1, keepdim=True))


def fast_label(logits, target, eps, pick_rows=False):
    """The sort-free path alone: (label, rows it leaves to the sort as a numpy mask, k* as numpy).

    pick_rows=False computes every pass (as on an accelerator); True skips the passes no row needs (as on CPU)."""
    k_star = logits.argmin(1, keepdim=True)
    n_donors = (logits > logits.amin(1, keepdim=True)).sum(1, keepdim=True).to(logits.dtype)
    label, solved = _structured_label(logits, target, eps / 2, k_star, n_donors, torch.empty_like(logits), pick_rows)
    return label, (~solved).numpy(), k_star.view(-1).numpy()


@settings(max_examples=300, deadline=None)
@given(case=structures, eps=radii)
def test_fast_path_equals_general_path(case, eps):
    logits, target = structured_case(*case)
    expected = general_label(logits, target, eps)
    torch.testing.assert_close(adversarial_label(logits, target, eps), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(adversarial_label(logits.float(), target.float(), eps), expected.float(),
                               rtol=0, atol=2e-6)
    for pick_rows in (False, True):
        label, sorted_rows, k_star = fast_label(logits, target, eps, pick_rows)
        assert torch.equal(torch.from_numpy(k_star), logits.argmin(1))
        solved = torch.from_numpy(~sorted_rows)
        torch.testing.assert_close(label[solved], expected[solved], rtol=0, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2 ** 31), k=st.integers(3, 2000), smoothing=st.floats(0.0, 1.0, exclude_max=True),
       mix=st.sampled_from(['one_hot', 'near_one']), eps=st.floats(2e-3, 1.0))
def test_smoothing_within_half_the_budget_never_sorts(seed, k, smoothing, mix, eps):
    # The common case: the classes above the own class hold s/K each (plus < 1e-3 on a MixUp partner), all of it
    # fits in eps/2, and the own class (mass >= 1 - eps/2) gives the rest: no sort, whatever the logit order.
    # (With K = 2 the row minimum is the partner's mass, not the smoothing: that row may sort.)
    smoothing = max(0.0, min(smoothing, eps / 2 - 1e-3))
    logits, target = structured_case(seed, 8, k, smoothing, mix, 'plain')
    _, sorted_rows, _ = fast_label(logits, target, eps)
    assert not sorted_rows.any()


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2 ** 31), k=st.integers(3, 2000), lam=st.floats(0.2, 0.8),
       logit_kind=st.sampled_from(['plain', 'rounded', 'bf16']))
def test_mixup_targets_never_sort(seed, k, lam, logit_kind):
    # timm MixUp/CutMix rows with smoothing 0.1 and eps 0.3: whichever of the two classes comes first in the order
    # holds >= 0.18 > eps/2 and every class before it holds 0.1/K: the cut is on it, with or without ties.
    logits, target = structured_case(seed, 8, k, 0.1, 'uniform', logit_kind)
    own, partner = target.topk(2, dim=1).indices.unbind(1)
    target = (lam * F.one_hot(own, k) + (1 - lam) * F.one_hot(partner, k)).double() * 0.9 + 0.1 / k
    label, sorted_rows, _ = fast_label(logits, target, 0.3)
    assert not sorted_rows.any()
    torch.testing.assert_close(label, general_label(logits, target, 0.3), rtol=0, atol=1e-12)


def test_budget_ending_inside_a_run_of_smoothed_classes_falls_back_to_the_sort():
    # s = 0.9 spread over 10 classes (0.09 each), eps/2 = 0.2: the true class is ranked last, so the budget runs out
    # after 2.2 of the classes above it: which two depends on their order.
    k = 10
    logits = torch.arange(k, 0, -1, dtype=torch.float64).view(1, -1)  # class 0 largest
    target = torch.full((1, k), 0.09, dtype=torch.float64)
    target[0, k - 2] += 0.1  # true class: second smallest logit (the smallest is k*)
    _, sorted_rows, _ = fast_label(logits, target, 0.4)
    assert sorted_rows.all()
    rho = adversarial_label(logits, target, 0.4)
    expected = target.clone()
    expected[0, :2] = 0.0
    expected[0, 2] = 0.07
    expected[0, k - 1] += 0.2
    torch.testing.assert_close(rho, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(rho, general_label(logits, target, 0.4), rtol=0, atol=1e-12)


def test_rows_that_are_not_structured_use_the_sort_and_mix_with_fast_rows():
    logits, target = make_case(11, 6, 50, soft=True, ties=True)  # arbitrary rows: many classes with mass
    smoothed = structured_case(12, 6, 50, 0.1, 'uniform', 'rounded')[1]
    target = torch.cat([target, smoothed])
    logits = torch.cat([logits, logits])
    _, sorted_rows, _ = fast_label(logits, target, 0.3)
    assert sorted_rows[:6].all() and not sorted_rows[6:].any()
    torch.testing.assert_close(adversarial_label(logits, target, 0.3), general_label(logits, target, 0.3),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize('dtype', [torch.uint8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize('shape', [(5,), (5, 1)])
def test_class_indices_of_any_integer_dtype_and_b1_shape(dtype, shape):
    logits = torch.randn(5, 7)
    index = torch.tensor([0, 6, 3, 3, 1])
    rho = adversarial_label(logits, index.to(dtype).view(shape), 0.3)
    torch.testing.assert_close(rho, adversarial_label(logits, index, 0.3), rtol=0, atol=0)
    validate_target(index.to(dtype).view(shape), 7, 5)


def test_num_classes_may_be_a_numpy_or_torch_integer():
    logits = torch.randn(2, 5)
    for k in (np.int64(5), torch.tensor(5)):
        assert adversarial_label(logits, torch.tensor([0, 4]), 0.2, num_classes=k).shape == (2, 5)


def test_eps_may_be_a_one_element_tensor():
    logits = torch.randn(2, 5)
    torch.testing.assert_close(adversarial_label(logits, torch.tensor([0, 4]), torch.tensor(0.2)),
                               adversarial_label(logits, torch.tensor([0, 4]), 0.2))


def test_accepts_num_classes_when_consistent():
    rho = adversarial_label(torch.randn(2, 5), torch.tensor([0, 4]), 0.2, num_classes=5)
    assert rho.shape == (2, 5)


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(eps=-0.1), ValueError, 'eps=-0.1'),
    (dict(eps=2.5), ValueError, 'eps=2.5'),
    (dict(target=torch.tensor([0, 5])), ValueError, 'out of range'),
    (dict(target=torch.tensor([-1, 0])), ValueError, 'out of range'),
    (dict(target=torch.tensor([0, 1, 2])), ValueError, 'batch size'),
    (dict(target=torch.tensor([[0.5, 0.6, 0, 0, 0], [1.0, 0, 0, 0, 0]])), ValueError, 'sum to 1'),
    (dict(target=torch.tensor([[1.5, -0.5, 0, 0, 0], [1.0, 0, 0, 0, 0]])), ValueError, 'non-negative'),
    (dict(target=torch.full((2, 4), 0.25)), ValueError, 'soft target has 4 classes but the logits have 5 classes'),
    (dict(target=torch.tensor([0.0, 1.0])), TypeError, 'integer class indices'),
    (dict(target=torch.ones(2, 5, dtype=torch.long)), TypeError, 'floating point'),
    (dict(num_classes=4), ValueError, 'num_classes=4'),
    (dict(logits=torch.ones(2, 5, dtype=torch.long)), TypeError, 'floating-point'),
    (dict(logits=torch.tensor([[0.0, float('nan'), 0, 0, 0], [0.0] * 5])), ValueError, 'NaN or inf'),
    (dict(logits=torch.tensor([[0.0, float('inf'), 0, 0, 0], [0.0] * 5])), ValueError, 'NaN or inf'),
    (dict(logits=torch.tensor([[0.0, -float('inf'), 0, 0, 0], [0.0] * 5])), ValueError, 'NaN or inf'),
    (dict(eps=torch.tensor([0.1, 0.2])), ValueError, 'single number'),
    (dict(eps=None), TypeError, 'eps must be a real number'),
    (dict(eps=True), TypeError, 'eps must be a real number'),
    (dict(eps=float('nan')), ValueError, 'eps=nan'),
    (dict(num_classes=5.0), TypeError, 'num_classes must be an integer'),
    (dict(target=torch.tensor([[0.5, float('nan'), 0, 0, 0], [1.0, 0, 0, 0, 0]])), ValueError, 'sum to 1'),
    (dict(target=torch.tensor([[True], [False]])), TypeError, 'integer class indices'),
    (dict(target=torch.zeros(2, 5, 1)), ValueError, 'got shape'),
    (dict(target=[0, 1]), TypeError, 'must be a torch.Tensor'),
    (dict(logits=torch.randn(2, 5, 1)), TypeError, 'floating-point'),
])
def test_bad_input_is_named(kwargs, error, match):
    args = dict(logits=torch.randn(2, 5), target=torch.tensor([0, 1]), eps=0.3)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        adversarial_label(**args)
