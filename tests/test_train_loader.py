"""train_timm.py with timm's loader and timm's recipe flags: one tiny smoke run each (64 bundled images, 1-2 epochs,
a width-4 PreAct ResNet), plus the hand-over rules between the fast and the timm loader."""
import argparse
import logging
import os

import pytest
import torch

from timm_alps import train
from timm_alps.train import TrainError, mixing
import timm_alps.train.run  # noqa: F401 (train.run.train_one_epoch is patched)


TINY = ['--model', 'preact_resnet18_w16', '--model-kwargs', 'width=4', '--max-train-samples', '64',
        '--max-eval-samples', '32', '-b', '16', '--epochs', '1', '--no-progress', '-j', '0']


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def _run(tmp_path, flags, name='run', caplog=None):
    if caplog is not None:
        caplog.set_level(logging.INFO, logger='train')
    assert train.main(TINY + flags + ['--output', str(tmp_path), '--experiment', name]) == 0
    return _load(tmp_path / name / 'last.pth.tar')


def _loader_kind(caplog) -> str:
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith('Model '))
    return 'fast' if 'InMemoryLoader' in line else 'timm'


@pytest.mark.parametrize('flags', [
    [],  # ALPS with the prefetcher: FastCollateALPSMixup in the collate
    ['--no-prefetcher'],  # ALPSMixup in the training step
    ['--method', 'mixup'],  # timm's FastCollateMixup
    ['--alps-label', 'model'],  # model-handle path: mixing in the step even with the prefetcher
], ids=['alps-collate', 'no-prefetcher', 'mixup-collate', 'alps-model-label'])
def test_timm_loader_on_bundled_shards(tmp_path, caplog, flags):
    ckpt = _run(tmp_path, ['--loader', 'timm'] + flags, caplog=caplog)
    assert _loader_kind(caplog) == 'timm'
    assert ckpt['step'] == 4  # --max-train-samples 64 of the stream at batch 16
    assert ckpt['args'].prefetcher == ('--no-prefetcher' not in flags)


def test_timm_recipe_flags_hand_over_from_auto(tmp_path, caplog):
    """timm augmentation flags the fast loader cannot honour: --loader auto hands the run to timm's loader."""
    # (not rand-*: timm's RandAugment Posterize can ask Pillow >= 11 for 0 bits, which Pillow now rejects)
    ckpt = _run(tmp_path, ['--aa', 'original', '--reprob', '0.25', '--remode', 'pixel', '--recount', '1',
                           '--scale', '0.5', '1', '--ratio', '0.75', '1.33', '--color-jitter', '0.2',
                           '--train-interpolation', 'bicubic', '--img-size', '32'], caplog=caplog)
    assert _loader_kind(caplog) == 'timm'
    assert ckpt['args'].aa == 'original' and ckpt['args'].loader == 'auto'


def test_fast_loader_by_default_and_max_train_samples_is_a_balanced_subset(tmp_path, caplog):
    ckpt = _run(tmp_path, [], caplog=caplog)
    assert _loader_kind(caplog) == 'fast'
    assert ckpt['step'] == 4


def test_bce_loss_and_grad_accum(tmp_path):
    ckpt = _run(tmp_path, ['--bce-loss', '--bce-target-thresh', '0.2', '--grad-accum-steps', '2'])
    assert ckpt['step'] == 2  # 4 batches, 2 per update
    ckpt = _run(tmp_path, ['--method', 'erm', '--bce-loss', '--smoothing', '0.1', '--grad-accum-steps', '3'], 'erm')
    assert ckpt['step'] == 2  # 4 batches: one update of 3, one of the last 1


def test_grad_accum_matches_the_big_batch(tmp_path):
    """--grad-accum-steps 2 at batch 16 computes the same updates as batch 32 (no BatchNorm, no mixing, fp32)."""
    common = ['--model', 'test_vit', '--model-kwargs', 'img_size=32', 'patch_size=8', '--num-classes', '10',
              '--max-train-samples', '64', '--max-eval-samples', '32', '--epochs', '1', '--no-progress', '--no-amp',
              '--method', 'erm', '--output', str(tmp_path)]
    assert train.main(common + ['-b', '32', '--experiment', 'big']) == 0
    assert train.main(common + ['-b', '16', '--grad-accum-steps', '2', '--experiment', 'accum']) == 0
    big, accum = _load(tmp_path / 'big' / 'last.pth.tar'), _load(tmp_path / 'accum' / 'last.pth.tar')
    assert big['step'] == accum['step'] == 2
    for k, v in big['state_dict'].items():
        torch.testing.assert_close(accum['state_dict'][k], v, rtol=1e-4, atol=1e-5)


def test_off_epochs_stop_mixing_and_label_shift(tmp_path, monkeypatch):
    seen = []
    original = mixing.Regularisation.set_epoch

    def spy(self, epoch, task):
        original(self, epoch, task)
        mixer = self.mixup_fn or self.collate_mixer
        seen.append((epoch, mixer.mixup_enabled, type(task.criterion).__name__))

    monkeypatch.setattr(mixing.Regularisation, 'set_epoch', spy)
    _run(tmp_path, ['--epochs', '2', '--alps-off-epoch', '1'], 'alps')
    assert seen == [(0, True, 'ALPSSoftTargetCrossEntropy'), (1, False, 'SoftTargetCrossEntropy')]
    seen.clear()
    _run(tmp_path, ['--epochs', '2', '--method', 'mixup', '--mixup-off-epoch', '1'], 'mixup')
    assert seen == [(0, True, 'SoftTargetCrossEntropy'), (1, False, 'SoftTargetCrossEntropy')]


