#!/usr/bin/env python3
"""ALPS training script in the style of timm's train.py.

    python train_timm.py                                   # ALPS on the bundled CIFAR-10 subset, CPU-friendly
    python train_timm.py --alps-eps 0.3 --alps-beta 8 2    # the same, flags spelled out
    python train_timm.py --dataset torch/cifar10 --data-dir data --dataset-download --model preact_resnet18 \
        --epochs 200 --sched multistep --decay-milestones 101 151 --lr 0.1 --weight-decay 1e-4  # the paper
    python train_timm.py --loader timm --aa rand-m9-mstd0.5 --reprob 0.25 --bce-loss ...  # a timm recipe
    torchrun --nproc_per_node 4 train_timm.py ...          # DDP (NCCL on GPUs, gloo on CPU)

Flags keep the names and meanings of timm's train.py. Every flag is checked before anything is built or written
(one table, `FLAG_RULES`). The output folder gets args.yaml, summary.csv, log.txt, last/best/numbered checkpoints
(written atomically) and curves.png. `--resume auto` continues from the latest good checkpoint.

Data: `--loader fast` keeps a small dataset as uint8 tensors on the device (crop/flip/normalise batched there);
`--loader timm` is timm's `create_loader` (streaming webdataset shards, image folders, torch/ datasets, timm's
augmentations, the prefetcher with mixing in the collate); `--loader auto` picks fast when the training split
fits in `--fast-loader-max-mb` and every augmentation flag given can be honoured by it.

CPU precision: on CPUs with native bf16 (AMX or AVX512-BF16) the default is bf16 autocast + channels_last
(`--no-amp` forces fp32); elsewhere fp32, as timm.
"""
import argparse
import dataclasses
import difflib
import logging
import math
import os
import re
import signal
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import yaml

import timm
from timm import utils
from timm.data import FastCollateMixup, Mixup, create_dataset, create_loader, resolve_data_config
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import create_model, safe_model_name
from timm.optim import create_optimizer_v2, list_optimizers, optimizer_kwargs
from timm.scheduler import PlateauLRScheduler, create_scheduler_v2, scheduler_kwargs
from timm.utils import NativeScaler

from timm_alps import data as alps_data  # importing timm_alps registers the CIFAR models with timm
from timm_alps.checkpoint import (
    AtomicCheckpointSaver, CheckpointError, capture_rank_state, check_output_dir, estimate_checkpoint_bytes,
    find_resume_checkpoint, list_checkpoints, load_training_checkpoint, restore_rank_state)
from timm_alps import ALPSMixup, FastCollateALPSMixup
from timm_alps.task import ALPSTask

_logger = logging.getLogger('train')


class TrainError(Exception):
    """A problem reported as one clear line: bad input or environment (exit status 2), or a run that had to
    stop (non-finite loss, failed write: exit status 1)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(' '.join(str(message).split()))  # one line, whatever the wrapped error looked like
        self.exit_code = exit_code


class NonFiniteError(RuntimeError):
    """Training loss, evaluation or weights turned NaN/inf."""


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises `TrainError` (one line, exit status 2 in the CLI) instead of printing usage and exiting."""

    def error(self, message: str):
        raise TrainError(message)


# -- flags ----------------------------------------------------------------------------------------------------------
config_parser = _ArgumentParser(description='Training Config', add_help=False)
config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                           help='YAML config file specifying default arguments')

parser = _ArgumentParser(description='ALPS training for timm models', allow_abbrev=False)
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
                   help='train on a seeded random subset of N samples (class-balanced where labels are known); on '
                        'streaming shards (--loader timm): each epoch ends after N samples of the shuffled stream')
group.add_argument('--max-eval-samples', type=int, default=None, metavar='N',
                   help='evaluate on a seeded random subset of N samples (streaming shards: the first N)')
group.add_argument('--loader', default='auto', choices=('auto', 'fast', 'timm'),
                   help='fast: whole dataset as uint8 in (device) memory, batched crop/flip/normalise; timm: '
                        'create_loader; auto: fast when the train split has <= --fast-loader-max-mb of pixels and '
                        'every augmentation flag given is one the fast loader honours')
group.add_argument('--fast-loader-max-mb', type=float, default=2048, metavar='MB')
group.add_argument('--no-prefetcher', action='store_true', default=False,
                   help='timm loader: no PrefetchLoader (normalise in the workers; mixing in the training step)')

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
group.add_argument('--img-size', type=int, default=None, metavar='N',
                   help='image size (timm loader resizes; default: the model\'s, else the data\'s)')
group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N',
                   help='input dimensions C H W (overrides --img-size)')
group.add_argument('--crop-pct', default=None, type=float, metavar='PCT', help='eval center crop (timm loader)')
group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN')
group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD')
group.add_argument('--interpolation', default='', type=str, metavar='NAME',
                   help='eval resize interpolation (timm loader; default: the model\'s)')
group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N', help='batch size per process')
group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N')
group.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=None,
                   help='channels_last memory format (default: on with CPU bf16 autocast, else off)')
group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                   help='accumulate gradients over N batches per optimizer update')
group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                   help='torch.compile the model with this backend (default: inductor)')
group.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs,
                   help='extra model arguments, key=value (e.g. width=8)')

group = parser.add_argument_group('Optimizer parameters')
group.add_argument('--opt', default='momentum', type=str, metavar='OPTIMIZER',
                   help="timm optimizer name (default: momentum, SGD with classical momentum as in the paper; "
                        "timm's sgd is Nesterov)")
group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON')
group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
group.add_argument('--momentum', type=float, default=0.9, metavar='M')
group.add_argument('--weight-decay', type=float, default=1e-4, help='weight decay (default: 1e-4, the paper)')
group.add_argument('--clip-grad', type=float, default=None, metavar='NORM')
group.add_argument('--clip-mode', type=str, default='norm', help='norm, value or agc')
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
group.add_argument('--method', default=None, type=str,
                   help="preset of the paper's comparison: erm, dropout (0.5), ls (0.1), mixup (alpha 1), alps "
                        "(Beta(8, 2), eps 0.3); explicit flags override it (default: alps)")
group.add_argument('--alps-eps', type=float, default=None, metavar='EPS',
                   help='L1 radius of the adversarial label ball (default: 0.3)')
group.add_argument('--alps-beta', type=float, nargs='+', default=None, metavar='A B',
                   help='Beta(A, B) of the mixing weight of the sample itself (default: 8 2)')
group.add_argument('--alps-prob', type=float, default=None, help='probability of mixing a sample (default: 1)')
group.add_argument('--alps-mode', type=str, default=None,
                   help='draw the mixing weight per sample, pair or batch: elem, pair, batch (default: elem)')
group.add_argument('--alps-label', type=str, default=None,
                   help='fused: adversarial label from the training forward (free); model: extra no-grad forward '
                        'in the mixer (default: fused)')
group.add_argument('--alps-off-epoch', type=int, default=0, metavar='N',
                   help='from epoch N on, no ALPS (no input mixing, no label shift); 0: never (default)')
group.add_argument('--alps-eps-warmup-epochs', type=float, default=None, metavar='E',
                   help='ramp the ALPS radius linearly from 0 to --alps-eps over the first E epochs (per optimizer '
                        'update; removes the ALPS start stall, see the README); 0: off, the paper\'s ALPS '
                        '(default: 1 with --method alps)')
group.add_argument('--no-aug', action='store_true', default=False, help='no augmentation')
group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
group.add_argument('--crop-pad', type=int, default=None,
                   help='random crop padding of the fast loader (default: 4); the timm loader crops with --scale')
group.add_argument('--scale', type=float, nargs=2, default=None, metavar='PCT',
                   help="timm loader RandomResizedCrop scale (timm's default 0.08 1.0)")
group.add_argument('--ratio', type=float, nargs=2, default=None, metavar='RATIO',
                   help="timm loader RandomResizedCrop ratio (timm's default 3/4 4/3)")
group.add_argument('--color-jitter', type=float, default=None, metavar='PCT',
                   help="timm loader color jitter (timm's default 0.4)")
group.add_argument('--aa', type=str, default=None, metavar='NAME',
                   help='AutoAugment policy, e.g. rand-m9-mstd0.5-inc1, augmix-m5, original, v0 (timm loader)')
group.add_argument('--reprob', type=float, default=0.0, metavar='PCT', help='random erase prob (timm loader)')
group.add_argument('--remode', type=str, default='pixel', help='random erase mode: pixel, rand, const')
group.add_argument('--recount', type=int, default=1, help='random erase count')
group.add_argument('--train-interpolation', type=str, default=None,
                   help="training resize interpolation (timm loader): random, bilinear, bicubic, nearest (timm's "
                        "default random)")
