"""Tests for timm_alps.attacks: bounds, exact identities on linear models, monotonicity, model state, transfer."""
import argparse
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from timm_alps.attacks import (
    NormalizedModel, apgd_ce, evaluate_robustness, fgsm, gradient_masking_suspected, load_checkpoint_model, pgd,
    transfer_attack, unbounded_pgd,
)

NUM_CLASSES = 3
SHAPE = (3, 4, 4)


def _synthetic(n: int, seed: int):
    """Three classes, each a fixed +-0.08 pattern around grey plus noise: learnable, but not by a wide margin."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn((NUM_CLASSES,) + SHAPE, generator=torch.Generator().manual_seed(0)).sign() * 0.08
    labels = torch.arange(n) % NUM_CLASSES
    noise = 0.2 * torch.randn((n,) + SHAPE, generator=g)
    return (0.5 + templates[labels] + noise).clamp(0, 1), labels


class TinyNet(nn.Module):
    """Conv + BN + dropout + MLP: has buffers and train/eval-dependent layers, to check attacks leave them be."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8 * 16, num_classes)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.bn(self.conv(x))).flatten(1)))


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 80) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope='module')
def data():
    return _synthetic(96, seed=1)


@pytest.fixture(scope='module')
def net(data):
    torch.manual_seed(0)
    return _train(TinyNet(), *_synthetic(384, seed=2))


def _error(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) != y).float().mean().item()


def _ce(model, x, y) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction='none')


ATTACKS = {
    'fgsm': lambda m, x, y, eps: fgsm(m, x, y, eps),
    'pgd': lambda m, x, y, eps: pgd(m, x, y, eps, step_size=max(eps, 1e-3) / 4, steps=5),
    'pgd_rs': lambda m, x, y, eps: pgd(m, x, y, eps, step_size=max(eps, 1e-3) / 4, steps=5, random_start=True,
                                       generator=torch.Generator().manual_seed(0)),
    'pgd_last': lambda m, x, y, eps: pgd(m, x, y, eps, step_size=max(eps, 1e-3) / 4, steps=5, keep_best=False),
    'apgd': lambda m, x, y, eps: apgd_ce(m, x, y, eps, steps=10, generator=torch.Generator().manual_seed(0)),
    'apgd_restarts': lambda m, x, y, eps: apgd_ce(m, x, y, eps, steps=5, n_restarts=2,
                                                  generator=torch.Generator().manual_seed(0)),
}


@pytest.mark.parametrize('name', sorted(ATTACKS))
@pytest.mark.parametrize('eps', [0.0, 1 / 255, 4 / 255, 0.3])
def test_bounded_and_in_unit_box(net, data, name, eps):
    x, y = data
    # push some pixels onto the box edges, where the [0, 1] clip binds
    x = x.clone()
    x[:8] = (x[:8] - 0.5).sign().clamp(min=0)
    x_adv = ATTACKS[name](net, x, y, eps)
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max().item() <= eps + 1e-7
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


@settings(max_examples=25, deadline=None)
@given(eps=st.floats(0.0, 0.5), seed=st.integers(0, 2 ** 16), steps=st.integers(1, 4),
       random_start=st.booleans())
def test_pgd_bounded_property(eps, seed, steps, random_start):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    x = torch.rand(5, 3, 2, 2)
    y = torch.randint(0, 4, (5,))
    gen = torch.Generator().manual_seed(seed)
    for x_adv in (fgsm(model, x, y, eps),
                  pgd(model, x, y, eps, step_size=0.05, steps=steps, random_start=random_start, generator=gen),
                  apgd_ce(model, x, y, eps, steps=steps, random_start=random_start, generator=gen)):
        assert (x_adv - x).abs().max().item() <= eps + 1e-6
        assert 0.0 <= x_adv.min().item() and x_adv.max().item() <= 1.0


def test_unbounded_stays_in_unit_box(net, data):
    x, y = data
    x_adv = unbounded_pgd(net, x, y, steps=5, step_size=0.2)
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert (x_adv - x).abs().max().item() > 0.2  # not bound to any eps


