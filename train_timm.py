#!/usr/bin/env python3
"""ALPS training script in the style of timm's train.py.

    python train_timm.py                                   # ALPS on the bundled CIFAR-10 subset, CPU-friendly
    python train_timm.py --alps-eps 0.3 --alps-beta 8 2    # the same, flags spelled out
    python train_timm.py --dataset torch/cifar10 --data-dir data --dataset-download --model preact_resnet18 \
        --epochs 200 --sched multistep --decay-milestones 101 151 --lr 0.1 --weight-decay 1e-4  # the paper
    torchrun --nproc_per_node 4 train_timm.py ...          # DDP (NCCL on GPUs, gloo on CPU)

Flags keep the names of timm's train.py. The output folder gets args.yaml, summary.csv, last/best/numbered
checkpoints (written atomically) and curves.png. `--resume auto` continues from the latest good checkpoint.
"""
import argparse
import difflib
import logging
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from functools import partial
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import yaml

import timm
from timm import utils
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.models import create_model, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import PlateauLRScheduler, create_scheduler_v2, scheduler_kwargs
from timm.utils import NativeScaler

import timm_alps  # noqa: F401  (registers the CIFAR models with timm)
from timm_alps import data as alps_data
from timm_alps.checkpoint import (
    AtomicCheckpointSaver, CheckpointError, capture_rng_state, check_output_dir, estimate_checkpoint_bytes,
    find_resume_checkpoint, list_checkpoints, load_training_checkpoint, restore_rng_state)
from timm_alps.task import METHODS, ALPSTask, LossMonitor, apply_method_preset, create_mixup_and_loss

_logger = logging.getLogger('train')


