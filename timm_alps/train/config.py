"""The run's configuration: every flag declared once, parsed from the command line and a -c YAML alike, resolved
into one frozen `Config` before anything is built.

Each flag is one `_flag(...)` call: its type, its range (numbers) or its names (choices) and its help. A YAML file
becomes the command-line words it stands for (`read_config_file`), so argparse converts it as it converts the command
line, and every value, wherever it came from, goes through the same checks (`_check_rules`). `resolve_config` then fills what the user
left open (the method's preset, the bundled dataset and its evaluation split, the precision of the device) and
returns the frozen `Config` that the run reads and saves as args.yaml; nothing changes it afterwards.
"""
import argparse
import dataclasses
import difflib
import math
import os
import re
import types
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import yaml

import timm
from timm import utils
from timm.optim import list_optimizers

from .. import data as alps_data
from .errors import TrainError

__all__ = ['Config', 'FLAG_NAMES', 'FLAG_RULES', 'METHODS', 'SCHEDULERS', 'Range', 'cpu_has_native_bf16',
           'flag_name', 'parse_args', 'parser', 'resolve_config', 'resolve_precision']


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises `TrainError` (one line, exit status 2 in the CLI) instead of printing usage and exiting."""

    def error(self, message: str):
        raise TrainError(message)


@dataclasses.dataclass(frozen=True)
class Range:
    """A numeric flag's valid values: finite, in [lo, hi] (ends open when asked), `count` values for lists."""
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    count: Optional[Tuple[int, ...]] = None

    def describe(self) -> str:
        lo, hi = _number(self.lo), _number(self.hi)
        if self.lo == -math.inf and self.hi == math.inf:
            return 'a finite number'
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if self.lo == -math.inf:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"

    def accepts(self, v: float) -> bool:
        return (math.isfinite(v) and (v > self.lo if self.lo_open else v >= self.lo)
                and (v < self.hi if self.hi_open else v <= self.hi))


def _number(x: float) -> str:
    # whole bounds in full (the seed's upper bound is 4294963199, not 4.29496e+09), others as %g
    return str(int(x)) if math.isfinite(x) and float(x).is_integer() else f'{x:g}'


_POS, _NONNEG, _PROB, _FRACTION = Range(0, lo_open=True), Range(0), Range(0, 1), Range(0, 1, hi_open=True)

# timm's create_scheduler_v2 names (tests build each one, so a timm change shows up there).
SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'constant', 'wsd', 'rsqrt')
_INTERPOLATIONS = ('bilinear', 'bicubic', 'nearest', 'box', 'hamming', 'lanczos')
METHODS = ('erm', 'dropout', 'ls', 'mixup', 'alps')
LOADERS = ('auto', 'fast', 'timm')


def _optimizer_names() -> List[str]:
    names = list_optimizers()
    return names + [f'lookahead_{n}' for n in names]


def _compile_backends() -> List[str]:
    import torch._dynamo
    return torch._dynamo.list_backends(exclude_tags=())


# dest -> Range of every numeric flag; dest -> valid names (or a function listing them) of every named flag.
FLAG_RULES: Dict[str, Range] = {}
FLAG_NAMES: Dict[str, Union[Sequence[str], Callable[[], Sequence[str]]]] = {}


def _flag(group, *names: str, range: Optional[Range] = None, choices=None, **kwargs) -> None:
    """Declare one flag: argparse's spelling, type, default and help, plus its range or its names."""
    action = group.add_argument(*names, **kwargs)
    if action.type in (int, float) and range is None:
        raise TypeError(f'{names[0]}: a numeric flag needs a range')
    if range is not None:
        FLAG_RULES[action.dest] = range
    if choices is not None:
        FLAG_NAMES[action.dest] = choices


# -- the flags ------------------------------------------------------------------------------------------------------
config_parser = _ArgumentParser(description='Training Config', add_help=False)
config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                           help='YAML config file specifying default arguments (e.g. the args.yaml of a run)')

parser = _ArgumentParser(description='ALPS training for timm models', allow_abbrev=False)
group = parser.add_argument_group('Dataset parameters')
_flag(group, '--data-dir', metavar='DIR', default=None,
             help='dataset root (default: the bundled CIFAR-10 subset)')
_flag(group, '--dataset', metavar='NAME', default=None,
             help='timm dataset "<type>/<name>", e.g. wds/cifar10, torch/cifar10, or empty for an image folder')
_flag(group, '--train-split', metavar='NAME', default='train')
_flag(group, '--val-split', metavar='NAME', default=None,
             help='evaluation split (default: "test" for the bundled and torch/ datasets, else "validation")')
_flag(group, '--dataset-download', action='store_true', default=False,
             help='allow download of torch/ datasets')