def test_eps_zero_gives_clean_error(net, data):
    x, y = data
    loader = [(x[:48], y[:48]), (x[48:], y[48:])]
    attacks = {name: (lambda m, a, b, f=fn: f(m, a, b, 0.0)) for name, fn in ATTACKS.items()}
    result = evaluate_robustness({'net': net}, loader, attacks=attacks, source=net, transfer_attacks=attacks,
                                 progress=False)
    errors = result.errors['net']
    assert result.num_samples == 96
    assert errors['clean'] == pytest.approx(_error(net, x, y))
    assert errors['clean'] > 0  # the check is not trivially 0 == 0
    for name in ATTACKS:
        assert errors[f'white-box/{name}'] == errors['clean']
        assert errors[f'black-box/{name}'] == errors['clean']
    for name, fn in ATTACKS.items():
        assert torch.equal(fn(net, x, y, 0.0), x)


@pytest.mark.parametrize('eps', [1 / 255, 4 / 255, 0.1])
def test_one_pgd_step_equals_fgsm(net, data, eps):
    x, y = data
    a = fgsm(net, x, y, eps)
    for keep_best in (True, False):
        b = pgd(net, x, y, eps, step_size=eps, steps=1, random_start=False, keep_best=keep_best)
        assert torch.equal(a, b)
    assert not torch.equal(a, x)


def _binary_linear(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    x = 0.2 + 0.6 * torch.rand(64, 3, 2, 2)  # interior: x +- eps never meets the [0, 1] clip
    y = torch.randint(0, 2, (64,))
    return model, x, y


def test_fgsm_is_analytic_worst_case_on_linear_model():
    model, x, y = _binary_linear()
    eps = 4 / 255
    w = model[1].weight.detach()
    # true-class margin (w_y - w_other) . x is minimised over the box by x - eps * sign(w_y - w_other)
    direction = (w[y] - w[1 - y]).reshape(x.shape)
    worst = x - eps * direction.sign()
    x_adv = fgsm(model, x, y, eps)
    torch.testing.assert_close(x_adv, worst, rtol=0, atol=1e-7)

    def margin(z, labels):
        logits = model(z).detach()
        return logits.gather(1, labels[:, None]).squeeze(1) - logits.gather(1, (1 - labels)[:, None]).squeeze(1)

    # brute-force the corners of the eps-box for one sample: none lowers the margin further
    corners = torch.tensor([[(i >> k) & 1 for k in range(12)] for i in range(4096)], dtype=torch.float32)
    box = x[:1].flatten(1) + eps * (2 * corners - 1)
    logits = model(box.reshape(-1, 3, 2, 2)).detach()
    best = (logits[:, y[0]] - logits[:, 1 - y[0]]).min()
    assert margin(x_adv[:1], y[:1]).item() == pytest.approx(best.item(), abs=1e-5)


def test_pgd_cannot_beat_fgsm_on_linear_model_and_reaches_it():
    model, x, y = _binary_linear(seed=3)
    eps = 4 / 255
    x_fgsm = fgsm(model, x, y, eps)
    loss_fgsm = _ce(model, x_fgsm, y)
    for steps, step_size, rs in [(10, 1 / 255, False), (3, 1 / 255, False), (7, 0.5 / 255, True)]:
        x_pgd = pgd(model, x, y, eps, step_size=step_size, steps=steps, random_start=rs,
                    generator=torch.Generator().manual_seed(0))
        assert (_ce(model, x_pgd, y) <= loss_fgsm + 1e-6).all()
    # 10 steps of 1/255 travel past the 4/255 corner, so PGD-10 ends exactly on FGSM's point
    torch.testing.assert_close(pgd(model, x, y, eps, step_size=1 / 255, steps=10), x_fgsm, rtol=0, atol=1e-6)


def test_more_pgd_steps_never_lower_the_loss(net, data):
    x, y = data
    eps = 8 / 255
    for rs in (False, True):
        previous = None
        for steps in range(1, 9):
            # a large step makes plain PGD oscillate; the kept best iterate must still never lose ground
            x_adv = pgd(net, x, y, eps, step_size=eps, steps=steps, random_start=rs,
                        generator=torch.Generator().manual_seed(7))
            loss = _ce(net, x_adv, y)
            if previous is not None:
                assert (loss >= previous - 1e-6).all(), steps
            previous = loss


def _state(model: nn.Module):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize('name', ['fgsm', 'pgd_rs', 'apgd', 'unbounded', 'evaluate'])
def test_model_mode_parameters_buffers_untouched(data, name):
    x, y = data
    torch.manual_seed(0)
    model = TinyNet().train()
    model.bn.eval()  # mixed modes must come back as they were, not all-train
    model.fc.weight.requires_grad_(False)
    with torch.no_grad():
        model.bn.running_mean.add_(0.3)  # non-default stats, so a BN update in train mode would show
    before = _state(model)
    if name == 'unbounded':
        unbounded_pgd(model, x, y, steps=3)
    elif name == 'evaluate':
        attack = lambda m, a, b: pgd(m, a, b, 4 / 255, 1 / 255, 2)  # noqa: E731
        evaluate_robustness({'m': model}, [(x, y)], attacks={'pgd': attack}, source=model,
                            transfer_attacks={'pgd': attack}, progress=False)
    else:
        ATTACKS[name](model, x, y, 4 / 255)
    assert model.training and model.conv.training and model.drop.training and not model.bn.training
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, True, False, True]
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_attacks_use_eval_mode(data):
    # with dropout active, two forward passes differ; in eval mode the attack is deterministic
    x, y = data
    torch.manual_seed(0)
    model = TinyNet().train()
    model.drop.p = 0.9
    torch.manual_seed(1)
    a = pgd(model, x, y, 4 / 255, 1 / 255, 3)
    torch.manual_seed(2)
    b = pgd(model, x, y, 4 / 255, 1 / 255, 3)
    assert torch.equal(a, b)


