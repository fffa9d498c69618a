"""train_timm.py: one-epoch smoke runs per --method on a tiny bundled subset, output files, and flag errors."""
import argparse
import csv
import os
import subprocess
import sys

import pytest
import torch

from timm_alps import train
from timm_alps.train import TrainError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# width-4 PreAct ResNet-18, 256 training / 128 eval images of the bundled subset: ~1-3 s per epoch on one core.
TINY = ['--model', 'preact_resnet18_w16', '--model-kwargs', 'width=4', '--max-train-samples', '256',
        '--max-eval-samples', '128', '-b', '64', '--epochs', '1', '--no-progress']


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


@pytest.mark.parametrize('method', ['erm', 'dropout', 'ls', 'mixup', 'alps'])
def test_one_epoch_per_method(tmp_path, method):
    assert train.main(TINY + ['--method', method, '--output', str(tmp_path), '--experiment', method]) == 0
    out = tmp_path / method
    for name in ('args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'checkpoint-0.pth.tar',
                 'curves.png', 'log.txt'):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / 'summary.csv')))
    assert len(rows) == 1
    assert {'epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr'} <= set(rows[0])
    assert 0.0 <= float(rows[0]['eval_top1']) <= 100.0 and float(rows[0]['train_loss']) > 0

    ckpt = _load(out / 'last.pth.tar')
    args = ckpt['args']
    assert ckpt['arch'] == args.model == 'preact_resnet18_w16' and args.model_kwargs == {'width': 4}
    assert args.method == method and args.num_classes == 10
    presets = dict(erm=(0.0, 0.0), dropout=(0.5, 0.0), ls=(0.0, 0.1), mixup=(0.0, 0.0), alps=(0.0, 0.0))
    assert (args.drop, args.smoothing) == presets[method]
    if method == 'alps':
        assert (args.alps_eps, args.alps_beta, args.alps_label) == (0.3, [8.0, 2.0], 'fused')
        assert ckpt['rank_state'][0]['alps_mixup']['generator'] is not None
    if method == 'mixup':
        assert args.mixup == 1.0
    # the checkpoint rebuilds the model as documented in common.md
    import timm
    model = timm.create_model(args.model, num_classes=args.num_classes, **args.model_kwargs)
    model.load_state_dict(ckpt['state_dict'])
    for key in ('optimizer', 'scheduler', 'step', 'rank_state', 'saver'):
        assert key in ckpt, key
    assert {'rng', 'alps_mixup', 'loader'} <= set(ckpt['rank_state'][0])
    assert not {'rng', 'alps_mixup', 'loader'} & set(ckpt), 'per-rank state is stored once, in rank_state'
    assert ckpt['step'] == 4

    if method in ('erm', 'alps'):
        # args.yaml reproduces the run through timm's -c/--config, to the last digit on CPU
        assert train.main(['-c', str(out / 'args.yaml'), '--output', str(tmp_path), '--experiment', 'again']) == 0
        again = list(csv.DictReader(open(tmp_path / 'again' / 'summary.csv')))
        keys = ('train_loss', 'eval_loss', 'eval_top1', 'lr')
        assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in rows]


def test_alps_model_label_ema_channels_last(tmp_path):
    assert train.main(TINY + ['--alps-label', 'model', '--alps-mode', 'pair', '--alps-prob', '0.5',
                                   '--model-ema', '--channels-last', '--output', str(tmp_path),
                                   '--experiment', 'x']) == 0
    ckpt = _load(tmp_path / 'x' / 'last.pth.tar')
    assert 'state_dict_ema' in ckpt and ckpt['args'].alps_label == 'model'


def test_timm_loader_path_on_image_folder(tmp_path):
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for split in ('train', 'validation'):
        for c in ('a', 'b'):
            d = tmp_path / 'imgs' / split / c
            d.mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f'{i}.png')
    for loader in ('timm', 'fast'):
        assert train.main(['--data-dir', str(tmp_path / 'imgs'),
                                '--model', 'preact_resnet18_w16', '--model-kwargs', 'width=4', '-b', '8', '-j', '0',
                                '--epochs', '1', '--no-progress', '--loader', loader, '--output', str(tmp_path),
                                '--experiment', loader]) == 0
        assert _load(tmp_path / loader / 'last.pth.tar')['args'].num_classes == 2


@pytest.mark.parametrize('flags, message', [
    (['--model', 'preact_resnet81'], r"unknown model 'preact_resnet81'.*Did you mean: preact_resnet18"),
    (['--alps-beta', '8'], r'--alps-beta takes 2 number'),
    (['--alps-beta', '8', '0'], r'--alps-beta 8.0 0.0: must be finite and > 0'),
    (['--alps-eps', '2.5'], r'--alps-eps 2.5: must be finite and in \[0, 2\]'),
    (['--alps-eps', '-0.1'], r'in \[0, 2\]'),
    (['--alps-prob', '1.5'], r'--alps-prob 1.5: must be finite and in \[0, 1\]'),
    (['--alps-eps', '0.3', '--mixup', '0.2'], r'--alps-eps cannot be combined with --mixup'),
    (['--method', 'alps', '--cutmix', '1'], r'--cutmix only apply to --method mixup'),
    (['--method', 'erm', '--alps-eps', '0.1'], r'only apply to --method alps'),
    (['--method', 'mixup', '--mixup', '-1'], r'--mixup -1.0: must be finite and >= 0'),
    (['--smoothing', '1.0'], r'--smoothing 1.0: must be finite and in \[0, 1\)'),
    (['--drop', '1.0'], r'--drop 1.0: must be finite'),
    (['--lr', '0'], r'--lr 0.0: must be finite and > 0'),
    (['--mean', '0.5', '0.5'], r'--mean takes 1 or 3 number'),
    (['--data-dir', '/nonexistent/cifar'], r"does not exist.*python -m timm_alps.data"),
    (['--dataset', 'wds/cifar10'], r"--dataset wds/cifar10 needs --data-dir DIR"),
    (['--dataset', 'torch/cifar10', '--dataset-download'], r"--dataset torch/cifar10 needs --data-dir DIR.*download"),
    (['--seed', '-1'], r'--seed -1: must be finite and in \[0, 4294963199\]'),
    (['--model-kwargs', 'width=-3'], r'could not create model.*width'),
    (['--output', '/proc/timm_alps_cannot_write'], r'not writable'),
])
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, flags, message):
    argv = TINY + ['--experiment', 'bad'] + (['--output', str(tmp_path)] if '--output' not in flags else []) + flags
    with pytest.raises(TrainError, match=message):
        train.main(argv)
    assert not (tmp_path / 'bad').exists()


def test_cli_reports_one_line_and_exit_status_2():
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, 'train_timm.py', '--alps-beta', '8'], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ['train_timm.py: error: --alps-beta takes 2 number(s), got 1: 8.0']
    # the same CLI from the package (what the timm-alps-train console script runs)
    r = subprocess.run([sys.executable, '-m', 'timm_alps.train', '--alps-beta', '8'], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ['timm-alps-train: error: --alps-beta takes 2 number(s), got 1: 8.0']
