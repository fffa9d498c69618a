"""Fault tolerance: atomic checkpoints, corrupt-file fallback, exact resume after a real kill -9, SIGTERM, NaN."""
import csv
import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from timm_alps.checkpoint import (
    AtomicCheckpointSaver, CheckpointError, atomic_torch_save, capture_rng_state, check_output_dir,
    find_resume_checkpoint, load_training_checkpoint, restore_rng_state)

from timm_alps import train
from timm_alps.train import TrainError
import timm_alps.train.run  # noqa: F401 (train.run.train_one_epoch is patched)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny run: width-4 PreAct ResNet on 256 bundled images, 4 updates per epoch.
TINY = ['--model', 'preact_resnet18_w16', '--model-kwargs', 'width=4', '--max-train-samples', '256',
        '--max-eval-samples', '128', '-b', '64', '--log-interval', '1', '--no-progress', '--seed', '3']


def _summary(path):
    with open(os.path.join(path, 'summary.csv'), newline='') as f:
        return list(csv.DictReader(f))


def _metrics(rows):
    return [(r['epoch'], r['train_loss'], r['eval_loss'], r['eval_top1'], r['lr']) for r in rows]


def _run(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return subprocess.Popen([sys.executable, '-m', 'timm_alps.train'] + args, cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _state(epoch=0):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt


# -- unit level ---------------------------------------------------------------------------------------------------
def test_atomic_save_keeps_old_file_when_write_fails(tmp_path, monkeypatch):
    path = str(tmp_path / 'last.pth.tar')
    atomic_torch_save({'epoch': 1, 'x': torch.ones(3)}, path)

    def full_disk(obj, f, *a, **k):
        f.write(b'partial bytes')
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(CheckpointError, match='no space left'):
        atomic_torch_save({'epoch': 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)['epoch'] == 1
    assert sorted(os.listdir(tmp_path)) == ['last.pth.tar']  # temporary file removed


def test_saver_writes_loadable_checkpoints_with_extra_state(tmp_path):
    model, opt = _state()
    saver = AtomicCheckpointSaver(model=model, optimizer=opt, checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path),
                                  max_history=2, extra_state_fn=lambda: {'step': 7, 'rng': capture_rng_state()})
    for epoch, metric in enumerate([10.0, 30.0, 20.0]):
        saver.save_checkpoint(epoch, metric)
    names = sorted(os.listdir(tmp_path))
    assert names == ['checkpoint-1.pth.tar', 'checkpoint-2.pth.tar', 'last.pth.tar', 'model_best.pth.tar']
    ckpt = load_training_checkpoint(str(tmp_path / 'last.pth.tar'))
    assert ckpt['epoch'] == 2 and ckpt['step'] == 7
    assert load_training_checkpoint(str(tmp_path / 'model_best.pth.tar'))['epoch'] == 1


def test_rng_state_roundtrip():
    import random
    state = capture_rng_state()
    a = (torch.rand(2), np.random.rand(2), random.random())
    restore_rng_state(state)
    b = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_corrupt_checkpoint_reported_and_auto_falls_back(tmp_path):
    model, opt = _state()
    step = {'step': 0}
    saver = AtomicCheckpointSaver(model=model, optimizer=opt, checkpoint_dir=str(tmp_path), max_history=5,
                                  extra_state_fn=lambda: dict(step))
    for epoch in range(3):
        step['step'] = 10 * (epoch + 1)
        saver.save_checkpoint(epoch, metric=float(epoch))
    last = tmp_path / 'last.pth.tar'
    data = last.read_bytes()
    os.unlink(last)  # break the hard link before truncating, as a crash of a non-atomic writer would
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match='corrupt or truncated.*--resume auto'):
        load_training_checkpoint(str(last))
    path, skipped = find_resume_checkpoint(str(tmp_path))
    assert os.path.basename(path) == 'checkpoint-2.pth.tar'
    assert [os.path.basename(p) for p, _ in skipped] == ['last.pth.tar']


def test_stale_temporary_files_are_ignored_and_removed(tmp_path):
    model, opt = _state()
    saver = AtomicCheckpointSaver(model=model, optimizer=opt, checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(0, metric=1.0)
    # what a kill -9 during a write leaves behind: a hidden partial file, and a finished one not yet renamed
    (tmp_path / '.last.pth.tar.abc123.part').write_bytes(b'PK\x03\x04 partial')
    (tmp_path / 'tmp.pth.tar').write_bytes(b'half')
    path, skipped = find_resume_checkpoint(str(tmp_path))
    assert os.path.basename(path) == 'last.pth.tar' and not skipped
    AtomicCheckpointSaver(model=model, optimizer=opt, checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-0.pth.tar', 'last.pth.tar', 'model_best.pth.tar']


def test_missing_and_non_training_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match='no checkpoint at'):
        load_training_checkpoint(str(tmp_path / 'nope.pth.tar'))
    torch.save({'weights': torch.ones(1)}, tmp_path / 'w.pth')
    with pytest.raises(CheckpointError, match='not a training checkpoint'):
        load_training_checkpoint(str(tmp_path / 'w.pth'))
    with pytest.raises(CheckpointError, match='no usable checkpoint'):
        find_resume_checkpoint(str(tmp_path))


def test_output_dir_checks(tmp_path, monkeypatch):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    with pytest.raises(CheckpointError, match='not writable'):
        check_output_dir(str(blocker / 'sub'))
    import shutil
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: usage._replace(free=1000))
    with pytest.raises(CheckpointError, match='MiB free'):
        check_output_dir(str(tmp_path / 'ok'), need_bytes=10 ** 6)


# -- end to end ---------------------------------------------------------------------------------------------------
def test_kill9_then_resume_auto_matches_uninterrupted_run(tmp_path):
    """A real SIGKILL in the middle of epoch 2 (or while saving), then --resume auto: same final metrics, bit-exact."""
    common = TINY + ['--epochs', '3', '--output', str(tmp_path)]
    ref = _run(common + ['--experiment', 'ref'])
    victim = _run(common + ['--experiment', 'victim'])
    last = tmp_path / 'victim' / 'last.pth.tar'
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.05)
    assert last.exists(), victim.communicate()[0]
    time.sleep(0.3)  # somewhere inside epoch 2
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    out_ref = ref.communicate()[0]
    assert ref.returncode == 0, out_ref
    done_before = len(_summary(tmp_path / 'victim'))
    assert done_before < 3, 'the kill came too late to test anything'

    resumed = _run(common + ['--experiment', 'victim', '--resume', 'auto'])
    out = resumed.communicate()[0]
    assert resumed.returncode == 0, out
    assert 'Resumed from' in out
    assert _metrics(_summary(tmp_path / 'victim')) == _metrics(_summary(tmp_path / 'ref'))