def test_attacks_run_in_fp32_under_autocast(net, data):
    x, y = data
    with torch.autocast('cpu', dtype=torch.bfloat16):
        a = fgsm(net, x, y, 4 / 255)
    assert a.dtype == torch.float32
    assert torch.equal(a, fgsm(net, x, y, 4 / 255))


def test_unbounded_check_breaks_trained_model(net, data):
    x, y = data
    assert _error(net, x, y) < 20  # the model has learnt something
    x_adv = unbounded_pgd(net, x, y)
    accuracy = 100 - _error(net, x_adv, y)
    assert accuracy <= 1.0
    assert not gradient_masking_suspected(accuracy)


class _Quantised(nn.Module):
    """Rounds its input to 4 grey levels: zero gradient almost everywhere, the textbook shattered gradient."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 3) / 3)


def test_unbounded_check_flags_masked_gradients(net, data):
    x, y = data
    masked = _Quantised(net)
    accuracy = 100 - _error(masked, unbounded_pgd(masked, x, y), y)
    assert gradient_masking_suspected(accuracy)


class _Recorder(nn.Module):
    """A target that records the inputs it is shown and blocks gradients through itself."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x.detach())


def test_transfer_uses_source_gradients(net, data):
    x, y = data
    torch.manual_seed(5)
    other = _train(TinyNet(), *_synthetic(384, seed=9), steps=60)
    target = _Recorder(other)
    eps = 8 / 255
    attack = lambda m, a, b: fgsm(m, a, b, eps)  # noqa: E731
    result = transfer_attack(net, {'target': target, 'source_itself': net}, [(x, y)], {'fgsm': attack},
                             progress=False)
    from_source = fgsm(net, x, y, eps)
    from_target = fgsm(other, x, y, eps)
    assert not torch.equal(from_source, from_target)
    assert any(torch.equal(seen, from_source) for seen in target.seen)
    assert not any(torch.equal(seen, from_target) for seen in target.seen)
    assert result.errors['target']['black-box/fgsm'] == pytest.approx(_error(other, from_source, y))
    assert result.errors['source_itself']['black-box/fgsm'] == pytest.approx(_error(net, from_source, y))
    assert set(result.errors['target']) == {'clean', 'black-box/fgsm'}


def test_transfer_crafts_once_per_batch(net, data):
    x, y = data
    calls = []

    def attack(m, a, b):
        calls.append(m)
        return fgsm(m, a, b, 4 / 255)

    evaluate_robustness({'a': net, 'b': net, 'c': net}, [(x[:50], y[:50]), (x[50:], y[50:])],
                        source=net, transfer_attacks={'fgsm': attack}, progress=False)
    assert len(calls) == 2


