"""Nothing hidden changes a result: copies, pickles, in-place edits, inference mode, torch.func and torch.compile."""
import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_alps import (ALPSBinaryCrossEntropy, ALPSMixup, ALPSSoftTargetCrossEntropy, EpsWarmup,
                       FastCollateALPSMixup, adversarial_label)
from timm_alps.labels import _soft_label, _sorted_label


def _holder(mixer_cls=ALPSMixup, loss='ce'):
    holder = nn.Module()  # a LightningModule, an EMA wrapper, ... holding both
    holder.m = mixer_cls(alps_eps=0.3, num_classes=10, seed=0)
    holder.c = holder.m.make_loss(loss)
    return holder


@pytest.mark.parametrize('mixer_cls', [ALPSMixup, FastCollateALPSMixup])
@pytest.mark.parametrize('how', ['deepcopy', 'pickle'])
def test_a_copy_of_mixer_and_loss_stays_linked(mixer_cls, how):
    h = _holder(mixer_cls)
    h2 = copy.deepcopy(h) if how == 'deepcopy' else pickle.loads(pickle.dumps(h))
    h2.m.alps_eps = 0.05
    assert h2.c.eps == 0.05 and h.c.eps == 0.3 and h.m.alps_eps == 0.3
    logits, target = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    torch.testing.assert_close(h2.c(logits, target), ALPSSoftTargetCrossEntropy(0.05)(logits, target))
    h.m.alps_eps = 0.1  # the original steers only its own loss
    assert h.c.eps == 0.1 and h2.c.eps == 0.05


def test_warmup_reaches_the_copied_loss():
    h = _holder()
    h.w = EpsWarmup(h.m, warmup_updates=4)
    h2 = copy.deepcopy(h)
    h2.w.step(2)
    assert h2.c.eps == pytest.approx(0.15) and h.c.eps == 0.0
    h3 = pickle.loads(pickle.dumps(h2))
    h3.w.step()
    assert h3.c.eps == pytest.approx(0.225) and h2.c.eps == pytest.approx(0.15)


def test_a_refused_radius_changes_nothing():
    mixer = ALPSMixup(alps_eps=0.0, num_classes=10)
    ce = mixer.make_loss()
    bce = mixer.make_loss('bce', smooth_dense=True)  # multi-label smoothing: no ball, so eps must stay 0
    with pytest.raises(ValueError, match='smooth_dense'):
        mixer.alps_eps = 0.3
    assert mixer.alps_eps == 0.0 and ce.eps == 0.0 and bce.eps == 0.0
    for bad, error in (('0.3', TypeError), (3.0, ValueError), (float('nan'), ValueError), (None, TypeError)):
        with pytest.raises(error, match='alps_eps'):
            mixer.alps_eps = bad
        assert mixer.alps_eps == 0.0 and ce.eps == 0.0


def test_in_place_edits_of_a_target_reach_the_loss():
    mixer = ALPSMixup(num_classes=10, label_smoothing=0.1, seed=0)
    _, target = mixer(torch.randn(4, 3), torch.tensor([1, 2, 3, 4]))
    criterion, logits = mixer.make_loss(), torch.randn(4, 10)
    target.data[:] = 0.1
    torch.testing.assert_close(criterion(logits, target), criterion(logits, target.clone()))
    torch.testing.assert_close(criterion(logits, target), ALPSSoftTargetCrossEntropy(0.3)(logits, torch.full((4, 10), 0.1)))


def test_both_mixers_and_the_losses_under_inference_mode():
    mixer = ALPSMixup(num_classes=10, label_smoothing=0.1, seed=0)
    collate = FastCollateALPSMixup(num_classes=10, seed=0)
    batch = [(torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8), i) for i in range(4)]
    with torch.inference_mode():
        x, target = mixer(torch.randn(4, 3), torch.tensor([1, 2, 3, 4]))
        images, collated = collate(batch)
        logits = torch.randn(4, 10)
        for criterion in (mixer.make_loss(), mixer.make_loss('bce'), collate.make_loss()):
            assert torch.isfinite(criterion(logits, target)) and torch.isfinite(criterion(logits, collated))
    model = nn.Linear(3, 10)
    with torch.inference_mode():
        _, adversarial = ALPSMixup(num_classes=10, model=model, seed=0)(torch.randn(4, 3), torch.tensor([1, 2, 3, 4]))
    assert adversarial.shape == (4, 10)


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_torch_func_grad_equals_autograd(smoothing):
    mixer = ALPSMixup(num_classes=10, label_smoothing=smoothing, seed=0)
    _, target = mixer(torch.randn(8, 3), torch.randint(10, (8,)))
    criterion = mixer.make_loss()
    logits = torch.randn(8, 10)
    grad = torch.func.grad(lambda z: criterion(z, target))(logits)
    z = logits.clone().requires_grad_()
    criterion(z, target).backward()
    torch.testing.assert_close(grad, z.grad)


def test_fused_loss_under_torch_compile():
    criterion = ALPSSoftTargetCrossEntropy(eps=0.3)
    compiled = torch.compile(lambda z, t: criterion(z, t), backend='aot_eager')
    target = torch.full((6, 12), 0.1 / 12).index_fill_(1, torch.tensor([3]), 0.9 + 0.1 / 12)
    logits = torch.randn(6, 12)
    torch.testing.assert_close(compiled(logits, target), criterion(logits, target))


def test_float32_loss_and_label_under_cpu_autocast():
    criterion = ALPSSoftTargetCrossEntropy(eps=0.3)
    linear = nn.Linear(5, 10)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = linear(torch.randn(4, 5))
        assert logits.dtype == torch.bfloat16
        loss = criterion(logits, torch.tensor([0, 1, 2, 3]))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, criterion(logits.float(), torch.tensor([0, 1, 2, 3])))


