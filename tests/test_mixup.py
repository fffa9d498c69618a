"""ALPSMixup: sampling, modes, label handshake and the model-handle forward."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from scipy import stats

from timm_alps import ALPSMixup, ALPSSoftTargetCrossEntropy, adversarial_label


def small_net(num_classes=10, bn=True, dropout=0.0):
    layers = [nn.Conv2d(3, 8, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(8))
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(8, num_classes)]
    return nn.Sequential(*layers)


def test_lambda_follows_beta():
    mixup = ALPSMixup(alps_alpha=8, alps_beta=2, seed=0, num_classes=10)
    lam, _ = mixup.sample(20000, torch.device('cpu'))
    result = stats.kstest(lam.numpy(), stats.beta(8, 2).cdf)
    assert result.pvalue > 0.01, result
    # and a clearly different Beta is rejected, so the test has power
    assert stats.kstest(lam.numpy(), stats.beta(6, 2).cdf).pvalue < 1e-6


def test_mixed_input_is_the_convex_combination_with_the_partner():
    x, y = torch.randn(9, 3, 8, 8), torch.randint(10, (9,))
    x_mixed, target = ALPSMixup(seed=3, num_classes=10)(x, y)
    lam, partner = ALPSMixup(seed=3, num_classes=10).sample(9, x.device)
    expected = lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x[partner]
    torch.testing.assert_close(x_mixed, expected)
    # the label is the sample's own, never the partner's
    torch.testing.assert_close(target, nn.functional.one_hot(y, 10).float())
    assert sorted(partner.tolist()) == list(range(9))  # a permutation: every sample is some partner once


def test_modes():
    cpu = torch.device('cpu')
    lam, _ = ALPSMixup(mode='batch', seed=0, num_classes=10).sample(16, cpu)
    assert torch.all(lam == lam[0])
    lam, partner = ALPSMixup(mode='pair', seed=0, num_classes=10).sample(15, cpu)
    assert torch.equal(partner[partner], torch.arange(15))  # pairs: each mixes with the other
    assert torch.equal(lam, lam[partner])
    assert (partner == torch.arange(15)).sum() == 1  # odd batch: one sample left unmixed
    lam, _ = ALPSMixup(mode='elem', seed=0, num_classes=10).sample(16, cpu)
    assert len(set(lam.tolist())) == 16


@pytest.mark.parametrize('mode', ['elem', 'pair', 'batch'])
@pytest.mark.parametrize('batch', [1, 2, 7])
def test_odd_batches_and_batch_of_one(mode, batch):
    x, y = torch.randn(batch, 3, 4, 4), torch.randint(10, (batch,))
    x_mixed, target = ALPSMixup(mode=mode, seed=0, num_classes=10)(x, y)
    assert x_mixed.shape == x.shape and target.shape == (batch, 10)
    if batch == 1:
        torch.testing.assert_close(x_mixed, x)  # its only partner is itself


def test_prob_gates_mixing():
    cpu = torch.device('cpu')
    lam, _ = ALPSMixup(prob=0.0, seed=0, num_classes=10).sample(64, cpu)
    assert torch.all(lam == 1)
    lam, _ = ALPSMixup(prob=0.3, seed=0, num_classes=10).sample(20000, cpu)
    assert abs((lam < 1).float().mean().item() - 0.3) < 0.02
    mixup = ALPSMixup(seed=0, num_classes=10)
    mixup.mixup_enabled = False
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(mixup(x, torch.arange(4))[0], x)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16])
def test_dtype_and_device_are_kept(dtype):
    x = torch.rand(6, 3, 4, 4).to(dtype)
    x_mixed, target = ALPSMixup(seed=0, num_classes=10)(x, torch.randint(10, (6,)))
    assert x_mixed.dtype == dtype and x_mixed.device == x.device
    assert target.dtype == torch.float32


def test_label_smoothing_and_soft_targets():
    mixup = ALPSMixup(label_smoothing=0.1, num_classes=10, seed=0)
    _, target = mixup(torch.randn(2, 3), torch.tensor([0, 9]))
    torch.testing.assert_close(target[0, 0], torch.tensor(0.91))
    torch.testing.assert_close(target[0, 1], torch.tensor(0.01))
    soft = torch.full((2, 10), 0.1)
    _, target = mixup(torch.randn(2, 3), soft)
    torch.testing.assert_close(target, soft)


def test_state_dict_replays_the_same_draws():
    mixup = ALPSMixup(num_classes=10)
    x, y = torch.randn(8, 3, 4, 4), torch.randint(10, (8,))
    mixup(x, y)
    state = mixup.state_dict()
    expected = mixup(x, y)[0]
    resumed = ALPSMixup(num_classes=10, seed=123)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed(x, y)[0], expected)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before, training):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert model.training == training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize('training', [True, False])
def test_model_handle_forward_leaves_the_model_as_it_was(training):
    torch.manual_seed(0)
    model = small_net(dropout=0.5).train(training)
    before = snapshot(model)
    mixup = ALPSMixup(model=model, seed=0, num_classes=10)
    _, target = mixup(torch.randn(8, 3, 8, 8), torch.randint(10, (8,)))
    assert_untouched(model, before, training)
    assert not target.requires_grad
    assert (target.max(1).values < 1).any()  # adversarial: mass has moved


def test_model_handle_through_torch_compile():
    torch.manual_seed(0)
    model = small_net()
    compiled = torch.compile(model, backend='eager')
    before = snapshot(model)
    _, target = ALPSMixup(model=compiled, seed=0, num_classes=10)(torch.randn(4, 3, 8, 8), torch.arange(4))
    assert_untouched(model, before, True)
    assert target.shape == (4, 10)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_model_handle_through_ddp_skips_its_hooks():
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = small_net()
        ddp = nn.parallel.DistributedDataParallel(model)
        before = snapshot(model)
        mixup = ALPSMixup(model=ddp, seed=0, num_classes=10)
        x, target = mixup(torch.randn(4, 3, 8, 8), torch.arange(4))
        assert_untouched(model, before, True)
        # DDP still trains normally afterwards (its reducer saw no stray forward)
        mixup.make_loss()(ddp(x), target).backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()


def test_fused_and_model_handle_paths_agree_on_a_deterministic_model():
    torch.manual_seed(0)
    model = small_net(bn=False)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(10, (16,))
    fused = ALPSMixup(alps_eps=0.4, seed=5, num_classes=10)
    handle = ALPSMixup(alps_eps=0.4, seed=5, num_classes=10, model=model)
    x_fused, base = fused(x, y)
    x_handle, adversarial = handle(x, y)
    torch.testing.assert_close(x_fused, x_handle)
    logits = model(x_fused)
    torch.testing.assert_close(adversarial, adversarial_label(logits, base, 0.4))
    assert isinstance(fused.make_loss(), ALPSSoftTargetCrossEntropy) and fused.make_loss().eps == 0.4
    assert handle.make_loss().eps == 0.0  # the handshake: no second shift
    torch.testing.assert_close(fused.make_loss()(logits, base), handle.make_loss()(logits, adversarial))


@pytest.mark.parametrize('kwargs, match', [
    (dict(alps_alpha=0), 'alps_alpha=0'),
    (dict(alps_beta=-1), 'alps_beta=-1'),
    (dict(alps_eps=2.5), 'alps_eps=2.5'),
    (dict(alps_eps=-0.1), 'alps_eps=-0.1'),
    (dict(prob=1.5), 'prob=1.5'),
    (dict(mode='cutmix'), "mode='cutmix'"),
    (dict(label_smoothing=1.0), 'label_smoothing=1.0'),
    (dict(num_classes=1), 'num_classes=1'),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ALPSMixup(**kwargs)


def test_bad_inputs_are_named():
    mixup = ALPSMixup(num_classes=10)
    with pytest.raises(TypeError, match='convert first'):
        mixup(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match='out of range'):
        mixup(torch.zeros(2, 3, 4, 4), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match='batch size'):
        mixup(torch.zeros(3, 3, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match='num_classes=10'):
        mixup(torch.zeros(2, 3), torch.full((2, 5), 0.2))
    with pytest.raises(TypeError, match='nn.Module'):
        ALPSMixup(model=lambda x: x)
