""" Reproduce the ALPS paper's Tables 2, 3, 5 and 6: plan the runs, train and attack them, write the tables

    python -m benchmarks.reproduce --preset smoke             # every method, bundled subset, 1 epoch (minutes, CPU)
    python -m benchmarks.reproduce --preset cpu-converged --jobs 2 --threads 1
    python -m benchmarks.reproduce --preset paper --dry-run   # print the exact training commands
    python -m benchmarks.reproduce --preset cpu --sweep eps=0.1,0.2,0.3,0.4 --seeds 0

Each (dataset, model, method, seed) is one `train_timm.py` run with the preset's recipe, in
`<runs-dir>/<preset>/<dataset>-<model>-e<epochs>/<method>-s<seed>/`, launched as a subprocess by a pool of --jobs
worker processes. A finished run is skipped, an interrupted one continued with `--resume auto`. The worker that
trained a run then attacks it (white-box) through the library's protocol (`timm_alps.attacks.evaluate_robustness`,
on the seeded class-balanced subsets `python -m benchmarks.robustness --max-samples N` uses); once all are in, each
model is attacked with examples crafted on the ERM model of the next seed (black-box, `transfer_attack`). Results
are cached per run in `eval.json`.

`<results-dir>/<preset>/runs.csv` is the durable record: one row per run with every metric of the table, its
curves, command and machine. A report merges the runs found on disk into it (a run on disk replaces its own row only
when it has at least the results the row has) and regenerates from it `table.md` / `table.csv` (mean +- std over
seeds beside the paper's numbers, the paper's claims with noise verdicts), `curves.png`, `eps.png`, `commands.md`
and `environment.json`; rows whose runs are not on disk (another machine, a deleted ./runs) are kept as recorded.
"""
import argparse
import csv
import hashlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks import reproduce_report as report
from benchmarks.reproduce_report import (METHOD_LABELS, eps_hypothesis, eps_table, goal_checks,  # noqa: F401
                                         table_metrics)

REPO = Path(__file__).resolve().parent.parent
METHODS = report.METHODS
DEFAULT_METHODS = METHODS[:5]  # the paper's comparison; presets that want the ramp arm name it
ALPS_METHODS = ('alps', 'alps-ramp')  # runs that take the preset's ALPS setting (alps_eps, alps_beta)
LAUNCH_ORDER = ('erm', 'mixup', 'alps', 'ls', 'dropout', 'alps-ramp')  # ERM first: the black-box source
METHOD_ARGS: Dict[str, List[str]] = {
    'erm': ['--method', 'erm'],
    'dropout': ['--method', 'dropout', '--drop', '0.5'],
    'ls': ['--method', 'ls', '--smoothing', '0.1'],
    'mixup': ['--method', 'mixup', '--mixup', '1.0'],
    'alps': ['--method', 'alps', '--alps-eps-warmup-epochs', '0'],  # the paper's ALPS: no eps ramp
    'alps-ramp': ['--method', 'alps', '--alps-eps-warmup-epochs', '1'],  # eps ramped in over the first epoch
}
# training flags the runner decides, since its plan, its resume and its tables are keyed on them: --train-arg may
# change any other flag (a variant of the recipe, recorded in each run's command), never these; value: how to ask
RUNNER_FLAGS = {'epochs': '--epochs', 'seed': '--seeds', 'model': '--models', 'num_classes': '--datasets',
                'dataset': '--data', 'data_dir': '--data', 'output': '--runs-dir', 'experiment': '--runs-dir',
                'method': '--methods', 'alps_eps': '--sweep eps=...', 'alps_beta': '--sweep beta=...',
                'max_train_samples': 'another preset', 'max_eval_samples': 'another preset',
                'resume': 'running the same command again', 'overwrite': 'another --runs-dir'}
EPS_PIXELS, PGD_STEPS, UNBOUNDED_STEP = 4 / 255, 10, 0.01  # the paper's L-inf radius; PGD-10 step eps/4
EVAL_SEED = report.EVAL_SEED  # seed of the evaluation subsets (timm_alps.data.subset_indices)
EVAL_PROTOCOL = 2  # bump when the evaluation changes: cached eval.json files of another protocol are recomputed