@pytest.mark.parametrize('seed', range(5))
def test_the_accelerator_branch_is_exact_too(seed):
    """Without picking rows (as on an accelerator: no host sync) every row is sorted and torch.where picks: the same
    label as the CPU branch, rows the sort-free path leaves included."""
    g = torch.Generator().manual_seed(seed)
    k = 12
    z = torch.randint(4, (16, k), generator=g).double()
    soft = torch.rand(16, k, generator=g, dtype=torch.float64) ** 4
    soft[8:] = 0.09  # smoothing spread so wide the budget ends inside a run: these rows need the sort
    soft[8:, 0] += 1 - soft[8:].sum(1)
    soft /= soft.sum(1, keepdim=True)
    k_star = z.argmin(1, keepdim=True)
    n_donors = (z > z.amin(1, keepdim=True)).sum(1, keepdim=True).double()
    expected = _sorted_label(z, soft, 0.2, k_star)
    for pick_rows in (True, False):
        label = _soft_label(z, soft, 0.2, k_star, n_donors, torch.empty_like(z), pick_rows)
        torch.testing.assert_close(label, expected, rtol=0, atol=1e-12)


def test_adversarial_label_keeps_no_state_between_calls():
    logits, target = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    first = adversarial_label(logits, target, 0.3)
    adversarial_label(torch.randn(4, 10), F.one_hot(target, 10).float(), 0.5)
    torch.testing.assert_close(adversarial_label(logits, target, 0.3), first, rtol=0, atol=0)


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(sum_classes='false'), TypeError, 'sum_classes must be True or False'),
    (dict(sum_classes=1), TypeError, 'sum_classes'),
    (dict(smooth_dense='no'), TypeError, 'smooth_dense must be True or False'),
    (dict(pos_weight=-1), ValueError, r'pos_weight must be >= 0'),
    (dict(pos_weight=[1.0, -0.5]), ValueError, r'pos_weight must be >= 0'),
    (dict(pos_weight=float('nan')), ValueError, 'pos_weight must be finite'),
    (dict(weight=[1.0, float('nan')]), ValueError, 'weight must be finite'),
    (dict(weight=[1.0, float('inf')]), ValueError, 'weight must be finite'),
    (dict(weight=torch.ones(2, 3)), ValueError, 'weight must be a number or a 1-D'),
    (dict(weight='heavy'), TypeError, 'weight must be a number or a per-class tensor'),
    (dict(pos_weight=True), TypeError, 'pos_weight'),
    (dict(reduction='avg'), ValueError, "reduction='avg'"),
])
def test_bce_arguments_are_checked_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        ALPSBinaryCrossEntropy(**kwargs)


@pytest.mark.parametrize('name', ['weight', 'pos_weight'])
def test_bce_weight_length_is_checked_at_the_first_call(name):
    criterion = ALPSBinaryCrossEntropy(**{name: torch.ones(11)})
    with pytest.raises(ValueError, match=f'{name} has 11 entries but the logits have 10 classes'):
        criterion(torch.randn(2, 10), torch.tensor([0, 1]))
    assert torch.isfinite(ALPSBinaryCrossEntropy(**{name: torch.ones(10)})(torch.randn(2, 10), torch.tensor([0, 1])))


@pytest.mark.parametrize('state, error, match', [
    (None, TypeError, 'state_dict must be the dict'),
    ({'generatr': None, 'device': None}, ValueError, "keys \\['device', 'generatr'\\]"),
    ({'generator': None}, ValueError, 'keys'),
    ({'generator': None, 'device': None, 'extra': 1}, ValueError, 'keys'),
    ({'generator': [1, 2], 'device': 'cpu'}, TypeError, 'uint8 tensor'),
    ({'generator': torch.zeros(7, dtype=torch.uint8), 'device': 'cpu'}, ValueError, 'not a CPU generator state'),
    ({'generator': torch.Generator().get_state(), 'device': None}, TypeError, 'device type'),
    ({'generator': None, 'device': 'cpu'}, ValueError, 'without a generator state'),
])
@pytest.mark.parametrize('mixer_cls', [ALPSMixup, FastCollateALPSMixup])
def test_mixer_load_state_dict_refuses_what_it_cannot_restore(mixer_cls, state, error, match):
    mixer = mixer_cls(num_classes=10, seed=0)
    before = mixer.state_dict()
    with pytest.raises(error, match=match):
        mixer.load_state_dict(state)
    assert mixer.state_dict()['generator'] is before['generator']


def test_a_generator_state_of_another_device_is_refused_at_the_first_draw():
    mixer = ALPSMixup(num_classes=10, seed=0)
    mixer.load_state_dict({'generator': torch.Generator().get_state(), 'device': 'cuda'})
    with pytest.raises(ValueError, match='cuda generator state'):
        mixer(torch.randn(2, 3), torch.tensor([0, 1]))


def test_mixer_state_round_trips_through_pickle_and_resumes_the_stream():
    mixer = ALPSMixup(num_classes=10, seed=3)
    mixer(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))
    state = pickle.loads(pickle.dumps(mixer.state_dict()))
    expected = mixer(torch.arange(12.).view(4, 3), torch.tensor([0, 1, 2, 3]))
    resumed = ALPSMixup(num_classes=10, seed=3)
    resumed.load_state_dict(state)
    got = resumed(torch.arange(12.).view(4, 3), torch.tensor([0, 1, 2, 3]))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