def test_apgd_bounded_and_not_weaker_than_pgd(net, data):
    x, y = data
    eps = 8 / 255
    clean_loss = _ce(net, x, y)
    x_apgd = apgd_ce(net, x, y, eps, steps=40, random_start=False)
    assert (x_apgd - x).abs().max().item() <= eps + 1e-7
    assert 0.0 <= x_apgd.min().item() and x_apgd.max().item() <= 1.0
    fooled = net(x_apgd).argmax(1) != y
    # samples it did not fool: the returned point is the best-loss iterate, never below the start
    assert (_ce(net, x_apgd, y)[~fooled] >= clean_loss[~fooled] - 1e-6).all()
    err_apgd = _error(net, x_apgd, y)
    err_pgd = _error(net, pgd(net, x, y, eps, step_size=eps / 4, steps=10), y)
    assert err_apgd > _error(net, x, y)
    assert err_apgd >= err_pgd - 100 / len(y)  # at most one sample of slack
    # random restarts only add misclassified samples
    x_rs = apgd_ce(net, x, y, eps, steps=20, n_restarts=3, generator=torch.Generator().manual_seed(0))
    x_one = apgd_ce(net, x, y, eps, steps=20, n_restarts=1, generator=torch.Generator().manual_seed(0))
    assert _error(net, x_rs, y) >= _error(net, x_one, y)


# -- bad input ------------------------------------------------------------------------------------------------------

def test_bad_inputs(net, data):
    x, y = data
    with pytest.raises(ValueError, match='eps must be >= 0'):
        fgsm(net, x, y, -1 / 255)
    with pytest.raises(ValueError, match='eps must be >= 0'):
        pgd(net, x, y, float('nan'), 0.01, 3)
    with pytest.raises(ValueError, match=r'pixels in \[0, 1\]'):
        fgsm(net, (x - 0.5) / 0.25, y, 4 / 255)
    with pytest.raises(ValueError, match=r'pixels in \[0, 1\]'):
        apgd_ce(net, x * 255, y, 4 / 255)
    with pytest.raises(ValueError, match='labels must lie in'):
        pgd(net, x, y + NUM_CLASSES, 4 / 255, 1 / 255, 2)
    with pytest.raises(ValueError, match='empty batch'):
        fgsm(net, x[:0], y[:0], 4 / 255)
    with pytest.raises(ValueError, match='batch size'):
        fgsm(net, x, y[:3], 4 / 255)
    with pytest.raises(TypeError, match='labels'):
        fgsm(net, x, y.float(), 4 / 255)
    with pytest.raises(ValueError, match='unbounded_pgd'):
        apgd_ce(net, x, y, math.inf)
    with pytest.raises(ValueError, match='step_size'):
        pgd(net, x, y, 4 / 255, 0.0, 3)
    with pytest.raises(ValueError, match='steps'):
        pgd(net, x, y, 4 / 255, 1 / 255, 0)
    with pytest.raises(ValueError, match='random_start'):
        apgd_ce(net, x, y, 4 / 255, n_restarts=2, random_start=False)


def test_evaluate_bad_inputs(net, data):
    x, y = data
    with pytest.raises(ValueError, match='empty'):
        evaluate_robustness({'net': net}, [], progress=False)
    ten_way = _train(TinyNet(num_classes=10), *_synthetic(48, seed=3), steps=2)
    attack = lambda m, a, b: fgsm(m, a, b, 4 / 255)  # noqa: E731
    with pytest.raises(ValueError, match='number of classes'):
        evaluate_robustness({'net': net}, [(x, y)], source=ten_way, transfer_attacks={'fgsm': attack},
                            progress=False)
    with pytest.raises(ValueError, match='source'):
        evaluate_robustness({'net': net}, [(x, y)], source=net, progress=False)


# -- NormalizedModel and checkpoints --------------------------------------------------------------------------------