group.add_argument('--mixup', type=float, default=None, help='MixUp alpha (--method mixup; preset 1.0)')
group.add_argument('--cutmix', type=float, default=None, help='CutMix alpha (--method mixup)')
group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None,
                   help='CutMix min/max box ratio, two numbers in (0, 1] (overrides --cutmix alpha)')
group.add_argument('--mixup-prob', type=float, default=1.0)
group.add_argument('--mixup-switch-prob', type=float, default=0.5)
group.add_argument('--mixup-mode', type=str, default='batch', help='batch, pair or elem')
group.add_argument('--mixup-off-epoch', type=int, default=0, metavar='N',
                   help='from epoch N on, no MixUp/CutMix (timm); 0: never')
group.add_argument('--smoothing', type=float, default=None, help='label smoothing (default: 0, ls preset 0.1)')
group.add_argument('--bce-loss', action='store_true', default=False,
                   help='binary cross-entropy (timm BinaryCrossEntropy; ALPSBinaryCrossEntropy for ALPS)')
group.add_argument('--bce-target-thresh', type=float, default=None, help='threshold the BCE targets to 0/1')
group.add_argument('--bce-pos-weight', type=float, default=None, help='BCE positive class weight')
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
group.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help='mixed precision autocast (default: bf16 on CPUs with native bf16, else off; --no-amp: fp32)')
group.add_argument('--amp-dtype', default=None, type=str,
                   help='float16 or bfloat16 (default: bfloat16 on CPU, float16 on GPU as timm)')
group.add_argument('--output', default='', type=str, metavar='PATH', help='default: ./output/train')
group.add_argument('--experiment', default='', type=str, metavar='NAME', help='sub-folder of --output')
group.add_argument('--overwrite', action='store_true', default=False,
                   help='allow replacing the results of an earlier run in the same output folder')
group.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC', help='top1, top5 or loss')
group.add_argument('--on-nonfinite', default='stop', choices=('stop', 'skip'),
                   help='non-finite loss: stop (keep the last good checkpoint) or skip the update (one host sync '
                        'per step on accelerators)')
group.add_argument('--no-progress', action='store_true', default=False, help='no progress bar')

# Keys a run adds to args.yaml beyond the flags (so `-c args.yaml` of a finished run is accepted); recomputed.
_DERIVED_KEYS = ('distributed', 'world_size', 'rank', 'local_rank', 'progress', 'prefetcher', 'device_type')


# -- checking the flags: one table ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Range:
    """A numeric flag's valid values: finite, in [lo, hi] (ends open when asked), `count` values for lists."""
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    count: Optional[Tuple[int, ...]] = None

    def describe(self) -> str:
        if self.lo == -math.inf and self.hi == math.inf:
            return 'a finite number'
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo == -math.inf:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"

    def accepts(self, v: float) -> bool:
        return (math.isfinite(v) and (v > self.lo if self.lo_open else v >= self.lo)
                and (v < self.hi if self.hi_open else v <= self.hi))


_POS, _NONNEG, _PROB, _FRACTION = Range(0, lo_open=True), Range(0), Range(0, 1), Range(0, 1, hi_open=True)

# Every numeric flag (None, where allowed by the default, means "not given").
FLAG_RULES: Dict[str, Range] = {
    # data and model
    'batch_size': Range(1), 'validation_batch_size': Range(1), 'max_train_samples': Range(1),
    'max_eval_samples': Range(1), 'fast_loader_max_mb': _NONNEG, 'workers': Range(0), 'num_classes': Range(2),
    'img_size': Range(1), 'input_size': Range(1, count=(3,)), 'crop_pct': Range(0, 1, lo_open=True),
    'mean': Range(count=(1, 3)), 'std': Range(0, lo_open=True, count=(1, 3)), 'grad_accum_steps': Range(1),
    # optimizer and schedule
    'lr': _POS, 'warmup_lr': _NONNEG, 'min_lr': _NONNEG, 'momentum': _FRACTION, 'weight_decay': _NONNEG,
    'clip_grad': _POS, 'opt_eps': _POS, 'opt_betas': Range(0, 1, hi_open=True, count=(1, 2, 3)), 'epochs': Range(1),
    'decay_milestones': Range(0), 'decay_epochs': _POS, 'warmup_epochs': Range(0), 'cooldown_epochs': Range(0),
    'decay_rate': _POS,
    # augmentation and regularisation
    'alps_eps': Range(0, 2), 'alps_beta': Range(0, lo_open=True, count=(2,)), 'alps_prob': _PROB,
    'alps_off_epoch': Range(0), 'alps_eps_warmup_epochs': _NONNEG, 'hflip': _PROB, 'crop_pad': Range(0),
    'scale': Range(0, 1, lo_open=True, count=(2,)),
    'ratio': Range(0, lo_open=True, count=(2,)), 'color_jitter': _NONNEG, 'reprob': _PROB, 'recount': Range(1),
    'mixup': _NONNEG, 'cutmix': _NONNEG, 'cutmix_minmax': Range(0, 1, lo_open=True, count=(2,)),
    'mixup_prob': _PROB, 'mixup_switch_prob': _PROB, 'mixup_off_epoch': Range(0), 'smoothing': _FRACTION,
    'bce_target_thresh': _PROB, 'bce_pos_weight': _POS, 'drop': _FRACTION, 'drop_path': _FRACTION,
    # misc
    'model_ema_decay': Range(0, 1, lo_open=True, hi_open=True), 'seed': Range(0, 2 ** 32 - 1 - 4096),
    'log_interval': Range(1), 'recovery_interval': Range(0), 'checkpoint_hist': Range(1),
}

# timm's create_scheduler_v2 names (tests build each one, so a timm change shows up there).
SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'constant', 'wsd', 'rsqrt')
_INTERPOLATIONS = ('bilinear', 'bicubic', 'nearest', 'box', 'hamming', 'lanczos')
METHODS = ('erm', 'dropout', 'ls', 'mixup', 'alps')


def _optimizer_names() -> List[str]:
    names = list_optimizers()
    return names + [f'lookahead_{n}' for n in names]


def _compile_backends() -> List[str]:
    import torch._dynamo
    return torch._dynamo.list_backends(exclude_tags=())


# Every flag that takes a name: its valid names (callables are evaluated only when the flag is set).
FLAG_NAMES: Dict[str, Union[Sequence[str], Callable[[], Sequence[str]]]] = {
    'method': METHODS, 'opt': _optimizer_names, 'sched': SCHEDULERS, 'eval_metric': ('top1', 'top5', 'loss'),
    'torchcompile': _compile_backends, 'mixup_mode': ('batch', 'pair', 'elem'), 'alps_mode': ('elem', 'pair', 'batch'),
    'alps_label': ('fused', 'model'), 'clip_mode': ('norm', 'value', 'agc'), 'dist_bn': ('reduce', 'broadcast', ''),
    'amp_dtype': ('float16', 'bfloat16'), 'remode': ('pixel', 'rand', 'const'),
    'train_interpolation': ('random',) + _INTERPOLATIONS, 'interpolation': ('',) + _INTERPOLATIONS,
}

# Flags only timm's loader honours (with the value that means "not given"), and the fast loader's own.
TIMM_LOADER_FLAGS = dict(aa=None, reprob=0.0, scale=None, ratio=None, color_jitter=None, train_interpolation=None,
                         crop_pct=None, interpolation='')
FAST_LOADER_FLAGS = dict(crop_pad=None)


def _actions() -> Dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != 'help'}


def flag_name(dest: str) -> str:
    """The command-line spelling of an argument (its longest option string)."""
    action = _actions().get(dest)
    return max(action.option_strings, key=len) if action is not None else '--' + dest.replace('_', '-')


def _show(v: Any) -> str:
    return ' '.join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _check_types(args) -> None:
    """Values that came from a -c YAML skip argparse's conversion: check them like the command line would."""
    for dest, action in _actions().items():
        v = getattr(args, dest, None)
        if v is None or v == action.default:
            continue
        flag = flag_name(dest)
        if action.type in (int, float):
            many = action.nargs not in (None, '?')
            if many and not isinstance(v, (list, tuple)):
                v = [v]  # a YAML scalar for a list flag
                setattr(args, dest, v)
            for x in (v if many else [v]):
                ok = isinstance(x, (int, float)) and not isinstance(x, bool) and (
                    action.type is float or float(x).is_integer())
                if not ok:
                    kind = 'an integer' if action.type is int else 'a number'
                    raise TrainError(f'{flag} {_show(v)}: expected {kind}, got {type(x).__name__} {x!r}')
        elif action.const is True or action.const is False or isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(v, bool):
                raise TrainError(f'{flag}: expected true or false, got {v!r}')
        elif isinstance(action, utils.ParseKwargs):
            if not isinstance(v, dict):
                raise TrainError(f'{flag}: expected a mapping of key=value, got {v!r}')
        elif not isinstance(v, (str, list)):
            raise TrainError(f'{flag}: expected a string, got {type(v).__name__} {v!r}')
        if action.choices is not None and v not in action.choices:
            raise TrainError(f"{flag} {v!r}: unknown; choose one of {', '.join(map(str, action.choices))}")