# `data`: dataset -> default source (an .npz, a shard folder or 'bundled'). `milestones`: fractions of `epochs` done
# when the LR is divided by 10. `eval`: attack-suite sizes, each N class-balanced test images (clean error on
# `clean_samples`, FGSM/PGD on `samples`, APGD-CE, the unbounded check, the eps curve, AutoAttack at `autoattack_eps`
# /255 on their `*_samples`; `autoattack_steps` / `_queries` below 100 / 5000 are not the standard version);
# `normalised_eps` adds the paper protocol with eps 4/255 in normalised-input units.
PRESETS: Dict[str, Dict[str, Any]] = {
    'smoke': dict(
        description='every method on a few hundred bundled images for 1 epoch: the pipeline end to end',
        data={'cifar10': 'bundled'}, models=('preact_resnet18_w16',),
        epochs=1, milestones=(0.5, 0.75), batch_size=64, lr=0.05, seeds=(0,), alps_eps=0.3, alps_beta=(8.0, 2.0),
        max_train_samples=256, max_eval_samples=128, train_args=['--channels-last'],
        eval=dict(clean_samples=128, samples=16, batch_size=32, apgd_samples=8, apgd_steps=3, unbounded_samples=8,
                  unbounded_steps=5, curve_samples=8, curve_eps=(2, 8), autoattack_samples=8,
                  autoattack_eps=(8,), autoattack_steps=2, autoattack_queries=10, normalised_eps=True),
    ),
    'cpu': dict(
        description='CIFAR-10, width-16 PreActResNet18, the paper recipe with its two /10 steps compressed to '
                    'the epoch budget (at 1/3 and 2/3); sized for about 2.5 h on 2 CPU cores',
        data={'cifar10': '../shared/data/cifar10.npz'}, models=('preact_resnet18_w16',),
        epochs=6, milestones=(1 / 3, 2 / 3), batch_size=128, lr=0.1, seeds=(0, 1),
        opt='sgd',  # timm's Nesterov `sgd`: what the committed cpu results were trained with (the paper: classical)
        alps_eps=0.3, alps_beta=(8.0, 2.0), max_train_samples=None, max_eval_samples=2000,
        train_args=['--channels-last'],
        eval=dict(clean_samples=10000, samples=500, batch_size=250, apgd_samples=100, apgd_steps=25,
                  unbounded_samples=50, unbounded_steps=50, curve_samples=100, curve_eps=(1, 2, 4, 8),
                  autoattack_samples=100, autoattack_eps=(8, 4)),
    ),
    'cpu-converged': dict(
        description='CIFAR-10, width-16 PreActResNet18 (w32, or the narrow VGG16 vgg16_cifar_w24, with --models) '
                    'trained to convergence on CPU: the paper '
                    'recipe (batch 128, SGD 0.1 classical momentum 0.9, wd 1e-4, /10 at 1/2 and 3/4 of the epochs) '
                    'over 60 epochs (--epochs to change), a 1-epoch linear LR warm-up per update for every method '
                    '(ALPS stalls at LR 0.1 from step 0 at some seeds, see results/cpu-alps-warmup); ERM, MixUp '
                    '(alpha 1), ALPS (Beta(8, 2), '
                    'eps 0.3) and ALPS with eps ramped in over the first epoch (the start-stall remedy) x 2 seeds, '
                    'label smoothing and Dropout with --methods',
        data={'cifar10': '../shared/data/cifar10.npz'}, models=('preact_resnet18_w16',),
        methods=('erm', 'mixup', 'alps', 'alps-ramp'),
        epochs=60, milestones=(0.5, 0.75), batch_size=128, lr=0.1, seeds=(0, 1), opt='momentum', warmup_epochs=1,
        alps_eps=0.3, alps_beta=(8.0, 2.0), max_train_samples=None, max_eval_samples=2000,
        # the LR warm-up per update (linear over the first epoch), not timm's per-epoch default
        train_args=['--channels-last', '--sched-on-updates'],
        eval=dict(clean_samples=10000, samples=1000, batch_size=250, apgd_samples=500, apgd_steps=100,
                  unbounded_samples=200, unbounded_steps=200, curve_samples=500, curve_eps=(1, 2, 4, 8),
                  autoattack_samples=500, autoattack_eps=(8, 4), normalised_eps=True),
    ),
    'paper': dict(
        description='the paper recipe: 200 epochs, batch 128, SGD 0.1 momentum 0.9, /10 at 100 and 150, wd 1e-4, '
                    'crop+flip; PreActResNet18 and VGG16 on CIFAR-10 and CIFAR-100 (GPU: bf16, channels_last, '
                    'data on the GPU)',
        data={'cifar10': '../shared/data/cifar10.npz', 'cifar100': '../shared/data/cifar100.npz'},
        models=('preact_resnet18', 'vgg16_cifar'),
        epochs=200, milestones=(0.5, 0.75), batch_size=128, lr=0.1, seeds=(0, 1, 2),
        alps_eps=0.3, alps_beta=(8.0, 2.0), max_train_samples=None, max_eval_samples=None,
        train_args=['--channels-last', '--amp', '--amp-dtype', 'bfloat16', '--loader', 'fast'],
        eval=dict(clean_samples=10000, samples=10000, batch_size=1000, apgd_samples=1000, apgd_steps=100,
                  unbounded_samples=500, unbounded_steps=200, curve_samples=2000, curve_eps=(1, 2, 4, 8),
                  autoattack_samples=1000, autoattack_eps=(8, 4), normalised_eps=True),
    ),
}
NUM_CLASSES = {'cifar10': 10, 'cifar100': 100}


def get_preset(name: str, epochs: Optional[int] = None, seeds: Optional[Sequence[int]] = None,
               methods: Optional[Sequence[str]] = None, models: Optional[Sequence[str]] = None,
               datasets: Optional[Sequence[str]] = None, train_args: Sequence[str] = ()) -> Dict[str, Any]:
    """A copy of preset `name` with the command-line overrides applied.

    Args:
        models: any model timm_alps.models registers with timm (the CIFAR family), in place of the preset's.
        datasets: a subset of the preset's datasets.
        train_args: appended to every training command.

    Raises:
        ValueError: unknown preset, method, model or dataset; epochs < 1.
    """
    if name not in PRESETS:
        raise ValueError(f'unknown preset {name!r}; choose one of {", ".join(PRESETS)}')
    preset = dict(PRESETS[name], name=name, eval=dict(PRESETS[name]['eval']))
    if epochs is not None:
        if epochs < 1:
            raise ValueError(f'--epochs must be >= 1, got {epochs}')
        preset['epochs'] = epochs
    if seeds is not None:
        preset['seeds'] = tuple(seeds)
    chosen = tuple(methods) if methods else tuple(preset.get('methods', DEFAULT_METHODS))
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise ValueError(f'unknown method(s) {unknown}; choose from {", ".join(METHODS)}')
    preset['methods'] = tuple(sorted(set(chosen), key=METHODS.index))
    if models:
        import timm
        import timm_alps.models as family  # the CIFAR models, registered with timm on import
        offered = [m for m in timm.list_models() if m in vars(family)]
        unknown = [m for m in models if m not in offered]
        if unknown:
            raise ValueError(f'preset {name!r} has no model(s) {unknown}; it trains the CIFAR models of '
                             f'timm_alps.models: {", ".join(offered)}')
        preset['models'] = tuple(dict.fromkeys(models))
    if datasets:
        unknown = [d for d in datasets if d not in preset['data']]
        if unknown:
            raise ValueError(f'preset {name!r} has no dataset(s) {unknown}; it has {", ".join(preset["data"])}')
        preset['data'] = {k: v for k, v in preset['data'].items() if k in datasets}
    preset['train_args'] = list(preset.get('train_args', ())) + list(train_args)
    return preset


