"""ALPSMixup: sampling, modes, label handshake and the model-handle forward."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from scipy import stats

from timm_alps import ALPSMixup, ALPSSoftTargetCrossEntropy, adversarial_label

from distributed_helpers import free_port  # tests/distributed_helpers.py


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


# --- arguments, timm's mixup_args, target forms, the model handle's RNG and outputs ------------------------------


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(alps_alpha=float('inf')), ValueError, 'alps_alpha=inf must be a finite number'),
    (dict(alps_beta=float('nan')), ValueError, 'alps_beta=nan'),
    (dict(alps_alpha=True), TypeError, 'alps_alpha'),
    (dict(alps_eps=None), TypeError, 'alps_eps must be a number'),
    (dict(alps_eps=float('nan')), ValueError, 'alps_eps=nan'),
    (dict(alps_eps=torch.tensor([0.1, 0.2])), ValueError, 'alps_eps must be a number or a one-element tensor'),
    (dict(prob=float('nan')), ValueError, 'prob=nan'),
    (dict(label_smoothing=float('nan')), ValueError, 'label_smoothing=nan'),
    (dict(label_smoothing=-0.1), ValueError, 'label_smoothing=-0.1'),
    (dict(mode=None), ValueError, 'mode=None'),
    (dict(seed=True), TypeError, 'seed must be an integer'),
    (dict(seed=1.5), TypeError, 'seed must be an integer'),
    (dict(seed=-1), ValueError, 'seed=-1'),
    (dict(seed=2 ** 64), ValueError, r'seed=\d+ must be in \[0, 2\*\*64\)'),
    (dict(num_classes=True), TypeError, 'num_classes must be an integer'),
    (dict(num_classes=10.0), TypeError, 'num_classes must be an integer'),
    (dict(rank=-1), ValueError, 'rank=-1'),
])
def test_every_argument_is_validated_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        ALPSMixup(**kwargs)


def test_arguments_as_numpy_and_torch_values():
    mixup = ALPSMixup(alps_eps=torch.tensor(0.2), num_classes=np.int64(10), seed=np.uint64(3),
                      alps_alpha=np.float32(8))
    assert mixup.alps_eps == pytest.approx(0.2) and mixup.num_classes == 10 and type(mixup.num_classes) is int
    assert ALPSMixup(num_classes=torch.tensor(10)).num_classes == 10
    assert ALPSMixup(seed=2 ** 64 - 1).seed == 2 ** 64 - 1


def timm_mixup_args(**overrides):
    # what timm's train.py builds (its defaults: --mixup 0 --cutmix 0 --mixup-prob 1 --mixup-switch-prob 0.5
    # --mixup-mode batch --smoothing 0.1)
    args = dict(mixup_alpha=0.0, cutmix_alpha=0.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5, mode='batch',
                label_smoothing=0.1, num_classes=10)
    args.update(overrides)
    return args


def test_from_mixup_args_takes_timm_train_py_dict():
    mixup = ALPSMixup.from_mixup_args(timm_mixup_args(prob=0.8), alps_eps=0.2, mode='elem', seed=0)
    assert (mixup.prob, mixup.mode, mixup.label_smoothing, mixup.num_classes, mixup.alps_eps) == \
        (0.8, 'elem', 0.1, 10, 0.2)
    assert ALPSMixup.from_mixup_args(timm_mixup_args()).mode == 'batch'
    assert ALPSMixup.from_mixup_args(timm_mixup_args(mixup_alpha=1.0, correct_lam=True)).num_classes == 10
    assert ALPSMixup.from_mixup_args({}).label_smoothing == 0.0  # ours, where timm's Mixup() has 0.1


@pytest.mark.parametrize('key, value', [('mixup_alpha', 0.8), ('cutmix_alpha', 1.0), ('cutmix_minmax', (0.2, 0.8)),
                                        ('switch_prob', 0.3), ('correct_lam', False), ('multi_label', True)])
def test_from_mixup_args_refuses_what_alps_does_not_have(key, value):
    with pytest.raises(ValueError, match=f"mixup_args\\['{key}'\\].*no meaning for ALPS"):
        ALPSMixup.from_mixup_args(timm_mixup_args(**{key: value}))


def test_from_mixup_args_bad_inputs():
    with pytest.raises(ValueError, match="mixup_args\\['alpha'\\]"):
        ALPSMixup.from_mixup_args({'alpha': 1.0})
    with pytest.raises(TypeError, match='mixup_args must be a dict'):
        ALPSMixup.from_mixup_args([('prob', 1.0)])
    with pytest.raises(ValueError, match='prob=2.0'):
        ALPSMixup.from_mixup_args(timm_mixup_args(prob=2.0))


def test_targets_as_timm_takes_them():
    x, y = torch.randn(5, 3, 2, 2), torch.tensor([0, 3, 9, 2, 2])
    expected = ALPSMixup(seed=0, num_classes=10, label_smoothing=0.1)(x, y)
    for t in (y.view(-1, 1), y.to(torch.uint8), y.to(torch.int16), y.to(torch.int32)):
        got = ALPSMixup(seed=0, num_classes=10, label_smoothing=0.1)(x, t)
        torch.testing.assert_close(got, expected)


class Tupled(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind, self.fc = kind, nn.Linear(12, 10)

    def forward(self, x):
        out = self.fc(x.flatten(1))
        return {'tuple': (out, out), 'list': [out], 'dict': {'logits': out}, 'wide': out[:, :5]}[self.kind]


@pytest.mark.parametrize('kind', ['tuple', 'list', 'dict'])
def test_model_handle_with_non_tensor_output_names_the_fix(kind):
    mixup = ALPSMixup(model=Tupled(kind), num_classes=10, seed=0)
    with pytest.raises(TypeError, match=f'returned a {kind}.*return model\\(x\\)\\[0\\]'):
        mixup(torch.randn(4, 3, 2, 2), torch.arange(4))


def test_model_handle_with_wrong_logits_shape():
    with pytest.raises(ValueError, match=r'shape \(4, 5\).*num_classes=10'):
        ALPSMixup(model=Tupled('wide'), num_classes=10, seed=0)(torch.randn(4, 3, 2, 2), torch.arange(4))


def test_model_handle_leaves_the_training_dropout_masks_alone():
    model = small_net(bn=False, dropout=0.5)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(10, (16,))
    torch.manual_seed(0)
    x_fused, base = ALPSMixup(seed=1, num_classes=10)(x, y)
    out_fused = model(x_fused)
    torch.manual_seed(0)
    x_handle, adversarial = ALPSMixup(seed=1, num_classes=10, model=model)(x, y)
    out_handle = model(x_handle)
    torch.testing.assert_close(out_handle, out_fused, rtol=0, atol=0)  # same dropout masks
    # and, having drawn the same masks, the label forward saw the training forward's logits: both paths agree
    torch.testing.assert_close(adversarial, adversarial_label(out_fused, base, 0.3))


def test_streams_differ_by_rank_and_epoch_and_repeat_by_seed():
    def draws(**kwargs):
        mixup = ALPSMixup(seed=7, num_classes=10, **kwargs)
        epoch = kwargs.pop('epoch', None)
        if epoch is not None:
            mixup.set_epoch(epoch)
        return mixup.sample(32)[0]
    torch.testing.assert_close(draws(), draws())
    torch.testing.assert_close(draws(rank=0), draws())
    assert not torch.equal(draws(rank=1), draws())
    mixup = ALPSMixup(seed=7, num_classes=10)
    mixup.set_epoch(3)
    assert not torch.equal(mixup.sample(32)[0], draws())


def test_make_loss_options():
    mixup = ALPSMixup(alps_eps=0.25, num_classes=10)
    bce = mixup.make_loss('bce', target_threshold=0.2, sum_classes=True, pos_weight=2.0)
    assert bce.eps == 0.25 and bce.target_threshold == 0.2 and bce.sum_classes
    wrapped = mixup.make_loss(nn.MSELoss())
    assert wrapped.eps == 0.25 and isinstance(wrapped.base_loss, nn.MSELoss)
    with pytest.raises(ValueError, match='do not pass eps'):
        mixup.make_loss('ce', eps=0.1)
    with pytest.raises(ValueError, match="loss='focal'"):
        mixup.make_loss('focal')
    mixup.set_model(small_net())
    assert mixup.label_path == 'model' and mixup.make_loss('bce').eps == 0.0


def test_from_mixup_args_takes_alps_keys_too():
    mixup = ALPSMixup.from_mixup_args(timm_mixup_args(alps_eps=0.1, seed=3), alps_alpha=5)
    assert (mixup.alps_eps, mixup.seed, mixup.alps_alpha) == (0.1, 3, 5.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_model_handle_keeps_the_cuda_dropout_masks():
    model = small_net(bn=False, dropout=0.5).cuda()
    x, y = torch.randn(16, 3, 8, 8, device='cuda'), torch.randint(10, (16,), device='cuda')
    torch.manual_seed(0)
    out_fused = model(ALPSMixup(seed=1, num_classes=10)(x, y)[0])
    torch.manual_seed(0)
    out_handle = model(ALPSMixup(seed=1, num_classes=10, model=model)(x, y)[0])
    torch.testing.assert_close(out_handle, out_fused, rtol=0, atol=0)