def _check_ranges(args) -> None:
    for dest, rule in FLAG_RULES.items():
        v = getattr(args, dest, None)
        if v is None:
            continue
        values = list(v) if isinstance(v, (list, tuple)) else [v]
        flag = flag_name(dest)
        if rule.count is not None and len(values) not in rule.count:
            n = ' or '.join(map(str, rule.count))
            raise TrainError(f'{flag} takes {n} number(s), got {len(values)}: {_show(v)}')
        for x in values:
            if not rule.accepts(float(x)):
                raise TrainError(f'{flag} {_show(v)}: must be finite and {rule.describe()}')


def _check_names(args) -> None:
    for dest, names in FLAG_NAMES.items():
        v = getattr(args, dest, None)
        if v is None:
            continue
        names = list(names() if callable(names) else names)
        if dest == 'opt':
            v = v.lower()
        if v not in names:
            close = difflib.get_close_matches(str(v), names, n=3, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ''
            shown = names if len(names) <= 12 else names[:12] + ['...']
            raise TrainError(f"{flag_name(dest)} {v!r} is unknown; choose one of {', '.join(map(repr, shown))}.{hint}")


def validate_args(args) -> None:
    """Reject bad flag values before anything is built or written; fill the method preset.

    Raises:
        TrainError: the message names the flag and the accepted values.
    """
    _check_types(args)
    _check_names(args)
    _check_ranges(args)
    try:
        apply_method_preset(args)
    except ValueError as e:
        raise TrainError(str(e)) from None
    _check_ranges(args)  # the preset's values too
    for dest in ('cutmix_minmax', 'scale', 'ratio'):
        v = getattr(args, dest)
        if v is not None and (v[0] >= v[1] if dest == 'cutmix_minmax' else v[0] > v[1]):
            raise TrainError(f'{flag_name(dest)} {_show(v)}: the first value (min) must be below the second (max)')
    m = args.decay_milestones
    if m and any(b <= a for a, b in zip(m, m[1:])):
        raise TrainError(f'--decay-milestones {_show(m)}: must be strictly increasing')
    if args.sched in ('step', 'multistep', 'plateau') and args.decay_rate > 1:
        raise TrainError(f'--decay-rate {args.decay_rate}: with --sched {args.sched} it multiplies the LR at each '
                         f'decay and must be in (0, 1]')
    for dest in ('bce_target_thresh', 'bce_pos_weight'):
        if getattr(args, dest) is not None and not args.bce_loss:
            raise TrainError(f'{flag_name(dest)} only applies with --bce-loss')
    for dest in ('mixup_prob', 'mixup_switch_prob', 'mixup_mode'):
        if args.method != 'mixup' and getattr(args, dest) != parser.get_default(dest):
            raise TrainError(f'{flag_name(dest)} only applies to --method mixup (got --method {args.method}); '
                             f'ALPS has --alps-prob and --alps-mode')
    for dest, method in (('alps_off_epoch', 'alps'), ('alps_eps_warmup_epochs', 'alps'),
                         ('mixup_off_epoch', 'mixup')):
        if getattr(args, dest) and args.method != method:
            raise TrainError(f'{flag_name(dest)} only applies to --method {method} (got --method {args.method})')
    alps_epochs = min(args.epochs, args.alps_off_epoch or args.epochs)  # epochs trained with ALPS
    if args.alps_eps_warmup_epochs > alps_epochs:
        ends = f'--alps-off-epoch {alps_epochs}' if alps_epochs < args.epochs else f'--epochs {alps_epochs}'
        raise TrainError(f'--alps-eps-warmup-epochs {args.alps_eps_warmup_epochs:g}: the ramp would not reach '
                         f'--alps-eps before ALPS ends ({ends}); use at most {alps_epochs}')
    if args.aa:
        from timm.data import create_transform
        try:
            # timm's RandAugment parser skips sections without a number ('rand-zz'); here they are errors.
            loose = [c for c in args.aa.split('-')[1:] if not re.fullmatch(r'[a-z]+\d[\d.]*', c) and not
                     (args.aa.startswith('rand') and c.startswith('t'))]
            if loose:
                raise ValueError(f'unknown section(s) {", ".join(loose)}')
            create_transform(32, is_training=True, auto_augment=args.aa)
        except Exception as e:  # timm's policy parsers raise AssertionError/KeyError/ValueError
            raise TrainError(f"--aa {args.aa!r} is not a timm augmentation policy ({type(e).__name__}: {e}); e.g. "
                             f"rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, v0") from None
    if args.loader == 'fast':
        for dest, unset in TIMM_LOADER_FLAGS.items():
            if getattr(args, dest) != unset:
                raise TrainError(f'{flag_name(dest)} needs timm\'s loader, but --loader fast was given: use '
                                 f'--loader timm (or auto)')
        if args.no_prefetcher:
            raise TrainError('--no-prefetcher applies to --loader timm only')
    if args.loader == 'timm' and args.crop_pad is not None:
        raise TrainError('--crop-pad is the fast loader\'s pad-and-crop; timm\'s loader crops with --scale/--ratio')
    if not timm.is_model(args.model):
        close = difflib.get_close_matches(args.model, timm.list_models(), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ' See timm.list_models().'
        raise TrainError(f"unknown model '{args.model}'.{hint}")
    if args.resume == 'auto' and not args.experiment:
        raise TrainError("--resume auto needs --experiment NAME (and --output if not the default): the folder of the "
                         "run to continue")


def parse_args(argv: Optional[List[str]] = None):
    """Flags over the -c/--config YAML (e.g. a run's args.yaml) over the defaults.

    Raises:
        TrainError: unreadable YAML, a YAML that is not a mapping, an unknown key (named with the closest flag), or
            a bad command line.
    """
    args_config, remaining = config_parser.parse_known_args(argv)
    config = {}
    if args_config.config:
        try:
            with open(args_config.config) as f:
                config = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as e:
            raise TrainError(f'could not read --config {args_config.config}: {e}') from None
        config = {} if config is None else config
        if not isinstance(config, dict):
            raise TrainError(f'--config {args_config.config}: expected a mapping of flag: value, got a '
                             f'{type(config).__name__}')
        known = set(_actions())
        for key in config:
            if not isinstance(key, str) or (key.replace('-', '_') not in known and key not in _DERIVED_KEYS):
                dests = sorted(known)
                close = difflib.get_close_matches(str(key).replace('-', '_'), dests, n=1, cutoff=0.6)
                hint = f'; did you mean {close[0]!r} ({flag_name(close[0])})?' if close else ''
                raise TrainError(f'--config {args_config.config}: unknown key {key!r}{hint}')
        config = {k.replace('-', '_'): v for k, v in config.items() if k not in _DERIVED_KEYS}
    # A pre-filled namespace instead of parser.set_defaults keeps the module-level parser unchanged between calls.
    return parser.parse_args(remaining, namespace=argparse.Namespace(**config))


# -- method presets of the paper's comparison -----------------------------------------------------------------------
# Settings of the paper's comparison (Guo et al., 2021, Sec. 5): values used when the flag is not given.
METHOD_PRESETS: Dict[str, Dict[str, Any]] = {
    'erm': dict(drop=0.0, smoothing=0.0),
    'dropout': dict(drop=0.5, smoothing=0.0),
    'ls': dict(drop=0.0, smoothing=0.1),
    'mixup': dict(drop=0.0, smoothing=0.0, mixup=1.0),
    'alps': dict(drop=0.0, smoothing=0.0, alps_eps=0.3, alps_beta=(8.0, 2.0)),
}
_ALPS_FLAGS = ('alps_eps', 'alps_beta', 'alps_prob', 'alps_mode', 'alps_label')


def apply_method_preset(args) -> None:
    """Resolve ``args.method`` and fill flags left at None with the method's preset, validating combinations.

    Without ``--method`` the method is ALPS, unless only MixUp/CutMix flags are given (then it is timm's MixUp),
    so timm users' ``--mixup 0.2`` keeps its meaning. ALPS flags with another method, or together with
    ``--mixup``/``--cutmix``, are an error rather than silently ignored.

    Raises:
        ValueError: conflicting settings; the message names the flag.
    """
    alps_given = [f for f in _ALPS_FLAGS if getattr(args, f, None) is not None]
    # 0 disables MixUp/CutMix (as in timm), so `--mixup 0` or a saved args.yaml with mixup: 0.0 is not a request.
    mixup_given = [f for f in ('mixup', 'cutmix') if getattr(args, f, None)]
    if getattr(args, 'cutmix_minmax', None) is not None:
        mixup_given.append('cutmix_minmax')
    if args.method is None:
        args.method = 'mixup' if mixup_given and not alps_given else 'alps'
    if alps_given and mixup_given:
        raise ValueError(f"{', '.join(map(flag_name, alps_given))} cannot be combined with "
                         f"{', '.join(map(flag_name, mixup_given))}: ALPS replaces MixUp/CutMix. Drop one of them.")
    if alps_given and args.method != 'alps':
        raise ValueError(f"{', '.join(map(flag_name, alps_given))} only apply to --method alps (got --method "
                         f"{args.method})")
    if mixup_given and args.method != 'mixup':
        raise ValueError(f"{', '.join(map(flag_name, mixup_given))} only apply to --method mixup (got --method "
                         f"{args.method}); ALPS has its own --alps-beta")
    if args.method == 'mixup' and mixup_given:
        # `--cutmix 1` alone means CutMix only, not CutMix plus the preset's MixUp.
        for f in ('mixup', 'cutmix'):
            if getattr(args, f, None) is None:
                setattr(args, f, 0.0)
    for k, v in METHOD_PRESETS[args.method].items():
        if getattr(args, k, None) is None:
            setattr(args, k, list(v) if isinstance(v, tuple) else v)
    defaults = dict(drop=0.0, smoothing=0.0, mixup=0.0, cutmix=0.0)
    if args.method == 'alps':
        # Not the paper's: ramping eps in over the first epoch removes the ALPS start stall at no measured cost at
        # convergence (README, "ALPS and the first steps"); --alps-eps-warmup-epochs 0 is the paper's ALPS.
        defaults.update(alps_prob=1.0, alps_mode='elem', alps_label='fused', alps_eps_warmup_epochs=1.0)
    else:
        defaults.update(alps_eps_warmup_epochs=0.0)
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.method == 'alps':
        if len(args.alps_beta) != 2:
            raise ValueError(f'--alps-beta takes two numbers, the alpha and beta of Beta(alpha, beta) '
                             f'(e.g. --alps-beta 8 2), got {len(args.alps_beta)}: {_show(args.alps_beta)}')
        args.alps_beta = [float(b) for b in args.alps_beta]
    if args.method == 'mixup' and args.mixup == 0 and args.cutmix == 0 and args.cutmix_minmax is None:
        raise ValueError('--method mixup needs --mixup ALPHA > 0 or --cutmix ALPHA > 0')


# -- data: one function per loader kind ------------------------------------------------------------------------------
def resolve_dataset_args(args) -> None:
    """Default to the bundled subset and its evaluation split; check that a given dataset path exists."""
    if args.data_dir is None and args.dataset is None:
        args.data_dir, args.dataset = str(alps_data.BUNDLED_DATA_DIR), 'wds/cifar10_subset'
    args.dataset = args.dataset or ''
    if args.val_split is None:
        args.val_split = alps_data.default_eval_split(args.dataset, args.data_dir)
    needs_dir = not (args.dataset.startswith('torch/') and args.dataset_download)
    if needs_dir and (not args.data_dir or not os.path.exists(args.data_dir)):
        raise TrainError(
            f"dataset folder '{args.data_dir}' does not exist. Create webdataset shards with "
            f"`python -m timm_alps.data --help` (e.g. from a CIFAR .npz or an image folder), use "
            f"--dataset torch/cifar10 --dataset-download, or omit --data-dir/--dataset for the bundled subset.")
    splits = (_read_info(args) or {}).get('splits')
    for dest in ('train_split', 'val_split'):
        if splits and getattr(args, dest) not in splits:
            raise TrainError(f"{flag_name(dest)} {getattr(args, dest)!r}: '{args.data_dir}' has the splits "
                             f"{', '.join(map(repr, splits))}")


def _read_info(args) -> Optional[Dict[str, Any]]:
    """`_info.json` of timm_alps shards given as --dataset wds/..., else None."""
    if not args.dataset.startswith('wds/') or not args.data_dir:
        return None
    try:
        return alps_data.read_info(args.data_dir)
    except (OSError, ValueError) as e:
        raise TrainError(f"could not read the _info.json of '{args.data_dir}': {e}") from e


def _subset(ds, k: Optional[int], seed: int) -> Optional[torch.Tensor]:
    """Seeded random subset of k samples of a map-style dataset (class-balanced when its labels are known)."""
    if not k or k >= len(ds):
        return None
    return alps_data.subset_indices(len(ds), k, seed, labels=alps_data.dataset_labels(ds))


def _dataset_classes(ds) -> Optional[List[str]]:
    """Class names of a timm / torchvision dataset, when it knows them."""
    classes = getattr(ds, 'classes', None)
    if classes is None:
        classes = getattr(getattr(ds, 'reader', None), 'class_to_idx', None) or None
    if isinstance(classes, dict):
        classes = sorted(classes, key=classes.get)
    return list(classes) if classes else None


@dataclasses.dataclass
class Data:
    """Both splits, opened for one loader kind: uint8 tensors (fast) or timm datasets (timm)."""
    kind: str
    train: Any
    eval: Any
    classes: Optional[List[str]] = None

    @property
    def image_size(self) -> Optional[Tuple[int, int]]:
        return tuple(self.train[0].shape[-2:]) if self.kind == 'fast' else None


def _timm_datasets(args, num_samples: bool = False):
    common = dict(root=args.data_dir, download=args.dataset_download, batch_size=args.batch_size, seed=args.seed)
    streaming = args.dataset.startswith(('wds/', 'tfds/', 'hfids/'))
    try:
        ds_train = create_dataset(args.dataset, split=args.train_split, is_training=True, **common,
                                  **(dict(num_samples=args.max_train_samples) if streaming and num_samples else {}))
        ds_eval = create_dataset(args.dataset, split=args.val_split, is_training=False, **common,
                                 **(dict(num_samples=args.max_eval_samples) if streaming and num_samples else {}))
    except (OSError, ValueError, RuntimeError, KeyError, AssertionError) as e:
        raise TrainError(f"could not open dataset '{args.dataset}' in '{args.data_dir}' (splits "
                         f"{args.train_split}/{args.val_split}): {e}") from e
    return ds_train, ds_eval


def _is_map_style(ds) -> bool:
    return not isinstance(ds, torch.utils.data.IterableDataset) and hasattr(ds, '__getitem__') and \
        hasattr(ds, '__len__')


def open_fast_data(args) -> Data:
    """Both splits as uint8 tensors: timm_alps shards read straight into memory, map-style datasets decoded once;
    `--max-*-samples` take a seeded random (class-balanced) subset."""
    info = _read_info(args)
    if info is not None:
        out = {}
        for key, split, k in (('train', args.train_split, args.max_train_samples),
                              ('eval', args.val_split, args.max_eval_samples)):
            try:  # only the subset's images are decoded
                x, y, _ = alps_data.load_split_tensors(args.data_dir, split, max_samples=k, seed=args.seed)
            except (OSError, ValueError) as e:
                raise TrainError(f"could not read split '{split}' of '{args.data_dir}': {e}") from e
            out[key] = (x, y)
        return Data('fast', out['train'], out['eval'], info.get('classes'))
    ds_train, ds_eval = _timm_datasets(args)
    if not _is_map_style(ds_train):
        raise TrainError(f"--loader fast needs a map-style dataset or timm_alps shards; '{args.dataset}' streams. "
                         f"Use --loader timm.")
    out = {}
    for key, ds, k in (('train', ds_train, args.max_train_samples), ('eval', ds_eval, args.max_eval_samples)):
        try:
            out[key] = alps_data.decode_dataset(ds, _subset(ds, k, args.seed))
        except (TypeError, ValueError) as e:
            raise TrainError(f'the fast loader could not decode {args.dataset or "the image folder"}: {e}; use '
                             f'--loader timm') from e
    return Data('fast', out['train'], out['eval'], _dataset_classes(ds_train))


class _Subset(torch.utils.data.Subset):
    """A `Subset` that passes the ``transform`` timm's `create_loader` sets on to the dataset it selects from."""

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, transform):
        self.dataset.transform = transform


def open_timm_data(args) -> Data:
    """Both splits as timm datasets; `--max-*-samples`: a seeded random subset of map-style datasets, the first N
    samples of each epoch's shuffled stream for streaming shards."""
    ds_train, ds_eval = _timm_datasets(args, num_samples=True)
    classes = _dataset_classes(ds_train)
    if classes is None:
        classes = (_read_info(args) or {}).get('classes')
    subsets = []
    for ds, k in ((ds_train, args.max_train_samples), (ds_eval, args.max_eval_samples)):
        if _is_map_style(ds):
            idx = _subset(ds, k, args.seed)
            ds = ds if idx is None else _Subset(ds, idx.tolist())
        subsets.append(ds)
    return Data('timm', subsets[0], subsets[1], classes)


def _fast_loader_can_not(args) -> Optional[str]:
    """The first flag given that only timm's loader honours, or None."""
    for dest, unset in TIMM_LOADER_FLAGS.items():
        if getattr(args, dest) != unset:
            return flag_name(dest)
    if args.no_prefetcher:
        return '--no-prefetcher'
    return None


def _fits_in_memory(args) -> bool:
    """Does the training split fit in --fast-loader-max-mb (known without decoding: shards' _info.json, or one
    image of a map-style dataset)?"""
    limit = args.fast_loader_max_mb * 2 ** 20
    info = _read_info(args)
    if info is not None:
        n = min(info.get('splits', {}).get(args.train_split, {}).get('num_samples') or 0,
                args.max_train_samples or math.inf)
        return bool(n) and n * math.prod(alps_data.shard_image_shape(args.data_dir, args.train_split)) <= limit
    if args.dataset.startswith(('wds/', 'tfds/', 'hfids/')):
        return False
    ds_train, _ = _timm_datasets(args)
    if not _is_map_style(ds_train) or not len(ds_train):
        return False
    img = ds_train[0][0]
    chw = (len(img.getbands()), img.height, img.width) if hasattr(img, 'getbands') else tuple(img.shape)
    return min(len(ds_train), args.max_train_samples or len(ds_train)) * math.prod(chw) <= limit


def open_data(args) -> Data:
    """Pick the loader kind (the one place that decides) and open both splits for it."""
    if args.loader == 'timm' or (args.loader == 'auto' and (_fast_loader_can_not(args) or not _fits_in_memory(args))):
        return open_timm_data(args)
    return open_fast_data(args)


def _fixed_input_size(model: nn.Module) -> Optional[Tuple[int, int]]:
    """(H, W) a model only accepts (e.g. a ViT's patch embedding with strict_img_size), else None."""
    pe = getattr(model, 'patch_embed', None)
    if pe is not None and getattr(pe, 'strict_img_size', False):
        return tuple(pe.img_size)
    return None


def _mixup_args(args, num_classes: int) -> Dict[str, Any]:
    return dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                label_smoothing=args.smoothing, num_classes=num_classes)