_flag(group, '--max-train-samples', type=int, default=None, metavar='N',
             help='train on a seeded random subset of N samples (class-balanced where labels are known); on '
                  'streaming shards (--loader timm): each epoch ends after N samples of the shuffled stream',
             range=Range(1))
_flag(group, '--max-eval-samples', type=int, default=None, metavar='N',
             help='evaluate on a seeded random subset of N samples (streaming shards: the first N)', range=Range(1))
_flag(group, '--loader', default='auto', choices=LOADERS,
             help='fast: whole dataset as uint8 in (device) memory, batched crop/flip/normalise; timm: '
                  'create_loader; auto: fast when the train split has <= --fast-loader-max-mb of pixels, its '
                  'images are one size and every augmentation flag given is one the fast loader honours')
_flag(group, '--fast-loader-max-mb', type=float, default=2048, metavar='MB', range=_NONNEG)
_flag(group, '--tolerate-bad-shards', action='store_true', default=False,
             help='train on the readable shards when some shards of a split are missing, truncated or corrupt '
                  '(large noisy corpora); skipped shards and samples are counted in the log and summary.csv. '
                  'Default: such a shard stops the run before it starts, naming the shard')
_flag(group, '--no-prefetcher', action='store_true', default=False,
             help='timm loader: no PrefetchLoader (normalise in the workers; mixing in the training step)')

group = parser.add_argument_group('Model parameters')
_flag(group, '--model', default='preact_resnet18_w16', type=str, metavar='MODEL',
             help='timm model name (default: preact_resnet18_w16, a narrow PreAct ResNet-18)')
_flag(group, '--pretrained', action='store_true', default=False)
_flag(group, '--initial-checkpoint', default='', type=str, metavar='PATH',
             help='initialise the model weights from this checkpoint')
_flag(group, '--resume', default='', type=str, metavar='PATH',
             help="resume the full training state from PATH, or 'auto': latest good checkpoint in the output "
                  "folder (needs --experiment)")
_flag(group, '--num-classes', type=int, default=None, metavar='N',
             help='number of classes (default: from the dataset, else the model)', range=Range(2))
_flag(group, '--img-size', type=int, default=None, metavar='N',
             help='image size (timm loader resizes; default: the model\'s, else the data\'s)', range=Range(1))
_flag(group, '--input-size', default=None, nargs=3, type=int, metavar='N',
             help='input dimensions C H W (overrides --img-size)', range=Range(1, count=(3,)))
_flag(group, '--crop-pct', default=None, type=float, metavar='PCT', help='eval center crop (timm loader)',
             range=Range(0, 1, lo_open=True))
_flag(group, '--mean', type=float, nargs='+', default=None, metavar='MEAN', range=Range(count=(1, 3)))
_flag(group, '--std', type=float, nargs='+', default=None, metavar='STD', range=Range(0, lo_open=True, count=(1, 3)))
_flag(group, '--interpolation', default='', type=str, metavar='NAME',
             help='eval resize interpolation (timm loader; default: the model\'s)', choices=('',) + _INTERPOLATIONS)
_flag(group, '-b', '--batch-size', type=int, default=128, metavar='N', help='batch size per process', range=Range(1))
_flag(group, '-vb', '--validation-batch-size', type=int, default=None, metavar='N', range=Range(1))
_flag(group, '--channels-last', action=argparse.BooleanOptionalAction, default=None,
             help='channels_last memory format (default: on with CPU bf16 autocast, else off)')
_flag(group, '--grad-accum-steps', type=int, default=1, metavar='N',
             help='accumulate gradients over N batches per optimizer update', range=Range(1))
_flag(group, '--torchcompile', nargs='?', type=str, default=None, const='inductor',
             help='torch.compile the model with this backend (default: inductor)', choices=_compile_backends)
_flag(group, '--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs,
             help='extra model arguments, key=value (e.g. width=8)')

group = parser.add_argument_group('Optimizer parameters')
_flag(group, '--opt', default='momentum', type=str, metavar='OPTIMIZER',
             help="timm optimizer name (default: momentum, SGD with classical momentum as in the paper; "
                  "timm's sgd is Nesterov)", choices=_optimizer_names)
_flag(group, '--opt-eps', default=None, type=float, metavar='EPSILON', range=_POS)
_flag(group, '--opt-betas', default=None, type=float, nargs='+', metavar='BETA',
             range=Range(0, 1, hi_open=True, count=(1, 2, 3)))
_flag(group, '--momentum', type=float, default=0.9, metavar='M', range=_FRACTION)
_flag(group, '--weight-decay', type=float, default=1e-4, help='weight decay (default: 1e-4, the paper)', range=_NONNEG)
_flag(group, '--clip-grad', type=float, default=None, metavar='NORM', range=_POS)
_flag(group, '--clip-mode', type=str, default='norm', help='norm, value or agc', choices=('norm', 'value', 'agc'))
_flag(group, '--opt-kwargs', nargs='*', default={}, action=utils.ParseKwargs)