class TrainError(Exception):
    """A problem reported as one clear line: bad input or environment (exit status 2), or a run that had to
    stop (non-finite loss, failed write: exit status 1)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteLossError(RuntimeError):
    pass


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                           help='YAML config file specifying default arguments')

parser = argparse.ArgumentParser(description='ALPS training for timm models', allow_abbrev=False)
group = parser.add_argument_group('Dataset parameters')
group.add_argument('--data-dir', metavar='DIR', default=None,
                   help='dataset root (default: the bundled CIFAR-10 subset)')
group.add_argument('--dataset', metavar='NAME', default=None,
                   help='timm dataset "<type>/<name>", e.g. wds/cifar10, torch/cifar10, or empty for an image folder')
group.add_argument('--train-split', metavar='NAME', default='train')
group.add_argument('--val-split', metavar='NAME', default=None,
                   help='evaluation split (default: "test" for the bundled and torch/ datasets, else "validation")')
group.add_argument('--dataset-download', action='store_true', default=False,
                   help='allow download of torch/ datasets')
group.add_argument('--max-train-samples', type=int, default=None, metavar='N',
                   help='train on the first N training samples only (smoke tests)')
group.add_argument('--max-eval-samples', type=int, default=None, metavar='N',
                   help='evaluate on the first N evaluation samples only')
group.add_argument('--loader', default='auto', choices=('auto', 'fast', 'timm'),
                   help='fast: whole dataset as uint8 in (device) memory, batched crop/flip/normalise; timm: '
                        'create_loader; auto: fast when the train split has <= --fast-loader-max-mb of pixels')
group.add_argument('--fast-loader-max-mb', type=float, default=2048, metavar='MB')

group = parser.add_argument_group('Model parameters')
group.add_argument('--model', default='preact_resnet18_w16', type=str, metavar='MODEL',
                   help='timm model name (default: preact_resnet18_w16, a narrow PreAct ResNet-18)')
group.add_argument('--pretrained', action='store_true', default=False)
group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                   help='initialise the model weights from this checkpoint')
group.add_argument('--resume', default='', type=str, metavar='PATH',
                   help="resume the full training state from PATH, or 'auto': latest good checkpoint in the output "
                        "folder (needs --experiment)")
group.add_argument('--num-classes', type=int, default=None, metavar='N',
                   help='number of classes (default: from the dataset, else the model)')
group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN')
group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD')
group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N', help='batch size per process')
group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N')
group.add_argument('--channels-last', action='store_true', default=False)
group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                   help='torch.compile the model with this backend (default: inductor)')
group.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs,
                   help='extra model arguments, key=value (e.g. width=8)')

group = parser.add_argument_group('Optimizer parameters')
group.add_argument('--opt', default='momentum', type=str, metavar='OPTIMIZER',
                   help='timm optimizer name (default: momentum, SGD with classical momentum as in the paper; timm\'s sgd is Nesterov)')
group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON')
group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
group.add_argument('--momentum', type=float, default=0.9, metavar='M')
group.add_argument('--weight-decay', type=float, default=1e-4, help='weight decay (default: 1e-4, the paper)')
group.add_argument('--clip-grad', type=float, default=None, metavar='NORM')
group.add_argument('--clip-mode', type=str, default='norm')
group.add_argument('--opt-kwargs', nargs='*', default={}, action=utils.ParseKwargs)

group = parser.add_argument_group('Learning rate schedule parameters')
group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER',
                   help='LR scheduler: cosine, multistep (the paper), step, ... (default: cosine)')
group.add_argument('--sched-on-updates', action='store_true', default=False)
group.add_argument('--lr', type=float, default=0.1, metavar='LR')
group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR')
group.add_argument('--min-lr', type=float, default=0, metavar='LR')
group.add_argument('--epochs', type=int, default=12, metavar='N')
group.add_argument('--decay-milestones', default=[100, 150], type=int, nargs='+', metavar='MILESTONES')
group.add_argument('--decay-epochs', type=float, default=90, metavar='N')
group.add_argument('--warmup-epochs', type=int, default=0, metavar='N')
group.add_argument('--warmup-prefix', action='store_true', default=False)
group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N')
group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE')

group = parser.add_argument_group('Augmentation and regularization parameters')
group.add_argument('--method', default=None, choices=METHODS,
                   help="preset of the paper's comparison: erm, dropout (0.5), ls (0.1), mixup (alpha 1), alps "
                        "(Beta(8, 2), eps 0.3); explicit flags override it (default: alps)")
group.add_argument('--alps-eps', type=float, default=None, metavar='EPS',
                   help='L1 radius of the adversarial label ball (default: 0.3)')
group.add_argument('--alps-beta', type=float, nargs='+', default=None, metavar='A B',
                   help='Beta(A, B) of the mixing weight of the sample itself (default: 8 2)')
group.add_argument('--alps-prob', type=float, default=None, help='probability of mixing a sample (default: 1)')
group.add_argument('--alps-mode', type=str, default=None, choices=('elem', 'pair', 'batch'),
                   help='draw the mixing weight per sample, pair or batch (default: elem)')
group.add_argument('--alps-label', type=str, default=None, choices=('fused', 'model'),
                   help='fused: adversarial label from the training forward (free); model: extra no-grad forward '
                        'in the mixer (default: fused)')
group.add_argument('--no-aug', action='store_true', default=False, help='no crop/flip augmentation')
group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
group.add_argument('--crop-pad', type=int, default=4, help='random crop padding of the fast loader (default: 4)')
group.add_argument('--mixup', type=float, default=None, help='MixUp alpha (--method mixup; preset 1.0)')
group.add_argument('--cutmix', type=float, default=None, help='CutMix alpha (--method mixup)')
group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
group.add_argument('--mixup-prob', type=float, default=1.0)
group.add_argument('--mixup-switch-prob', type=float, default=0.5)
group.add_argument('--mixup-mode', type=str, default='batch')
group.add_argument('--smoothing', type=float, default=None, help='label smoothing (default: 0, ls preset 0.1)')
group.add_argument('--drop', type=float, default=None, metavar='PCT',
                   help='dropout rate (default: 0, dropout preset 0.5)')
group.add_argument('--drop-path', type=float, default=None, metavar='PCT')

group = parser.add_argument_group('Distributed and batch norm parameters')
group.add_argument('--device', default=None, type=str, help="'cuda' when available, else 'cpu'")
group.add_argument('--dist-backend', default=None, type=str, help='default: nccl on CUDA, gloo on CPU')
group.add_argument('--dist-url', default='env://', type=str)
group.add_argument('--sync-bn', action='store_true', help='synchronized BatchNorm across processes')
group.add_argument('--dist-bn', type=str, default='reduce', help='share BN stats after each epoch: reduce, broadcast, ""')
group.add_argument('--no-ddp-bb', action='store_true', default=False, help='no DDP buffer broadcast')

group = parser.add_argument_group('Model exponential moving average parameters')
group.add_argument('--model-ema', action='store_true', default=False)
group.add_argument('--model-ema-decay', type=float, default=0.9998)
group.add_argument('--model-ema-warmup', action='store_true')

group = parser.add_argument_group('Miscellaneous parameters')
group.add_argument('--seed', type=int, default=42, metavar='S')
group.add_argument('--deterministic', action='store_true', default=False,
                   help='torch.use_deterministic_algorithms (exact resume on GPU; slower)')
group.add_argument('--log-interval', type=int, default=50, metavar='N')
group.add_argument('--recovery-interval', type=int, default=0, metavar='N',
                   help='also write a mid-epoch recovery checkpoint every N updates (0: epoch ends only)')
group.add_argument('--checkpoint-hist', type=int, default=3, metavar='N')
group.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='data workers of the timm loader')
group.add_argument('--amp', action='store_true', default=False)
group.add_argument('--amp-dtype', default='float16', type=str, choices=('float16', 'bfloat16'))
group.add_argument('--output', default='', type=str, metavar='PATH', help='default: ./output/train')
group.add_argument('--experiment', default='', type=str, metavar='NAME', help='sub-folder of --output')
group.add_argument('--overwrite', action='store_true', default=False,
                   help='allow replacing the results of an earlier run in the same output folder')
group.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC')
group.add_argument('--on-nonfinite', default='stop', choices=('stop', 'skip'),
                   help='non-finite loss: stop (keep the last good checkpoint) or skip the update (one host sync '
                        'per step on accelerators)')
group.add_argument('--no-progress', action='store_true', default=False, help='no progress bar')


def parse_args(argv: Optional[List[str]] = None):
    """Flags over the -c/--config YAML (e.g. a run's args.yaml) over the defaults."""
    args_config, remaining = config_parser.parse_known_args(argv)
    config = {}
    if args_config.config:
        try:
            with open(args_config.config) as f:
                config = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise TrainError(f'could not read --config {args_config.config}: {e}') from None
    # A pre-filled namespace instead of parser.set_defaults keeps the module-level parser unchanged between calls.
    return parser.parse_args(remaining, namespace=argparse.Namespace(**config))


def validate_args(args) -> None:
    """Reject bad flag values before anything is built or written."""
    try:
        apply_method_preset(args)
    except ValueError as e:
        raise TrainError(str(e)) from None
    for name in ('batch_size', 'epochs', 'log_interval', 'checkpoint_hist'):
        if getattr(args, name) < 1:
            raise TrainError(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    for name in ('max_train_samples', 'max_eval_samples', 'validation_batch_size'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise TrainError(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.lr <= 0:
        raise TrainError(f'--lr must be > 0, got {args.lr}')
    for name in ('mean', 'std'):
        v = getattr(args, name)
        if v is not None and len(v) not in (1, 3):
            raise TrainError(f'--{name} takes 1 or 3 numbers (per channel), got {len(v)}')
    if args.std is not None and any(s <= 0 for s in args.std):
        raise TrainError(f'--std values must be > 0, got {args.std}')
    if not timm.is_model(args.model):
        close = difflib.get_close_matches(args.model, timm.list_models(), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ' See timm.list_models().'
        raise TrainError(f"unknown model '{args.model}'.{hint}")
    if args.resume == 'auto' and not args.experiment:
        raise TrainError("--resume auto needs --experiment NAME (and --output if not the default): the folder of the "
                         "run to continue")


# -- data ----------------------------------------------------------------------------------------------------------
def resolve_dataset_args(args) -> None:
    """Default to the bundled subset; check that a given dataset path exists (fail before building anything)."""
    if args.data_dir is None and args.dataset is None:
        args.data_dir, args.dataset = str(alps_data.BUNDLED_DATA_DIR), 'wds/cifar10_subset'
    args.dataset = args.dataset or ''
    if args.val_split is None:
        args.val_split = 'test' if args.dataset.startswith('torch/') else 'validation'
        info_path = os.path.join(args.data_dir or '', '_info.json')
        if args.dataset.startswith('wds/') and os.path.isfile(info_path):
            import json
            with open(info_path) as f:
                splits = json.load(f).get('splits', {})
            args.val_split = next((s for s in ('validation', 'val', 'test') if s in splits), args.val_split)
    needs_dir = not (args.dataset.startswith('torch/') and args.dataset_download)
    if needs_dir and (not args.data_dir or not os.path.exists(args.data_dir)):
        raise TrainError(
            f"dataset folder '{args.data_dir}' does not exist. Create webdataset shards with "
            f"`python -m timm_alps.data --help` (e.g. from a CIFAR .npz or an image folder), use "
            f"--dataset torch/cifar10 --dataset-download, or omit --data-dir/--dataset for the bundled subset.")


def _fits_in_memory(args, dataset_len: Optional[int], chw) -> bool:
    return dataset_len is not None and dataset_len * math.prod(chw) <= args.fast_loader_max_mb * 2 ** 20


def open_data(args) -> Dict[str, Any]:
    """Open both splits: as uint8 tensors for the fast loader (small datasets) or as timm datasets.

    webdataset shards with an `_info.json` written by `timm_alps.data` are read straight into tensors; other small
    map-style datasets (torch/cifar10, image folders) are decoded once. Big or streaming datasets stay timm datasets.
    """
    info_path = os.path.join(args.data_dir or '', '_info.json')
    shards = args.dataset.startswith('wds/') and os.path.isfile(info_path)
    out: Dict[str, Any] = dict(kind='timm', classes=None)
    try:
        if shards:
            import json
            with open(info_path) as f:
                info = json.load(f)
            split_info = info.get('splits', {}).get(args.train_split, {})
            n = split_info.get('num_samples')
            if args.loader == 'fast' or (args.loader == 'auto' and n and
                                         _fits_in_memory(args, n, _first_shard_image_chw(args.data_dir, split_info))):
                out.update(kind='fast', classes=info.get('classes'))
                for key, split in (('train', args.train_split), ('eval', args.val_split)):
                    x, y, _ = alps_data.load_split_tensors(args.data_dir, split)
                    out[key] = (x, y)
                return out
        common = dict(root=args.data_dir, download=args.dataset_download, batch_size=args.batch_size, seed=args.seed)
        ds_train = create_dataset(args.dataset, split=args.train_split, is_training=True, **common)
        ds_eval = create_dataset(args.dataset, split=args.val_split, is_training=False, **common)
    except (OSError, ValueError, RuntimeError, KeyError, AssertionError) as e:
        raise TrainError(f"could not open dataset '{args.dataset}' in '{args.data_dir}' (splits "
                         f"{args.train_split}/{args.val_split}): {e}") from e
    out['classes'] = _dataset_classes(ds_train)
    n = len(ds_train) if isinstance(ds_train, torch.utils.data.Dataset) and hasattr(ds_train, '__getitem__') else None
    sample_chw = None
    if n:
        img = ds_train[0][0]
        sample_chw = (len(img.getbands()), img.height, img.width) if hasattr(img, 'getbands') else tuple(img.shape)
    if args.loader == 'fast' or (args.loader == 'auto' and sample_chw and _fits_in_memory(args, n, sample_chw)):
        if n is None:
            raise TrainError(f"--loader fast needs a map-style dataset or timm_alps shards; '{args.dataset}' "
                             f"streams. Use --loader timm.")
        out['kind'] = 'fast'
        for key, ds, limit in (('train', ds_train, args.max_train_samples), ('eval', ds_eval, args.max_eval_samples)):
            if limit:
                ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))
            out[key] = _decode(ds)
        return out
    if args.max_train_samples or args.max_eval_samples:
        raise TrainError('--max-train-samples/--max-eval-samples need the fast in-memory loader (small datasets)')
    out.update(train=ds_train, eval=ds_eval)
    return out


def _dataset_classes(ds) -> Optional[List[str]]:
    """Class names of a timm / torchvision dataset, when it knows them."""
    classes = getattr(ds, 'classes', None)
    if classes is None:
        classes = getattr(getattr(ds, 'reader', None), 'class_to_idx', None) or None
    if isinstance(classes, dict):
        classes = sorted(classes, key=classes.get)
    return list(classes) if classes else None


def _first_shard_image_chw(root: str, split_info: Dict[str, Any]):
    import tarfile
    from PIL import Image
    with tarfile.open(os.path.join(root, split_info['filenames'][0]), 'r:*') as tar:
        for m in tar:
            if m.name.endswith(('.png', '.jpg', '.jpeg', '.webp')):
                with Image.open(tar.extractfile(m)) as img:
                    return len(img.getbands()), img.height, img.width
    return 3, 32, 32


def _decode(dataset):
    """Decode a (PIL image, class) dataset once into uint8 N x C x H x W images and int64 labels."""
    import numpy as np
    images, labels = [], []
    for img, target in dataset:
        if hasattr(img, 'convert'):
            img = torch.from_numpy(np.array(img.convert('RGB'))).permute(2, 0, 1)
        if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8:
            raise TrainError('the fast loader needs datasets of PIL images or uint8 tensors; use --loader timm')
        images.append(img)
        labels.append(int(target))
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def build_loaders(args, data: Dict[str, Any], data_config: Dict[str, Any], device: torch.device):
    """Train and eval loaders: InMemoryLoader (crop/flip/normalise batched on the device) or timm's create_loader."""
    eval_bs = args.validation_batch_size or args.batch_size
    if data['kind'] == 'fast':
        (xt, yt), (xe, ye) = data['train'], data['eval']
        xt, yt = xt[:args.max_train_samples], yt[:args.max_train_samples]
        xe, ye = xe[:args.max_eval_samples], ye[:args.max_eval_samples]
        norm = dict(mean=data_config['mean'], std=data_config['std'], device=device, channels_last=args.channels_last)
        loader_train = alps_data.InMemoryLoader(
            xt, yt, batch_size=args.batch_size, is_training=True, padding=0 if args.no_aug else args.crop_pad,
            hflip=0.0 if args.no_aug else args.hflip, drop_last=True, seed=args.seed, rank=args.rank,
            world_size=args.world_size, **norm)
        # Each rank evaluates a disjoint slice, so summed metrics are exact (no padded duplicates).
        loader_eval = alps_data.InMemoryLoader(
            xe[args.rank::args.world_size], ye[args.rank::args.world_size], batch_size=eval_bs, is_training=False,
            **norm)
        loader_train.max_label = int(max(yt.max(), ye.max()))
        return loader_train, loader_eval
    loader_kw = dict(input_size=data_config['input_size'], mean=data_config['mean'], std=data_config['std'],
                     num_workers=args.workers, distributed=args.distributed, device=device,
                     interpolation=data_config['interpolation'])
    loader_train = create_loader(data['train'], batch_size=args.batch_size, is_training=True, no_aug=args.no_aug,
                                 hflip=args.hflip, **loader_kw)
    loader_eval = create_loader(data['eval'], batch_size=eval_bs, is_training=False, crop_pct=data_config['crop_pct'],
                                **loader_kw)
    return loader_train, loader_eval


# -- output ---------------------------------------------------------------------------------------------------------
def resolve_output_dir(args) -> str:
    base = args.output or os.path.join('.', 'output', 'train')
    if args.experiment:
        return os.path.join(base, args.experiment)
    if args.resume and args.resume != 'auto':
        return os.path.dirname(os.path.abspath(args.resume))  # continue the run where it was
    name = '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), args.method])
    return os.path.join(base, name)


_OUR_FILES = ('args.yaml', 'summary.csv', 'curves.png', 'log.txt')


def prepare_output_dir(output_dir: str, args, need_bytes: int) -> None:
    """Refuse to clobber an earlier run without --resume/--overwrite, then check the folder can take checkpoints."""
    existing = [f for f in (os.listdir(output_dir) if os.path.isdir(output_dir) else []) if not f.startswith('.')]
    if existing and not args.resume:
        if not args.overwrite:
            raise TrainError(f"output folder '{output_dir}' already holds {len(existing)} file(s) (e.g. "
                             f"{sorted(existing)[0]}). Continue it with --resume auto --experiment "
                             f"{os.path.basename(output_dir)}, replace it with --overwrite, or pick another "
                             f"--experiment.")
        for path in list_checkpoints(output_dir) + [os.path.join(output_dir, f) for f in _OUR_FILES]:
            if os.path.exists(path):
                os.remove(path)
    try:
        check_output_dir(output_dir, need_bytes)
    except CheckpointError as e:
        raise TrainError(str(e)) from None


def plot_curves(summary_csv: str, png_path: str, method: str = '', num_classes: int = 0) -> None:
    """Loss and accuracy per epoch from summary.csv (train loss, eval loss, eval top-1; chance level dashed)."""
    import csv
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    with open(summary_csv, newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    ep = [int(r['epoch']) + 1 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(ep, [float(r['train_loss']) for r in rows], 'o-', label=f'train ({method} targets)' if method else 'train')
    ax1.plot(ep, [float(r['eval_loss']) for r in rows], 'o-', label='eval')
    ax1.set(xlabel='epoch', ylabel='cross-entropy', title='loss')
    ax2.plot(ep, [float(r['eval_top1']) for r in rows], 'o-', color='C2', label='eval top-1')
    if num_classes:
        ax2.axhline(100.0 / num_classes, color='gray', ls='--', lw=1, label=f'chance ({100.0 / num_classes:.3g}%)')
    ax2.set(xlabel='epoch', ylabel='accuracy (%)', title='eval accuracy', ylim=(0, 100))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(summary_csv))), fontsize=9)
    fig.tight_layout()
    tmp = png_path + '.part.png'
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, png_path)


# -- training -------------------------------------------------------------------------------------------------------
class SignalFlag:
    """First SIGINT/SIGTERM asks for a checkpoint and a clean exit at the next step; a second one kills."""

    def __init__(self):
        self.signum = 0
        self._old = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def _progress(loader, epoch: int, num_epochs: int, enabled: bool, start: int):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=len(loader), initial=start, desc=f'Epoch {epoch + 1}/{num_epochs}', leave=False,
                dynamic_ncols=True, unit='batch')