def _alps_args(args, num_classes: int) -> Dict[str, Any]:
    alpha, beta = args.alps_beta
    return dict(alps_alpha=alpha, alps_beta=beta, alps_eps=args.alps_eps, prob=args.alps_prob, mode=args.alps_mode,
                label_smoothing=args.smoothing, num_classes=num_classes)


def build_loaders(args, data: Data, data_config: Dict[str, Any], device: torch.device, num_classes: int):
    """Train and eval loaders, and the collate-level mixer when mixing happens in timm's collate (else None).

    fast: `InMemoryLoader` (crop/flip/normalise batched on the device). timm: `create_loader` with timm's
    augmentation flags; with the prefetcher, MixUp/ALPS mixing runs in the collate as in timm's train.py.
    """
    eval_bs = args.validation_batch_size or args.batch_size
    if data.kind == 'fast':
        (xt, yt), (xe, ye) = data.train, data.eval
        norm = dict(mean=data_config['mean'], std=data_config['std'], device=device, channels_last=args.channels_last)
        pad = 4 if args.crop_pad is None else args.crop_pad
        loader_train = alps_data.InMemoryLoader(
            xt, yt, batch_size=args.batch_size, is_training=True, padding=0 if args.no_aug else pad,
            hflip=0.0 if args.no_aug else args.hflip, drop_last=True, seed=args.seed, rank=args.rank,
            world_size=args.world_size, **norm)
        # Each rank evaluates a disjoint slice, so summed metrics are exact (no padded duplicates).
        loader_eval = alps_data.InMemoryLoader(
            xe[args.rank::args.world_size], ye[args.rank::args.world_size], batch_size=eval_bs, is_training=False,
            **norm)
        loader_train.max_label = int(max(yt.max(), ye.max()))
        return loader_train, loader_eval, None
    collate_mixer = None
    if args.prefetcher and args.method == 'mixup':
        collate_mixer = FastCollateMixup(**_mixup_args(args, num_classes))
    elif args.prefetcher and args.method == 'alps' and args.alps_label == 'fused':
        # Each worker and rank derives its own stream from the seed (and the epoch, see Regularisation.set_epoch).
        collate_mixer = FastCollateALPSMixup(**_alps_args(args, num_classes), seed=args.seed,
                                                       rank=args.rank)
    loader_kw = dict(input_size=data_config['input_size'], mean=data_config['mean'], std=data_config['std'],
                     num_workers=args.workers, distributed=args.distributed, device=device,
                     use_prefetcher=args.prefetcher, pin_memory=device.type == 'cuda',
                     # fresh workers each epoch, seeded from the main process's RNG: a resume at an epoch boundary
                     # (which restores that RNG) replays the same augmentations
                     persistent_workers=False)
    loader_train = create_loader(
        data.train, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug, hflip=args.hflip,
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, scale=args.scale, ratio=args.ratio,
        color_jitter=0.4 if args.color_jitter is None else args.color_jitter, auto_augment=args.aa,
        interpolation=args.train_interpolation or 'random', collate_fn=collate_mixer, **loader_kw)
    loader_eval = create_loader(data.eval, batch_size=eval_bs, is_training=False, crop_pct=data_config['crop_pct'],
                                interpolation=data_config['interpolation'], **loader_kw)
    return loader_train, loader_eval, collate_mixer


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