group = parser.add_argument_group('Learning rate schedule parameters')
_flag(group, '--sched', type=str, default='cosine', metavar='SCHEDULER',
             help='LR scheduler: cosine, multistep (the paper), step, ... (default: cosine)', choices=SCHEDULERS)
_flag(group, '--sched-on-updates', action='store_true', default=False)
_flag(group, '--lr', type=float, default=0.1, metavar='LR', range=_POS)
_flag(group, '--warmup-lr', type=float, default=1e-5, metavar='LR', range=_NONNEG)
_flag(group, '--min-lr', type=float, default=0, metavar='LR', range=_NONNEG)
_flag(group, '--epochs', type=int, default=12, metavar='N', range=Range(1))
_flag(group, '--decay-milestones', default=[100, 150], type=int, nargs='+', metavar='MILESTONES', range=Range(0))
_flag(group, '--decay-epochs', type=float, default=90, metavar='N', range=_POS)
_flag(group, '--warmup-epochs', type=int, default=0, metavar='N', range=Range(0))
_flag(group, '--warmup-prefix', action='store_true', default=False)
_flag(group, '--cooldown-epochs', type=int, default=0, metavar='N', range=Range(0))
_flag(group, '--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', range=_POS)

group = parser.add_argument_group('Augmentation and regularization parameters')
_flag(group, '--method', default=None, type=str,
             help="preset of the paper's comparison: erm, dropout (0.5), ls (0.1), mixup (alpha 1), alps "
                  "(Beta(8, 2), eps 0.3); explicit flags override it (default: alps)", choices=METHODS)
_flag(group, '--alps-eps', type=float, default=None, metavar='EPS',
             help='L1 radius of the adversarial label ball (default: 0.3)', range=Range(0, 2))
_flag(group, '--alps-beta', type=float, nargs='+', default=None, metavar='A B',
             help='Beta(A, B) of the mixing weight of the sample itself (default: 8 2)',
             range=Range(0, lo_open=True, count=(2,)))
_flag(group, '--alps-prob', type=float, default=None, help='probability of mixing a sample (default: 1)', range=_PROB)
_flag(group, '--alps-mode', type=str, default=None,
             help='draw the mixing weight per sample, pair or batch: elem, pair, batch (default: elem)',
             choices=('elem', 'pair', 'batch'))
_flag(group, '--alps-label', type=str, default=None,
             help='fused: adversarial label from the training forward (free); model: extra no-grad forward '
                  'in the mixer (default: fused)', choices=('fused', 'model'))
_flag(group, '--alps-off-epoch', type=int, default=0, metavar='N',
             help='from epoch N on, no ALPS (no input mixing, no label shift); 0: never (default)', range=Range(0))
_flag(group, '--alps-eps-warmup-epochs', type=float, default=None, metavar='E',
             help='ramp the ALPS radius linearly from 0 to --alps-eps over the first E epochs (per optimizer '
                  'update, with timm_alps.EpsWarmup; removes the ALPS start stall); 0: off, the paper\'s ALPS '
                  '(default: 1 with --method alps)', range=_NONNEG)
_flag(group, '--no-aug', action='store_true', default=False, help='no augmentation')
_flag(group, '--hflip', type=float, default=0.5, help='horizontal flip probability', range=_PROB)
_flag(group, '--crop-pad', type=int, default=None,
             help='random crop padding of the fast loader (default: 4); the timm loader crops with --scale',
             range=Range(0))
_flag(group, '--scale', type=float, nargs=2, default=None, metavar='PCT',
             help="timm loader RandomResizedCrop scale (timm's default 0.08 1.0)",
             range=Range(0, 1, lo_open=True, count=(2,)))
_flag(group, '--ratio', type=float, nargs=2, default=None, metavar='RATIO',
             help="timm loader RandomResizedCrop ratio (timm's default 3/4 4/3)",
             range=Range(0, lo_open=True, count=(2,)))
_flag(group, '--color-jitter', type=float, default=None, metavar='PCT',
             help="timm loader color jitter (timm's default 0.4)", range=_NONNEG)
_flag(group, '--aa', type=str, default=None, metavar='NAME',
             help='AutoAugment policy, e.g. rand-m9-mstd0.5-inc1, augmix-m5, original, v0 (timm loader)')
_flag(group, '--reprob', type=float, default=0.0, metavar='PCT', help='random erase prob (timm loader)', range=_PROB)
_flag(group, '--remode', type=str, default='pixel', help='random erase mode: pixel, rand, const',
             choices=('pixel', 'rand', 'const'))
_flag(group, '--recount', type=int, default=1, help='random erase count', range=Range(1))
_flag(group, '--train-interpolation', type=str, default=None,
             help="training resize interpolation (timm loader): random, bilinear, bicubic, nearest (timm's "
                  "default random)", choices=('random',) + _INTERPOLATIONS)
