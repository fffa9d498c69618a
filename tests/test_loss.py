"""ALPSSoftTargetCrossEntropy: a drop-in for timm's SoftTargetCrossEntropy."""
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from scipy.optimize import linprog
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

from timm_alps import ALPSBinaryCrossEntropy, ALPSLoss, ALPSMixup, ALPSSoftTargetCrossEntropy, adversarial_label


def test_eps_zero_is_timm_soft_target_cross_entropy():
    logits = torch.randn(8, 10)
    soft = torch.softmax(torch.randn(8, 10), 1)
    torch.testing.assert_close(ALPSSoftTargetCrossEntropy(eps=0)(logits, soft), SoftTargetCrossEntropy()(logits, soft))
    hard = torch.randint(10, (8,))
    torch.testing.assert_close(ALPSSoftTargetCrossEntropy(eps=0)(logits, hard), F.cross_entropy(logits, hard))


@pytest.mark.parametrize('soft', [False, True])
def test_value_and_gradient_are_soft_cross_entropy_at_the_fixed_label(soft):
    torch.manual_seed(0)
    logits = torch.randn(16, 10, requires_grad=True)
    target = torch.softmax(torch.randn(16, 10), 1) if soft else torch.randint(10, (16,))
    loss = ALPSSoftTargetCrossEntropy(eps=0.3)(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)

    rho = adversarial_label(logits.detach(), target, 0.3)
    reference = SoftTargetCrossEntropy()(logits, rho)
    (reference_grad,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(grad, reference_grad)
    # the label really moved: the loss is above the clean soft cross-entropy
    clean = target if soft else F.one_hot(target, 10).float()
    assert loss > SoftTargetCrossEntropy()(logits, clean)


def test_adversarial_loss_is_never_below_clean_loss():
    torch.manual_seed(1)
    logits = torch.randn(64, 100)
    target = torch.randint(100, (64,))
    assert ALPSSoftTargetCrossEntropy(eps=0.3)(logits, target) >= F.cross_entropy(logits, target)


@pytest.mark.parametrize('eps', [-0.01, 2.01])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match=f'eps={eps}'):
        ALPSSoftTargetCrossEntropy(eps=eps)


def test_non_finite_logits_are_not_silent():
    logits = torch.randn(2, 5)
    logits[0, 0] = float('nan')
    with pytest.raises(ValueError, match='NaN or inf'):
        ALPSSoftTargetCrossEntropy(eps=0.3)(logits, torch.tensor([0, 1]))


def _dense_reference(logits, target, eps):
    """The ALPS loss and its gradient computed the plain way: -sum(adversarial_label * log_softmax)."""
    logits = logits.detach().clone().requires_grad_()
    loss = torch.sum(-adversarial_label(logits, target, eps) * F.log_softmax(logits, -1), -1).mean()
    loss.backward()
    return loss, logits.grad


def _row(kind, k, y, draw_float):
    if kind == 'one_hot':
        return F.one_hot(torch.tensor(y), k).double()
    if kind == 'smoothed':
        s = draw_float
        return torch.full((k,), s / k, dtype=torch.float64).index_fill_(0, torch.tensor([y]), 1 - s + s / k)
    if kind == 'mixture':
        row = 0.5 * _row('smoothed', k, y, draw_float) + 0.5 * _row('smoothed', k, (y * 7 + 1) % k, draw_float)
        return row
    row = torch.rand(k, dtype=torch.float64, generator=torch.Generator().manual_seed(y))  # arbitrary
    return row / row.sum()


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2 ** 16), k=st.integers(2, 40), batch=st.integers(1, 6), tie_levels=st.sampled_from([0, 2, 3]),
       eps=st.sampled_from([0.01, 0.1, 0.3, 0.5, 1.0, 2.0]), smoothing=st.sampled_from([0.0, 0.05, 0.1, 0.5, 0.9]),
       kinds=st.lists(st.sampled_from(['one_hot', 'smoothed', 'mixture', 'arbitrary']), min_size=6, max_size=6))