# -- precision ------------------------------------------------------------------------------------------------------
def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 arithmetic in hardware (AMX-BF16 or AVX512-BF16), where oneDNN runs bf16 convolutions
    and matmuls faster than fp32 (measured: benchmarks/results/train_throughput.md)."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
        if 'amx_bf16' in flags or 'avx512_bf16' in flags:
            return True
    except OSError:
        pass
    return 'AMX' in (torch.backends.cpu.get_cpu_capability() or '').upper()


def resolve_precision(args, device: torch.device) -> None:
    """Fill --amp, --amp-dtype and --channels-last left unset (None): bf16 autocast + channels_last on CPUs with
    native bf16, fp32 elsewhere; float16 autocast on GPUs when --amp is given (timm's default)."""
    if args.amp_dtype is None:
        args.amp_dtype = 'bfloat16' if device.type == 'cpu' else 'float16'
    if args.amp is None:
        args.amp = device.type == 'cpu' and cpu_has_native_bf16()
    if args.channels_last is None:
        args.channels_last = bool(args.amp and device.type == 'cpu' and args.amp_dtype == 'bfloat16')


# -- mixing and loss ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Regularisation:
    """What turns a batch into training targets: the mixer in the training step (or None), the mixer in the
    collate (or None), the criterion the mixer asks for, and the plain criterion of the epochs after
    --alps-off-epoch. `set_epoch` is the one place that switches mixing off, `set_step` the one place that sets the
    ALPS radius of --alps-eps-warmup-epochs."""
    method: str
    mixup_fn: Optional[Callable]
    collate_mixer: Optional[Any]
    criterion: nn.Module
    plain_criterion: nn.Module
    off_epoch: int = 0
    eps: float = 0.0  # --alps-eps
    eps_warmup_updates: int = 0  # --alps-eps-warmup-epochs in optimizer updates; 0: no ramp
    _eps_set: Optional[float] = dataclasses.field(default=None, init=False, repr=False)

    def eps_at(self, step: int) -> float:
        """The ALPS radius of the update that follows `step` updates: eps * min(1, step / eps_warmup_updates)."""
        if step >= self.eps_warmup_updates:
            return self.eps
        return self.eps * (step / self.eps_warmup_updates)

    def set_step(self, step: int) -> None:
        """Set the radius for the next update (`step` = updates done, so a resumed run recomputes it exactly).

        The mixer hands it to whatever applies the label: its loss on the fused and collate paths, itself on the
        model-handle path (whose loss keeps eps 0). A float assignment: no host sync, nothing logged.
        """
        if not self.eps_warmup_updates:
            return
        eps = self.eps_at(step)
        if eps != self._eps_set:
            self.stateful_mixer.alps_eps = eps
            self._eps_set = eps

    def active(self, epoch: int) -> bool:
        return not (self.off_epoch and epoch >= self.off_epoch)

    def set_epoch(self, epoch: int, task: 'ALPSTask') -> None:
        on = self.active(epoch)
        for mixer in (self.mixup_fn, self.collate_mixer):
            if mixer is not None:
                mixer.mixup_enabled = on
                if hasattr(mixer, 'set_epoch'):
                    mixer.set_epoch(epoch)
        if self.method == 'alps':  # no label shift either: the mixer's model handle and the fused loss go
            if isinstance(self.mixup_fn, ALPSMixup) and not on:
                self.mixup_fn.set_model(None)
            task.criterion = self.criterion if on else self.plain_criterion

    @property
    def stateful_mixer(self):
        return self.mixup_fn if self.mixup_fn is not None else self.collate_mixer