def train_one_epoch(epoch, task, loader, optimizer, args, state, device, lr_scheduler=None, saver=None,
                    amp_autocast=nullcontext, loss_scaler=None, stop=None, skip_batches=0):
    """One pass over the loader; returns dict(loss, img_per_sec). `state` holds the global step and position."""
    task.train()
    monitor = state['monitor'] = LossMonitor(device)
    if skip_batches and state.get('resume_loss') is not None:  # the epoch's loss so far, before the interruption
        monitor.loss_sum.fill_(state['resume_loss'][0])
        monitor.sample_count.fill_(state['resume_loss'][1])
    updates_per_epoch = len(loader)
    check_every = 1 if device.type == 'cpu' else args.log_interval
    bar = _progress(loader, epoch, args.epochs, args.progress and state['rank0'], skip_batches)
    samples, t0 = 0, time.perf_counter()
    for batch_idx, (input, target) in enumerate(loader):
        if batch_idx < skip_batches:  # mid-epoch resume: same batches as before the interruption, not trained
            continue
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            loss = task(input, target)['loss']
        if args.on_nonfinite == 'skip':
            finite = torch.isfinite(loss.detach()).to(torch.int32)
            if args.distributed:  # every rank must take the same decision, or DDP's all-reduce hangs
                torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
            if not bool(finite):
                _logger.warning(f'Skipping update at epoch {epoch} step {state["step"]}: non-finite loss')
                optimizer.zero_grad(set_to_none=True)
                state['skipped'] += 1
                continue
        params = None if args.clip_grad is None else task.get_clip_parameters(exclude_head='agc' in args.clip_mode)
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode, parameters=params)
        else:
            loss.backward()
            if args.clip_grad is not None:
                utils.dispatch_clip_grad(params, value=args.clip_grad, mode=args.clip_mode)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state['step'] += 1
        state['batch_idx'] = batch_idx
        task.update_ema(step=state['step'])
        monitor.update(loss, input.shape[0], state['step'])
        samples += input.shape[0]
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=state['step'])

        last = batch_idx == updates_per_epoch - 1
        if (batch_idx + 1) % check_every == 0 or last:
            # One small read-back (and all-reduce under DDP) per check, never per step on accelerators.
            signum, count, first = monitor.check(stop.signum if stop else 0, args.distributed)
            if count and args.on_nonfinite == 'stop':
                raise NonFiniteLossError(f'non-finite loss at epoch {epoch}, step {first}')
            if signum and not last:
                if saver is not None:
                    saver.save_recovery(epoch, batch_idx=batch_idx)
                raise Interrupted(signum)
        if bar is not None:
            bar.update(1)
        if batch_idx % args.log_interval == 0 and (args.progress or args.log_interval < updates_per_epoch):
            shown = utils.reduce_tensor(loss.detach(), args.world_size) if args.distributed else loss
            if bar is not None:
                bar.set_postfix(loss=f'{shown.item():.3f}', lr=f'{optimizer.param_groups[0]["lr"]:.3g}')
            elif state['rank0']:
                _logger.info(f'Train: {epoch} [{batch_idx:>4d}/{updates_per_epoch}]  Loss: {shown.item():#.3g}  '
                             f'LR: {optimizer.param_groups[0]["lr"]:.3e}')
        if args.recovery_interval and saver is not None and (batch_idx + 1) % args.recovery_interval == 0 and not last:
            saver.save_recovery(epoch, batch_idx=batch_idx)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    state['batch_idx'] = None
    return dict(loss=monitor.summary(args.distributed), img_per_sec=samples * args.world_size / max(elapsed, 1e-9))