def test_fixed_input_size_model(tmp_path, caplog):
    """A ViT that only takes 48x48 images: the fast loader (32x32) refuses naming the flag, auto resizes as timm."""
    vit = ['--model', 'test_vit', '--model-kwargs', 'img_size=48', 'patch_size=16', 'dynamic_img_size=False']
    with pytest.raises(TrainError, match='--img-size.*--loader timm'):
        train.main(TINY + vit + ['--loader', 'fast', '--output', str(tmp_path), '--experiment', 'fast'])
    assert not (tmp_path / 'fast').exists()
    caplog.set_level(logging.INFO, logger='train')
    assert train.main(TINY + vit + ['--output', str(tmp_path), '--experiment', 'auto']) == 0
    assert _loader_kind(caplog) == 'timm'


def test_timm_loader_image_folder_subset(tmp_path):
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for split in ('train', 'validation'):
        for c in ('a', 'b'):
            d = tmp_path / 'imgs' / split / c
            d.mkdir(parents=True)
            for i in range(12):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f'{i}.png')
    for loader in ('timm', 'fast'):
        assert train.main(['--data-dir', str(tmp_path / 'imgs'), '--model', 'preact_resnet18_w16',
                                '--model-kwargs', 'width=4', '-b', '8', '-j', '0', '--epochs', '1', '--no-progress',
                                '--loader', loader, '--max-train-samples', '16', '--output', str(tmp_path),
                                '--experiment', loader]) == 0
        ckpt = _load(tmp_path / loader / 'last.pth.tar')
        assert ckpt['args'].num_classes == 2 and ckpt['step'] == 2


def test_checkpoint_listing_goes_to_log_file_only(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    _run(tmp_path, [])
    assert 'Current checkpoints' in (tmp_path / 'run' / 'log.txt').read_text()
    assert not any('Current checkpoints' in r.getMessage() for r in caplog.records)
    assert sum(r.getMessage().startswith('Epoch 1/1') for r in caplog.records) == 1


@pytest.mark.slow
@pytest.mark.parametrize('flags', [[], ['--method', 'mixup']], ids=['alps', 'mixup'])
def test_timm_loader_resume_at_epoch_boundary_is_exact(tmp_path, monkeypatch, flags):
    """Stopped by SIGTERM at the end of epoch 0, resumed with --resume auto: epoch 1 matches the uninterrupted run
    (timm's loader: shard shuffle, augmentations, collate mixing; the main process's RNG restored)."""
    import csv
    import signal
    common = ['--loader', 'timm', '--epochs', '2', '--seed', '5', '-j', '1'] + flags
    _run(tmp_path, common, 'ref')
    original = train.run.train_one_epoch

    def stop_after_first(epoch, *a, **k):
        out = original(epoch, *a, **k)
        if epoch == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the script: finish the epoch, save, exit 128+15
        return out

    monkeypatch.setattr(train.run, 'train_one_epoch', stop_after_first)
    argv = TINY + common + ['--output', str(tmp_path), '--experiment', 'cut']
    assert train.main(argv) == 128 + signal.SIGTERM
    monkeypatch.setattr(train.run, 'train_one_epoch', original)
    assert train.main(argv + ['--resume', 'auto']) == 0
    rows = [list(csv.DictReader(open(tmp_path / name / 'summary.csv'))) for name in ('ref', 'cut')]
    keys = ('epoch', 'train_loss', 'eval_loss', 'eval_top1', 'lr')
    assert [[r[k] for k in keys] for r in rows[1]] == [[r[k] for k in keys] for r in rows[0]]

def test_image_folder_of_mixed_sizes_goes_to_timms_loader(tmp_path, caplog):
    """Photos of many sizes and modes (grayscale, palette, RGBA): auto picks timm's loader, which resizes; --loader
    fast refuses up front naming two sizes, before anything is written."""
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for split in ('train', 'validation'):
        for c in ('a', 'b', 'c'):
            d = tmp_path / 'imgs' / split / c
            d.mkdir(parents=True)
            for i in range(6):
                h, w = rng.integers(20, 50, 2)
                img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
                img.convert(('RGB', 'L', 'P', 'RGBA')[i % 4]).save(d / f'{i}.png')
    flags = ['--data-dir', str(tmp_path / 'imgs'), '--model', 'preact_resnet18_w16', '--model-kwargs', 'width=4',
             '-b', '6', '-j', '0', '--epochs', '1', '--no-progress', '--output', str(tmp_path)]
    with pytest.raises(TrainError, match=r'--loader fast .* differ in size \(sample \d+ is \d+x\d+ but sample 0 is '
                                         r'\d+x\d+\): use --loader timm'):
        train.main(flags + ['--loader', 'fast', '--experiment', 'fast'])
    assert not (tmp_path / 'fast').exists()
    caplog.set_level(logging.INFO, logger='train')
    assert train.main(flags + ['--experiment', 'auto']) == 0
    assert _loader_kind(caplog) == 'timm'
    assert _load(tmp_path / 'auto' / 'last.pth.tar')['args'].num_classes == 3