def create_regularisation(args, num_classes: int, model: nn.Module, collate_mixer=None,
                          updates_per_epoch: int = 1) -> Regularisation:
    """The mixer for --method and the criterion it calls for (the mixer owns the ALPS label path)."""
    bce = dict(target_threshold=args.bce_target_thresh, pos_weight=args.bce_pos_weight)
    if args.method == 'alps':
        mixer = collate_mixer
        mixup_fn = None
        if mixer is None:
            mixup_fn = mixer = ALPSMixup(**_alps_args(args, num_classes), seed=args.seed + args.rank,
                                         model=model if args.alps_label == 'model' else None)
        criterion = mixer.make_loss('bce', **bce) if args.bce_loss else mixer.make_loss()
        plain = BinaryCrossEntropy(**bce) if args.bce_loss else SoftTargetCrossEntropy()
        return Regularisation('alps', mixup_fn, collate_mixer, criterion, plain, args.alps_off_epoch, args.alps_eps,
                              round(args.alps_eps_warmup_epochs * updates_per_epoch))
    if args.method == 'mixup':
        mixup_fn = None if collate_mixer is not None else Mixup(**_mixup_args(args, num_classes))
        criterion = BinaryCrossEntropy(**bce) if args.bce_loss else SoftTargetCrossEntropy()
        return Regularisation('mixup', mixup_fn, collate_mixer, criterion, criterion, args.mixup_off_epoch)
    if args.bce_loss:
        criterion = BinaryCrossEntropy(smoothing=args.smoothing, **bce)
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    return Regularisation(args.method, None, None, criterion, criterion)


# -- run state ------------------------------------------------------------------------------------------------------
class LossMonitor:
    """Running training loss and count of non-finite losses, accumulated on the loss's device.

    `update` only queues device ops (no host sync per step); `check` and `summary` read back, so call
    them at log intervals / epoch end. Non-finite losses are left out of the mean.
    """

    def __init__(self, device: Union[str, torch.device] = 'cpu'):
        self.device = torch.device(device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.sample_count = torch.zeros((), dtype=torch.float64, device=self.device)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)
        self.first_nonfinite_step = torch.full((), -1, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def update(self, loss: torch.Tensor, n: int, step: int) -> None:
        """Record the loss of `n` samples at global `step`."""
        loss = loss.detach().double()
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss * n, 0.0)
        self.sample_count += finite.double() * n
        self.nonfinite += (~finite).long()
        first = (~finite) & (self.first_nonfinite_step < 0)
        self.first_nonfinite_step = torch.where(first, step, self.first_nonfinite_step)

    def check(self, signal: int = 0, distributed: bool = False) -> Tuple[int, int, int]:
        """One read-back (and one small all-reduce under DDP): (largest signal number seen by any rank, non-finite
        losses so far, first global step with a non-finite loss or -1)."""
        none = 2 ** 62
        first = torch.where(self.first_nonfinite_step < 0, none, self.first_nonfinite_step)
        flags = torch.stack([torch.full_like(self.nonfinite, signal), self.nonfinite, -first])
        if distributed:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        sig, count, neg_first = flags.tolist()
        return int(sig), int(count), (-1 if -neg_first == none else int(-neg_first))

    def summary(self, distributed: bool = False) -> float:
        """Mean finite loss per sample (over all ranks if distributed); NaN when there was none."""
        totals = torch.stack([self.loss_sum, self.sample_count])
        if distributed:
            torch.distributed.all_reduce(totals)
        loss_sum, count = totals.tolist()
        return loss_sum / count if count else float('nan')


@dataclasses.dataclass
class TrainState:
    """Where the run is: read by the checkpoint callback, advanced by the training loop, set by a resume."""
    rank0: bool = True
    step: int = 0  # optimizer updates done
    batch_idx: Optional[int] = None  # last trained batch of the current epoch; None at epoch boundaries
    skipped: int = 0  # updates skipped for a non-finite loss
    monitor: Optional[LossMonitor] = None
    resume_loss: Optional[Tuple[float, float]] = None  # (loss sum, samples) of a resumed, half-done epoch
    loader_epoch_state: Any = None  # the loader's state when the current epoch began


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


# -- training -------------------------------------------------------------------------------------------------------
def train_one_epoch(epoch, task, loader, optimizer, args, state: TrainState, device, lr_scheduler=None, saver=None,
                    amp_autocast=nullcontext, loss_scaler=None, stop=None, skip_batches=0,
                    regularisation: Optional[Regularisation] = None):
    """One pass over the loader with --grad-accum-steps batches per update; returns dict(loss, img_per_sec).

    `regularisation.set_step` is told the updates done before every batch (the --alps-eps-warmup-epochs ramp).
    """
    task.train()
    monitor = state.monitor = LossMonitor(device)
    if skip_batches and state.resume_loss is not None:  # the epoch's loss so far, before the interruption
        monitor.loss_sum.fill_(state.resume_loss[0])
        monitor.sample_count.fill_(state.resume_loss[1])
    n_batches, accum = len(loader), args.grad_accum_steps
    last_group_start = (n_batches - 1) // accum * accum  # the last update may accumulate fewer batches
    check_every = 1 if device.type == 'cpu' else args.log_interval
    bar = None
    if args.progress and state.rank0:
        from tqdm import tqdm
        bar = tqdm(total=n_batches, initial=skip_batches, desc=f'Epoch {epoch + 1}/{args.epochs}', leave=False,
                   dynamic_ncols=True, unit='batch')
    ddp = task.trainable_module if isinstance(task.trainable_module, nn.parallel.DistributedDataParallel) else None
    samples, group_finite, t0 = 0, None, time.perf_counter()
    for batch_idx, (input, target) in enumerate(loader):
        if batch_idx < skip_batches:  # mid-epoch resume: same batches as before the interruption, not trained
            continue
        last = batch_idx == n_batches - 1
        need_update = last or (batch_idx + 1) % accum == 0
        group_size = (n_batches - last_group_start) if batch_idx >= last_group_start else accum
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        if regularisation is not None:
            regularisation.set_step(state.step)
        with (ddp.no_sync() if ddp is not None and not need_update else nullcontext()):
            with amp_autocast():
                loss = task(input, target)['loss']
            if args.on_nonfinite == 'skip':
                finite = torch.isfinite(loss.detach())
                group_finite = finite if group_finite is None else group_finite & finite
            scaled = loss / group_size if group_size > 1 else loss
            params = None
            if need_update and args.clip_grad is not None:
                params = task.get_clip_parameters(exclude_head='agc' in args.clip_mode)
            if loss_scaler is not None:
                loss_scaler(scaled, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode, parameters=params,
                            need_update=need_update)
            else:
                scaled.backward()
        monitor.update(loss, input.shape[0], state.step)
        samples += input.shape[0]
        if bar is not None:
            bar.update(1)
        if not need_update:
            continue
        if group_finite is not None:
            ok = group_finite.to(torch.int32)
            if args.distributed:  # every rank must take the same decision, or the next all-reduce hangs
                torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
            group_finite = None
            if not bool(ok):
                _logger.warning(f'Skipping update at epoch {epoch} step {state.step}: non-finite loss')
                optimizer.zero_grad(set_to_none=True)
                state.skipped += 1
                continue
        if loss_scaler is None:
            if args.clip_grad is not None:
                utils.dispatch_clip_grad(params, value=args.clip_grad, mode=args.clip_mode)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.batch_idx = batch_idx
        task.update_ema(step=state.step)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=state.step)

        update_idx = batch_idx // accum
        if (update_idx + 1) % check_every == 0 or last:
            # One small read-back (and all-reduce under DDP) per check, never per step on accelerators.
            signum, count, first = monitor.check(stop.signum if stop else 0, args.distributed)
            if count and args.on_nonfinite == 'stop':
                raise NonFiniteError(f'non-finite loss at epoch {epoch}, step {first}')
            if signum and not last:
                if saver is not None:
                    saver.save_recovery(epoch, batch_idx=batch_idx)
                raise Interrupted(signum)
        if update_idx % args.log_interval == 0 and (args.progress or args.log_interval * accum < n_batches):
            shown = utils.reduce_tensor(loss.detach(), args.world_size) if args.distributed else loss
            if bar is not None:
                bar.set_postfix(loss=f'{shown.item():.3f}', lr=f'{optimizer.param_groups[0]["lr"]:.3g}')
            elif state.rank0:
                _logger.info(f'Train: {epoch} [{batch_idx:>4d}/{n_batches}]  Loss: {shown.item():#.3g}  '
                             f'LR: {optimizer.param_groups[0]["lr"]:.3e}')
        if args.recovery_interval and saver is not None and (update_idx + 1) % args.recovery_interval == 0 \
                and not last:
            saver.save_recovery(epoch, batch_idx=batch_idx)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    state.batch_idx = None
    return dict(loss=monitor.summary(args.distributed), img_per_sec=samples * args.world_size / max(elapsed, 1e-9))