def milestones(preset: Dict[str, Any]) -> List[int]:
    """timm `--decay-milestones` for the preset: the 1-based epochs from which each lower LR applies (the paper
    divides once 100 and 150 of 200 epochs are done; timm applies milestone m from 1-based epoch m on)."""
    e = preset['epochs']
    return sorted({min(max(1, math.floor(f * e + 0.5)) + 1, e) for f in preset['milestones']})


def parse_sweep(spec: str) -> Tuple[str, List[Tuple[str, Dict[str, Any]]]]:
    """`eps=0.1,0.2` or `beta=0.8,0.875` (modes of Beta(a, 2)) or `beta=8:2,4:1.5` (a:b pairs).

    Returns:
        (name, [(tag, ALPS settings)]), e.g. ('eps', [('eps0.1', {'alps_eps': 0.1}), ...]).

    Raises:
        ValueError: unknown sweep name or a value outside its range.
    """
    name, _, values = spec.partition('=')
    name, items = name.strip(), [v.strip() for v in values.split(',') if v.strip()]
    if name not in ('eps', 'beta'):
        raise ValueError(f'--sweep takes eps=V1,V2,... or beta=V1,V2,..., got {spec!r}')
    if not items:
        raise ValueError(f'--sweep {name}= has no values')
    out = []
    for v in items:
        try:
            nums = [float(t) for t in v.split(':')]
        except ValueError:
            raise ValueError(f'--sweep {name}: {v!r} is not a number (or, for beta, a:b)') from None
        if name == 'eps':
            if len(nums) != 1 or not 0 < nums[0] <= 2:
                raise ValueError(f'--sweep eps values must lie in (0, 2] (the L1 radius), got {v}')
            out.append((f'eps{nums[0]:g}', {'alps_eps': nums[0]}))
            continue
        if len(nums) == 1:
            if not 0.5 < nums[0] < 1:
                raise ValueError(f'--sweep beta mode must lie in (0.5, 1), got {v}; or give a:b pairs such as 8:2')
            nums = [1.0 / (1.0 - nums[0]), 2.0]  # the mode of Beta(a, 2) is (a - 1) / a
        if len(nums) != 2 or min(nums) <= 0:
            raise ValueError(f'--sweep beta takes modes in (0.5, 1) or a:b pairs with a, b > 0, got {v}')
        out.append((f'beta{nums[0]:g}-{nums[1]:g}', {'alps_beta': tuple(nums)}))
    tags = [tag for tag, _ in out]
    twice = sorted({tag for tag in tags if tags.count(tag) > 1})
    if twice:
        raise ValueError(f'--sweep {spec!r} gives the same setting more than once ({", ".join(twice)})')
    return name, out


# -- planning ----------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One training run and where it lives."""
    dataset: str
    model: str
    method: str
    seed: int
    tag: str = ''  # sweep tag ('' for the main comparison)
    alps: Dict[str, Any] = field(default_factory=dict)
    group_dir: Path = Path('.')

    @property
    def name(self) -> str:
        return f'{self.method}{"-" + self.tag if self.tag else ""}-s{self.seed}'

    @property
    def group(self) -> str:
        return f'{self.dataset}-{self.model}'

    @property
    def dir(self) -> Path:
        return self.group_dir / self.name

    @property
    def log_path(self) -> Path:  # beside the run folder: train_timm.py refuses a folder that holds files
        return self.group_dir / f'{self.name}.log'

    @property
    def meta_path(self) -> Path:  # the command and each launch of it (time, machine, runner call)
        return self.group_dir / f'{self.name}.reproduce.json'


def plan_runs(preset: Dict[str, Any], runs_dir: Path, sweep: Optional[str] = None) -> List[Run]:
    """Runs in launch order: per group the ERM models of the first two seeds (black-box sources), then seed by seed
    in `LAUNCH_ORDER`. A sweep trains ALPS at each setting (the preset's own setting is the main `alps` run)."""
    runs = []
    default = dict(alps_eps=preset['alps_eps'], alps_beta=tuple(preset['alps_beta']))
    settings = parse_sweep(sweep)[1] if sweep else None
    for dataset in preset['data']:
        for model in preset['models']:
            gdir = runs_dir / preset['name'] / f'{dataset}-{model}-e{preset["epochs"]}'
            group = []
            for seed in preset['seeds']:
                if settings is None:
                    group += [Run(dataset, model, m, seed, alps=dict(default) if m in ALPS_METHODS else {},
                                  group_dir=gdir) for m in sorted(preset['methods'], key=LAUNCH_ORDER.index)]
                for tag, setting in settings or ():
                    alps = dict(default, **setting)
                    group.append(Run(dataset, model, 'alps', seed, '' if alps == default else tag, alps, gdir))
            first = [r for r in group if r.method == 'erm' and r.seed in preset['seeds'][:2]] \
                if settings is None and len(preset['seeds']) > 1 else []
            runs += first + [r for r in group if r not in first]
    return runs


def resolve_data(preset: Dict[str, Any], data_args: Sequence[str]) -> Dict[str, str]:
    """dataset -> data source, from the preset and `--data [DATASET=]PATH` overrides.

    Raises:
        ValueError: a bare PATH for a preset with several datasets, or an unknown dataset name.
    """
    data, given = dict(preset['data']), set()
    for item in data_args or ():
        key, path = item.split('=', 1) if '=' in item and not os.path.exists(item) else (None, item)
        if key is None and len(data) != 1:
            raise ValueError(f'preset {preset["name"]!r} trains on {", ".join(data)}: pass --data DATASET=PATH')
        if key is not None and key not in data:
            raise ValueError(f'--data {item!r}: preset {preset["name"]!r} has no dataset {key!r} '
                             f'(it has {", ".join(data)})')
        key = key or next(iter(data))
        if key in given:
            raise ValueError(f'--data gives {key} twice; pass one source per dataset')
        given.add(key)
        data[key] = path
    return {k: v if v == 'bundled' or os.path.isabs(v) else str((REPO / v).resolve()) for k, v in data.items()}