_flag(group, '--mixup', type=float, default=None, help='MixUp alpha (--method mixup; preset 1.0)', range=_NONNEG)
_flag(group, '--cutmix', type=float, default=None, help='CutMix alpha (--method mixup)', range=_NONNEG)
_flag(group, '--cutmix-minmax', type=float, nargs='+', default=None,
             help='CutMix min/max box ratio, two numbers in (0, 1] (overrides --cutmix alpha)',
             range=Range(0, 1, lo_open=True, count=(2,)))
_flag(group, '--mixup-prob', type=float, default=1.0, range=_PROB)
_flag(group, '--mixup-switch-prob', type=float, default=0.5, range=_PROB)
_flag(group, '--mixup-mode', type=str, default='batch', help='batch, pair or elem', choices=('batch', 'pair', 'elem'))
_flag(group, '--mixup-off-epoch', type=int, default=0, metavar='N',
             help='from epoch N on, no MixUp/CutMix (timm); 0: never', range=Range(0))
_flag(group, '--smoothing', type=float, default=None, help='label smoothing (default: 0, ls preset 0.1)',
             range=_FRACTION)
_flag(group, '--bce-loss', action='store_true', default=False,
             help='binary cross-entropy (timm BinaryCrossEntropy; ALPSBinaryCrossEntropy for ALPS)')
_flag(group, '--bce-target-thresh', type=float, default=None, help='threshold the BCE targets to 0/1', range=_PROB)
_flag(group, '--bce-pos-weight', type=float, default=None, help='BCE positive class weight', range=_POS)
_flag(group, '--drop', type=float, default=None, metavar='PCT',
             help='dropout rate (default: 0, dropout preset 0.5)', range=_FRACTION)
_flag(group, '--drop-path', type=float, default=None, metavar='PCT', range=_FRACTION)

group = parser.add_argument_group('Distributed and batch norm parameters')
_flag(group, '--device', default=None, type=str, help="'cuda' when available, else 'cpu'")
_flag(group, '--dist-backend', default=None, type=str, help='default: nccl on CUDA, gloo on CPU')
_flag(group, '--dist-url', default='env://', type=str)
_flag(group, '--sync-bn', action='store_true', help='synchronized BatchNorm across processes')
_flag(group, '--dist-bn', type=str, default='reduce', help='share BN stats after each epoch: reduce, broadcast, ""',
             choices=('reduce', 'broadcast', ''))
_flag(group, '--no-ddp-bb', action='store_true', default=False, help='no DDP buffer broadcast')

group = parser.add_argument_group('Model exponential moving average parameters')
_flag(group, '--model-ema', action='store_true', default=False)
_flag(group, '--model-ema-decay', type=float, default=0.9998, range=Range(0, 1, lo_open=True, hi_open=True))
_flag(group, '--model-ema-warmup', action='store_true')

group = parser.add_argument_group('Miscellaneous parameters')
_flag(group, '--seed', type=int, default=42, metavar='S', range=Range(0, 2 ** 32 - 1 - 4096))
_flag(group, '--deterministic', action='store_true', default=False,
             help='torch.use_deterministic_algorithms (exact resume on GPU; slower)')
_flag(group, '--log-interval', type=int, default=50, metavar='N', range=Range(1))
_flag(group, '--recovery-interval', type=int, default=0, metavar='N',
             help='also write a mid-epoch recovery checkpoint every N updates (0: epoch ends only)', range=Range(0))
_flag(group, '--checkpoint-hist', type=int, default=3, metavar='N', range=Range(1))
_flag(group, '-j', '--workers', type=int, default=4, metavar='N', help='data workers of the timm loader',
             range=Range(0))
_flag(group, '--amp', action=argparse.BooleanOptionalAction, default=None,
             help='mixed precision autocast (default: bf16 on CPUs with native bf16, else off; --no-amp: fp32)')
_flag(group, '--amp-dtype', default=None, type=str,
             help='float16 or bfloat16 (default: bfloat16 on CPU, float16 on GPU as timm)',
             choices=('float16', 'bfloat16'))
_flag(group, '--output', default='', type=str, metavar='PATH', help='default: ./output/train')
_flag(group, '--experiment', default='', type=str, metavar='NAME', help='sub-folder of --output')
_flag(group, '--overwrite', action='store_true', default=False,
             help='replace the run already in the output folder (its checkpoints, args.yaml, summary.csv, '
                  'log.txt); with --resume PATH: continue the checkpoint PATH in a folder that holds another run')
_flag(group, '--eval-metric', default='top1', type=str, metavar='EVAL_METRIC', help='top1, top5 or loss',
             choices=('top1', 'top5', 'loss'))
_flag(group, '--on-nonfinite', default='stop', choices=('stop', 'skip'),
             help='non-finite loss: stop (keep the last good checkpoint) or skip the update (one host sync '
                  'per step on accelerators)')