def test_normalized_model_matches_manual_normalisation():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    wrapped = NormalizedModel(inner, mean, std)
    x = torch.rand(2, 3, 8, 8)
    expected = inner((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    torch.testing.assert_close(wrapped(x), expected)
    assert set(wrapped.state_dict()) == {'model.' + k for k in inner.state_dict()}
    with pytest.raises(ValueError, match='std'):
        NormalizedModel(inner, mean, (0.2, 0.0, 0.2))


def _write_checkpoint(path, model, arch, num_classes, ema=None, **extra_args):
    fields = dict(model=arch, num_classes=num_classes, model_kwargs={}, mean=None, std=None, in_chans=None, gp=None)
    args = argparse.Namespace(**{**fields, **extra_args})
    ckpt = {'state_dict': model.state_dict(), 'args': args, 'arch': arch, 'epoch': 3, 'metric': 50.0}
    if ema is not None:
        ckpt['state_dict_ema'] = ema.state_dict()
    torch.save(ckpt, path)


def test_load_checkpoint_model_roundtrip(tmp_path):
    import timm
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=4).eval()
    ema = timm.create_model('test_resnet', num_classes=4).eval()
    path = tmp_path / 'model_best.pth.tar'
    _write_checkpoint(path, model, 'test_resnet', 4, ema=ema, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    loaded = load_checkpoint_model(path)
    assert isinstance(loaded, NormalizedModel) and not loaded.training
    assert loaded.checkpoint_args.num_classes == 4
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model((x - 0.5) / 0.25))
        torch.testing.assert_close(load_checkpoint_model(path, use_ema=True)(x), ema((x - 0.5) / 0.25))


def test_load_checkpoint_model_uses_pretrained_cfg_mean_std(tmp_path):
    import timm
    timm_alps_models = pytest.importorskip('timm_alps.models')
    model = timm.create_model('preact_resnet18_w16', num_classes=10).eval()
    path = tmp_path / 'last.pth.tar'
    _write_checkpoint(path, model, 'preact_resnet18_w16', 10)
    loaded = load_checkpoint_model(path)
    torch.testing.assert_close(loaded.mean.flatten(), torch.tensor(timm_alps_models.CIFAR10_MEAN))
    torch.testing.assert_close(loaded.std.flatten(), torch.tensor(timm_alps_models.CIFAR10_STD))


def test_load_checkpoint_model_errors(tmp_path):
    import timm
    model = timm.create_model('test_resnet', num_classes=4)
    path = tmp_path / 'ckpt.pth.tar'
    _write_checkpoint(path, model, 'test_resnet', 4)
    with pytest.raises(ValueError, match='num_classes=10'):
        load_checkpoint_model(path, num_classes=10)
    with pytest.raises(ValueError, match='does not match model'):
        load_checkpoint_model(path, model_name='test_efficientnet')
    with pytest.raises(ValueError, match='state_dict_ema'):
        load_checkpoint_model(path, use_ema=True)
    with pytest.raises(ValueError, match='does not exist'):
        load_checkpoint_model(tmp_path / 'nope.pth.tar')
    (tmp_path / 'garbage.pth.tar').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='cannot read checkpoint'):
        load_checkpoint_model(tmp_path / 'garbage.pth.tar')
    torch.save({'weights': 1}, tmp_path / 'bad.pth.tar')
    with pytest.raises(ValueError, match='not a train_timm.py checkpoint'):
        load_checkpoint_model(tmp_path / 'bad.pth.tar')