@torch.no_grad()
def validate(model, loader, args, device, amp_autocast=nullcontext) -> Dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) over the whole eval set, summed exactly across ranks."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # shards may differ in size: no DDP collectives per forward
    model.eval()
    k = min(5, args.num_classes)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    for input, target in loader:
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            output = model(input)
        output = output.float()
        target = target.to(output.device)
        topk = output.topk(k, dim=1).indices == target.view(-1, 1)
        totals += torch.stack([
            nn.functional.cross_entropy(output, target, reduction='sum').double(),
            topk[:, 0].sum().double(), topk.any(dim=1).sum().double(),
            torch.tensor(float(target.numel()), dtype=torch.float64, device=output.device)])
    if args.distributed:
        torch.distributed.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    n = max(n, 1.0)
    return dict(loss=loss / n, top1=100.0 * top1 / n, top5=100.0 * top5 / n)


def resume_training(args, output_dir, task, optimizer, loss_scaler, lr_scheduler, mixup_fn, loader_train, state):
    """Load a checkpoint into the plain (not yet DDP/compiled) modules and restore every random stream.

    Returns:
        (path, checkpoint dict, start epoch, batches of that epoch already trained)
    """
    start_epoch, skip_batches = 0, 0
    try:
        if args.resume == 'auto':
            resume_path, skipped = find_resume_checkpoint(output_dir)
            for p, why in skipped:
                _logger.warning(f'--resume auto: skipping {p}: {why}')
        else:
            resume_path = args.resume
        checkpoint = load_training_checkpoint(resume_path)
    except CheckpointError as e:
        raise TrainError(str(e)) from None
    if checkpoint.get('arch') not in (None, args.model):
        raise TrainError(f"--resume: '{resume_path}' holds a {checkpoint['arch']} but --model is {args.model}")
    try:
        task.load_checkpoint_state(checkpoint['state_dict'], checkpoint.get('task_state'))
        if args.model_ema and checkpoint.get('state_dict_ema') is not None:
            task.load_checkpoint_state(checkpoint['state_dict_ema'], checkpoint.get('task_state_ema'), ema=True)
        optimizer.load_state_dict(checkpoint['optimizer'])
    except (RuntimeError, ValueError, KeyError) as e:
        raise TrainError(f"--resume: '{resume_path}' does not match this model/optimizer "
                         f"(different --model, --model-kwargs, --num-classes or --opt?): {e}") from e
    if loss_scaler is not None and loss_scaler.state_dict_key in checkpoint:
        loss_scaler.load_state_dict(checkpoint[loss_scaler.state_dict_key])
    if checkpoint.get('scheduler') is not None and isinstance(lr_scheduler, PlateauLRScheduler):
        # Only the plateau schedule has history; the others are functions of epoch/step, re-derived in main() from
        # the current flags (so a resume may extend --epochs).
        lr_scheduler.load_state_dict(checkpoint['scheduler'])
    state['step'] = int(checkpoint.get('step', 0))
    if checkpoint.get('batch_idx') is not None:
        start_epoch, skip_batches = int(checkpoint['epoch']), int(checkpoint['batch_idx']) + 1
    else:
        start_epoch = int(checkpoint['epoch']) + 1
    per_rank = checkpoint.get('rank_state') or []
    if args.rank < len(per_rank):
        mine = per_rank[args.rank]
        restore_rng_state(mine['rng'])
        if mine.get('alps_mixup') is not None and hasattr(mixup_fn, 'load_state_dict'):
            mixup_fn.load_state_dict(mine['alps_mixup'])
        if mine.get('loader') is not None and hasattr(loader_train, 'load_state_dict'):
            loader_train.load_state_dict(mine['loader'])
        state['resume_loss'] = mine.get('epoch_loss')
    else:
        _logger.warning(f'--resume: no saved RNG state for rank {args.rank} (world size changed?); '
                        f'continuing with fresh random streams.')
    if state['rank0']:
        where = f'epoch {start_epoch}' + (f', batch {skip_batches}' if skip_batches else '')
        _logger.info(f"Resumed from '{resume_path}' at {where} (step {state['step']}).")

    return resume_path, checkpoint, start_epoch, skip_batches