_flag(group, '--no-progress', action='store_true', default=False, help='no progress bar')


# Keys a run adds to args.yaml beyond the flags (so `-c args.yaml` of a finished run is accepted); recomputed.
DERIVED_KEYS = ('distributed', 'world_size', 'rank', 'local_rank', 'progress', 'prefetcher', 'device_type')

# Flags only timm's loader honours (with the value that means "not given"), and the fast loader's own.
TIMM_LOADER_FLAGS = dict(aa=None, reprob=0.0, scale=None, ratio=None, color_jitter=None, train_interpolation=None,
                         crop_pct=None, interpolation='', no_prefetcher=False)
FAST_LOADER_FLAGS = dict(crop_pad=None)


def _actions() -> Dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != 'help'}


def flag_name(dest: str) -> str:
    """The command-line spelling of an argument (its longest option string)."""
    action = _actions().get(dest)
    if action is None:
        return '--' + dest.replace('_', '-')
    names = action.option_strings
    if isinstance(action, argparse.BooleanOptionalAction):  # --amp, not its --no-amp
        names = [o for o in names if not o.startswith('--no-')]
    return max(names, key=len)


def _show(v: Any) -> str:
    return ' '.join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


# -- -c YAML: read strictly, converted as the command line would ----------------------------------------------------
class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping key given twice (plain YAML keeps the last one silently)."""


def _unique_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            twice = key in seen
        except TypeError:  # a list or mapping as a key
            raise yaml.constructor.ConstructorError(None, None, f'key {key!r} is not a flag name',
                                                    key_node.start_mark) from None
        if twice:
            raise yaml.constructor.ConstructorError(None, None, f'key {key!r} is given twice', key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _is_bool_flag(action: argparse.Action) -> bool:
    return action.const is True or action.const is False or isinstance(action, argparse.BooleanOptionalAction)


def _yaml_argv(action: argparse.Action, value: Any) -> List[str]:
    """A YAML value as the command-line words it stands for, so that argparse converts it as it converts the command
    line (ranges and names are then checked for both by `_check_rules`). Only what has no command-line spelling is
    refused here: null for a flag that needs a value, a non-boolean for a switch, a nested value."""
    flag = flag_name(action.dest)
    if value is None:
        if action.default is not None and not isinstance(action.default, dict):
            raise TrainError(f'{flag}: null, but the flag needs a value (default {_show(action.default)}); give one '
                             f'or leave the key out')
        return []
    if _is_bool_flag(action):
        if not isinstance(value, bool):
            raise TrainError(f'{flag}: expected true or false, got {value!r}')
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else '--no-' + flag[2:]]
        return [flag] if value != action.default else []
    if isinstance(action, utils.ParseKwargs):  # timm's key=value parser reads each value with ast.literal_eval
        if not isinstance(value, dict) or not all(isinstance(k, str) and '=' not in k for k in value):
            raise TrainError(f'{flag}: expected a mapping of key: value, got {value!r}')
        return [flag] + [f'{k}={v!r}' for k, v in value.items()] if value else []
    many = action.nargs not in (None, '?')
    values = list(value) if many and isinstance(value, (list, tuple)) else [value]
    if any(isinstance(x, (list, tuple, dict)) for x in values):
        raise TrainError(f"{flag}: expected {'a list of values' if many else 'one value'}, got {value!r}")
    if action.type in (int, float) and any(isinstance(x, bool) for x in values):
        raise TrainError(f'{flag}: expected a number, got {value!r}')
    # `--flag=value`: a value starting with '-' is not read as another flag
    return [f'{flag}={values[0]}'] if not many else [flag] + [str(x) for x in values]


def read_config_file(path: str) -> List[str]:
    """The flags of a -c YAML file (flag: value) as command-line words; derived keys of a saved args.yaml are
    dropped.

    Raises:
        TrainError: unreadable or binary file, invalid YAML, a key given twice, not a mapping, an unknown key
            (named with the closest flag), or a value with no command-line spelling.
    """
    try:
        with open(path, encoding='utf-8') as f:
            config = yaml.load(f, Loader=_StrictLoader)
    except UnicodeDecodeError:
        raise TrainError(f'could not read --config {path}: not a UTF-8 text file (a YAML mapping of flag: value)') \
            from None
    except (OSError, yaml.YAMLError) as e:
        raise TrainError(f'could not read --config {path}: {e}') from None
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise TrainError(f'--config {path}: expected a mapping of flag: value, got a {type(config).__name__}')
    actions, argv, seen = _actions(), [], set()
    for key, value in config.items():
        dest = key.replace('-', '_') if isinstance(key, str) else None
        if dest in DERIVED_KEYS:
            continue
        if dest not in actions:
            close = difflib.get_close_matches(str(key).replace('-', '_'), sorted(actions), n=1, cutoff=0.6)
            hint = f'; did you mean {close[0]!r} ({flag_name(close[0])})?' if close else ''
            raise TrainError(f'--config {path}: unknown key {key!r}{hint}')
        if dest in seen:
            raise TrainError(f'--config {path}: {flag_name(dest)} is given twice ({key!r})')
        seen.add(dest)
        try:
            argv += _yaml_argv(actions[dest], value)
        except TrainError as e:
            raise TrainError(f'--config {path}: {e}') from None
    try:
        parser.parse_args(argv)  # alone first, so that a bad value is reported as the file's
    except TrainError as e:
        raise TrainError(f'--config {path}: {e}') from None
    return argv


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The user's values: flags over the -c/--config YAML (e.g. a run's args.yaml) over the defaults, all read by
    the one argparse parser (the YAML as the command-line words it stands for, before the command line's own).

    None means "not given" for flags that `resolve_config` fills (the method's preset, the dataset, the precision).

    Raises:
        TrainError: a bad config file or command line (one line).
    """
    args_config, remaining = config_parser.parse_known_args(argv)
    config = read_config_file(args_config.config) if args_config.config else []
    return parser.parse_args(config + remaining)