@torch.no_grad()
def validate(model, loader, args, device, amp_autocast=nullcontext) -> Dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) over the whole eval set, summed exactly across ranks (each rank holds a
    disjoint shard, so no DDP wrapper and no padded duplicates)."""
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


def _check_finite(epoch: int, modules: Sequence[nn.Module], metrics: Sequence[Dict[str, float]]) -> None:
    """Stop before saving when the weights (or the evaluation computed from them) are NaN/inf."""
    for m in metrics:
        if not math.isfinite(m['loss']):
            raise NonFiniteError(f'non-finite evaluation loss after epoch {epoch}')
    for module in modules:
        tensors = [t for t in module.state_dict().values() if torch.is_tensor(t) and t.is_floating_point()]
        if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            raise NonFiniteError(f'non-finite weights after epoch {epoch}')


# -- resume ---------------------------------------------------------------------------------------------------------
def resume_training(args, output_dir, task, optimizer, loss_scaler, lr_scheduler, mixer, loader_train,
                    state: TrainState):
    """Load a checkpoint into the plain (not yet DDP/compiled) modules and restore every random stream.

    Returns:
        (path, checkpoint dict, start epoch, batches of that epoch already trained)
    """
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
    state.step = int(checkpoint.get('step', 0))
    start_epoch, skip_batches = int(checkpoint['epoch']) + 1, 0
    if checkpoint.get('batch_idx') is not None:
        start_epoch, skip_batches = int(checkpoint['epoch']), int(checkpoint['batch_idx']) + 1
    per_rank = checkpoint.get('rank_state') or []
    if args.rank < len(per_rank):
        state.resume_loss = restore_rank_state(per_rank[args.rank], mixer=mixer, loader=loader_train)
    else:
        _logger.warning(f'--resume: no saved RNG state for rank {args.rank} (world size changed?); '
                        f'continuing with fresh random streams.')
    if state.rank0:
        where = f'epoch {start_epoch}' + (f', batch {skip_batches}' if skip_batches else '')
        _logger.info(f"Resumed from '{resume_path}' at {where} (step {state.step}).")
    return resume_path, checkpoint, start_epoch, skip_batches


# -- main -----------------------------------------------------------------------------------------------------------
def setup_device(args) -> torch.device:
    """Device, process group, determinism, precision flags."""
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        if torch.device(args.device).type == 'cuda' and not torch.cuda.is_available():
            raise RuntimeError('no CUDA device is available (leave --device out to train on the CPU)')
        device = utils.init_distributed_device(args)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise TrainError(f'could not set up device {args.device!r}: {e}') from e
    if args.distributed:  # the log cadence drives a collective, so every rank must agree on it
        flag = torch.tensor([int(args.progress)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        args.progress = bool(flag.item())
        _logger.info(f'Process {args.rank}/{args.world_size} on {device} ({torch.distributed.get_backend()}).')
    if args.sync_bn and device.type == 'cpu':
        raise TrainError('--sync-bn needs GPUs (torch.nn.SyncBatchNorm has no CPU kernel); on CPU BatchNorm '
                         'statistics are averaged after each epoch (--dist-bn reduce)')
    if args.deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    resolve_precision(args, device)
    return device


def create_task_model(args, num_classes: Optional[int]) -> nn.Module:
    try:
        return create_model(args.model, pretrained=args.pretrained, num_classes=num_classes, drop_rate=args.drop,
                            drop_path_rate=args.drop_path, checkpoint_path=args.initial_checkpoint or None,
                            **args.model_kwargs)
    except (TypeError, ValueError, RuntimeError, FileNotFoundError, AssertionError) as e:
        raise TrainError(f"could not create model '{args.model}' with --model-kwargs {args.model_kwargs}: {e}") from e


def build_model_and_loaders(args, device: torch.device):
    """Open the data (the loader kind decided once), build the model on the device, then the loaders for its input
    size; a fixed-input-size model makes --loader auto hand over to timm's loader (which resizes).

    Returns:
        (model, loader_train, loader_eval, collate_mixer or None)
    """
    data = open_data(args)
    if args.num_classes is None and data.classes:
        args.num_classes = len(data.classes)
    if data.classes and args.num_classes < len(data.classes):
        raise TrainError(f'--num-classes {args.num_classes} but the dataset has {len(data.classes)} classes; pass '
                         f'--num-classes {len(data.classes)} or leave it out')
    model = create_task_model(args, args.num_classes)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    fixed, given = _fixed_input_size(model), args.input_size is not None or args.img_size is not None
    data_config = resolve_data_config(vars(args), model=model, verbose=False)
    if fixed and tuple(data_config['input_size'][1:]) != fixed:
        if given:
            raise TrainError(f'--input-size/--img-size {data_config["input_size"][1]}: model {args.model} only '
                             f'takes {fixed[0]}x{fixed[1]} images (its img_size); pass --img-size {fixed[0]} or '
                             f'build it for your size with --model-kwargs img_size=N')
        data_config['input_size'] = (data_config['input_size'][0], *fixed)  # its pretrained_cfg may say otherwise
    if data.kind == 'fast' and (given or fixed) and tuple(data_config['input_size'][1:]) != data.image_size:
        why = ('--input-size/--img-size' if given else f'model {args.model} takes only '
               f'{data_config["input_size"][1]}x{data_config["input_size"][2]} images; pass --img-size')
        if args.loader == 'fast':
            raise TrainError(f'{why}: the fast loader cannot resize {data.image_size[0]}x{data.image_size[1]} '
                             f'images; use --loader timm (resizes as timm does)')
        data = open_timm_data(args)  # --loader auto: timm's loader resizes
    try:
        loader_train, loader_eval, collate_mixer = build_loaders(args, data, data_config, device, args.num_classes)
    except (ValueError, TypeError, AssertionError) as e:
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
    if args.distributed and args.sync_bn:
        args.dist_bn = ''
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, loader_train, loader_eval, collate_mixer


def check_output_folder(args, output_dir: str, task: ALPSTask, optimizer) -> None:
    """Rank 0 checks the output folder (consent, writable, space); every rank stops with the same error instead of
    hanging in a collective."""
    error = None
    if utils.is_primary(args):
        try:
            modules = [task.get_trainable_module()] + ([task.get_trainable_module(ema=True)] if args.model_ema else [])
            prepare_output_dir(output_dir, args, 3 * estimate_checkpoint_bytes(modules, optimizer))
        except TrainError as e:
            error = str(e)
    if args.distributed:
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise TrainError(error)


def set_loader_epoch(loader, epoch: int, args, state: TrainState) -> None:
    """Tell the loader (or its dataset / sampler, as timm's train.py does) the epoch, and remember its state."""
    dataset = getattr(loader, 'dataset', None)
    if hasattr(loader, 'set_epoch'):
        loader.set_epoch(epoch)
    elif hasattr(dataset, 'set_epoch'):
        dataset.set_epoch(epoch)
    elif args.distributed and hasattr(getattr(loader, 'sampler', None), 'set_epoch'):
        loader.sampler.set_epoch(epoch)
    state.loader_epoch_state = loader.state_dict() if hasattr(loader, 'state_dict') else None


def main(argv: Optional[List[str]] = None) -> int:
    """Train; returns the exit status (0, or 128 + signal number after a checkpoint on SIGINT/SIGTERM).

    Raises:
        TrainError: bad input or environment (reported before anything is written when possible).
    """
    args = parse_args(argv)
    validate_args(args)
    resolve_dataset_args(args)
    args.progress = not args.no_progress and sys.stderr.isatty()
    args.prefetcher = not args.no_prefetcher
    device = setup_device(args)
    rank0 = utils.is_primary(args)
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp else nullcontext
    loss_scaler = NativeScaler(device=device.type) if args.amp and amp_dtype == torch.float16 and \
        device.type == 'cuda' else None
    utils.random_seed(args.seed, args.rank)

    model, loader_train, loader_eval, collate_mixer = build_model_and_loaders(args, device)
    updates_per_epoch = math.ceil(len(loader_train) / args.grad_accum_steps)
    if rank0:
        precision = f'{args.amp_dtype} autocast' if args.amp else 'fp32'
        _logger.info(f'Model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), '
                     f'method {args.method}, {type(loader_train).__name__}, {updates_per_epoch} updates/epoch, '
                     f'{precision}{", channels_last" if args.channels_last else ""}.')

    # task, optimizer, schedule
    reg = create_regularisation(args, args.num_classes, model, collate_mixer, updates_per_epoch)
    if rank0 and reg.eps_warmup_updates:
        _logger.info(f'ALPS radius ramps linearly from 0 to {reg.eps:g} over the first {reg.eps_warmup_updates} '
                     f'updates (--alps-eps-warmup-epochs {args.alps_eps_warmup_epochs:g}).')
    task = ALPSTask(model, reg.mixup_fn, reg.criterion, device=device, verbose=False)
    try:  # combinations timm itself rejects (e.g. --opt-kwargs a optimizer lacks, --sched rsqrt without warm-up)
        optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
        lr_scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                       updates_per_epoch=updates_per_epoch)
    except (ValueError, TypeError, AssertionError, ImportError) as e:
        raise TrainError(f'could not create optimizer --opt {args.opt} / scheduler --sched {args.sched}: {e}') from e
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
    args.epochs = num_epochs
    # The collate mixer's generator lives in the worker processes when there are any: not the main process's to save.
    mixer_state = reg.mixup_fn if reg.mixup_fn is not None else (collate_mixer if args.workers == 0 else None)

    # resume (before DDP / compile, so state loads into the plain modules)
    output_dir = resolve_output_dir(args)
    state = TrainState(rank0=rank0)
    resume_path, checkpoint, start_epoch, skip_batches = '', None, 0, 0
    if args.resume:
        resume_path, checkpoint, start_epoch, skip_batches = resume_training(
            args, output_dir, task, optimizer, loss_scaler, lr_scheduler, mixer_state, loader_train, state)
    if args.torchcompile:
        task.compile(backend=args.torchcompile)
    if args.distributed:
        ddp_kwargs = dict(broadcast_buffers=False) if args.no_ddp_bb else {}
        task.prepare_distributed(device_ids=[device] if device.type == 'cuda' else None, **ddp_kwargs)
    if lr_scheduler is not None and checkpoint is not None:
        lr_scheduler.step(start_epoch)  # as timm's train.py
        if args.sched_on_updates:
            lr_scheduler.step_update(num_updates=state.step)

    check_output_folder(args, output_dir, task, optimizer)

    def extra_state() -> Dict[str, Any]:
        # Every rank's random streams, so a resumed DDP run continues each rank exactly. Mid-epoch: the loader as it
        # was when the epoch began (resume replays the epoch and skips the done batches).
        mid_epoch = state.batch_idx is not None
        mine = capture_rank_state(
            mixer_state, loader_train, loader_state=state.loader_epoch_state if mid_epoch else None,
            epoch_loss=(state.monitor.loss_sum.item(), state.monitor.sample_count.item())
            if mid_epoch and state.monitor is not None else None)
        gathered = [mine]
        if args.distributed:
            gathered = [None] * args.world_size
            torch.distributed.all_gather_object(gathered, mine)
        return dict(scheduler=lr_scheduler.state_dict() if lr_scheduler is not None else None, step=state.step,
                    batch_idx=state.batch_idx, rank_state=gathered)

    saver = log_file = None
    if rank0:
        saver = AtomicCheckpointSaver(
            model=model, optimizer=optimizer, args=args, amp_scaler=loss_scaler, checkpoint_dir=output_dir,
            recovery_dir=output_dir, decreasing=args.eval_metric == 'loss', max_history=args.checkpoint_hist,
            task=task, extra_state_fn=extra_state)
        log_file = _start_log_file(output_dir)
        if checkpoint is not None and checkpoint.get('saver') and \
                os.path.abspath(os.path.dirname(resume_path)) == os.path.abspath(output_dir):
            saver.load_state_dict(checkpoint['saver'])
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            f.write(yaml.safe_dump(vars(args), default_flow_style=False))
        utils.trim_summary(os.path.join(output_dir, 'summary.csv'), start_epoch)
        _logger.info(f'Output folder: {output_dir}')
    elif args.distributed:
        saver = _CollectiveOnly(extra_state)  # non-zero ranks join the all_gather of every save
    checkpoint = None

    stop = SignalFlag()
    best_metric, best_epoch, last_path = None, None, None
    try:
        for epoch in range(start_epoch, num_epochs):
            reg.set_epoch(epoch, task)
            set_loader_epoch(loader_train, epoch, args, state)
            t_epoch = time.perf_counter()
            train_metrics = train_one_epoch(
                epoch, task, loader_train, optimizer, args, state, device, lr_scheduler=lr_scheduler, saver=saver,
                amp_autocast=amp_autocast, loss_scaler=loss_scaler, stop=stop, skip_batches=skip_batches,
                regularisation=reg)
            skip_batches = 0
            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                utils.distribute_bn(task.get_trainable_module(), args.world_size, args.dist_bn == 'reduce')
            eval_metrics = validate(task.get_eval_model(), loader_eval, args, device, amp_autocast)
            checked = [eval_metrics]
            if args.model_ema:
                ema_model = task.get_eval_model(ema=True)
                if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                    utils.distribute_bn(ema_model, args.world_size, args.dist_bn == 'reduce')
                eval_metrics = validate(ema_model, loader_eval, args, device, amp_autocast)  # as timm: EMA reported
                checked.append(eval_metrics)
            _check_finite(epoch, [task.get_trainable_module()], checked)
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
                _logger.info(
                    f"Epoch {epoch + 1}/{num_epochs}  train_loss {train_metrics['loss']:.4f}  "
                    f"eval_loss {eval_metrics['loss']:.4f}  eval_top1 {eval_metrics['top1']:.2f}%  lr {lr:.3g}  "
                    f"{time.perf_counter() - t_epoch:.1f}s ({train_metrics['img_per_sec']:.0f} img/s)"
                    + ('  *best' if best_epoch == epoch else ''))
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
    except NonFiniteError as e:
        kept = last_path or (resume_path or 'none (no epoch finished)')
        raise TrainError(f'{e}. Stopped without saving the diverged weights; last good checkpoint: {kept}. Lower '
                         f'--lr, add --clip-grad, or pass --on-nonfinite skip.', exit_code=1) from None
    except Interrupted as e:
        if rank0:
            _logger.warning(f'{e} received: checkpoint saved in {output_dir}; continue with --resume auto '
                            f'--experiment {os.path.basename(output_dir)}'
                            + (f' --output {args.output}' if args.output else ''))
        return 128 + e.signum
    except (CheckpointError, OSError) as e:
        raise TrainError(f'{e} Stopping; the last complete checkpoint is still in {output_dir}.',
                         exit_code=1) from None
    finally:
        stop.restore()
        _stop_log_file(log_file)
    if rank0 and best_metric is not None:
        _logger.info(f'*** Best {args.eval_metric}: {best_metric:.4f} (epoch {best_epoch + 1}); results in {output_dir}')
    if state.skipped and rank0:
        _logger.warning(f'{state.skipped} update(s) skipped for non-finite loss.')
    return 0


_SAVER_LOGGER = 'timm.utils.checkpoint_saver'


def _start_log_file(output_dir: str) -> logging.Handler:
    """log.txt gets everything; the saver's per-epoch "Current checkpoints:" listing goes there only."""
    handler = logging.FileHandler(os.path.join(output_dir, 'log.txt'))
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
    logging.root.addHandler(handler)
    saver_logger = logging.getLogger(_SAVER_LOGGER)
    saver_logger.addHandler(handler)
    saver_logger.propagate = False
    return handler


def _stop_log_file(handler: Optional[logging.Handler]) -> None:
    if handler is None:
        return
    logging.root.removeHandler(handler)
    saver_logger = logging.getLogger(_SAVER_LOGGER)
    saver_logger.removeHandler(handler)
    saver_logger.propagate = True
    handler.close()


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
        print(f'train_timm.py: error: {e}', file=sys.stderr)  # once, on stderr, no traceback
        return e.exit_code
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == '__main__':
    sys.exit(_cli())