def prepare_data(source: str, dataset: str, runs_dir: Path, dry_run: bool = False) -> Tuple[str, str, List[str]]:
    """(data_dir, timm dataset name, converter command) for `source`: the bundled subset, a shard folder, or an npz
    converted once to shards under `<runs_dir>/data/`."""
    from timm_alps.data import BUNDLED_DATA_DIR, read_info
    if source == 'bundled':
        return str(BUNDLED_DATA_DIR), 'wds/cifar10_subset', []
    src = Path(source)
    info = read_info(src) if src.is_dir() else None
    if info is not None:
        return str(src), f'wds/{info.get("name", dataset)}', []
    if not src.is_dir() and src.suffix != '.npz':
        raise ValueError(f'data source {source!r} is neither a shard folder, an .npz, a folder the converter reads '
                         f'(torchvision CIFAR files, an image folder), nor "bundled"')
    out = runs_dir / 'data' / f'{dataset}-{src.stem}-{hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:8]}'
    cmd = [sys.executable, '-m', 'timm_alps.data', str(src), str(out), '--name', dataset]
    if not (out / '_info.json').is_file() and not dry_run:
        if not src.exists():
            raise FileNotFoundError(f'{dataset} data {str(src)!r} does not exist; pass --data PATH (an .npz with '
                                    f'x_train/y_train/x_test/y_test, or a shard folder from '
                                    f'`python -m timm_alps.data`)')
        print(f'[reproduce] converting {src} -> {out}', flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)
    return str(out), f'wds/{dataset}', cmd


def train_command(run: Run, preset: Dict[str, Any], data_dir: str, dataset_name: str,
                  python: str = sys.executable) -> List[str]:
    """The exact `train_timm.py` command of `run` (without `--resume`)."""
    cmd = [python, str(REPO / 'train_timm.py'), '--data-dir', data_dir, '--dataset', dataset_name,
           '--model', run.model, '--num-classes', str(NUM_CLASSES[run.dataset]),
           '-b', str(preset['batch_size']), '--epochs', str(preset['epochs']),
           '--opt', preset.get('opt', 'momentum'), '--lr', str(preset['lr']), '--momentum', '0.9',
           '--weight-decay', '1e-4', '--sched', 'multistep', '--decay-milestones', *map(str, milestones(preset)),
           '--decay-rate', '0.1', '--warmup-epochs', str(preset.get('warmup_epochs', 0)),
           '--seed', str(run.seed), '--output', str(run.group_dir), '--experiment', run.name,
           '--checkpoint-hist', '1', '--no-progress', '--log-interval', '100', *METHOD_ARGS[run.method]]
    if run.method in ALPS_METHODS:
        a, b = run.alps['alps_beta']
        cmd += ['--alps-eps', f'{run.alps["alps_eps"]:g}', '--alps-beta', f'{a:g}', f'{b:g}']
    for key in ('max_train_samples', 'max_eval_samples'):
        if preset.get(key):
            cmd += [f'--{key.replace("_", "-")}', str(preset[key])]
    return cmd + list(preset.get('train_args', ()))


def check_command(run: Run, cmd: Sequence[str], n_extra: int = 0) -> None:
    """train_timm.py's own checks of `cmd` (flags, ranges, combinations; the data folder once it exists), so that a
    bad --train-arg or preset is refused before any run starts; and the last `n_extra` words (the user's
    --train-arg) may not change a flag in `RUNNER_FLAGS`.

    Raises:
        ValueError: naming the run and what is refused.
    """
    from timm_alps.train.config import flag_name, parse_args, resolve_config
    from timm_alps.train.errors import TrainError
    try:
        args = parse_args(list(cmd[2:]))
        if args.data_dir and os.path.isdir(args.data_dir):
            resolve_config(args)
    except TrainError as e:
        raise ValueError(f'train_timm.py refuses the command of {run.group}/{run.name}: {e}') from None
    if n_extra:
        core = vars(parse_args(list(cmd[2:len(cmd) - n_extra])))
        for dest, how in RUNNER_FLAGS.items():
            if getattr(args, dest) != core[dest]:
                raise ValueError(f'--train-arg changes {flag_name(dest)} ({core[dest]!r} -> {getattr(args, dest)!r}), '
                                 f'which the runner decides: use {how}')


def recipe(cmd: Sequence[str]) -> List[str]:
    """What a training command trains: its arguments without the interpreter, the script and the paths (data and
    output may move between machines)."""
    out = list(cmd[2:])
    for flag in ('--data-dir', '--output'):
        if flag in out:
            out[out.index(flag) + 1] = '*'
    return out


# -- one run: train, then attack --------------------------------------------------------------------------------------
def _summary(run_dir: Path) -> List[Dict[str, str]]:
    """summary.csv, the last row of each epoch (a resumed run may repeat one)."""
    if not (run_dir / 'summary.csv').is_file():
        return []
    with open(run_dir / 'summary.csv', newline='') as f:
        rows = {int(r['epoch']): r for r in csv.DictReader(f) if r.get('epoch', '').strip().isdigit()}
    return [rows[e] for e in sorted(rows)]


def run_status(run: Run, preset: Dict[str, Any]) -> str:
    """'finished' (last.pth.tar after the last epoch and a summary row per epoch), 'partial' (a checkpoint to resume)
    or 'missing'."""
    path = run.dir / 'last.pth.tar'
    if path.is_file():
        from timm_alps.checkpoint import CheckpointError, load_training_checkpoint
        try:
            ckpt = load_training_checkpoint(str(path))
            done = int(ckpt['epoch']) + (ckpt.get('batch_idx') is None)  # a mid-epoch checkpoint: epoch not done
            if done >= preset['epochs'] and len(_summary(run.dir)) >= preset['epochs']:
                return 'finished'
        except CheckpointError as e:
            print(f'[reproduce] {path} is not usable ({e}); the run counts as interrupted', flush=True)
    return 'partial' if any(run.dir.glob('*.pth.tar')) else 'missing'