# -- checks, for values from either source --------------------------------------------------------------------------
def _check_rules(v: Dict[str, Any]) -> None:
    for dest, names in FLAG_NAMES.items():
        value = v.get(dest)
        if value is None:
            continue
        names = list(names() if callable(names) else names)
        if (value.lower() if dest == 'opt' else value) not in names:
            close = difflib.get_close_matches(str(value), names, n=3, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ''
            shown = names if len(names) <= 12 else names[:12] + ['...']
            raise TrainError(f"{flag_name(dest)} {value!r} is unknown; choose one of {', '.join(map(repr, shown))}."
                             f"{hint}")
    for dest, rule in FLAG_RULES.items():
        value = v.get(dest)
        if value is None:
            continue
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        flag = flag_name(dest)
        if rule.count is not None and len(values) not in rule.count:
            n = ' or '.join(map(str, rule.count))
            raise TrainError(f'{flag} takes {n} number(s), got {len(values)}: {_show(value)}')
        for x in values:
            if not rule.accepts(float(x)):
                raise TrainError(f'{flag} {_show(value)}: must be finite and {rule.describe()}')


# -- method presets of the paper's comparison -----------------------------------------------------------------------
# Settings of the paper's comparison (Guo et al., 2021, Sec. 5): values used when the flag is not given.
METHOD_PRESETS: Dict[str, Dict[str, Any]] = {
    'erm': dict(drop=0.0, smoothing=0.0),
    'dropout': dict(drop=0.5, smoothing=0.0),
    'ls': dict(drop=0.0, smoothing=0.1),
    'mixup': dict(drop=0.0, smoothing=0.0, mixup=1.0),
    'alps': dict(drop=0.0, smoothing=0.0, alps_eps=0.3, alps_beta=[8.0, 2.0]),
}
_ALPS_FLAGS = ('alps_eps', 'alps_beta', 'alps_prob', 'alps_mode', 'alps_label')


def _resolve_method(v: Dict[str, Any]) -> None:
    """Resolve the method and fill flags left at None with its preset, refusing flags of another method.

    Without ``--method`` the method is ALPS, unless only MixUp/CutMix flags are given (then it is timm's MixUp), so
    timm users' ``--mixup 0.2`` keeps its meaning.
    """
    alps_given = [f for f in _ALPS_FLAGS if v[f] is not None]
    # 0 disables MixUp/CutMix (as in timm), so `--mixup 0` or a saved args.yaml with mixup: 0.0 is not a request.
    mixup_given = [f for f in ('mixup', 'cutmix') if v[f]] + (['cutmix_minmax'] if v['cutmix_minmax'] else [])
    if v['method'] is None:
        v['method'] = 'mixup' if mixup_given and not alps_given else 'alps'
    method = v['method']
    if alps_given and mixup_given:
        raise TrainError(f"{', '.join(map(flag_name, alps_given))} cannot be combined with "
                         f"{', '.join(map(flag_name, mixup_given))}: ALPS replaces MixUp/CutMix. Drop one of them.")
    if alps_given and method != 'alps':
        raise TrainError(f"{', '.join(map(flag_name, alps_given))} only apply to --method alps (got --method "
                         f"{method})")
    if mixup_given and method != 'mixup':
        raise TrainError(f"{', '.join(map(flag_name, mixup_given))} only apply to --method mixup (got --method "
                         f"{method}); ALPS has its own --alps-beta")
    if method == 'mixup' and mixup_given:  # `--cutmix 1` alone means CutMix only, not CutMix plus the preset's MixUp
        for f in ('mixup', 'cutmix'):
            if v[f] is None:
                v[f] = 0.0
    for k, value in METHOD_PRESETS[method].items():
        if v[k] is None:
            v[k] = value
    defaults = dict(drop=0.0, smoothing=0.0, mixup=0.0, cutmix=0.0, alps_eps_warmup_epochs=0.0)
    if method == 'alps':
        # Not the paper's: ramping eps in over the first epoch removes the ALPS start stall at no measured cost at
        # convergence; --alps-eps-warmup-epochs 0 is the paper's ALPS.
        defaults.update(alps_prob=1.0, alps_mode='elem', alps_label='fused', alps_eps_warmup_epochs=1.0)
    for k, value in defaults.items():
        if v[k] is None:
            v[k] = value
    if method == 'mixup' and v['mixup'] == 0 and v['cutmix'] == 0 and v['cutmix_minmax'] is None:
        raise TrainError('--method mixup needs --mixup ALPHA > 0 or --cutmix ALPHA > 0')


def _check_combinations(v: Dict[str, Any]) -> None:
    """Checks that involve more than one flag (after the method's preset)."""
    for dest in ('cutmix_minmax', 'scale', 'ratio'):
        r = v[dest]
        if r is not None and (r[0] >= r[1] if dest == 'cutmix_minmax' else r[0] > r[1]):
            raise TrainError(f'{flag_name(dest)} {_show(r)}: the first value (min) must be below the second (max)')
    m = v['decay_milestones']
    if m and any(b <= a for a, b in zip(m, m[1:])):
        raise TrainError(f'--decay-milestones {_show(m)}: must be strictly increasing')
    if v['sched'] in ('step', 'multistep', 'plateau') and v['decay_rate'] > 1:
        raise TrainError(f"--decay-rate {v['decay_rate']}: with --sched {v['sched']} it multiplies the LR at each "
                         f"decay and must be in (0, 1]")
    for dest in ('bce_target_thresh', 'bce_pos_weight'):
        if v[dest] is not None and not v['bce_loss']:
            raise TrainError(f'{flag_name(dest)} only applies with --bce-loss')
    for dest in ('mixup_prob', 'mixup_switch_prob', 'mixup_mode'):
        if v['method'] != 'mixup' and v[dest] != parser.get_default(dest):
            raise TrainError(f"{flag_name(dest)} only applies to --method mixup (got --method {v['method']}); "
                             f"ALPS has --alps-prob and --alps-mode")
    for dest, method in (('alps_off_epoch', 'alps'), ('alps_eps_warmup_epochs', 'alps'),
                         ('mixup_off_epoch', 'mixup')):
        if v[dest] and v['method'] != method:
            raise TrainError(f"{flag_name(dest)} only applies to --method {method} (got --method {v['method']})")
    alps_epochs = min(v['epochs'], v['alps_off_epoch'] or v['epochs'])  # epochs trained with ALPS
    if v['alps_eps_warmup_epochs'] > alps_epochs:
        ends = f'--alps-off-epoch {alps_epochs}' if alps_epochs < v['epochs'] else f'--epochs {alps_epochs}'
        raise TrainError(f"--alps-eps-warmup-epochs {v['alps_eps_warmup_epochs']:g}: the ramp would not reach "
                         f"--alps-eps before ALPS ends ({ends}); use at most {alps_epochs}")
    if v['aa']:
        from timm.data import create_transform
        try:
            # timm's RandAugment parser skips sections without a number ('rand-zz'); here they are errors.
            loose = [c for c in v['aa'].split('-')[1:] if not re.fullmatch(r'[a-z]+\d[\d.]*', c) and not
                     (v['aa'].startswith('rand') and c.startswith('t'))]
            if loose:
                raise ValueError(f'unknown section(s) {", ".join(loose)}')
            create_transform(32, is_training=True, auto_augment=v['aa'])
        except Exception as e:  # timm's policy parsers raise AssertionError/KeyError/ValueError
            raise TrainError(f"--aa {v['aa']!r} is not a timm augmentation policy ({type(e).__name__}: {e}); e.g. "
                             f"rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, v0") from None
    if v['loader'] == 'fast':
        for dest, unset in TIMM_LOADER_FLAGS.items():
            if v[dest] != unset:
                raise TrainError(f"{flag_name(dest)} needs timm's loader, but --loader fast was given: use "
                                 f"--loader timm (or auto)")
    if v['loader'] == 'timm' and v['crop_pad'] is not None:
        raise TrainError("--crop-pad is the fast loader's pad-and-crop; timm's loader crops with --scale/--ratio")
    if not timm.is_model(v['model']):
        close = difflib.get_close_matches(v['model'], timm.list_models(), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ' See timm.list_models().'
        raise TrainError(f"unknown model '{v['model']}'.{hint}")
    if v['resume'] == 'auto' and not v['experiment']:
        raise TrainError("--resume auto needs --experiment NAME (and --output if not the default): the folder of the "
                         "run to continue")


# -- what the user left open: dataset, precision ---------------------------------------------------------------------
def _resolve_dataset(v: Dict[str, Any]) -> None:
    """Default to the bundled subset and its evaluation split; check that a given dataset path and split exist."""
    if v['data_dir'] is None and v['dataset'] is None:
        v['data_dir'], v['dataset'] = str(alps_data.BUNDLED_DATA_DIR), 'wds/cifar10_subset'
    v['dataset'] = v['dataset'] or ''
    if not v['data_dir']:
        raise TrainError(
            f"--dataset {v['dataset']} needs --data-dir DIR: the folder that holds it, or for a torch/ dataset with "
            f"--dataset-download the folder to download it into; omit --dataset for the bundled subset.")
    needs_dir = not (v['dataset'].startswith('torch/') and v['dataset_download'])
    if needs_dir and not os.path.exists(v['data_dir']):
        raise TrainError(
            f"dataset folder '{v['data_dir']}' does not exist. Create webdataset shards with "
            f"`python -m timm_alps.data --help` (e.g. from a CIFAR .npz or an image folder), use "
            f"--dataset torch/cifar10 --dataset-download, or omit --data-dir/--dataset for the bundled subset.")
    try:
        if v['val_split'] is None:
            v['val_split'] = alps_data.default_eval_split(v['dataset'], v['data_dir'])
        info = alps_data.read_info(v['data_dir']) if v['dataset'].startswith('wds/') else None
    except (OSError, ValueError) as e:
        raise TrainError(f"could not read the _info.json of '{v['data_dir']}': {e}") from None
    splits = (info or {}).get('splits')
    for dest in ('train_split', 'val_split'):
        if splits and v[dest] not in splits:
            raise TrainError(f"{flag_name(dest)} {v[dest]!r}: '{v['data_dir']}' has the splits "
                             f"{', '.join(map(repr, splits))}")


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


def resolve_precision(amp: Optional[bool], amp_dtype: Optional[str], channels_last: Optional[bool],
                      device_type: str) -> Tuple[bool, str, bool]:
    """(amp, amp_dtype, channels_last) with the unset (None) ones filled: bf16 autocast + channels_last on CPUs with
    native bf16, fp32 elsewhere; float16 autocast on GPUs when --amp is given (timm's default)."""
    if amp_dtype is None:
        amp_dtype = 'bfloat16' if device_type == 'cpu' else 'float16'
    if amp is None:
        amp = device_type == 'cpu' and cpu_has_native_bf16()
    if channels_last is None:
        channels_last = bool(amp and device_type == 'cpu' and amp_dtype == 'bfloat16')
    return amp, amp_dtype, channels_last


# -- the frozen result ----------------------------------------------------------------------------------------------
class Config(argparse.Namespace):
    """The resolved flags of a run (every flag, user value or resolved default): read-only.

    It is an `argparse.Namespace` so timm's helpers (`optimizer_kwargs`, `scheduler_kwargs`, `resolve_data_config`)
    read it as they read timm's own args; lists are tuples and mappings read-only, so nothing can change it.
    """

    def __init__(self, **values: Any):
        self.__dict__.update({k: _frozen(v) for k, v in values.items()})

    def __setattr__(self, name: str, value: Any):
        raise AttributeError(f'Config is read-only ({name}); resolve_config makes a new one')

    def __delattr__(self, name: str):
        raise AttributeError(f'Config is read-only ({name})')

    def to_dict(self) -> Dict[str, Any]:
        """Plain Python values (lists, dicts), e.g. for args.yaml."""
        def plain(v):
            if isinstance(v, tuple):
                return [plain(x) for x in v]
            if isinstance(v, types.MappingProxyType):
                return {k: plain(x) for k, x in v.items()}
            return v
        return {k: plain(v) for k, v in vars(self).items()}


def _frozen(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_frozen(x) for x in v)
    if isinstance(v, dict):
        return types.MappingProxyType({k: _frozen(x) for k, x in v.items()})
    return v


def resolve_config(args: argparse.Namespace) -> Config:
    """Check every value and fill what the user left open; the one place a run's configuration is decided.

    Args:
        args: from `parse_args` (not changed).

    Raises:
        TrainError: the message names the flag and the accepted values.
    """
    v = dict(vars(args))
    _check_rules(v)
    _resolve_method(v)
    _check_rules(v)  # the preset's values too
    _check_combinations(v)
    _resolve_dataset(v)
    device_type = torch.device(v['device']).type if v['device'] else 'cuda' if torch.cuda.is_available() else 'cpu'
    v['device'] = v['device'] or device_type
    v['amp'], v['amp_dtype'], v['channels_last'] = resolve_precision(v['amp'], v['amp_dtype'], v['channels_last'],
                                                                     device_type)
    return Config(**v)

