"""Ramping the ALPS radius in: the validated `eps` / `alps_eps` setters of the library, and the training engine's
--alps-eps-warmup-epochs (eps_t = eps * min(1, t / warmup_updates) at update t) on every label path, with resume."""
import copy
import os
import pickle
import signal

import pytest
import torch
import torch.nn as nn

from timm_alps import (ALPSBinaryCrossEntropy, ALPSLoss, ALPSMixup, ALPSSoftTargetCrossEntropy,
                       FastCollateALPSMixup)
from timm_alps.checkpoint import load_training_checkpoint
from timm_alps.labels import adversarial_label

from timm_alps import EpsWarmup, train
from timm_alps.train import mixing, parse_args, resolve_config


# 64 bundled images at batch 16: 4 updates per epoch; a 1.5-epoch ramp is round(1.5 * 4) = 6 updates.
TINY = ['--model', 'preact_resnet18_w16', '--model-kwargs', 'width=4', '--max-train-samples', '64',
        '--max-eval-samples', '32', '-b', '16', '--epochs', '2', '--no-progress', '-j', '0', '--seed', '7',
        '--alps-eps-warmup-epochs', '1.5']
RAMP = [0.3 * t / 6 if t < 6 else 0.3 for t in range(8)]  # EpsWarmup: t = 0..7: 0, 0.05, ..., 0.25, then 0.3


# -- library: the setters ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('make', [
    lambda eps: ALPSSoftTargetCrossEntropy(eps=eps),
    lambda eps: ALPSBinaryCrossEntropy(eps=eps),
    lambda eps: ALPSLoss(nn.MSELoss(), eps=eps),
], ids=['ce', 'bce', 'wrapped'])
def test_loss_eps_setter_changes_the_label_and_validates(make):
    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    loss = make(0.3)
    loss.eps = 0.1
    assert loss.eps == 0.1 and 'eps=0.1' in repr(loss)
    torch.testing.assert_close(loss(x, y), make(0.1)(x, y), rtol=0, atol=0)  # as if built with eps=0.1
    loss.eps = torch.tensor(0.2)  # a one-element tensor, as at construction
    assert loss.eps == pytest.approx(0.2) and isinstance(loss.eps, float)
    for bad, error in ((-0.1, ValueError), (float('nan'), ValueError), (2.5, ValueError), (None, TypeError),
                       (True, TypeError), ('0.3', TypeError)):
        with pytest.raises(error, match='eps'):
            loss.eps = bad
    assert loss.eps == pytest.approx(0.2)  # a rejected value leaves the radius as it was


def test_bce_smooth_dense_refuses_a_radius_set_later():
    loss = ALPSBinaryCrossEntropy(eps=0.0, smooth_dense=True)
    with pytest.raises(ValueError, match='smooth_dense'):
        loss.eps = 0.1
    with pytest.raises(ValueError, match='smooth_dense'):
        ALPSBinaryCrossEntropy(eps=0.1, smooth_dense=True)
    assert loss.eps == 0.0


@pytest.mark.parametrize('mixer_cls', [ALPSMixup, FastCollateALPSMixup])
def test_mixer_alps_eps_reaches_the_fused_losses_it_made(mixer_cls):
    mixer = mixer_cls(alps_eps=0.3, num_classes=5, seed=0)
    losses = [mixer.make_loss(), mixer.make_loss('bce'), mixer.make_loss(nn.MSELoss())]
    mixer.alps_eps = 0.12
    assert mixer.alps_eps == 0.12 and [loss.eps for loss in losses] == [0.12] * 3
    for bad, error in ((-1, ValueError), (float('nan'), ValueError), (None, TypeError)):
        with pytest.raises(error, match='alps_eps'):
            mixer.alps_eps = bad
    assert mixer.alps_eps == 0.12 and [loss.eps for loss in losses] == [0.12] * 3
    # copies (DataLoader workers, deepcopy) keep the radius but do not steer this process's losses
    for other in (pickle.loads(pickle.dumps(mixer)), copy.deepcopy(mixer)):
        assert other.alps_eps == 0.12
        other.alps_eps = 0.2
        assert [loss.eps for loss in losses] == [0.12] * 3
        assert other.make_loss().eps == 0.2