def test_cross_check_with_torchattacks(net, data):
    """FGSM / PGD against an independent implementation (runs only where torchattacks is installed)."""
    torchattacks = pytest.importorskip('torchattacks')
    x, y = data
    eps = 8 / 255
    theirs = torchattacks.FGSM(net, eps=eps)(x, y)
    torch.testing.assert_close(fgsm(net, x, y, eps), theirs, rtol=0, atol=1e-6)
    theirs = torchattacks.PGD(net, eps=eps, alpha=2 / 255, steps=10, random_start=False)(x, y)
    ours = pgd(net, x, y, eps, step_size=2 / 255, steps=10, keep_best=False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


# -- bad input of the kind users send (issue 12 section 5) -----------------------------------------------------------

@pytest.mark.parametrize('eps', [4.0, 1.0001, 255.0, -0.0001, float('nan'), -math.inf])
def test_eps_outside_pixel_range_is_refused(net, data, eps):
    x, y = data
    for attack in (lambda e: fgsm(net, x, y, e), lambda e: pgd(net, x, y, e, 0.01, 2),
                   lambda e: apgd_ce(net, x, y, e, steps=2)):
        with pytest.raises(ValueError, match='eps must be >= 0 and <= 1'):
            attack(eps)


def test_eps_of_255_levels_suggests_the_fraction(net, data):
    x, y = data
    with pytest.raises(ValueError, match='did you mean 4/255'):
        fgsm(net, x, y, 4)


@pytest.mark.parametrize('bad', ['shifted', 'shape', 'nan', 'int'])
def test_attack_output_outside_pixel_range_is_refused(net, data, bad):
    x, y = data
    outputs = {'shifted': lambda a: a + 0.5, 'shape': lambda a: a[:, :1], 'nan': lambda a: a * float('nan'),
               'int': lambda a: (a * 255).to(torch.uint8)}
    broken = lambda m, a, b: outputs[bad](fgsm(m, a, b, 4 / 255))  # noqa: E731
    with pytest.raises(ValueError, match="attack 'broken'"):
        evaluate_robustness({'net': net}, [(x, y)], attacks={'broken': broken}, progress=False)
    with pytest.raises(ValueError, match="attack 'broken'"):
        transfer_attack(net, {'net': net}, [(x, y)], attacks={'broken': broken}, progress=False)


def test_normalized_model_channel_mismatch_names_the_shapes():
    inner = nn.Sequential(nn.Flatten(), nn.LazyLinear(2))
    wrapped = NormalizedModel(inner, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    with pytest.raises(ValueError, match=r'3 channel\(s\).*\(2, 1, 4, 4\)'):
        wrapped(torch.rand(2, 1, 4, 4))
    gray = NormalizedModel(nn.Sequential(nn.Flatten(), nn.LazyLinear(2)), mean=(0.5,), std=(0.25,))
    assert gray(torch.rand(2, 3, 4, 4)).shape == (2, 2)  # one statistic broadcasts over any channel count
    for mean, std in (((0.5, float('nan')), (1.0, 1.0)), ((0.5,), (float('inf'),)), ((0.5,), (0.0,))):
        with pytest.raises(ValueError, match='finite'):
            NormalizedModel(inner, mean, std)


@pytest.mark.parametrize('content', [b'e' * 64, b'\x80\x02not really', b'', b'PK\x03\x04broken zip'])
def test_files_that_are_not_checkpoints(tmp_path, content):
    path = tmp_path / 'notes.pth.tar'
    path.write_bytes(content)
    with pytest.raises(ValueError, match='cannot read checkpoint'):
        load_checkpoint_model(path)
    with pytest.raises(ValueError, match='is a folder'):
        load_checkpoint_model(tmp_path)


# -- AutoAttack ------------------------------------------------------------------------------------------------------

AA_CLASSES = 10


class TenWayNet(nn.Module):
    """Conv + BN + dropout + linear on 10 classes: APGD-T needs at least 4."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(6 * 16, AA_CLASSES)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.bn(self.conv(x))).flatten(1)))


def _ten_way(n: int, seed: int):
    templates = torch.randn((AA_CLASSES,) + SHAPE, generator=torch.Generator().manual_seed(5)).sign() * 0.06
    labels = torch.arange(n) % AA_CLASSES
    noise = 0.1 * torch.randn((n,) + SHAPE, generator=torch.Generator().manual_seed(seed))
    return (0.5 + templates[labels] + noise).clamp(0, 1), labels


@pytest.fixture(scope='module')
def ten_way():
    torch.manual_seed(0)
    model = _train(TenWayNet(), *_ten_way(400, seed=6), steps=60)
    x, y = _ten_way(30, seed=7)
    return model, x, y


# small budgets keep the tests fast; the flow and the settings are the standard version's
FAST_AA = dict(steps=8, n_queries=60)


def test_autoattack_bounds_flow_and_accounting(ten_way):
    pytest.importorskip('torchattacks')
    from timm_alps.autoattack import STANDARD_ATTACKS, autoattack
    model, x, y = ten_way
    eps = 8 / 255
    res = autoattack(model, x, y, eps, **FAST_AA)
    assert list(res.robust) == list(STANDARD_ATTACKS)
    adv = res.adversarial
    assert adv.dtype == torch.float32 and adv.shape == x.shape
    assert float((adv - x).abs().max()) <= eps + 1e-6 and float(adv.min()) >= 0 and float(adv.max()) <= 1
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
        adv_ok = model(adv).argmax(1) == y
    assert res.clean_correct == int(clean_ok.sum())
    # the robust count is monotone and is what the returned images score
    counts = [res.clean_correct] + list(res.robust.values())
    assert counts == sorted(counts, reverse=True)
    assert int(adv_ok.sum()) == counts[-1] and res.autoattack_acc == pytest.approx(100 * counts[-1] / len(y))
    # images that stay robust are returned clean; broken ones are the clean-correct ones
    torch.testing.assert_close(adv[adv_ok], x[adv_ok])
    assert not bool((~clean_ok & (adv != x).flatten(1).any(1)).any())
    assert res.flags == dict(randomized=False, zero_gradients=0, square_stronger=res.square_stronger)
    assert 0 < counts[-1] < res.clean_correct, 'the fixture should leave some, not all, images robust'


def test_autoattack_not_weaker_than_our_apgd_ce(ten_way):
    """Cross-check: torchattacks' APGD-CE (inside AutoAttack) against our own on the same model and images."""
    pytest.importorskip('torchattacks')
    from timm_alps.autoattack import autoattack
    model, x, y = ten_way
    eps = 8 / 255
    ours = apgd_ce(model, x, y, eps, steps=FAST_AA['steps'], generator=torch.Generator().manual_seed(0))
    ours_robust = int((model(ours).argmax(1) == y).sum())
    theirs = autoattack(model, x, y, eps, attacks=('apgd-ce',), **FAST_AA)
    assert abs(theirs.robust['apgd-ce'] - ours_robust) <= 2  # same algorithm, different random start
    full = autoattack(model, x, y, eps, **FAST_AA)
    assert full.robust['square'] <= ours_robust


def test_autoattack_guarantees(ten_way):
    pytest.importorskip('torchattacks')
    from timm_alps.autoattack import autoattack
    model, x, y = ten_way
    model.train()
    model.drop.eval()  # a mixed state must come back exactly
    for p in model.parameters():
        p.grad = None
    params = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        res = autoattack(model, x, y, 8 / 255, **FAST_AA)
    assert torch.equal(torch.rand(3), expected_next), 'the caller\'s RNG stream must be untouched'
    assert model.training and not model.drop.training and model.bn.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert res.adversarial.dtype == torch.float32 and not res.randomized  # eval mode: dropout off
    model.eval()
    # deterministic given the seed
    again = autoattack(model, x, y, 8 / 255, **FAST_AA)
    assert again.robust == autoattack(model, x, y, 8 / 255, **FAST_AA).robust


def test_autoattack_l2(ten_way):
    pytest.importorskip('torchattacks')
    from timm_alps.autoattack import autoattack
    model, x, y = ten_way
    res = autoattack(model, x, y, 0.5, norm='L2', **FAST_AA)
    assert float((res.adversarial - x).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-5
    assert res.robust['square'] <= res.clean_correct


class _Noisy(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 0.5 * torch.randn(x.shape[0], AA_CLASSES)


class _Flat(nn.Module):
    """Piecewise-constant logits: zero input gradient everywhere (the textbook masked gradient)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner((x * 8).round() / 8)


def test_autoattack_sanity_flags(ten_way):
    pytest.importorskip('torchattacks')
    from timm_alps.autoattack import autoattack
    model, x, y = ten_way
    assert autoattack(_Noisy(model), x, y, 8 / 255, attacks=('apgd-ce',), steps=2).randomized
    flat = autoattack(_Flat(model), x, y, 16 / 255, steps=4, n_queries=300)
    assert flat.zero_gradients == flat.clean_correct > 0
    # the gradient attacks see nothing; the black-box Square still breaks images
    assert flat.robust['fab-t'] == flat.clean_correct or flat.robust['square'] < flat.robust['fab-t']
    assert flat.square_stronger


def test_autoattack_bad_input(ten_way, net, data):
    pytest.importorskip('torchattacks')
    from timm_alps.autoattack import AutoAttack, autoattack
    model, x, y = ten_way
    for kwargs, match in ((dict(eps=4.0), r'eps must be \[0, 1\]'), (dict(eps=float('nan')), 'eps must be'),
                          (dict(eps=-0.1, norm='L2'), 'eps must be'), (dict(eps=0.1, norm='Linf2'), 'norm must be'),
                          (dict(eps=0.1, attacks=('apgd-ce', 'pgd')), 'attacks must be'),
                          (dict(eps=0.1, attacks=()), 'attacks must be'),
                          (dict(eps=0.1, steps=0), 'steps must be'), (dict(eps=0.1, n_queries=-5), 'n_queries'),
                          (dict(eps=0.1, n_target_classes=0), 'n_target_classes'),
                          (dict(eps=0.1, seed=-1), 'seed must be')):
        with pytest.raises(ValueError, match=match):
            autoattack(model, x, y, **kwargs)
        with pytest.raises(ValueError, match=match):
            AutoAttack(**kwargs)
    with pytest.raises(ValueError, match='at least 4 classes'):
        autoattack(net, *data, 8 / 255)
    with pytest.raises(ValueError, match='labels must lie in'):
        autoattack(model, x, y + AA_CLASSES, 8 / 255, steps=1, n_queries=1)
    with pytest.raises(ValueError, match=r'pixels in \[0, 1\]'):
        autoattack(model, x * 255, y, 8 / 255)


def test_autoattack_inside_evaluate_robustness_totals_per_model(ten_way):
    pytest.importorskip('torchattacks')
    from timm_alps.autoattack import AutoAttack, autoattack
    model, x, y = ten_way
    aa = AutoAttack(10 / 255, **FAST_AA)
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    result = evaluate_robustness({'m': model}, batches, attacks={'aa': aa}, progress=False)
    total = aa.result(model)
    assert total.n_examples == len(y) and total.adversarial is None
    assert result.errors['m']['white-box/aa'] == pytest.approx(100 - total.autoattack_acc)
    parts = [autoattack(model, xb, yb, 10 / 255, **FAST_AA) for xb, yb in batches]
    assert total.robust == {k: parts[0].robust[k] + parts[1].robust[k] for k in total.robust}


def test_autoattack_uses_the_reference_standard_settings(ten_way):
    """github.com/fra31/auto-attack `AutoAttack.set_version('standard')`: 100 iterations and 1 restart for APGD-CE,
    APGD-T and FAB-T, 9 target classes, Square with 5,000 queries, p_init 0.8 and no rescaled schedule."""
    pytest.importorskip('torchattacks')
    from timm_alps.autoattack import AutoAttack, _build
    model, _, _ = ten_way
    kw = AutoAttack(8 / 255).kwargs
    assert (kw['attacks'], kw['steps'], kw['n_queries'], kw['n_target_classes'], kw['norm']) == (
        ('apgd-ce', 'apgd-t', 'fab-t', 'square'), 100, 5000, 9, 'Linf')
    built = {name: _build(name, model, 8 / 255, 'Linf', 100, 9, 100, 5000, 0, torch.device('cpu'))
             for name in kw['attacks']}
    assert (built['apgd-ce'].steps, built['apgd-ce'].n_restarts, built['apgd-ce'].loss, built['apgd-ce'].thr_decr) == (
        100, 1, 'ce', 0.75)
    assert (built['apgd-t'].steps, built['apgd-t'].n_restarts, built['apgd-t'].n_target_classes) == (100, 1, 9)
    fab = built['fab-t']
    assert (fab.steps, fab.n_restarts, fab.multi_targeted, fab.n_target_classes) == (100, 1, True, 9)
    assert (fab.alpha_max, fab.eta, fab.beta) == (0.1, 1.05, 0.9)
    sq = built['square']
    assert (sq.n_queries, sq.n_restarts, sq.p_init, sq.loss, sq.rescale_schedule) == (5000, 1, 0.8, 'margin', False)
    # on fewer classes the targets are capped at classes - 1
    assert _build('apgd-t', model, 0.1, 'Linf', 5, 9, 100, 5000, 0, torch.device('cpu')).n_target_classes == 4