def test_fused_loss_equals_dense_path(seed, k, batch, tie_levels, eps, smoothing, kinds):
    """The loss never builds the label for one-hot/smoothed rows: value and gradient still equal the dense formula,
    with ties among the logits (tie_levels > 0: few distinct values, so ties at y, at k* and elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randint(tie_levels, (batch, k), generator=g).float() if tie_levels
              else torch.randn(batch, k, generator=g) * 3)
    ys = torch.randint(k, (batch,), generator=g).tolist()
    target = torch.stack([_row(kinds[b], k, ys[b], smoothing) for b in range(batch)]).float()
    loss_fn = ALPSSoftTargetCrossEntropy(eps=eps)
    x = logits.clone().requires_grad_()
    loss = loss_fn(x, target)
    loss.backward()
    reference, reference_grad = _dense_reference(logits, target, eps)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, reference_grad, rtol=1e-5, atol=1e-6)


def test_the_loss_reads_the_target_as_it_is_now():
    """Edits of a mixer's target after it was made (in place, through .data or numpy) reach the loss: the label is
    computed from the values, never from anything remembered about the tensor."""
    torch.manual_seed(0)
    mixer = ALPSMixup(num_classes=10, label_smoothing=0.1, seed=0)
    _, target = mixer(torch.zeros(4, 1), torch.tensor([1, 2, 3, 4]))
    logits = torch.randn(4, 10)
    loss_fn = mixer.make_loss()
    torch.testing.assert_close(loss_fn(logits, target.clone()), loss_fn(logits, target))
    target.data[:] = 0.1
    torch.testing.assert_close(loss_fn(logits, target), loss_fn(logits, torch.full((4, 10), 0.1)))
    target.numpy()[0] = F.one_hot(torch.tensor(7), 10).numpy()
    torch.testing.assert_close(loss_fn(logits, target), loss_fn(logits, target.clone()))
    target.fill_(-1.0)
    with pytest.raises(ValueError, match='non-negative and sum to 1'):
        loss_fn(logits, target)


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_non_finite_logits_with_dense_targets_are_not_silent(bad):
    logits = torch.randn(2, 5)
    logits[1, 3] = bad
    with pytest.raises(ValueError, match='NaN or inf'):
        ALPSSoftTargetCrossEntropy(eps=0.3)(logits, F.one_hot(torch.tensor([0, 1]), 5).float())


def test_fused_loss_in_float64():
    logits = torch.randn(4, 30, dtype=torch.float64)
    target = torch.full((4, 30), 0.1 / 30, dtype=torch.float64).index_fill_(1, torch.tensor([2]), 0.9 + 0.1 / 30)
    x = logits.clone().requires_grad_()
    loss = ALPSSoftTargetCrossEntropy(eps=0.3)(x, target)
    loss.backward()
    reference, reference_grad = _dense_reference(logits, target, 0.3)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(x.grad, reference_grad)


# --- BinaryCrossEntropy, the general wrapper, precision, the once-only handshake --------------------------------


def smoothed(target, k, s):
    return F.one_hot(target, k).double() * (1 - s) + s / k


@pytest.mark.parametrize('kwargs', [
    dict(), dict(smoothing=0.0), dict(target_threshold=0.2), dict(reduction='sum'), dict(sum_classes=True),
    dict(pos_weight=2.0), dict(weight=torch.rand(10)), dict(pos_weight=torch.rand(10) + 0.5, reduction='none'),
])
@pytest.mark.parametrize('soft', [False, True])
def test_bce_eps_zero_is_timm_binary_cross_entropy(kwargs, soft):
    torch.manual_seed(0)
    logits = torch.randn(8, 10)
    target = torch.softmax(torch.randn(8, 10) * 3, 1) if soft else torch.randint(10, (8,))
    torch.testing.assert_close(ALPSBinaryCrossEntropy(eps=0, **kwargs)(logits, target),
                               BinaryCrossEntropy(**kwargs)(logits, target))


@pytest.mark.parametrize('kwargs', [dict(), dict(smoothing=0.0), dict(reduction='sum'), dict(sum_classes=True),
                                    dict(pos_weight=3.0)])
def test_bce_is_timm_bce_at_the_adversarial_label(kwargs):
    torch.manual_seed(1)
    logits = torch.randn(16, 10, requires_grad=True)
    target = torch.randint(10, (16,))
    loss = ALPSBinaryCrossEntropy(eps=0.3, **kwargs)(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    s = kwargs.get('smoothing', 0.1)
    rho = adversarial_label(logits.detach(), smoothed(target, 10, s).float(), 0.3)
    reference = BinaryCrossEntropy(**kwargs)(logits, rho)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(grad, torch.autograd.grad(reference, logits)[0])  # no gradient through the label
    assert loss > BinaryCrossEntropy(**kwargs)(logits, target)


def bce_lp_optimum(coef, y_row, eps):
    """max_t coef.t s.t. t >= 0, sum t = 1, ||t - y||_1 <= eps, as an LP over (t, u) with u >= |t - y|."""
    k = len(y_row)
    eye = np.eye(k)
    a_ub = np.block([[eye, -eye], [-eye, -eye], [np.zeros((1, k)), np.ones((1, k))]])
    b_ub = np.concatenate([y_row, -y_row, [eps]])
    a_eq = np.concatenate([np.ones(k), np.zeros(k)])[None]
    res = linprog(np.concatenate([-coef, np.zeros(k)]), A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=[1.0],
                  bounds=[(0, None)] * (2 * k), method='highs')
    assert res.status == 0
    return -res.fun


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2 ** 31), k=st.integers(2, 8), soft=st.booleans(), ties=st.booleans(),
       eps=st.floats(0.0, 2.0), weights=st.sampled_from(['none', 'pos_scalar', 'pos_class', 'weight']))
def test_bce_label_is_optimal_against_linear_program(seed, k, soft, ties, eps, weights):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, k, generator=g, dtype=torch.float64) * 3
    if ties:
        logits = logits.round()
    if soft:
        raw = torch.rand(3, k, generator=g, dtype=torch.float64) * (torch.rand(3, k, generator=g) < 0.5)
        raw[torch.arange(3), torch.randint(k, (3,), generator=g)] += 1.0
        target = raw / raw.sum(1, keepdim=True)
        y = target
    else:
        target = torch.randint(k, (3,), generator=g)
        y = smoothed(target, k, 0.1)
    kwargs = {'pos_scalar': dict(pos_weight=2.5), 'pos_class': dict(pos_weight=torch.rand(k, generator=g) * 3),
              'weight': dict(weight=torch.rand(k, generator=g, dtype=torch.float64) * 2 - 0.5), 'none': {}}[weights]
    per_class = ALPSBinaryCrossEntropy(eps=eps, reduction='none', **kwargs)(logits, target)
    achieved = per_class.sum(1)
    # BCE is affine in the target: f(t) = sum_k w_k softplus(z_k) + sum_k t_k c_k
    w = kwargs.get('weight', torch.ones(k, dtype=torch.float64))
    p = torch.as_tensor(kwargs.get('pos_weight', 1.0), dtype=torch.float64)
    coef = w * (p * F.softplus(-logits) - F.softplus(logits))
    const = (w * F.softplus(logits)).sum(1)
    for i in range(3):
        best = const[i].item() + bce_lp_optimum(coef[i].numpy(), y[i].numpy(), eps)
        assert achieved[i].item() >= best - 1e-5


def test_bce_target_threshold_binarises_then_shifts():
    torch.manual_seed(2)
    logits = torch.randn(6, 10, requires_grad=True)
    target = torch.randint(10, (6,))
    loss = ALPSBinaryCrossEntropy(eps=0.3, smoothing=0.1, target_threshold=0.2)(logits, target)
    # the ball is taken around the binarised (one-hot) label, so the eps/2 mass on k* survives
    rho = adversarial_label(logits.detach(), target, 0.3)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, rho))
    assert loss > BinaryCrossEntropy(smoothing=0.1, target_threshold=0.2)(logits, target)


def test_bce_threshold_leaving_multi_hot_rows_is_refused():
    mixed = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])  # a MixUp target: two classes above 0.2
    with pytest.raises(ValueError, match='target_threshold=0.2'):
        ALPSBinaryCrossEntropy(eps=0.3, target_threshold=0.2)(torch.randn(2, 3), mixed)
    with pytest.raises(ValueError, match='target_threshold=0.95'):  # no class above it
        ALPSBinaryCrossEntropy(eps=0.3, target_threshold=0.95)(torch.randn(2, 3), torch.tensor([0, 1]))
    # eps=0 keeps timm's multi-hot behaviour
    ALPSBinaryCrossEntropy(eps=0, target_threshold=0.2)(torch.randn(2, 3), mixed)


def test_alps_loss_wraps_any_soft_target_loss():
    torch.manual_seed(3)
    logits, target = torch.randn(8, 10), torch.randint(10, (8,))
    torch.testing.assert_close(ALPSLoss(SoftTargetCrossEntropy(), eps=0.3)(logits, target),
                               ALPSSoftTargetCrossEntropy(eps=0.3)(logits, target))
    seen = {}

    def kl(x, t):
        seen['target'] = t
        return F.kl_div(F.log_softmax(x, 1), t, reduction='batchmean')
    ALPSLoss(kl, eps=0.4)(logits, target)
    torch.testing.assert_close(seen['target'], adversarial_label(logits, target, 0.4))


@pytest.mark.parametrize('base, error, match', [
    (ALPSSoftTargetCrossEntropy(), ValueError, 'already an ALPS loss'),
    (BinaryCrossEntropy(target_threshold=0.2), ValueError, 'target_threshold=0.2'),
    ('ce', TypeError, 'callable'),
])
def test_alps_loss_refuses(base, error, match):
    with pytest.raises(error, match=match):
        ALPSLoss(base)


@pytest.mark.parametrize('make', [
    lambda eps: ALPSSoftTargetCrossEntropy(eps=eps),
    lambda eps: ALPSBinaryCrossEntropy(eps=eps),
    lambda eps: ALPSLoss(SoftTargetCrossEntropy(), eps=eps),
])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_logits_give_a_float32_loss(make, dtype):
    torch.manual_seed(4)
    logits, target = torch.randn(8, 100).to(dtype), torch.randint(100, (8,))
    loss = make(0.3)(logits, target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, make(0.3)(logits.float(), target), rtol=0, atol=0)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        net = torch.nn.Linear(20, 100)
        out = net(torch.randn(8, 20))
        assert out.dtype == torch.bfloat16
        loss = make(0.3)(out, target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, make(0.3)(out.float(), target), rtol=0, atol=0)


@pytest.mark.parametrize('make', [ALPSSoftTargetCrossEntropy, ALPSBinaryCrossEntropy,
                                  lambda eps: ALPSLoss(SoftTargetCrossEntropy(), eps=eps)])
@pytest.mark.parametrize('eps', [0.0, 0.3])
def test_targets_as_timm_takes_them(make, eps):
    logits = torch.randn(5, 7)
    target = torch.tensor([0, 3, 6, 2, 2])
    expected = make(eps)(logits, target)
    for t in (target.view(-1, 1), target.to(torch.uint8), target.to(torch.int16), target.to(torch.int32)):
        torch.testing.assert_close(make(eps)(logits, t), expected)


@pytest.mark.parametrize('eps', [0.0, 0.3])
@pytest.mark.parametrize('target, error, match', [
    (torch.full((4, 1), 0.5), ValueError, 'soft target has 1 classes but the logits have 6 classes'),
    (torch.full((4, 6), 0.5 / 6), ValueError, 'sum to 1'),
    (torch.tensor([0, 1, 2, 6]), ValueError, r'out of range.*\[0, 6\) \(the logits have 6 classes\)'),
    (torch.tensor([0, 1, 2]), ValueError, 'batch size .* but the logits have 4 rows'),
])
def test_eps_zero_validates_targets_as_eps_positive(eps, target, error, match):
    with pytest.raises(error, match=match):
        ALPSSoftTargetCrossEntropy(eps=eps)(torch.randn(4, 6), target)


@pytest.mark.parametrize('make', [ALPSSoftTargetCrossEntropy, ALPSBinaryCrossEntropy,
                                  lambda eps: ALPSLoss(SoftTargetCrossEntropy(), eps=eps)])
@pytest.mark.parametrize('eps, error, match', [
    (None, TypeError, 'got None'),
    (float('nan'), ValueError, 'eps=nan'),
    (float('inf'), ValueError, 'eps=inf'),
    (torch.tensor([0.1, 0.2]), ValueError, 'one-element tensor'),
    ('0.3', TypeError, 'real number'),
])
def test_bad_eps_is_named(make, eps, error, match):
    with pytest.raises(error, match=match):
        make(eps)


def test_eps_as_one_element_tensor():
    assert ALPSSoftTargetCrossEntropy(eps=torch.tensor(0.25)).eps == 0.25
    assert ALPSBinaryCrossEntropy(eps=torch.tensor([0.25])).eps == 0.25


@pytest.mark.parametrize('kwargs, match', [
    (dict(smooth_dense=True), 'smooth_dense'),
    (dict(reduction='avg'), "reduction='avg'"),
    (dict(smoothing=1.0), 'smoothing=1.0'),
    (dict(target_threshold=float('nan')), 'target_threshold=nan'),
])
def test_bad_bce_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ALPSBinaryCrossEntropy(eps=0.3, **kwargs)


class TinyNet(torch.nn.Module):
    def __init__(self, k=10):
        super().__init__()
        self.fc = torch.nn.Linear(12, k)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize('loss', [
    lambda: ALPSSoftTargetCrossEntropy(eps=0.3), lambda: ALPSBinaryCrossEntropy(eps=0.3),
    lambda: ALPSLoss(SoftTargetCrossEntropy(), eps=0.3)])
def test_model_handle_targets_are_never_shifted_twice(loss):
    torch.manual_seed(5)
    net = TinyNet()
    mixup = ALPSMixup(model=net, seed=0, num_classes=10)
    x, target = mixup(torch.randn(6, 3, 2, 2), torch.randint(10, (6,)))
    with pytest.raises(ValueError, match='already adversarial.*make_loss'):
        loss()(net(x), target)


@pytest.mark.parametrize('kind', ['ce', 'bce'])
def test_make_loss_shifts_exactly_once_on_both_paths(kind):
    torch.manual_seed(6)
    net = TinyNet()
    x, y = torch.randn(8, 3, 2, 2), torch.randint(10, (8,))
    fused = ALPSMixup(alps_eps=0.4, seed=1, num_classes=10)
    handle = ALPSMixup(alps_eps=0.4, seed=1, num_classes=10, model=net)
    assert (fused.label_path, handle.label_path) == ('fused', 'model')
    xf, base = fused(x, y)
    xh, adversarial = handle(x, y)
    logits = net(xf)
    once = adversarial_label(logits, base, 0.4)
    torch.testing.assert_close(adversarial, once)
    fused_loss, handle_loss = fused.make_loss(kind), handle.make_loss(kind)
    assert fused_loss.eps == 0.4 and handle_loss.eps == 0.0
    torch.testing.assert_close(fused_loss(logits, base), handle_loss(net(xh), adversarial))
    reference = SoftTargetCrossEntropy() if kind == 'ce' else BinaryCrossEntropy()
    torch.testing.assert_close(fused_loss(logits, base), reference(logits, once))


def test_bce_weights_as_sequences():
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(ALPSBinaryCrossEntropy(pos_weight=[1.0, 2.0, 3.0], weight=np.ones(3))(logits, target),
                               ALPSBinaryCrossEntropy(pos_weight=torch.tensor([1.0, 2.0, 3.0]))(logits, target))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('make', [ALPSSoftTargetCrossEntropy, ALPSBinaryCrossEntropy])
def test_float32_loss_under_cuda_autocast(make):
    net = torch.nn.Linear(20, 100).cuda()
    target = torch.randint(100, (8,), device='cuda')
    with torch.autocast('cuda', dtype=torch.float16):
        out = net(torch.randn(8, 20, device='cuda'))
        loss = make(eps=0.3)(out, target)
    assert out.dtype == torch.float16 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, make(eps=0.3)(out.float(), target))