def test_model_handle_mixer_ramps_its_label_and_its_loss_keeps_eps_0():
    """Exactly once: the model-path mixer applies the ramped radius (eps/2 moved to k*), its loss stays at 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    mixer = ALPSMixup(alps_eps=0.3, prob=0.0, num_classes=4, model=model, seed=0)  # prob 0: inputs unmixed
    loss = mixer.make_loss()
    x, y = torch.randn(6, 3, 2, 2), torch.tensor([0, 1, 2, 3, 0, 1])
    onehot = torch.eye(4)[y]
    for eps in (0.0, 0.1, 0.3):
        mixer.alps_eps = eps
        assert loss.eps == 0.0
        _, target = mixer(x, y)
        expected = adversarial_label(model(x).detach(), onehot, eps) if eps else onehot
        torch.testing.assert_close(target, expected, rtol=0, atol=1e-7)
        k_star = model(x).argmin(1)
        mass = target.gather(1, k_star.view(-1, 1)).squeeze(1)
        torch.testing.assert_close(mass[k_star != y], torch.full_like(mass[k_star != y], eps / 2))
        loss(model(x), target)  # accepted: the marked target is not shifted again


# -- the training engine: the ramp is an EpsWarmup on the mixer that owns the label path --------------------------
def _config(flags):
    return resolve_config(parse_args(flags))


@pytest.mark.parametrize('flags, path', [
    ([], 'fused'),
    (['--alps-label', 'model'], 'model'),
    (['--bce-loss'], 'fused'),
    ('collate', 'collate'),
], ids=['fused', 'model', 'fused-bce', 'collate'])
def test_regularisation_sets_the_radius_where_the_label_path_applies_it(flags, path):
    collate = None
    if flags == 'collate':
        flags, collate = [], FastCollateALPSMixup(alps_eps=0.3, num_classes=10, seed=0)
    config = _config(flags + ['--alps-eps-warmup-epochs', '2.5', '--epochs', '3'])
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
    reg = mixing.create_regularisation(config, 10, model, collate_mixer=collate, updates_per_epoch=4)
    assert isinstance(reg.eps_warmup, EpsWarmup) and reg.eps_warmup.warmup_updates == 10  # round(2.5 * 4)
    mixer = reg.stateful_mixer
    holder = (lambda: mixer.alps_eps) if path == 'model' else (lambda: reg.criterion.eps)
    for step in (0, 1, 5, 9, 10, 11, 40, 3):  # set from the updates done: any order, as a resume does
        reg.set_step(step)
        assert holder() == (0.3 * step / 10 if step < 10 else 0.3) == reg.eps_warmup.eps_at(step)
        if path == 'model':
            assert reg.criterion.eps == 0.0
    assert [reg.eps_warmup.eps_at(t) for t in (0, 5, 10, 11)] == [0.0, 0.15, 0.3, 0.3]


def test_alps_ramps_over_one_epoch_by_default_and_zero_turns_it_off():
    config = _config([])
    assert config.method == 'alps' and config.alps_eps_warmup_epochs == 1.0
    reg = mixing.create_regularisation(config, 10, nn.Linear(2, 10), updates_per_epoch=4)
    assert reg.eps_warmup.warmup_updates == 4
    assert reg.criterion.eps == 0.0  # update 0, before any set_step
    reg.set_step(2)
    assert reg.criterion.eps == 0.15
    reg.set_step(4)
    assert reg.criterion.eps == 0.3

    config = _config(['--alps-eps-warmup-epochs', '0'])  # the paper's ALPS: the full radius from the first update
    reg = mixing.create_regularisation(config, 10, nn.Linear(2, 10), updates_per_epoch=4)
    reg.set_step(0)
    assert reg.eps_warmup is None and reg.criterion.eps == 0.3 and reg.mixup_fn.alps_eps == 0.3


@pytest.mark.parametrize('flags', [['--method', 'erm'], ['--method', 'mixup'], ['--mixup', '0.2'], ['--method', 'ls']])
def test_other_methods_get_no_ramp_and_accept_an_explicit_zero(flags):
    assert _config(flags).alps_eps_warmup_epochs == 0.0
    assert _config(flags + ['--alps-eps-warmup-epochs', '0']).alps_eps_warmup_epochs == 0.0


class _Recorder:
    """The radius each training forward used: the criterion's eps and the step mixer's alps_eps."""

    def __init__(self, monkeypatch, stop_at=None):
        self.loss_eps, self.mixer_eps, self.targets = [], [], []
        loss_forward, mixer_call = ALPSSoftTargetCrossEntropy.forward, ALPSMixup.__call__
        recorder = self

        def forward(loss, x, target):
            recorder.loss_eps.append(loss.eps)
            if stop_at is not None and len(recorder.loss_eps) == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)  # caught: recovery checkpoint after this update, exit 143
            return loss_forward(loss, x, target)

        def call(mixer, x, target):
            recorder.mixer_eps.append(mixer.alps_eps)
            out = mixer_call(mixer, x, target)
            recorder.targets.append((target, out[1]))
            return out

        monkeypatch.setattr(ALPSSoftTargetCrossEntropy, 'forward', forward)
        monkeypatch.setattr(ALPSMixup, '__call__', call)


def _main(tmp_path, name, flags=()):
    return train.main(TINY + list(flags) + ['--output', str(tmp_path), '--experiment', name])


def test_fused_run_ramps_per_update_and_resumes_exactly(tmp_path, monkeypatch):
    ref = _Recorder(monkeypatch)
    assert _main(tmp_path, 'ref') == 0
    assert ref.loss_eps == RAMP
    assert RAMP == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.3], abs=1e-15)
    assert RAMP[0] == 0.0 and RAMP[3] == 0.15 and RAMP[6:] == [0.3, 0.3]  # start, mid, end, after: exact
    assert ref.mixer_eps == RAMP  # the step mixer tells its fused loss; both hold the same radius

    # Interrupted mid-ramp (SIGTERM during update 2 of epoch 0), resumed from the recovery checkpoint at step 3.
    cut = _Recorder(monkeypatch, stop_at=3)
    assert _main(tmp_path, 'cut') == 128 + signal.SIGTERM
    assert cut.loss_eps == RAMP[:3]
    again = _Recorder(monkeypatch)
    assert _main(tmp_path, 'cut', ['--resume', 'auto']) == 0
    assert again.loss_eps == RAMP[3:]
    last = [load_training_checkpoint(str(tmp_path / n / 'last.pth.tar')) for n in ('ref', 'cut')]
    assert last[0]['step'] == last[1]['step'] == 8
    for k, v in last[0]['state_dict'].items():
        torch.testing.assert_close(last[1]['state_dict'][k], v, rtol=0, atol=0)


def test_model_handle_run_ramps_the_mixer_and_keeps_the_loss_at_0(tmp_path, monkeypatch):
    rec = _Recorder(monkeypatch)
    assert _main(tmp_path, 'model', ['--alps-label', 'model']) == 0
    assert rec.mixer_eps == RAMP
    assert rec.loss_eps == [0.0] * 8
    for eps, (y, target) in zip(RAMP, rec.targets):
        moved = 0.5 * (target - torch.eye(10)[y]).abs().sum(1)  # label mass moved off the sample's class
        assert float(moved.max()) == pytest.approx(eps / 2, abs=1e-6)


def test_collate_path_run_ramps_the_main_process_loss(tmp_path, monkeypatch):
    """timm's loader with the prefetcher: FastCollateALPSMixup mixes in the collate, the loss ramps in the step."""
    rec = _Recorder(monkeypatch)
    assert _main(tmp_path, 'collate', ['--loader', 'timm', '--epochs', '1', '--alps-eps-warmup-epochs', '1']) == 0
    assert rec.mixer_eps == []  # no mixer in the training step
    assert rec.loss_eps == [0.3 * t / 4 for t in range(4)]