def _broadcast_error(args, message: Optional[str]) -> None:
    """Rank 0 checks the output folder; every rank stops with the same error instead of hanging in a collective."""
    if args.distributed:
        box = [message]
        torch.distributed.broadcast_object_list(box, src=0)
        message = box[0]
    if message:
        raise TrainError(message)


def main(argv: Optional[List[str]] = None) -> int:
    """Train; returns the exit status (0, or 128 + signal number after a checkpoint on SIGINT/SIGTERM).

    Raises:
        TrainError: bad input or environment (reported before training when possible).
    """
    args = parse_args(argv)
    validate_args(args)
    resolve_dataset_args(args)
    args.progress = not args.no_progress and sys.stderr.isatty()

    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = utils.init_distributed_device(args)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise TrainError(f'could not set up device {args.device!r}: {e}') from e
    rank0 = utils.is_primary(args)
    if args.distributed:  # the log cadence drives a collective, so every rank must agree on it
        flag = torch.tensor([int(args.progress)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        args.progress = bool(flag.item())
    if args.distributed:
        _logger.info(f'Process {args.rank}/{args.world_size} on {device} ({torch.distributed.get_backend()}).')
    if args.deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp else nullcontext
    loss_scaler = NativeScaler(device=device.type) if args.amp and device.type == 'cuda' and \
        amp_dtype == torch.float16 else None
    utils.random_seed(args.seed, args.rank)

    data = open_data(args)
    if args.num_classes is None and data['classes']:
        args.num_classes = len(data['classes'])

    # model
    try:
        model = create_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes, drop_rate=args.drop,
                             drop_path_rate=args.drop_path, checkpoint_path=args.initial_checkpoint or None,
                             **args.model_kwargs)
    except (TypeError, ValueError, RuntimeError, FileNotFoundError) as e:
        raise TrainError(f"could not create model '{args.model}' with --model-kwargs {args.model_kwargs}: {e}") from e
    if args.num_classes is None:
        args.num_classes = model.num_classes
    data_config = resolve_data_config(vars(args), model=model, verbose=rank0)
    try:
        loader_train, loader_eval = build_loaders(args, data, data_config, device)
    except (ValueError, TypeError) as e:
        raise TrainError(f'could not build the data loaders: {e}') from e
    data = None
    max_label = getattr(loader_train, 'max_label', None)
    if max_label is not None and max_label >= args.num_classes:
        raise TrainError(f'the dataset has labels up to {max_label} but the model has {args.num_classes} classes; '
                         f'pass --num-classes {max_label + 1}')
    if len(loader_train) == 0:
        raise TrainError(f'the training set is smaller than one batch ({args.batch_size} per process); '
                         f'lower --batch-size')
    model.to(device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.sync_bn and device.type == 'cpu':
        raise TrainError('--sync-bn needs GPUs (torch.nn.SyncBatchNorm has no CPU kernel); on CPU BatchNorm '
                         'statistics are averaged after each epoch (--dist-bn reduce)')
    if args.distributed and args.sync_bn:
        args.dist_bn = ''
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if rank0:
        _logger.info(f'Model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), '
                     f'method {args.method}, {type(loader_train).__name__}, {len(loader_train)} updates/epoch.')

    # task, optimizer, schedule
    mixup_fn, criterion = create_mixup_and_loss(args, args.num_classes, seed=args.seed + args.rank)
    task = ALPSTask(model, mixup_fn, criterion, label_from_model=args.method == 'alps' and args.alps_label == 'model',
                    device=device, verbose=False)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
    lr_scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                   updates_per_epoch=len(loader_train))
    args.epochs = num_epochs

    # resume (before DDP / compile, so state loads into the plain modules)
    output_dir = resolve_output_dir(args)
    state = dict(step=0, batch_idx=None, skipped=0, rank0=rank0)
    resume_path, checkpoint, start_epoch, skip_batches = '', None, 0, 0
    if args.resume:
        resume_path, checkpoint, start_epoch, skip_batches = resume_training(
            args, output_dir, task, optimizer, loss_scaler, lr_scheduler, mixup_fn, loader_train, state)

    if args.torchcompile:
        task.compile(backend=args.torchcompile)
    if args.distributed:
        ddp_kwargs = dict(broadcast_buffers=False) if args.no_ddp_bb else {}
        task.prepare_distributed(device_ids=[device] if device.type == 'cuda' else None, **ddp_kwargs)
    if lr_scheduler is not None and checkpoint is not None:
        lr_scheduler.step(start_epoch)  # as timm's train.py
        if args.sched_on_updates:
            lr_scheduler.step_update(num_updates=state['step'])

    # output folder, checkpoint saver (rank 0 only)
    saver, error = None, None
    if rank0:
        try:
            ema = [task.get_trainable_module(ema=True)] if args.model_ema else []
            prepare_output_dir(output_dir, args, 3 * estimate_checkpoint_bytes([model] + ema, optimizer))
        except TrainError as e:
            error = str(e)
    _broadcast_error(args, error)

    loader_epoch_state = {}

    def extra_state() -> Dict[str, Any]:
        # Every rank's random streams, so a resumed DDP run continues each rank exactly.
        # Mid-epoch: the loader as it was when the epoch began (resume replays and skips the done batches).
        loader_state = None
        if hasattr(loader_train, 'state_dict'):
            loader_state = loader_epoch_state.get('state') if state['batch_idx'] is not None else \
                loader_train.state_dict()
        monitor = state.get('monitor')
        mine = dict(rng=capture_rng_state(),
                    alps_mixup=mixup_fn.state_dict() if hasattr(mixup_fn, 'state_dict') else None,
                    loader=loader_state,
                    epoch_loss=None if state['batch_idx'] is None or monitor is None else
                    (monitor.loss_sum.item(), monitor.sample_count.item()))
        gathered = [mine]
        if args.distributed:
            gathered = [None] * args.world_size
            torch.distributed.all_gather_object(gathered, mine)
        return dict(scheduler=lr_scheduler.state_dict() if lr_scheduler is not None else None, step=state['step'],
                    batch_idx=state['batch_idx'], rank_state=gathered,
                    alps_mixup=mine['alps_mixup'], rng=mine['rng'], loader=mine['loader'])

    if rank0:
        saver = AtomicCheckpointSaver(
            model=model, optimizer=optimizer, args=args, amp_scaler=loss_scaler, checkpoint_dir=output_dir,
            recovery_dir=output_dir, decreasing=args.eval_metric == 'loss', max_history=args.checkpoint_hist,
            task=task, extra_state_fn=extra_state)
        if checkpoint is not None and checkpoint.get('saver') and \
                os.path.abspath(os.path.dirname(resume_path)) == os.path.abspath(output_dir):
            saver.load_state_dict(checkpoint['saver'])
        args_text = yaml.safe_dump(vars(args), default_flow_style=False)
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            f.write(args_text)
        utils.trim_summary(os.path.join(output_dir, 'summary.csv'), start_epoch)
        _logger.info(f'Output folder: {output_dir}')
    elif args.distributed:
        saver = _CollectiveOnly(extra_state)  # non-zero ranks join the all_gather of every save
    checkpoint = None

    log_file = None
    if rank0:
        log_file = logging.FileHandler(os.path.join(output_dir, 'log.txt'))
        log_file.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
        logging.root.addHandler(log_file)
    stop = SignalFlag()
    best_metric, best_epoch, last_path = None, None, None
    try:
        for epoch in range(start_epoch, num_epochs):
            if hasattr(loader_train, 'set_epoch'):
                loader_train.set_epoch(epoch)
            elif args.distributed and hasattr(getattr(loader_train, 'sampler', None), 'set_epoch'):
                loader_train.sampler.set_epoch(epoch)
            if hasattr(loader_train, 'state_dict'):
                loader_epoch_state['state'] = loader_train.state_dict()
            t_epoch = time.perf_counter()
            train_metrics = train_one_epoch(
                epoch, task, loader_train, optimizer, args, state, device, lr_scheduler=lr_scheduler, saver=saver,
                amp_autocast=amp_autocast, loss_scaler=loss_scaler, stop=stop, skip_batches=skip_batches)
            skip_batches = 0
            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                utils.distribute_bn(task.get_trainable_module(), args.world_size, args.dist_bn == 'reduce')
            eval_metrics = validate(task.get_eval_model(), loader_eval, args, device, amp_autocast)
            if args.model_ema:
                ema_model = task.get_eval_model(ema=True)
                if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                    utils.distribute_bn(ema_model, args.world_size, args.dist_bn == 'reduce')
                eval_metrics = validate(ema_model, loader_eval, args, device, amp_autocast)  # as timm: EMA reported
            lr = optimizer.param_groups[0]['lr']
            if lr_scheduler is not None:
                lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric])
            if saver is not None:
                if rank0:
                    utils.update_summary(epoch, train_metrics, eval_metrics, os.path.join(output_dir, 'summary.csv'),
                                         lr=lr)
                best_metric, best_epoch = saver.save_checkpoint(epoch, metric=eval_metrics[args.eval_metric])
                last_path = os.path.join(output_dir, 'last.pth.tar')
            if rank0:
                is_best = best_epoch == epoch
                _logger.info(
                    f"Epoch {epoch + 1}/{num_epochs}  train_loss {train_metrics['loss']:.4f}  "
                    f"eval_loss {eval_metrics['loss']:.4f}  eval_top1 {eval_metrics['top1']:.2f}%  lr {lr:.3g}  "
                    f"{time.perf_counter() - t_epoch:.1f}s ({train_metrics['img_per_sec']:.0f} img/s)"
                    + ('  *best' if is_best else ''))
                try:
                    plot_curves(os.path.join(output_dir, 'summary.csv'), os.path.join(output_dir, 'curves.png'),
                                args.method, args.num_classes)
                except Exception as e:  # a figure is not worth stopping a long run for
                    _logger.warning(f'could not draw curves.png: {e}')
            signum = stop.signum
            if args.distributed:  # all ranks must leave together, or the others hang in the next collective
                flag = torch.tensor([signum], device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                signum = int(flag.item())
            if signum:
                raise Interrupted(signum)
    except NonFiniteLossError as e:
        kept = last_path or (resume_path or 'none (no epoch finished)')
        raise TrainError(f'{e}. Stopped without saving the diverged weights; last good checkpoint: {kept}. Lower '
                         f'--lr, add --clip-grad, or pass --on-nonfinite skip.', exit_code=1) from None
    except Interrupted as e:
        if rank0:
            _logger.warning(f'{e} received: checkpoint saved in {output_dir}; continue with --resume auto '
                            f'--experiment {os.path.basename(output_dir)}' + (f' --output {args.output}' if args.output else ''))
        return 128 + e.signum
    except (CheckpointError, OSError) as e:
        raise TrainError(f'{e} Stopping; the last complete checkpoint is still in {output_dir}.',
                         exit_code=1) from None
    finally:
        stop.restore()
        if log_file is not None:
            logging.root.removeHandler(log_file)
            log_file.close()
    if rank0 and best_metric is not None:
        _logger.info(f'*** Best {args.eval_metric}: {best_metric:.4f} (epoch {best_epoch + 1}); results in {output_dir}')
    if state['skipped'] and rank0:
        _logger.warning(f"{state['skipped']} update(s) skipped for non-finite loss.")
    return 0


class _CollectiveOnly:
    """Stand-in saver on ranks > 0: joins the collective of each save (gathering RNG states), writes nothing."""

    def __init__(self, extra_state_fn):
        self.extra_state_fn = extra_state_fn

    def save_checkpoint(self, epoch, metric=None):
        self.extra_state_fn()
        return None, None

    def save_recovery(self, epoch, batch_idx=0):
        self.extra_state_fn()


def _cli() -> int:
    utils.setup_default_logging()
    try:
        return main()
    except TrainError as e:
        logging.getLogger('train').error(f'error: {e}')
        print(f'train_timm.py: error: {e}', file=sys.stderr)
        return e.exit_code
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == '__main__':
    sys.exit(_cli())