def _meta(run: Run) -> Dict[str, Any]:
    return json.loads(run.meta_path.read_text()) if run.meta_path.is_file() else {}


def _write_json(path: Path, obj: Dict[str, Any]) -> None:
    tmp = path.with_name(path.name + '.part')
    tmp.write_text(json.dumps(obj, indent=1) + '\n')
    os.replace(tmp, path)


_CHILD: Optional[subprocess.Popen] = None  # this worker's training process
_STOPPING = False  # set by the first SIGINT / SIGTERM a worker gets: it starts nothing more


def _on_signal(signum, frame) -> None:
    """A worker's SIGINT / SIGTERM: forward one SIGINT to the training process (it checkpoints and exits; a second
    one would kill it), or stop an evaluation (it leaves no result; the next call redoes it)."""
    global _STOPPING
    first, _STOPPING = not _STOPPING, True
    if _CHILD is not None and _CHILD.poll() is None:
        if first:
            _CHILD.send_signal(signal.SIGINT)
    else:
        raise KeyboardInterrupt


def _init_worker(threads: Optional[int]) -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _on_signal)
    if threads:
        import torch
        torch.set_num_threads(threads)


def train(run: Run, cmd: List[str], preset: Dict[str, Any], deadline: Optional[float] = None,
          stop_at_deadline: bool = False, threads: Optional[int] = None, invocation: str = '') -> str:
    """Train `run` to completion (resuming it if it has a checkpoint); returns its status afterwards.

    Raises:
        ValueError: the run was started with another recipe (remove its folder or use another --runs-dir).
    """
    global _CHILD
    status = run_status(run, preset)
    if status == 'finished' or _STOPPING:
        return status
    if deadline is not None and time.time() > deadline:
        print(f'[reproduce] time budget spent: not launching {run.group}/{run.name}', flush=True)
        return status
    meta = _meta(run)
    core = recipe(cmd)[:len(cmd) - 2 - len(preset.get('train_args', ()))]  # the user's --train-arg may change
    if status == 'partial' and recipe(meta.get('command', cmd))[:len(core)] != core:
        raise ValueError(f'{run.dir} was started with another recipe ({shlex.join(meta["command"])}); delete '
                         f'that folder or pass another --runs-dir')
    full = cmd + (['--resume', 'auto'] if status == 'partial' else
                  ['--overwrite'] if run.dir.is_dir() and any(run.dir.iterdir()) else [])  # killed before a checkpoint
    from benchmarks.machine import machine_line
    slice_ = dict(start=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), seconds=None, rc=None,
                  resumed=status == 'partial', machine=machine_line(), threads=threads, invocation=invocation)
    meta.setdefault('command', cmd)
    meta.setdefault('slices', []).append(slice_)
    run.group_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run.meta_path, meta)  # the command is on record even if this process is killed
    print(f'[reproduce] {"resume" if status == "partial" else "train"} {run.group}/{run.name}', flush=True)
    env = dict(os.environ, **({'OMP_NUM_THREADS': str(threads), 'MKL_NUM_THREADS': str(threads)} if threads else {}))
    t0 = time.time()
    with open(run.log_path, 'a') as log:
        log.write(f'\n$ {shlex.join(full)}\n')
        log.flush()
        # a session of its own: a terminal's Ctrl-C reaches it once, through this worker (a second SIGINT kills)
        _CHILD = proc = subprocess.Popen(full, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        while True:
            try:
                rc = proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                if stop_at_deadline and deadline is not None and time.time() > deadline and not _STOPPING:
                    print(f'[reproduce] time budget reached: interrupting {run.name} (it will resume)', flush=True)
                    _on_signal(signal.SIGINT, None)
    _CHILD = None
    slice_.update(seconds=round(time.time() - t0, 1), rc=rc)
    _write_json(run.meta_path, meta)
    if rc not in (0, 128 + signal.SIGINT, -signal.SIGINT):
        tail = '\n  '.join(run.log_path.read_text().splitlines()[-15:])
        print(f'[reproduce] {run.name} failed (exit {rc}); last lines of {run.log_path}:\n  {tail}', flush=True)
    return run_status(run, preset)


def train_and_evaluate(run: Run, cmd: List[str], preset: Dict[str, Any], source: Optional[str],
                       deadline: Optional[float], stop_at_deadline: bool, threads: Optional[int],
                       invocation: str) -> str:
    """One pool task: train `run`, then (with a data `source`) attack the finished model white-box."""
    status = train(run, cmd, preset, deadline, stop_at_deadline, threads, invocation)
    if status == 'finished' and source is not None and not _STOPPING:
        evaluate(run, source, preset['eval'])
    return status


# -- evaluation: the library's protocol (timm_alps.attacks.evaluate_robustness / transfer_attack) ----------------------
def _device():
    import torch
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


@lru_cache(maxsize=2)
def _test_split(data_source: str):
    from timm_alps.data import load_split_tensors
    x, y, _ = load_split_tensors(data_source, 'test')
    return x, y.long()


def eval_batches(data_source: str, samples: int, batch_size: int, device):
    """`samples` class-balanced test images drawn with seed `EVAL_SEED`: the subsets `python -m benchmarks.robustness
    --max-samples N` (and train_timm.py's --max-eval-samples) evaluate."""
    from benchmarks.robustness import Batches, eval_subset
    x, y = _test_split(data_source)
    if samples < len(y):
        keep = eval_subset(y, samples, EVAL_SEED)
        x, y = x[keep], y[keep]
    return Batches(x, y, batch_size, device)


def paper_attacks(eps: float) -> Dict[str, Any]:
    """The paper's FGSM and PGD-10 (step eps/4, no random start) at radius `eps` (pixels)."""
    from timm_alps.attacks import fgsm, pgd
    return {'fgsm': partial(fgsm, eps=eps), 'pgd': partial(pgd, eps=eps, step_size=eps / 4, steps=PGD_STEPS)}


def normalised_eps(model) -> float:
    """The paper's 4/255 read as a radius in normalised-input units, expressed in pixels (4/255 times the model's
    mean input std): the radius of the `@norm` attack columns."""
    return float(EPS_PIXELS * model.std.mean())


def _attacks(model, ev: Dict[str, Any], full: bool = True) -> Dict[str, Dict[str, Any]]:
    """Subset size key (`samples`, `apgd_samples`, ...) -> attack name -> attack: the white-box suite (without
    `full`, only the paper's FGSM / PGD-10, which the black-box attack crafts on the source model)."""
    import torch
    from timm_alps.attacks import apgd_ce, unbounded_pgd
    norm = paper_attacks(normalised_eps(model)) if ev.get('normalised_eps') else {}
    sets = {'samples': dict(paper_attacks(EPS_PIXELS), **{f'{k}@norm': a for k, a in norm.items()})}
    if not full:
        return sets
    sets['apgd_samples'] = {'apgd-ce': partial(apgd_ce, eps=EPS_PIXELS, steps=ev['apgd_steps'],
                                               generator=torch.Generator(device=_device()).manual_seed(0))}
    sets['unbounded_samples'] = {'unbounded': partial(unbounded_pgd, steps=ev['unbounded_steps'],
                                                      step_size=UNBOUNDED_STEP)}
    sets['curve_samples'] = {f'pgd@{e}': paper_attacks(e / 255)['pgd'] for e in ev['curve_eps']}
    if ev.get('autoattack_samples'):
        from timm_alps.autoattack import AutoAttack
        sets['autoattack_samples'] = {f'autoattack@{e}': AutoAttack(
            e / 255, steps=ev.get('autoattack_steps', 100), n_queries=ev.get('autoattack_queries', 5000), seed=0)
            for e in ev['autoattack_eps']}
    return sets


def transfer_source(run: Run, seeds: Sequence[int]) -> Run:
    """The ERM model whose examples are `run`'s black-box attack: that of the next planned seed (cyclic), so every
    row is a transfer between independently trained models; with one seed, the same-seed ERM model."""
    seeds = list(seeds)
    seed = seeds[(seeds.index(run.seed) + 1) % len(seeds)] if run.seed in seeds else run.seed
    return Run(run.dataset, run.model, 'erm', seed, group_dir=run.group_dir)


def _eval_cache(run: Run, ev: Dict[str, Any]) -> Dict[str, Any]:
    """`<run>/eval.json` if it belongs to this checkpoint, settings and protocol, else a fresh record."""
    key = dict(json.loads(json.dumps(ev)), checkpoint_mtime=(run.dir / 'last.pth.tar').stat().st_mtime,
               protocol=EVAL_PROTOCOL)
    path = run.dir / 'eval.json'
    cached = json.loads(path.read_text()) if path.is_file() else {}
    return cached if cached.get('key') == key else dict(key=key, black={})


def _load_model(run: Run):
    from timm_alps.attacks import load_checkpoint_model
    return load_checkpoint_model(run.dir / 'last.pth.tar', _device())


def evaluate(run: Run, data_source: str, ev: Dict[str, Any]) -> Dict[str, Any]:
    """White-box errors (%) of `run`'s final model, cached in `<run>/eval.json`: clean error on `clean_samples`
    images, each attack set of `_attacks` on its own first-N subset."""
    from timm_alps.attacks import evaluate_robustness, gradient_masking_suspected
    result = _eval_cache(run, ev)
    if 'errors' in result:
        return result
    print(f'[reproduce] evaluating {run.group}/{run.name} (white-box)', flush=True)
    device, t0, name = _device(), time.time(), run.name
    model = _load_model(run)
    batches = partial(eval_batches, data_source, batch_size=ev['batch_size'], device=device)
    errors = {'clean': evaluate_robustness({name: model}, batches(ev['clean_samples']),
                                           progress=False).errors[name]['clean']}
    autoattack = {}
    for subset, attacks in _attacks(model, ev).items():
        res = evaluate_robustness({name: model}, batches(ev[subset]), attacks=attacks, progress=False)
        errors[f'clean@{subset}'] = res.errors[name]['clean']
        errors.update({k: v for k, v in res.errors[name].items() if k != 'clean'})  # 'white-box/<attack>'
        for key, attack in attacks.items():
            if key.startswith('autoattack'):
                aa = attack.result(model)
                autoattack[key] = dict(acc_after={a: aa.acc_after(a) for a in aa.robust}, flags=aa.flags,
                                       n_examples=aa.n_examples, seconds=round(sum(aa.seconds.values()), 1))
    unbounded = 100.0 - errors.pop('white-box/unbounded')
    curve = dict({'0': errors['clean@curve_samples']}, **{str(e): errors.pop(f'white-box/pgd@{e}')
                                                           for e in ev['curve_eps']})
    if ev.get('normalised_eps'):
        errors['eps_normalised_pixels'] = normalised_eps(model)
    result.update(errors=errors, unbounded_accuracy=unbounded, gradient_masking_suspected=gradient_masking_suspected(
        unbounded), pgd_curve=curve, autoattack=autoattack, device=str(device), started=round(t0, 1),
        seconds=round(time.time() - t0, 1))
    _write_json(run.dir / 'eval.json', result)
    return result


def evaluate_black_box(runs: Sequence[Run], preset: Dict[str, Any], sources: Dict[str, str]) -> None:
    """Black-box errors of every finished run that lacks them: FGSM / PGD-10 crafted once per ERM source model for
    all the runs it attacks (`transfer_attack`), stored in each run's eval.json under the source's name."""
    from timm_alps.attacks import transfer_attack
    ev, by_source = preset['eval'], {}
    for run in runs:
        source = transfer_source(run, preset['seeds'])
        if run_status(run, preset) == 'finished' and run_status(source, preset) == 'finished' \
                and source.name not in _eval_cache(run, ev)['black']:
            by_source.setdefault(str(source.dir), (source, []))[1].append(run)
    for source, targets in by_source.values():
        print(f'[reproduce] black-box examples crafted on {source.group}/{source.name} for '
              f'{", ".join(t.name for t in targets)}', flush=True)
        t0, src = time.time(), _load_model(source)
        res = transfer_attack(src, {t.name: _load_model(t) for t in targets},
                              eval_batches(sources[source.dataset], ev['samples'], ev['batch_size'], _device()),
                              _attacks(src, ev, full=False)['samples'], progress=False)
        for t in targets:
            result = _eval_cache(t, ev)
            result['black'][source.name] = dict({k: v for k, v in res.errors[t.name].items() if k != 'clean'},
                                                seconds=round(time.time() - t0, 1))
            _write_json(t.dir / 'eval.json', result)


def collect(run: Run, preset: Dict[str, Any]) -> Dict[str, Any]:
    """The runs.csv record of `run` from its folder (status, curves, every metric measured, command, machine)."""
    status, summary, meta = run_status(run, preset), _summary(run.dir), _meta(run)
    a, b = run.alps.get('alps_beta', ('', ''))
    rec = dict(group=run.group, dataset=run.dataset, model=run.model, method=run.method, tag=run.tag, seed=run.seed,
               run=run.name, alps_eps=run.alps.get('alps_eps', ''), alps_beta=f'{a:g} {b:g}' if run.alps else '',
               status=status, epochs=preset['epochs'], epochs_done=len(summary),
               command=shlex.join(meta['command']) if meta else '',
               train_seconds=round(sum(s['seconds'] or 0 for s in meta.get('slices', ()))),
               machine='; '.join(dict.fromkeys(s['machine'] for s in meta.get('slices', ()) if s.get('machine'))),
               invocations=list(dict.fromkeys(s['invocation'] for s in meta.get('slices', ()) if s.get('invocation'))),
               curve=[[int(r['epoch']) + 1, round(100.0 - float(r['eval_top1']), 4), float(r['train_loss'])]
                      for r in summary if r.get('eval_top1')])
    ips = [float(r['train_img_per_sec']) for r in summary if r.get('train_img_per_sec')]
    rec['train_img_per_sec'] = round(sum(ips) / len(ips)) if ips else ''
    if status != 'finished':
        return rec
    if rec['curve']:
        rec['clean'] = rec['curve'][-1][1]  # train_timm.py's last evaluation, until eval.json's
    path = run.dir / 'eval.json'
    ev = json.loads(path.read_text()) if path.is_file() else {}
    if 'errors' in ev:
        rec.update({k: v for k, v in ev['errors'].items() if k == 'clean' or k.startswith('white-box/')},
                   unbounded_accuracy=ev['unbounded_accuracy'], eval_seconds=ev['seconds'],
                   eval_protocol=ev.get('key', {}).get('protocol', ''),
                   gradient_masking_suspected=ev['gradient_masking_suspected'], pgd_curve=ev['pgd_curve'],
                   eps_normalised_pixels=ev['errors'].get('eps_normalised_pixels', ''),
                   autoattack_flags=' '.join(f'{flag}@{key.split("@")[1]}' for key, aa in ev['autoattack'].items()
                                             for flag, on in aa['flags'].items() if on))
        source = transfer_source(run, preset['seeds']).name
        black = ev.get('black', {}).get(source, {})
        rec.update({k: v for k, v in black.items() if k.startswith('black-box/')})
        rec['black_source'] = source if black else ''
    return rec


# -- main --------------------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m benchmarks.reproduce', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', required=True, choices=tuple(PRESETS))
    p.add_argument('--data', action='append', default=[], metavar='[DATASET=]PATH',
                   help='data source: an .npz (converted once to shards under <runs-dir>/data) or a shard folder; '
                        'DATASET= picks the dataset for presets with several')
    p.add_argument('--seeds', default=None, help='comma separated seeds (default: the preset\'s)')
    p.add_argument('--methods', default=None, help=f'comma separated subset of {",".join(METHODS)}')
    p.add_argument('--models', default=None, help='comma separated models of timm_alps.models (default: the '
                                                  'preset\'s), e.g. preact_resnet18_w32')
    p.add_argument('--datasets', default=None, help='comma separated subset of the preset\'s datasets')
    p.add_argument('--train-arg', action='append', default=[], metavar='FLAG',
                   help='extra train_timm.py argument(s), e.g. --train-arg=--torchcompile (repeat for several)')
    p.add_argument('--epochs', type=int, default=None, help='epoch budget override (milestones scale with it)')
    p.add_argument('--sweep', default=None, metavar='NAME=V1,V2',
                   help='ALPS sweep instead of the comparison: eps=0.1,0.2,0.3,0.4 or beta=0.8,0.875,0.9 (modes of '
                        'Beta(a, 2)) or beta=8:2,4:2; results in sweep-<name>.md / .csv / -runs.csv')
    p.add_argument('--runs-dir', default=str(REPO / 'runs'), help='checkpoints and logs (default: ./runs)')
    p.add_argument('--results-dir', default=str(REPO / 'benchmarks' / 'results'),
                   help='tables and figures go to <results-dir>/<preset>/')
    p.add_argument('--time-budget', type=float, default=None, metavar='MINUTES',
                   help='launch no training run after this many minutes; finished runs stay finished')
    p.add_argument('--stop-at-budget', action='store_true',
                   help='also interrupt the runs in progress at the budget (they checkpoint and resume later)')
    p.add_argument('--jobs', type=int, default=1, help='runs trained (and attacked) at once, one worker process '
                                                       'each (CPU: --jobs 2 --threads 1 uses 2 cores best)')
    p.add_argument('--threads', type=int, default=None, help='intra-op threads per training and evaluation process')
    p.add_argument('--dry-run', action='store_true', help='print the commands and the runs\' status, run nothing')
    p.add_argument('--no-eval', action='store_true', help='train only; the table shows clean error')
    p.add_argument('--report-only', action='store_true', help='only (re)write the results from runs.csv and the '
                                                              'runs on disk')
    args = p.parse_args(argv)
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        p.error(f'--jobs and --threads must be >= 1, got {args.jobs} and {args.threads}')
    if args.time_budget is not None and args.time_budget < 0:
        p.error(f'--time-budget must be >= 0 minutes, got {args.time_budget}')
    for name in ('seeds', 'methods', 'models', 'datasets'):  # comma separated lists: none empty, none repeated
        value = getattr(args, name)
        if value is None:
            continue
        items = [m.strip() for m in value.split(',') if m.strip()]
        if name == 'seeds':
            try:
                items = [int(m) for m in items]
            except ValueError:
                p.error(f'--seeds takes comma separated integers, got {value!r}')
        if not items:
            p.error(f'--{name} {value!r} names nothing; leave it out for the preset\'s {name}')
        twice = sorted({str(m) for m in items if items.count(m) > 1})
        if twice:
            p.error(f'--{name} {value!r} lists {", ".join(twice)} more than once')
        setattr(args, name, items)
    return args


def _stop_workers(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    deadline = t_start + 60 * args.time_budget if args.time_budget is not None else None
    invocation = 'python -m benchmarks.reproduce ' + shlex.join(argv if argv is not None else sys.argv[1:])
    runs_dir, results = Path(args.runs_dir).resolve(), Path(args.results_dir) / args.preset
    try:
        extra = [a for item in args.train_arg for a in shlex.split(item)]
        preset = get_preset(args.preset, args.epochs, args.seeds, args.methods, args.models, args.datasets, extra)
        runs = plan_runs(preset, runs_dir, args.sweep)
        data = resolve_data(preset, args.data)
        if preset['eval'].get('autoattack_samples') and not (args.no_eval or args.dry_run or args.report_only):
            from timm_alps.autoattack import _torchattacks
            try:
                _torchattacks()
            except ImportError as e:
                raise ValueError(f'{e}; or pass --no-eval') from e
        prepared = {d: prepare_data(s, d, runs_dir, args.dry_run or args.report_only) for d, s in data.items()}
        commands = {run.dir: train_command(run, preset, *prepared[run.dataset][:2]) for run in runs}
        if not args.report_only:
            for run in runs:
                check_command(run, commands[run.dir], len(extra))
        paths = report.result_paths(results, args.sweep and parse_sweep(args.sweep)[0])
        committed = report.read_runs_csv(paths['runs_csv'], preset['epochs'], EVAL_PROTOCOL)  # one it can keep
    except (FileNotFoundError, ValueError, subprocess.CalledProcessError) as e:
        print(f'reproduce: error: {e}', file=sys.stderr)
        return 2
    # the test images: the user's data source, or the prepared shards of the bundled subset
    sources = {d: s if s != 'bundled' else prepared[d][0] for d, s in data.items()}
    if args.dry_run:
        for conv in (c for _, _, c in prepared.values() if c):
            print('# data (once):', shlex.join(conv))
        for run in runs:
            print(f'# {run.group}/{run.name}: {run_status(run, preset)}')
            print(shlex.join(commands[run.dir]))
        print(f'# then per run (timm_alps.attacks.evaluate_robustness / transfer_attack): '
              f'{report.protocol_text(preset)} Results -> {results}')
        return 0

    failures = 0
    if not args.report_only:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        queue = sorted(runs, key=lambda r: run_status(r, preset) != 'partial')  # finish what was started first
        pool = ProcessPoolExecutor(args.jobs, multiprocessing.get_context('spawn'), _init_worker, (args.threads,))
        old = {s: signal.signal(s, _stop_workers) for s in (signal.SIGINT, signal.SIGTERM)}
        finished = False
        try:
            futures = {pool.submit(train_and_evaluate, run, commands[run.dir], preset,
                                   None if args.no_eval else sources[run.dataset], deadline, args.stop_at_budget,
                                   args.threads, invocation): run for run in queue}
            for fut in as_completed(futures):
                try:
                    failures += fut.result() != 'finished'
                except ValueError as e:  # a run folder of another recipe: the user decides
                    print(f'reproduce: error: {e}', file=sys.stderr)
                    return 2
                except Exception as e:  # one failed evaluation does not cost the others their report
                    print(f'[reproduce] {futures[fut].name} failed: {type(e).__name__}: {e}', flush=True)
                    failures += 1
            pool.shutdown()  # the workers' memory back before the black-box attacks
            if not args.no_eval:
                if args.threads:
                    import torch
                    torch.set_num_threads(args.threads)
                evaluate_black_box(runs, preset, sources)
            finished = True
        except KeyboardInterrupt:
            print('[reproduce] interrupted: waiting for the runs in progress to checkpoint', flush=True)
            failures += 1
        finally:
            if not finished:  # each worker forwards one SIGINT to its training run, which checkpoints and exits
                for proc in multiprocessing.active_children():
                    os.kill(proc.pid, signal.SIGINT)
            pool.shutdown(cancel_futures=True)
            for s, handler in old.items():
                signal.signal(s, handler)
    records = report.merge(committed, [collect(run, preset) for run in runs])
    path = report.write_results(records, preset, paths, invocation, data, args.sweep)
    print(f'[reproduce] {path} written ({time.time() - t_start:.0f}s)', flush=True)
    return 1 if failures and deadline is None else 0


if __name__ == '__main__':
    sys.exit(main())