def test_sigterm_saves_mid_epoch_and_resume_is_exact(tmp_path):
    common = TINY + ['--epochs', '2', '--output', str(tmp_path), '--max-train-samples', '1024']
    ref = _run(common + ['--experiment', 'ref'])
    victim = _run(common + ['--experiment', 'victim'])
    for line in victim.stdout:  # wait until training is under way
        if 'Train: 0 [   2/' in line:
            break
    victim.send_signal(signal.SIGTERM)
    out = victim.communicate()[0]
    assert victim.returncode == 128 + signal.SIGTERM, out
    assert 'SIGTERM received' in out
    files = os.listdir(tmp_path / 'victim')
    assert any(f.startswith('recovery-0-') for f in files), files

    resumed = _run(common + ['--experiment', 'victim', '--resume', 'auto'])
    out = resumed.communicate()[0]
    assert resumed.returncode == 0, out
    assert ', batch ' in out  # continued inside epoch 0
    assert ref.wait() == 0
    assert _metrics(_summary(tmp_path / 'victim')) == _metrics(_summary(tmp_path / 'ref'))


def test_nonfinite_loss_stops_with_clear_message(tmp_path):
    with pytest.raises(TrainError, match=r'non-finite loss at epoch 0, step \d+.*last good checkpoint'):
        train.main(TINY + ['--epochs', '1', '--lr', '1e30', '--output', str(tmp_path), '--experiment', 'nan',
                                '--warmup-epochs', '0'])
    assert not (tmp_path / 'nan' / 'last.pth.tar').exists()


def test_nonfinite_skip_policy_keeps_training(tmp_path, monkeypatch):
    """One NaN loss (injected into the 2nd step) is skipped; the other updates happen and the run finishes."""
    from timm_alps.task import ALPSTask
    original, calls = ALPSTask.forward, []

    def forward(self, input, target):
        out = original(self, input, target)
        calls.append(1)
        if len(calls) == 2:
            out['loss'] = out['loss'] * float('nan')
        return out

    monkeypatch.setattr(ALPSTask, 'forward', forward)
    assert train.main(TINY + ['--epochs', '1', '--output', str(tmp_path), '--experiment', 'skip',
                                   '--on-nonfinite', 'skip']) == 0
    ckpt = load_training_checkpoint(str(tmp_path / 'skip' / 'last.pth.tar'))
    assert ckpt['step'] == 3  # 4 batches, one skipped


def test_nonfinite_weights_stop_before_saving(tmp_path, monkeypatch):
    """Weights that turn NaN during epoch 1 (with a finite training loss) stop the run; last/model_best keep epoch 0."""
    original = train.run.train_one_epoch

    def poisoned(epoch, task, *args, **kwargs):
        metrics = original(epoch, task, *args, **kwargs)
        if epoch == 1:
            with torch.no_grad():
                next(task.get_trainable_module().parameters()).fill_(float('nan'))
        return metrics

    monkeypatch.setattr(train.run, 'train_one_epoch', poisoned)
    with pytest.raises(TrainError, match=r'non-finite (evaluation|weights).*epoch 1.*last good checkpoint'):
        train.main(TINY + ['--epochs', '2', '--output', str(tmp_path), '--experiment', 'w'])
    for name in ('last', 'model_best'):
        assert load_training_checkpoint(str(tmp_path / 'w' / f'{name}.pth.tar'))['epoch'] == 0


def test_resume_errors(tmp_path):
    bad = tmp_path / 'bad.pth.tar'
    bad.write_bytes(b'\x00garbage')
    with pytest.raises(TrainError, match='corrupt or truncated'):
        train.main(TINY + ['--epochs', '1', '--resume', str(bad), '--output', str(tmp_path)])
    with pytest.raises(TrainError, match='no checkpoint at'):
        train.main(TINY + ['--epochs', '1', '--resume', str(tmp_path / 'missing.pth.tar')])
    with pytest.raises(TrainError, match='needs --experiment'):
        train.main(TINY + ['--epochs', '1', '--resume', 'auto'])


def test_existing_output_needs_consent(tmp_path):
    args = TINY + ['--epochs', '1', '--output', str(tmp_path), '--experiment', 'run', '--max-train-samples', '64']
    assert train.main(args) == 0
    before = (tmp_path / 'run' / 'last.pth.tar').stat().st_mtime_ns
    with pytest.raises(TrainError, match='already holds.*--overwrite'):
        train.main(args)
    assert (tmp_path / 'run' / 'last.pth.tar').stat().st_mtime_ns == before
    assert train.main(args + ['--overwrite']) == 0
