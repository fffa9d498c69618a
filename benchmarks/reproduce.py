""" Reproduce the ALPS paper's Tables 2, 3, 5 and 6: one resumable runner for training, attacks and the table

    python -m benchmarks.reproduce --preset smoke             # every method, bundled subset, 1 epoch (minutes, CPU)
    python -m benchmarks.reproduce --preset cpu --jobs 2 --threads 1 --time-budget 150
    python -m benchmarks.reproduce --preset paper --dry-run   # print the exact train / eval commands
    python -m benchmarks.reproduce --preset paper --datasets cifar10 --models preact_resnet18 \
        --methods erm,mixup,alps --time-budget 8 --stop-at-budget   # GPU, one 10-minute slice after another
    python -m benchmarks.reproduce --preset cpu --sweep eps=0.1,0.2,0.3,0.4 --seeds 0

Each (dataset, model, method, seed) is one `train_timm.py` run with the preset's recipe, in
`<runs-dir>/<preset>/<dataset>-<model>-e<epochs>/<method>-s<seed>/`. A run whose final checkpoint and summary
exist is skipped; an interrupted one is continued with `--resume auto`, after its `args.yaml` is checked against the
new command (parsed by train_timm.py itself): only place and speed flags may differ. After training, each model is
attacked (white-box in a process of its own, up to --jobs at once, while the other runs train; black-box once all
are in) through the library's one protocol (`timm_alps.attacks.evaluate_robustness` / `transfer_attack`, on the
seeded class-balanced subsets `python -m benchmarks.robustness --max-samples N` uses): clean, FGSM 4/255 and PGD-10 (step
1/255, radius 4/255) white-box, the same crafted once on the ERM model of the next seed (black-box, so ERM's own row
is a transfer too), APGD-CE, AutoAttack (standard version, `timm_alps.autoattack`) at the preset's radii, the
unbounded-PGD gradient-masking check, PGD error against eps for the plot and, where the preset asks, the paper
protocol with eps in normalised-input units. Results are cached per run (`eval.json`), so evaluation resumes too.
`--time-budget` stops launching runs (and with `--stop-at-budget` interrupts the ones in progress, which checkpoint
and resume on the next call).

    python -m benchmarks.reproduce --preset cpu-converged --jobs 2 --threads 1   # converged CPU runs

`<results-dir>/<preset>/` gets `table.md` / `table.csv` (mean +- std over seeds beside the paper's numbers, missing
runs marked), `curves.png` (test error and train loss per epoch), `eps.png` (white-box PGD error against eps),
`runs.csv` (status, wall time, throughput per run), `commands.md` (the exact commands) and `environment.json`.
"""
import argparse
import csv
import hashlib
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
METHODS = ('erm', 'dropout', 'ls', 'mixup', 'alps', 'alps-ramp')
DEFAULT_METHODS = METHODS[:5]  # the paper's comparison; presets that want the ramp arm name it
ALPS_METHODS = ('alps', 'alps-ramp')  # runs that take the preset's ALPS setting (alps_eps, alps_beta)
# Launch order within a seed: ERM first (black-box source), then the methods the goals compare.
LAUNCH_ORDER = ('erm', 'mixup', 'alps', 'ls', 'dropout', 'alps-ramp')
METHOD_LABELS = dict(erm='ERM', dropout='Dropout', ls='Label smoothing', mixup='MixUp', alps='ALPS',
                     **{'alps-ramp': 'ALPS + eps ramp'})
# Settings the issue fixes for the comparison; anything else follows train_timm.py's --method presets.
METHOD_ARGS: Dict[str, List[str]] = {
    'erm': ['--method', 'erm'],
    'dropout': ['--method', 'dropout', '--drop', '0.5'],
    'ls': ['--method', 'ls', '--smoothing', '0.1'],
    'mixup': ['--method', 'mixup', '--mixup', '1.0'],
    # the paper's ALPS (no eps ramp); eps / Beta come from the preset (alps_eps, alps_beta)
    'alps': ['--method', 'alps', '--alps-eps-warmup-epochs', '0'],
    # eps ramped in from 0 over the first epoch, the ALPS-native remedy for the start stall and
    # train_timm.py's default since it showed no cost at convergence (benchmarks/results/cpu-converged/)
    'alps-ramp': ['--method', 'alps', '--alps-eps-warmup-epochs', '1'],
}
EPS_PIXELS = 4 / 255  # the paper's L-inf radius for FGSM and PGD
PGD_STEP = 1 / 255
PGD_STEPS = 10
UNBOUNDED_STEP = 0.01

# -- presets ---------------------------------------------------------------------------------------------------------
# `data`: dataset -> default source (an .npz or a shard folder; 'bundled' = the subset shipped with timm_alps).
# `milestones`: fractions of `epochs` completed when the LR is divided by 10 (the paper: after 100 and 150 of 200).
# `eval`: attack-suite sizes, each N class-balanced test images drawn with EVAL_SEED: clean error on `clean_samples`, FGSM/PGD
# (white- and black-box) on `samples`; APGD-CE, the unbounded check, the eps curve and AutoAttack (at each of
# `autoattack_eps` /255; `autoattack_steps` / `_queries` below 100 / 5000 are not the standard version) on their
# `*_samples`; `normalised_eps` adds the paper protocol with eps 4/255 in normalised-input units.
# `methods` / `optional_models`: the default methods, and models --models may add.
PRESETS: Dict[str, Dict[str, Any]] = {
    'smoke': dict(
        description='every method on a few hundred bundled images for 1 epoch: the pipeline end to end',
        data={'cifar10': 'bundled'},
        models=('preact_resnet18_w16',),
        epochs=1, milestones=(0.5, 0.75), batch_size=64, lr=0.05, seeds=(0,),
        alps_eps=0.3, alps_beta=(8.0, 2.0),
        max_train_samples=256, max_eval_samples=128,
        train_args=['--channels-last'],
        # AutoAttack at toy budgets: the pipeline, not the standard version (the table says so)
        eval=dict(clean_samples=128, samples=16, batch_size=32, apgd_samples=8, apgd_steps=3, unbounded_samples=8,
                  unbounded_steps=5, curve_samples=8, curve_eps=(2, 8), autoattack_samples=8,
                  autoattack_eps=(8,), autoattack_steps=2, autoattack_queries=10, normalised_eps=True),
    ),
    'cpu': dict(
        description='CIFAR-10, width-16 PreActResNet18, the paper recipe with its two /10 steps compressed to '
                    'the epoch budget (at 1/3 and 2/3); sized for about 2.5 h on 2 CPU cores',
        data={'cifar10': '../shared/data/cifar10.npz'},
        models=('preact_resnet18_w16',),
        # at a 6-epoch budget the paper's 1/2, 3/4 would leave 1.5 epochs per low LR: thirds, 2 epochs each
        epochs=6, milestones=(1 / 3, 2 / 3), batch_size=128, lr=0.1, seeds=(0, 1),
        # timm's `sgd` is Nesterov momentum; the paper's is classical (`momentum`). The committed cpu results were
        # trained with Nesterov, and changing it would refuse to resume them, so this preset keeps it (and says so).
        opt='sgd',
        alps_eps=0.3, alps_beta=(8.0, 2.0),
        max_train_samples=None, max_eval_samples=2000,
        train_args=['--channels-last'],
        eval=dict(clean_samples=10000, samples=500, batch_size=250, apgd_samples=100, apgd_steps=25,
                  unbounded_samples=50, unbounded_steps=50, curve_samples=100, curve_eps=(1, 2, 4, 8),
                  autoattack_samples=100, autoattack_eps=(8, 4)),
    ),
    'cpu-converged': dict(
        description='CIFAR-10, width-16 PreActResNet18 (w32 with --models) trained to convergence on CPU: the paper '
                    'recipe (batch 128, SGD 0.1 classical momentum 0.9, wd 1e-4, /10 at 1/2 and 3/4 of the epochs) '
                    'over 60 epochs (--epochs to change), a 1-epoch linear LR warm-up per update for every method '
                    '(ALPS stalls at LR 0.1 from step 0 at some seeds, see results/cpu-alps-warmup); ERM, MixUp '
                    '(alpha 1), ALPS (Beta(8, 2), '
                    'eps 0.3) and ALPS with eps ramped in over the first epoch (the start-stall remedy) x 2 seeds, '
                    'label smoothing and Dropout with --methods',
        data={'cifar10': '../shared/data/cifar10.npz'},
        models=('preact_resnet18_w16',), optional_models=('preact_resnet18_w32',),
        methods=('erm', 'mixup', 'alps', 'alps-ramp'),
        epochs=60, milestones=(0.5, 0.75), batch_size=128, lr=0.1, seeds=(0, 1), opt='momentum', warmup_epochs=1,
        alps_eps=0.3, alps_beta=(8.0, 2.0),
        max_train_samples=None, max_eval_samples=2000,
        # the warm-up per update (linear over the first epoch's 390 updates), not timm's per-epoch default, which
        # would train the whole first epoch at --warmup-lr
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
        alps_eps=0.3, alps_beta=(8.0, 2.0),
        max_train_samples=None, max_eval_samples=None,
        train_args=['--channels-last', '--amp', '--amp-dtype', 'bfloat16', '--loader', 'fast'],
        eval=dict(clean_samples=10000, samples=10000, batch_size=1000, apgd_samples=1000, apgd_steps=100,
                  unbounded_samples=500, unbounded_steps=200, curve_samples=2000, curve_eps=(1, 2, 4, 8),
                  autoattack_samples=1000, autoattack_eps=(8, 4), normalised_eps=True),
    ),
}
NUM_CLASSES = {'cifar10': 10, 'cifar100': 100}
# narrow CPU variants are compared with the paper's full-width model of the same family
PAPER_MODEL = {'preact_resnet18_w16': 'preact_resnet18', 'preact_resnet18_w32': 'preact_resnet18'}


def get_preset(name: str, epochs: Optional[int] = None, seeds: Optional[Sequence[int]] = None,
               methods: Optional[Sequence[str]] = None, models: Optional[Sequence[str]] = None,
               datasets: Optional[Sequence[str]] = None, train_args: Sequence[str] = ()) -> Dict[str, Any]:
    """A copy of preset `name` with the command-line overrides applied (`models` / `datasets` pick a subset of the
    preset's; `train_args` are appended to every training command).

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
    preset['methods'] = tuple(methods) if methods else tuple(preset.get('methods', DEFAULT_METHODS))
    unknown = [m for m in preset['methods'] if m not in METHODS]
    if unknown:
        raise ValueError(f'unknown method(s) {unknown}; choose from {", ".join(METHODS)}')
    preset['methods'] = tuple(sorted(preset['methods'], key=METHODS.index))
    if models:
        offered = tuple(preset['models']) + tuple(preset.get('optional_models', ()))
        unknown = [m for m in models if m not in offered]
        if unknown:
            raise ValueError(f'preset {name!r} has no model(s) {unknown}; it has {", ".join(offered)}')
        preset['models'] = tuple(m for m in offered if m in models)
    if datasets:
        unknown = [d for d in datasets if d not in preset['data']]
        if unknown:
            raise ValueError(f'preset {name!r} has no dataset(s) {unknown}; it has {", ".join(preset["data"])}')
        preset['data'] = {k: v for k, v in preset['data'].items() if k in datasets}
    preset['train_args'] = list(preset.get('train_args', ())) + list(train_args)
    return preset


def milestones(preset: Dict[str, Any]) -> List[int]:
    """timm `--decay-milestones` for the preset's schedule: the 1-based epochs from which each lower LR applies.

    The paper (the MixUp code it follows) divides the LR once 100 and 150 epochs are done, i.e. epochs 101 and 151
    (1-based) are the first at the lower rates. timm's multistep scheduler applies milestone `m` from 1-based epoch
    `m` on (it bisects `t + 1`), so the paper's schedule is `--decay-milestones 101 151`.
    """
    e = preset['epochs']
    return sorted({min(max(1, math.floor(f * e + 0.5)) + 1, e) for f in preset['milestones']})


# -- sweeps ------------------------------------------------------------------------------------------------------------
def parse_sweep(spec: str) -> Tuple[str, List[Tuple[str, Dict[str, Any]]]]:
    """`eps=0.1,0.2` or `beta=0.8,0.875` (modes of Beta(a, 2)) or `beta=8:2,4:1.5` (a:b pairs).

    Returns:
        (name, [(tag, ALPS settings)]), e.g. ('eps', [('eps0.1', {'alps_eps': 0.1}), ...]).

    Raises:
        ValueError: unknown sweep name or a value outside its range.
    """
    if '=' not in spec:
        raise ValueError(f'--sweep takes NAME=V1,V2,... (eps or beta), got {spec!r}')
    name, values = spec.split('=', 1)
    name = name.strip()
    items = [v.strip() for v in values.split(',') if v.strip()]
    if not items:
        raise ValueError(f'--sweep {name}= has no values')
    out = []
    for v in items:
        if name == 'eps':
            eps = float(v)
            if not 0 < eps <= 2:
                raise ValueError(f'--sweep eps values must lie in (0, 2] (the L1 radius; the paper uses (0, 0.5)), '
                                 f'got {v}')
            out.append((f'eps{eps:g}', {'alps_eps': eps}))
        elif name == 'beta':
            if ':' in v:
                a, b = (float(t) for t in v.split(':', 1))
            else:
                mode = float(v)
                if not 0.5 < mode < 1:
                    raise ValueError(f'--sweep beta mode must lie in (0.5, 1) (the paper: (0.75, 1)), got {v}; '
                                     f'or give a:b pairs such as 8:2')
                a, b = 1.0 / (1.0 - mode), 2.0  # mode of Beta(a, 2) is (a - 1) / a
            if a <= 0 or b <= 0:
                raise ValueError(f'--sweep beta parameters must be > 0, got {v}')
            out.append((f'beta{a:g}-{b:g}', {'alps_beta': (a, b)}))
        else:
            raise ValueError(f'--sweep {name!r} is unknown: sweep eps or beta')
    return name, out


# -- runs --------------------------------------------------------------------------------------------------------------
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
    def dir(self) -> Path:
        return self.group_dir / self.name

    @property
    def log_path(self) -> Path:
        # beside the run folder, not in it: train_timm.py refuses to start in a folder that holds files
        return self.group_dir / f'{self.name}.log'

    @property
    def meta_path(self) -> Path:
        return self.group_dir / f'{self.name}.reproduce.json'

    @property
    def group(self) -> str:
        return f'{self.dataset}-{self.model}'


def group_dir(runs_dir: Path, preset: Dict[str, Any], dataset: str, model: str) -> Path:
    return runs_dir / preset['name'] / f'{dataset}-{model}-e{preset["epochs"]}'


def plan_runs(preset: Dict[str, Any], runs_dir: Path, sweep: Optional[str] = None) -> List[Run]:
    """Runs in launch order: the ERM models of the first two seeds (the black-box sources of seeds 0 and 1), then
    seed by seed in `LAUNCH_ORDER`, so seed 0 of every method finishes, with its black-box numbers, before the rest
    of seed 1 starts."""
    runs = []
    default_alps = dict(alps_eps=preset['alps_eps'], alps_beta=tuple(preset['alps_beta']))
    sweep_values = parse_sweep(sweep)[1] if sweep else None
    for dataset in preset['data']:
        for model in preset['models']:
            gdir = group_dir(runs_dir, preset, dataset, model)
            first = len(runs)
            for seed in preset['seeds']:
                if sweep_values is None:
                    for method in sorted(preset['methods'], key=LAUNCH_ORDER.index):
                        runs.append(Run(dataset, model, method, seed, alps=dict(default_alps) if method in ALPS_METHODS
                                        else {}, group_dir=gdir))
                    continue
                for tag, setting in sweep_values:
                    alps = dict(default_alps, **setting)
                    # the preset's own setting is the main ALPS run: train it once
                    tag = '' if alps == default_alps else tag
                    runs.append(Run(dataset, model, 'alps', seed, tag=tag, alps=alps, group_dir=gdir))
            if sweep_values is None and 'erm' in preset['methods'] and len(preset['seeds']) > 1:
                group = runs[first:]
                erm = [r for r in group if r.method == 'erm' and r.seed in preset['seeds'][:2]]
                runs[first:] = erm + [r for r in group if r not in erm]
    return runs


def resolve_data(preset: Dict[str, Any], data_args: Sequence[str]) -> Dict[str, str]:
    """dataset -> data source, from the preset and `--data [DATASET=]PATH` overrides.

    Raises:
        ValueError: a bare PATH for a preset with several datasets, or an unknown dataset name.
    """
    data = dict(preset['data'])
    for item in data_args or ():
        if '=' in item and not os.path.exists(item):
            key, path = item.split('=', 1)
            if key not in data:
                raise ValueError(f'--data {item!r}: preset {preset["name"]!r} has no dataset {key!r} '
                                 f'(it has {", ".join(data)})')
            data[key] = path
        else:
            if len(data) != 1:
                raise ValueError(f'preset {preset["name"]!r} trains on {", ".join(data)}: pass --data DATASET=PATH')
            data[next(iter(data))] = item
    for key, path in data.items():
        if path != 'bundled' and not os.path.isabs(path):
            data[key] = str((REPO / path).resolve())
    return data


def prepare_data(source: str, dataset: str, runs_dir: Path, dry_run: bool = False) -> Tuple[str, str, List[str]]:
    """(data_dir, timm dataset name, converter command) for `source`: the bundled subset, a shard folder, or an npz
    converted once to shards under `<runs_dir>/data/` (the converter command is returned for the record)."""
    if source == 'bundled':
        from timm_alps.data import BUNDLED_DATA_DIR
        return str(BUNDLED_DATA_DIR), 'wds/cifar10_subset', []
    src = Path(source)
    from timm_alps.data import read_info
    info = read_info(src) if src.is_dir() else None
    if info is not None:
        return str(src), f'wds/{info.get("name", dataset)}', []
    if not src.is_dir() and src.suffix != '.npz':
        raise ValueError(f'data source {source!r} is neither a shard folder, an .npz, a folder the converter reads '
                         f'(torchvision CIFAR files, an image folder), nor "bundled"')
    digest = hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:8]
    out = runs_dir / 'data' / f'{dataset}-{src.stem}-{digest}'
    cmd = [sys.executable, '-m', 'timm_alps.data', str(src), str(out), '--name', dataset]
    if not (out / '_info.json').is_file() and not dry_run:
        if not src.exists():
            raise FileNotFoundError(
                f'{dataset} data {str(src)!r} does not exist; pass --data PATH (an .npz with x_train/y_train/x_test/'
                f'y_test, or a shard folder from `python -m timm_alps.data`)')
        print(f'[reproduce] converting {src} -> {out}', flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)
    return str(out), f'wds/{dataset}', cmd


def train_command(run: Run, preset: Dict[str, Any], data_dir: str, dataset_name: str,
                  python: str = sys.executable) -> List[str]:
    """The exact `train_timm.py` command of `run` (without `--resume`)."""
    cmd = [python, str(REPO / 'train_timm.py'),
           '--data-dir', data_dir, '--dataset', dataset_name,
           '--model', run.model, '--num-classes', str(NUM_CLASSES[run.dataset]),
           '-b', str(preset['batch_size']), '--epochs', str(preset['epochs']),
           '--opt', preset.get('opt', 'momentum'), '--lr', str(preset['lr']), '--momentum', '0.9',
           '--weight-decay', '1e-4',
           '--sched', 'multistep', '--decay-milestones', *[str(m) for m in milestones(preset)],
           '--decay-rate', '0.1', '--warmup-epochs', str(preset.get('warmup_epochs', 0)),
           '--seed', str(run.seed), '--output', str(run.group_dir), '--experiment', run.name,
           '--checkpoint-hist', '1', '--no-progress', '--log-interval', '100']
    cmd += METHOD_ARGS[run.method]
    if run.method in ALPS_METHODS:
        a, b = run.alps['alps_beta']
        cmd += ['--alps-eps', f'{run.alps["alps_eps"]:g}', '--alps-beta', f'{a:g}', f'{b:g}']
    if preset.get('max_train_samples'):
        cmd += ['--max-train-samples', str(preset['max_train_samples'])]
    if preset.get('max_eval_samples'):
        cmd += ['--max-eval-samples', str(preset['max_eval_samples'])]
    cmd += list(preset.get('train_args', ()))
    return cmd


def _read_summary(path: Path) -> List[Dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    # a resumed run may repeat epochs: the last row of each epoch wins
    by_epoch = {int(r['epoch']): r for r in rows if r.get('epoch', '').strip().lstrip('-').isdigit()}
    return [by_epoch[e] for e in sorted(by_epoch)]


# torch's `safe_globals` context manager (used by the checkpoint loaders) empties the allowlist for a moment on exit,
# so a load in another thread can fail then: the runner's threads load one at a time.
_LOAD_LOCK = threading.Lock()


def checkpoint_epoch(run_dir: Path) -> Optional[int]:
    """Completed epochs of `last.pth.tar` (None when absent or unreadable); mid-epoch checkpoints count as not done."""
    path = run_dir / 'last.pth.tar'
    if not path.is_file():
        return None
    from timm_alps.checkpoint import CheckpointError, load_training_checkpoint
    try:
        with _LOAD_LOCK:
            ckpt = load_training_checkpoint(str(path))
    except CheckpointError as e:
        print(f'[reproduce] {path} is not usable ({e}); the run counts as interrupted', flush=True)
        return None
    if ckpt.get('batch_idx') is not None:
        return int(ckpt['epoch'])
    return int(ckpt['epoch']) + 1


def run_status(run: Run, preset: Dict[str, Any]) -> str:
    """'finished', 'partial' (has a checkpoint to resume) or 'missing'."""
    done = checkpoint_epoch(run.dir)
    summary = _read_summary(run.dir / 'summary.csv')
    if done is not None and done >= preset['epochs'] and len(summary) >= preset['epochs']:
        return 'finished'
    if done is not None or any(run.dir.glob('*.pth.tar')):
        return 'partial'
    return 'missing'


def _load_meta(run: Run) -> Dict[str, Any]:
    return json.loads(run.meta_path.read_text()) if run.meta_path.is_file() else {}


def _save_meta(run: Run, meta: Dict[str, Any]) -> None:
    run.group_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run.meta_path, meta)


INVOCATION = ''  # the runner call, recorded with each training slice
_CHILDREN: set = set()  # training processes in flight (they run in their own session: signals are forwarded)


def _stop_children(signum, frame) -> None:
    for proc in list(_CHILDREN):
        try:
            proc.send_signal(signal.SIGINT)  # each writes a checkpoint and exits; the next call resumes it
        except OSError:
            pass
    raise KeyboardInterrupt


def _thread_env(threads: Optional[int]) -> Dict[str, str]:
    env = dict(os.environ)
    if threads:
        # one intra-op thread per process is much faster than two on cores other processes also use
        for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
            env[var] = str(threads)
    return env


def train(run: Run, cmd: List[str], preset: Dict[str, Any], deadline: Optional[float], stop_at_deadline: bool,
          log: Any = print, threads: Optional[int] = None) -> str:
    """Train `run` to completion (resuming if it has a checkpoint); returns its status afterwards.

    A run started with another recipe is not resumed with this one (ValueError): remove its folder or use another
    --runs-dir.
    """
    status = run_status(run, preset)
    if status == 'finished':
        return status
    meta = _load_meta(run)
    changed = recipe_changes(run.dir / 'args.yaml', cmd)
    if changed:
        raise ValueError(f'{run.dir} was started with another recipe (its args.yaml vs this command: '
                         f'{"; ".join(changed)}).\nDelete that folder or pass another --runs-dir.')
    full = list(cmd)
    if status == 'partial':
        full += ['--resume', 'auto']
    elif run.dir.exists() and any(p for p in run.dir.iterdir() if not p.name.startswith('.')):
        full += ['--overwrite']  # a run killed before its first checkpoint: nothing to keep
    meta.setdefault('command', cmd)
    meta.setdefault('slices', [])
    run.group_dir.mkdir(parents=True, exist_ok=True)
    log(f'[reproduce] {"resume" if status == "partial" else "train"} {run.group}/{run.name}')
    t0, start = time.time(), time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
    slice_ = dict(start=start, seconds=None, rc=None, resumed=status == 'partial', host=platform.node(),
                  machine=_machine_line(), threads=threads, invocation=INVOCATION)
    meta['slices'].append(slice_)
    _save_meta(run, meta)  # the command is on record even if this process is killed
    with open(run.log_path, 'a') as out:
        out.write(f'\n$ {shlex.join(full)}\n')
        out.flush()
        proc = subprocess.Popen(full, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=_thread_env(threads))
        _CHILDREN.add(proc)
        interrupted = False
        try:
            while True:
                try:
                    rc = proc.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    if stop_at_deadline and deadline is not None and time.time() > deadline and not interrupted:
                        # SIGINT: train_timm.py writes a recovery checkpoint and exits; the next call resumes it
                        log(f'[reproduce] time budget reached: interrupting {run.name} (it will resume)')
                        proc.send_signal(signal.SIGINT)
                        interrupted = True
        finally:
            _CHILDREN.discard(proc)
    slice_.update(seconds=round(time.time() - t0, 1), rc=rc)
    _save_meta(run, meta)
    if rc not in (0, 128 + signal.SIGINT):
        tail = run.log_path.read_text().splitlines()[-15:]
        log(f'[reproduce] {run.name} failed (exit {rc}); last lines of {run.log_path}:\n  '
            + '\n  '.join(tail))
    return run_status(run, preset)


# train_timm.py arguments that say where data lives, how fast training runs or where it writes, not what is trained:
# a run may be resumed with other values (e.g. started on one machine, continued on a GPU box with --torchcompile).
PLACE_ARGS = frozenset({
    'data_dir', 'data', 'torchcompile', 'torchcompile_mode', 'loader', 'workers', 'amp', 'amp_dtype', 'channels_last',
    'no_progress', 'progress', 'log_interval', 'output', 'experiment', 'resume', 'overwrite', 'config', 'pin_mem',
    'no_prefetcher', 'prefetcher', 'device', 'device_type', 'distributed', 'world_size', 'rank', 'local_rank',
    'checkpoint_hist', 'recovery_interval', 'on_nonfinite'})


def _plain(value: Any) -> Any:
    """YAML and argparse spell the same setting as list/tuple, int/float: compare them as equals."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return value


def recipe_changes(args_yaml: Path, cmd: Sequence[str]) -> List[str]:
    """What `cmd` (a train_timm.py command) would train differently from the run whose `args.yaml` is given.

    The command is parsed by train_timm.py's own parser (no copy of its flags here); each argument it sets is
    compared with the run's args.yaml, except those in `PLACE_ARGS`. An argument the command leaves at None is
    resolved by train_timm.py from the others (e.g. a method's preset), so it is not compared. No args.yaml (a run
    killed before it started) means nothing to compare.

    Returns:
        'name: run value -> command value' for each difference (empty when the recipe is the same).
    """
    if not args_yaml.is_file():
        return []
    import yaml
    try:
        saved = yaml.safe_load(args_yaml.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f'{args_yaml} is not readable YAML ({e}); delete the run folder to start it again') from e
    train_timm = _train_timm()
    try:
        new = vars(train_timm.parse_args(list(cmd[2:])))
    except (train_timm.TrainError, SystemExit) as e:  # the script's one-line error (or argparse's exit for --help)
        raise ValueError(f'train_timm.py refuses the command {shlex.join(cmd)}: {e}') from e
    out = []
    for key, value in sorted(new.items()):
        if key in PLACE_ARGS or value is None or key not in saved:
            continue
        if _plain(saved[key]) != _plain(value):
            out.append(f'{key}: {saved[key]!r} -> {value!r}')
    return out


def _train_timm():
    """The train_timm.py module (its `parse_args` defines the flags), imported from the repository root."""
    import importlib
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module('train_timm')


# -- evaluation: the library's protocol (timm_alps.attacks.evaluate_robustness / transfer_attack) -------------------
EVAL_SEED = 0  # seed of the evaluation subsets (timm_alps.data.subset_indices)
EVAL_PROTOCOL = 2  # bump when the evaluation changes: cached eval.json files of another protocol are recomputed


def _device():
    import torch
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def eval_batches(data_source: str, samples: int, batch_size: int, device):
    """`samples` class-balanced test images drawn with seed `EVAL_SEED`, as `python -m benchmarks.robustness
    --max-samples N` (and train_timm.py's --max-eval-samples) draw them: the same subsets for every model and tool."""
    from benchmarks.robustness import Batches, eval_subset
    x, y = _test_split(data_source)
    if samples < len(y):
        keep = eval_subset(y, samples, EVAL_SEED)
        x, y = x[keep], y[keep]
    return Batches(x, y, batch_size, device)


@lru_cache(maxsize=2)
def _test_split(data_source: str):
    """The decoded test split (uint8 images, int64 labels), once per process: every subset is cut from it."""
    from timm_alps.data import load_split_tensors
    x, y, _ = load_split_tensors(data_source, 'test')
    return x, y.long()


def _pixel_eps(model, eps_normalised: float) -> float:
    """An eps given in normalised-input units, in pixel units: eps x the mean of the model's per-channel std."""
    return float(eps_normalised * model.std.mean())


def paper_attacks(eps: float) -> Dict[str, Any]:
    """The paper's FGSM and PGD-10 (step eps/4: 1/255 at 4/255, no random start) at radius `eps` (pixels)."""
    from timm_alps.attacks import fgsm, pgd
    return {'fgsm': partial(fgsm, eps=eps), 'pgd': partial(pgd, eps=eps, step_size=eps / 4, steps=PGD_STEPS)}


def _attack_sets(model, ev: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Attack names -> functions per image subset (`samples`, `apgd_samples`, ...): the white-box suite."""
    import torch
    from timm_alps.attacks import apgd_ce, unbounded_pgd
    sets: Dict[str, Dict[str, Any]] = {'samples': paper_attacks(EPS_PIXELS)}
    if ev.get('normalised_eps'):
        sets['samples'].update({f'{k}@norm': v for k, v in paper_attacks(_pixel_eps(model, EPS_PIXELS)).items()})
    sets['apgd_samples'] = {'apgd-ce': partial(apgd_ce, eps=EPS_PIXELS, steps=ev['apgd_steps'],
                                               generator=torch.Generator(device=_device()).manual_seed(0))}
    sets['unbounded_samples'] = {'unbounded': partial(unbounded_pgd, steps=ev['unbounded_steps'],
                                                      step_size=UNBOUNDED_STEP)}
    sets['curve_samples'] = {f'pgd@{e}': paper_attacks(e / 255)['pgd'] for e in ev['curve_eps']}
    if ev.get('autoattack_samples'):
        from timm_alps.autoattack import AutoAttack
        sets['autoattack_samples'] = {
            f'autoattack@{e}': AutoAttack(e / 255, steps=ev.get('autoattack_steps', 100),
                                          n_queries=ev.get('autoattack_queries', 5000), seed=0)
            for e in ev['autoattack_eps']}
    return sets


def transfer_source(run: Run, seeds: Sequence[int]) -> Run:
    """The ERM model whose adversarial examples are `run`'s black-box attack: that of the next planned seed (cyclic),
    so the ERM row is a transfer between two independently trained ERM models, as in the paper's Tables 5-6. With a
    single seed there is no other ERM model and the source is the same-seed ERM (its black-box = its white-box)."""
    seeds = list(seeds)
    seed = seeds[(seeds.index(run.seed) + 1) % len(seeds)] if run.seed in seeds else run.seed
    return Run(run.dataset, run.model, 'erm', seed, group_dir=run.group_dir)


def _write_json(path: Path, obj: Dict[str, Any]) -> None:
    tmp = path.with_name(path.name + '.part')
    tmp.write_text(json.dumps(obj, indent=1) + '\n')
    os.replace(tmp, path)


def _eval_key(run: Run, ev: Dict[str, Any]) -> Dict[str, Any]:
    key = json.loads(json.dumps(ev))  # tuples -> lists, as read back from eval.json
    key.update(checkpoint_mtime=(run.dir / 'last.pth.tar').stat().st_mtime, protocol=EVAL_PROTOCOL)
    return key


def _load_eval(run: Run, ev: Dict[str, Any]) -> Dict[str, Any]:
    path = run.dir / 'eval.json'
    result = json.loads(path.read_text()) if path.is_file() else {}
    return result if result.get('key') == _eval_key(run, ev) else dict(key=_eval_key(run, ev), black={})


def _load_model(run: Run):
    from timm_alps.attacks import load_checkpoint_model
    with _LOAD_LOCK:
        return load_checkpoint_model(run.dir / 'last.pth.tar', _device())


def evaluate(run: Run, data_source: str, ev: Dict[str, Any], log: Any = print) -> Dict[str, Any]:
    """White-box errors (%) of `run`'s final model through `evaluate_robustness`, cached in `<run>/eval.json`
    (recomputed only when the checkpoint, the settings or the protocol change).

    Clean error on the first `clean_samples` class-balanced test images; FGSM / PGD-10 at 4/255 (and, with
    `normalised_eps`, at 4/255 in normalised-input units) on the first `samples`; APGD-CE, the unbounded check,
    AutoAttack (standard) and the PGD eps curve on their own first-N subsets.
    """
    from timm_alps.attacks import evaluate_robustness, gradient_masking_suspected
    result = _load_eval(run, ev)
    if 'errors' in result:
        return result
    log(f'[reproduce] evaluating {run.group}/{run.name} (white-box)')
    device, t0 = _device(), time.time()
    model = _load_model(run)
    name = run.name
    errors: Dict[str, float] = {}
    autoattack: Dict[str, Any] = {}
    clean = evaluate_robustness({name: model}, eval_batches(data_source, ev['clean_samples'], ev['batch_size'],
                                                            device), progress=False)
    errors['clean'] = clean.errors[name]['clean']
    for subset, attacks in _attack_sets(model, ev).items():
        res = evaluate_robustness({name: model}, eval_batches(data_source, ev[subset], ev['batch_size'], device),
                                  attacks=attacks, progress=False)
        errors[f'clean@{subset}'] = res.errors[name]['clean']
        errors.update({k: v for k, v in res.errors[name].items() if k != 'clean'})  # 'white-box/<attack>'
        for attack_name, attack in attacks.items():
            if attack_name.startswith('autoattack'):
                aa = attack.result(model)
                autoattack[attack_name] = dict(
                    acc_after={a: aa.acc_after(a) for a in aa.robust}, flags=aa.flags, n_examples=aa.n_examples,
                    seconds=round(sum(aa.seconds.values()), 1))
    unbounded_acc = 100.0 - errors.pop('white-box/unbounded')
    curve = {'0': errors['clean@curve_samples']}
    curve.update({str(e): errors.pop(f'white-box/pgd@{e}') for e in ev['curve_eps']})
    if ev.get('normalised_eps'):
        errors['eps_normalised_pixels'] = _pixel_eps(model, EPS_PIXELS)
    result.update(errors=errors, unbounded_accuracy=unbounded_acc,
                  gradient_masking_suspected=gradient_masking_suspected(unbounded_acc), pgd_curve=curve,
                  autoattack=autoattack, device=str(device), started=round(t0, 1), seconds=round(time.time() - t0, 1))
    _write_json(run.dir / 'eval.json', result)
    return result


def evaluate_black_box(source: Run, targets: Sequence[Run], data_source: str, ev: Dict[str, Any],
                       log: Any = print) -> None:
    """Black-box errors of `targets` under FGSM / PGD-10 crafted once on the ERM model `source` (`transfer_attack`:
    one crafting per batch for all targets), stored in each target's eval.json under the source's name."""
    from timm_alps.attacks import transfer_attack
    pending = [t for t in targets if source.name not in _load_eval(t, ev).get('black', {})]
    if not pending:
        return
    log(f'[reproduce] black-box examples crafted on {source.group}/{source.name} for '
        f'{", ".join(t.name for t in pending)}')
    t0 = time.time()
    src = _load_model(source)
    models = {t.name: _load_model(t) for t in pending}
    attacks = paper_attacks(EPS_PIXELS)
    if ev.get('normalised_eps'):
        attacks.update({f'{k}@norm': v for k, v in paper_attacks(_pixel_eps(src, EPS_PIXELS)).items()})
    res = transfer_attack(src, models, eval_batches(data_source, ev['samples'], ev['batch_size'], _device()),
                          attacks, progress=False)
    for t in pending:
        result = _load_eval(t, ev)
        result['black'][source.name] = dict({k: v for k, v in res.errors[t.name].items() if k != 'clean'},
                                            seconds=round(time.time() - t0, 1))
        _write_json(t.dir / 'eval.json', result)


# -- results -----------------------------------------------------------------------------------------------------------
PAPER_METRICS = ('clean', 'white-box/fgsm', 'white-box/pgd', 'black-box/fgsm', 'black-box/pgd')
METRIC_LABELS = {'clean': 'clean', 'white-box/fgsm': 'FGSM white', 'white-box/pgd': 'PGD-10 white',
                 'black-box/fgsm': 'FGSM black', 'black-box/pgd': 'PGD-10 black', 'white-box/apgd-ce': 'APGD-CE white',
                 'white-box/fgsm@norm': 'FGSM white (eps norm.)', 'white-box/pgd@norm': 'PGD-10 white (eps norm.)',
                 'black-box/fgsm@norm': 'FGSM black (eps norm.)', 'black-box/pgd@norm': 'PGD-10 black (eps norm.)'}


def table_metrics(ev: Dict[str, Any]) -> List[str]:
    """The table's columns for an evaluation config: the paper's, APGD-CE, AutoAttack per eps, and (with
    `normalised_eps`) the paper protocol with eps in normalised-input units."""
    metrics = list(PAPER_METRICS) + ['white-box/apgd-ce']
    metrics += [f'white-box/autoattack@{e}' for e in ev.get('autoattack_eps', ()) if ev.get('autoattack_samples')]
    if ev.get('normalised_eps'):
        metrics += [f'{box}/{a}@norm' for box in ('white-box', 'black-box') for a in ('fgsm', 'pgd')]
    return metrics


def metric_label(metric: str) -> str:
    if metric.startswith('white-box/autoattack@'):
        return f'AutoAttack {metric.rsplit("@", 1)[1]}/255'
    return METRIC_LABELS[metric]


def collect(run: Run, preset: Dict[str, Any]) -> Dict[str, Any]:
    """Everything the table needs from one run's folder (missing pieces left out)."""
    rec: Dict[str, Any] = dict(group=run.group, dataset=run.dataset, model=run.model, method=run.method,
                               tag=run.tag, seed=run.seed, status=run_status(run, preset), errors={},
                               alps=dict(run.alps))
    summary = _read_summary(run.dir / 'summary.csv')
    rec['epochs_done'] = len(summary)
    rec['curve'] = [(int(r['epoch']) + 1, 100.0 - float(r['eval_top1']), float(r['train_loss'])) for r in summary
                    if r.get('eval_top1') not in (None, '')]
    if rec['status'] == 'finished' and rec['curve']:
        rec['errors']['clean'] = rec['curve'][-1][1]  # train_timm.py's last eval; replaced by eval.json's
    meta = _load_meta(run)
    rec['train_seconds'] = sum(s['seconds'] or 0 for s in meta.get('slices', []))
    rec['command'] = meta.get('command')
    rec['machines'] = [sl.get('machine') or (_machine_line() if sl.get('host') == platform.node() else sl.get('host'))
                       for sl in meta.get('slices', [])]
    ips = [float(r['train_img_per_sec']) for r in summary if r.get('train_img_per_sec')]
    rec['img_per_sec'] = sum(ips) / len(ips) if ips else None
    path = run.dir / 'eval.json'
    ev = json.loads(path.read_text()) if rec['status'] == 'finished' and path.is_file() else {}
    rec['errors'].update(ev.get('errors', {}))
    source = transfer_source(run, preset['seeds']).name
    black = ev.get('black', {}).get(source, {})
    rec['errors'].update({k: v for k, v in black.items() if k.startswith('black-box/')})
    rec['black_source'] = source if black else None
    if 'unbounded_accuracy' in ev:
        rec['unbounded_accuracy'] = ev['unbounded_accuracy']
        rec['gradient_masking_suspected'] = ev['gradient_masking_suspected']
        rec['pgd_curve'] = {float(k): v for k, v in ev['pgd_curve'].items()}
        rec['eval_seconds'] = ev['seconds']
        rec['autoattack'] = ev.get('autoattack', {})
        rec['eps_normalised_pixels'] = ev['errors'].get('eps_normalised_pixels')
    return rec


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float('nan')


def _fmt(values: Sequence[float]) -> str:
    if not values:
        return 'missing'
    m, s = _mean_std(values)
    return f'{m:.2f}' if len(values) == 1 else f'{m:.2f} ± {s:.2f}'


def aggregate(records: Sequence[Dict[str, Any]], seeds: Sequence[int],
              metrics: Sequence[str] = PAPER_METRICS + ('white-box/apgd-ce',)) -> List[Dict[str, Any]]:
    """Per (group, method, tag): values per metric over the finished seeds."""
    from benchmarks.paper_numbers import paper_error
    rows = []
    keys = []
    for r in records:
        k = (r['group'], r['method'], r['tag'])
        if k not in keys:
            keys.append(k)
    for group, method, tag in keys:
        recs = [r for r in records if (r['group'], r['method'], r['tag']) == (group, method, tag)]
        r0 = recs[0]
        row = dict(group=group, dataset=r0['dataset'], model=r0['model'], method=method, tag=tag, alps=r0['alps'],
                   seeds_planned=len(seeds), seeds_done=[r['seed'] for r in recs if r['status'] == 'finished'],
                   values={}, paper={})
        for metric in metrics:
            row['values'][metric] = [r['errors'][metric] for r in recs if metric in r['errors']]
            paper_metric = metric.replace('@norm', '')
            if not tag and paper_metric in PAPER_METRICS:  # the main comparison; sweep tables drop these
                row['paper'][metric] = paper_error(r0['dataset'], PAPER_MODEL.get(r0['model'], r0['model']), method,
                                                   paper_metric)
        row['unbounded'] = [r['unbounded_accuracy'] for r in recs if 'unbounded_accuracy' in r]
        row['masking'] = any(r.get('gradient_masking_suspected') for r in recs)
        row['autoattack_flags'] = sorted({f'{flag}@{name.split("@")[1]}' for r in recs
                                          for name, aa in r.get('autoattack', {}).items()
                                          for flag, value in aa['flags'].items() if value})
        rows.append(row)
    return rows


def goal_checks(rows: Sequence[Dict[str, Any]], samples: Optional[Dict[str, int]] = None) -> List[str]:
    """The issue's goals checked against the measured means, one honest line each.

    `samples` (metric -> test images) adds a noise verdict: a difference within two standard errors of the
    difference of the two means is reported as within noise. The standard error counts the test sample (two error
    rates measured on that many images) and, where both methods have at least two seeds, the spread over seeds
    (Welch: the seed variance of each method over its number of seeds); with one seed of either method only the
    test sample is counted, and the line says so.
    """
    lines = []
    for group in dict.fromkeys(r['group'] for r in rows):
        by = {r['method']: r for r in rows if r['group'] == group and not r['tag']}

        def values(method, metric):
            return by.get(method, {}).get('values', {}).get(metric) or []

        def check(text, metric, a_method, b_method, cmp, relation):
            va, vb = values(a_method, metric), values(b_method, metric)
            if not va or not vb:
                lines.append(f'- {group}: {text}: not measured (runs missing)')
                return
            a, b = statistics.mean(va), statistics.mean(vb)
            ok = cmp(a, b)
            line = f'- {group}: {text}: **{"yes" if ok else "NO"}** ({a:.2f} {relation if ok else "vs"} {b:.2f}'
            n = (samples or {}).get(metric)
            if n:
                pa, pb = a / 100, b / 100
                var = 1e4 * (pa * (1 - pa) + pb * (1 - pb)) / n
                if len(va) > 1 and len(vb) > 1:
                    var += statistics.variance(va) / len(va) + statistics.variance(vb) / len(vb)
                    basis = f'{n} images and {len(va)} + {len(vb)} seeds'
                else:
                    basis = f'{n} images; test sample only, a method has one seed'
                se = math.sqrt(var)
                line += f'; {"within" if abs(a - b) <= 2 * se else "beyond"} noise: 2 SE = {2 * se:.2f} on {basis}'
            lines.append(line + ')')

        check('ALPS clean error <= MixUp', 'clean', 'alps', 'mixup', lambda a, b: a <= b, '<=')
        check('MixUp clean error < ERM', 'clean', 'mixup', 'erm', lambda a, b: a < b, '<')
        robust = ['white-box/fgsm', 'white-box/pgd'] + sorted(
            {m for r in by.values() for m in r['values'] if m.startswith('white-box/autoattack@')},
            key=lambda m: -int(m.rsplit('@', 1)[1]))
        for metric in robust:
            for base in ('erm', 'mixup'):
                check(f'ALPS {metric_label(metric)} error < {METHOD_LABELS[base]}', metric, 'alps', base,
                      lambda a, b: a < b, '<')
        if 'alps-ramp' in by:  # the ramp may become the default only if it costs nothing at convergence
            for metric in ['clean'] + robust:
                check(f'ALPS + eps ramp {metric_label(metric)} error <= ALPS', metric, 'alps-ramp', 'alps',
                      lambda a, b: a <= b, '<=')
    return lines


def eps_hypothesis(rows: Sequence[Dict[str, Any]], pixels: Optional[float] = None) -> List[str]:
    """Which reading of the paper's radius 4 reproduces its ERM and MixUp white-box figures: 4/255 in pixel units
    (our protocol) or 4/255 applied to the normalised input (`@norm` columns)? One line per method and attack."""
    lines = []
    for row in rows:
        if row['tag'] or row['method'] not in ('erm', 'mixup'):
            continue
        for metric in ('white-box/fgsm', 'white-box/pgd', 'black-box/fgsm', 'black-box/pgd'):
            paper, ours, norm = row['paper'].get(metric), row['values'].get(metric), row['values'].get(
                f'{metric}@norm')
            if not paper or not ours or not norm:
                continue
            a, b = statistics.mean(ours), statistics.mean(norm)
            gap_norm, gap_pixel = abs(b - paper[0]), abs(a - paper[0])
            closer = ('neither (a tie)' if gap_norm == gap_pixel else
                      'normalised-input eps' if gap_norm < gap_pixel else 'pixel eps')
            lines.append(f'- {row["group"]}: {METHOD_LABELS[row["method"]]} {METRIC_LABELS[metric]}: paper '
                         f'{paper[0]:.2f}; pixel eps 4/255 {a:.2f}; normalised-input eps 4/255 '
                         f'{"(" + format(pixels * 255, ".2f") + "/255 in pixels) " if pixels else ""}{b:.2f}: '
                         f'**{closer}** is closer')
    return lines


def eps_table(records: Sequence[Dict[str, Any]]) -> List[str]:
    """Markdown table of white-box PGD-10 error against eps (mean over finished seeds), one row per method."""
    lines = []
    for group in dict.fromkeys(r['group'] for r in records):
        recs = [r for r in records if r['group'] == group and not r['tag'] and r.get('pgd_curve')]
        if not recs:
            continue
        eps = sorted({e for r in recs for e in r['pgd_curve']})
        lines += [f'White-box PGD-10 error (%) against eps, {group} (mean over seeds; step eps/4):', '',
                  '| method | seeds | ' + ' | '.join(f'{e:g}/255' if e else 'clean' for e in eps) + ' |',
                  '|' + '---|' * (len(eps) + 2)]
        for method in METHODS:
            curves = [r['pgd_curve'] for r in recs if r['method'] == method]
            if curves:
                cells = [_fmt([c[e] for c in curves if e in c]) for e in eps]
                lines.append(f'| {METHOD_LABELS[method]} | {len(curves)} | ' + ' | '.join(cells) + ' |')
        lines.append('')
    return lines


def write_results(preset: Dict[str, Any], runs: Sequence[Run], out_dir: Path, invocation: str,
                  data: Dict[str, str], sweep: Optional[str] = None) -> Path:
    """table.md / table.csv (or sweep-<name>.md/.csv), curves.png, eps.png, runs.csv, commands.md, environment.json.

    Returns:
        The path of the markdown table.
    """
    records = [collect(r, preset) for r in runs]
    lost = _runs_the_folder_would_lose(out_dir, records, runs, sweep)
    if lost:
        # The runs behind the committed rows are not on this machine (e.g. a fresh clone): rewriting the folder
        # from what is here would drop those rows. Write next to it instead.
        partial = out_dir.with_name(out_dir.name + '-partial')
        print(f'[reproduce] {out_dir} holds finished runs that are not in this runs folder ({", ".join(lost[:4])}'
              f'{", ..." if len(lost) > 4 else ""}): it is left as it is, and these results go to {partial}')
        out_dir = partial
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = table_metrics(preset['eval'])
    rows = aggregate(records, preset['seeds'], metrics)
    rows.sort(key=lambda r: (r['group'], METHODS.index(r['method']), r.get('alps', {}).get('alps_eps', 0),
                             tuple(r.get('alps', {}).get('alps_beta', ()))))
    if sweep:
        for row in rows:
            row['paper'] = {}  # the paper gives no per-setting numbers
    stem = f'sweep-{parse_sweep(sweep)[0]}' if sweep else 'table'
    names = dict(runs_csv=f'{stem}-runs.csv', commands_md=f'{stem}-commands.md') if sweep else dict(
        runs_csv='runs.csv', commands_md='commands.md')
    write_table_csv(rows, metrics, out_dir / f'{stem}.csv')
    write_table_md(rows, records, metrics, preset, out_dir / f'{stem}.md', sweep, **names)
    write_runs_csv(records, runs, out_dir / names['runs_csv'])
    if not sweep:
        _plot(records, out_dir, preset)
    write_commands(records, runs, preset, out_dir / names['commands_md'], invocation, data)
    write_environment(out_dir / 'environment.json')
    return out_dir / f'{stem}.md'


def _runs_the_folder_would_lose(out_dir: Path, records: Sequence[Dict[str, Any]], runs: Sequence[Run],
                                sweep: Optional[str]) -> List[str]:
    """Runs recorded as finished in out_dir's runs.csv that are not finished among `records`."""
    stem = f'sweep-{parse_sweep(sweep)[0]}-runs.csv' if sweep else 'runs.csv'
    path = out_dir / stem
    if not path.is_file():
        return []
    with open(path, newline='') as f:
        recorded = {(r['group'], r['run']) for r in csv.DictReader(f) if r.get('status') == 'finished'}
    here = {(r['group'], run.name) for r, run in zip(records, runs) if r['status'] == 'finished'}
    return sorted(f'{group}/{run}' for group, run in recorded - here)


def write_table_csv(rows: Sequence[Dict[str, Any]], metrics: Sequence[str], path: Path) -> None:
    """One line per (method, setting, metric): mean, std, the per-seed values and the paper's mean/std."""
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['dataset', 'model', 'method', 'setting', 'metric', 'mean', 'std', 'n_seeds', 'seeds_planned',
                    'values', 'paper_mean', 'paper_std'])
        for row in rows:
            for metric in metrics:
                vals = row['values'][metric]
                m, s = _mean_std(vals) if vals else (float('nan'), float('nan'))
                p = row['paper'].get(metric)
                w.writerow([row['dataset'], row['model'], row['method'], row['tag'] or 'default', metric,
                            f'{m:.3f}', f'{s:.3f}', len(vals), row['seeds_planned'],
                            ' '.join(f'{v:.2f}' for v in vals), p[0] if p else '', p[1] if p else ''])


def _protocol_text(preset: Dict[str, Any]) -> str:
    ev = preset['eval']
    text = (f'Top-1 test error (%), mean ± std over the finished seeds (n = seeds finished of '
            f'{len(preset["seeds"])} planned), beside the paper\'s number in brackets (paper: full-width model, 200 '
            f'epochs). Every number comes from `timm_alps.attacks.evaluate_robustness` / `transfer_attack` on N '
            f'class-balanced test images drawn with seed {EVAL_SEED} (`timm_alps.data.subset_indices`, the subsets of '
            f'`python -m benchmarks.robustness --max-samples N`): '
            f'clean error on {ev["clean_samples"]}, FGSM / PGD-10 on {ev["samples"]}, APGD-CE on '
            f'{ev["apgd_samples"]} ({ev["apgd_steps"]} steps)')
    if ev.get('autoattack_samples'):
        steps, queries = ev.get('autoattack_steps', 100), ev.get('autoattack_queries', 5000)
        version = 'standard version' if (steps, queries) == (100, 5000) else \
            f'NOT the standard version: {steps} iterations, {queries} Square queries'
        text += f', AutoAttack ({version}, L-inf, `timm_alps.autoattack`) on {ev["autoattack_samples"]}'
    text += ('. FGSM radius 4/255; PGD-10 step 1/255 radius 4/255, both in [0, 1] pixel units; white-box = the model '
             'attacks itself; black-box = ')
    text += ('examples crafted on the ERM model of the next seed (cyclic: seed s is attacked with examples from '
             'erm-s(s+1)), so every row, ERM included, is a transfer between independently trained models.'
             if len(preset['seeds']) > 1 else
             'examples crafted on the ERM model of the same seed (one seed only: ERM\'s black-box equals its '
             'white-box).')
    if ev.get('normalised_eps'):
        text += (' Columns "(eps norm.)": the same attacks with eps = 4/255 in normalised-input units, i.e. '
                 '4/255 x the mean per-channel std in pixels (about 1/255 on CIFAR): the hypothesis that the paper '
                 'applied its radius to the normalised input.')
    return text


def write_table_md(rows: Sequence[Dict[str, Any]], records: Sequence[Dict[str, Any]], metrics: Sequence[str],
                   preset: Dict[str, Any], path: Path, sweep: Optional[str], runs_csv: str, commands_md: str) -> None:
    """The table, the goals checked beyond noise, the eps-hypothesis lines, the PGD-vs-eps table."""
    ev = preset['eval']
    md = [f'# ALPS reproduction: preset `{preset["name"]}`' + (f', sweep `{sweep}`' if sweep else ''), '',
          f'{preset["description"]}.', '', _protocol_text(preset), '', f'Machine: {_machines(records)}.', '']
    if any(r['status'] != 'finished' for r in records):
        done = sum(r['status'] == 'finished' for r in records)
        md += [f'**Partial**: {done} of {len(records)} runs finished; missing cells are runs still to train.', '']
    for group in dict.fromkeys(r['group'] for r in rows):
        grows = [r for r in rows if r['group'] == group]
        md += [f'## {group} ({preset["epochs"]} epochs; LR {preset["lr"]:g}, /10 from epochs '
               f'{" and ".join(map(str, milestones(preset)))} on, 1-based)', '']
        head = ['method' if not sweep else 'ALPS setting', 'seeds'] + [metric_label(m) for m in metrics] + \
            ['unbounded PGD acc.']
        md += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
        for row in grows:
            label = METHOD_LABELS[row['method']]
            if sweep:
                a, b = row['alps']['alps_beta']
                label = f'eps {row["alps"]["alps_eps"]:g}, Beta({a:g}, {b:g})'
            cells = [label, f'{len(row["seeds_done"])}/{row["seeds_planned"]}']
            for metric in metrics:
                cell = _fmt(row['values'][metric])
                p = row['paper'].get(metric)
                if p:
                    cell += f' [{p[0]:.2f}]'
                cells.append(cell)
            cells.append(_fmt(row['unbounded']) + (' (masking?)' if row['masking'] else ''))
            md.append('| ' + ' | '.join(cells) + ' |')
        flagged = [f'{METHOD_LABELS[r["method"]]}: {", ".join(r["autoattack_flags"])}' for r in grows
                   if r.get('autoattack_flags')]
        md += ['', 'AutoAttack sanity flags: ' + ('; '.join(flagged) if flagged else 'none raised') + '.'
               if ev.get('autoattack_samples') else '', '']
    if not sweep:
        samples = {'clean': ev['clean_samples'], 'white-box/fgsm': ev['samples'], 'white-box/pgd': ev['samples']}
        samples.update({f'white-box/autoattack@{e}': ev.get('autoattack_samples') for e in ev.get('autoattack_eps', ())})
        md += ['## The paper\'s claims, checked', ''] + goal_checks(rows, samples) + ['']
        if ev.get('normalised_eps'):
            pixels = next((r['eps_normalised_pixels'] for r in records if r.get('eps_normalised_pixels')), None)
            md += ['## What the paper\'s "radius 4" means', ''] + (
                eps_hypothesis(rows, pixels) or ['- not measured yet (ERM / MixUp runs missing)']) + ['']
        md += eps_table(records)
    md += ['Unbounded PGD (eps = inf, step 0.01, '
           f'{ev["unbounded_steps"]} steps, first {ev["unbounded_samples"]} images): accuracy must fall to ~0%; '
           '"masking?" flags a model above 1%, whose white-box numbers would then flatter it.', '',
           (f'Figures: [curves.png](curves.png) (test error and train loss per epoch), [eps.png](eps.png) '
            f'(white-box PGD-10 error against eps, step eps/4, first {ev["curve_samples"]} images). '
            if not sweep else '') +
           f'Per-run status, wall time and throughput: [{runs_csv}]({runs_csv}); exact commands: '
           f'[{commands_md}]({commands_md}); software and machine: [environment.json](environment.json).', '']
    path.write_text('\n'.join(md))


def write_runs_csv(records: Sequence[Dict[str, Any]], runs: Sequence[Run], path: Path) -> None:
    """Status, epochs, wall time, throughput and clean error per run."""
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['group', 'run', 'status', 'epochs_done', 'train_seconds', 'train_img_per_sec', 'eval_seconds',
                    'clean_error'])
        for r, run in zip(records, runs):
            w.writerow([r['group'], run.name, r['status'], r['epochs_done'], f'{r["train_seconds"]:.0f}',
                        f'{r["img_per_sec"]:.0f}' if r['img_per_sec'] else '', r.get('eval_seconds', ''),
                        f'{r["errors"]["clean"]:.2f}' if 'clean' in r['errors'] else ''])


def write_commands(records: Sequence[Dict[str, Any]], runs: Sequence[Run], preset: Dict[str, Any], path: Path,
                   invocation: str, data: Dict[str, str]) -> None:
    """The runner calls that produced the runs, this call, and every training command."""
    invocations = list(dict.fromkeys(
        sl['invocation'] for run in runs for sl in _load_meta(run).get('slices', []) if sl.get('invocation')))
    cmds = [f'# Commands of preset `{preset["name"]}`', '', 'Runner calls that trained and attacked these runs, then '
            'the one that wrote this folder:', '', '```bash', *invocations, invocation, '```', '',
            'Training runs (the runner adds `--resume auto` to continue an interrupted run; '
            'paths are those of the machine that ran them):', '', '```bash']
    cmds += [shlex.join(r['command']) for r in records if r['command']]
    cmds += ['```', '', f'Data: {json.dumps(data)}', '']
    path.write_text('\n'.join(cmds))


def write_environment(path: Path) -> None:
    """`benchmarks.machine.environment()`: torch.utils.collect_env's report plus timm, timm_alps, git commit."""
    from benchmarks.machine import environment
    path.write_text(json.dumps(environment(), indent=1) + '\n')


def _plot(records: Sequence[Dict[str, Any]], out_dir: Path, preset: Dict[str, Any]) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    groups = list(dict.fromkeys(r['group'] for r in records))
    colors = {m: f'C{i}' for i, m in enumerate(METHODS)}
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 4 * len(groups)), squeeze=False)
    for gi, group in enumerate(groups):
        for r in records:
            if r['group'] != group or not r['curve'] or r['tag']:
                continue
            ep, err, loss = zip(*r['curve'])
            style = dict(color=colors[r['method']], ls='-' if r['seed'] == preset['seeds'][0] else '--', alpha=0.85,
                         label=f'{METHOD_LABELS[r["method"]]} s{r["seed"]}')
            axes[gi, 0].plot(ep, err, marker='o', **style, markersize=3)
            axes[gi, 1].plot(ep, loss, marker='o', **style, markersize=3)
        axes[gi, 0].set(xlabel='epoch', ylabel='test error (%)', title=f'{group}: test error')
        axes[gi, 1].set(xlabel='epoch', ylabel='train loss (on its own targets)', title=f'{group}: train loss')
        for ax in axes[gi]:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / 'curves.png', dpi=80)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.2), squeeze=False)
    for gi, group in enumerate(groups):
        ax = axes[0, gi]
        for method in METHODS:
            curves = [r['pgd_curve'] for r in records if r['group'] == group and r['method'] == method
                      and not r['tag'] and r.get('pgd_curve')]
            if not curves:
                continue
            eps = sorted(curves[0])
            means = [sum(c[e] for c in curves) / len(curves) for e in eps]
            ax.plot(eps, means, 'o-', color=colors[method], label=f'{METHOD_LABELS[method]} (n={len(curves)})')
        ax.set(xlabel='L-inf radius eps (x/255)', ylabel='top-1 error (%)', ylim=(0, 100),
               title=f'{group}: white-box PGD-10')
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / 'eps.png', dpi=80)
    plt.close(fig)


def _machine_line() -> str:
    from benchmarks.machine import machine_line
    return machine_line()


def _machines(records: Sequence[Dict[str, Any]]) -> str:
    seen = list(dict.fromkeys(m for r in records for m in r.get('machines', [])))
    return '; '.join(seen) if seen else 'no run yet'


# -- main --------------------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.reproduce', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--preset', required=True, choices=tuple(PRESETS))
    parser.add_argument('--data', action='append', default=[], metavar='[DATASET=]PATH',
                        help='data source: an .npz (converted once to shards under <runs-dir>/data) or a shard '
                             'folder; DATASET= picks the dataset for presets with several')
    parser.add_argument('--seeds', default=None, help='comma separated seeds (default: the preset\'s)')
    parser.add_argument('--methods', default=None, help=f'comma separated subset of {",".join(METHODS)}')
    parser.add_argument('--models', default=None, help='comma separated subset of the preset\'s models')
    parser.add_argument('--datasets', default=None, help='comma separated subset of the preset\'s datasets')
    parser.add_argument('--train-arg', action='append', default=[], metavar='FLAG',
                        help='extra train_timm.py argument(s), e.g. --train-arg=--torchcompile (repeat for several)')
    parser.add_argument('--epochs', type=int, default=None, help='epoch budget override (milestones scale with it)')
    parser.add_argument('--sweep', default=None, metavar='NAME=V1,V2',
                        help='ALPS sweep instead of the comparison: eps=0.1,0.2,0.3,0.4 or beta=0.8,0.875,0.9 (modes '
                             'of Beta(a, 2)) or beta=8:2,4:2')
    parser.add_argument('--runs-dir', default=str(REPO / 'runs'), help='checkpoints and logs (default: ./runs)')
    parser.add_argument('--results-dir', default=str(REPO / 'benchmarks' / 'results'),
                        help='tables and figures go to <results-dir>/<preset>/')
    parser.add_argument('--time-budget', type=float, default=None, metavar='MINUTES',
                        help='launch no training run after this many minutes; finished runs stay finished')
    parser.add_argument('--stop-at-budget', action='store_true',
                        help='also interrupt the run in progress at the budget (it checkpoints and resumes later)')
    parser.add_argument('--jobs', type=int, default=1,
                        help='training runs at once, and white-box evaluations at once (CPU: --jobs 2 --threads 1 '
                             'uses 2 cores best)')
    parser.add_argument('--threads', type=int, default=None,
                        help='intra-op threads per training process and for the evaluation (default: torch\'s)')
    parser.add_argument('--dry-run', action='store_true', help='print the commands and the runs\' status, run nothing')
    parser.add_argument('--no-eval', action='store_true', help='train only; the table shows clean error')
    parser.add_argument('--report-only', action='store_true', help='only (re)write the results from what exists')
    args = parser.parse_args(argv)
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        parser.error(f'--jobs and --threads must be >= 1, got {args.jobs} and {args.threads}')
    if args.time_budget is not None and args.time_budget < 0:
        parser.error(f'--time-budget must be >= 0 minutes, got {args.time_budget}')
    try:
        args.seeds = [int(s) for s in args.seeds.split(',')] if args.seeds else None
    except ValueError:
        parser.error(f'--seeds takes comma separated integers, got {args.seeds!r}')
    for name in ('methods', 'models', 'datasets'):
        value = getattr(args, name)
        setattr(args, name, [m.strip() for m in value.split(',') if m.strip()] if value else None)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    deadline = t_start + 60 * args.time_budget if args.time_budget is not None else None
    try:
        preset = get_preset(args.preset, args.epochs, args.seeds, args.methods, args.models, args.datasets,
                            [a for item in args.train_arg for a in shlex.split(item)])
        if args.sweep:
            parse_sweep(args.sweep)
        data = resolve_data(preset, args.data)
        if preset['eval'].get('autoattack_samples') and not (args.no_eval or args.dry_run or args.report_only):
            from timm_alps.autoattack import _torchattacks
            try:
                _torchattacks()
            except ImportError as e:
                raise ValueError(f'{e}; or pass --no-eval') from e
    except ValueError as e:
        print(f'reproduce: error: {e}', file=sys.stderr)
        return 2
    runs_dir = Path(args.runs_dir).resolve()
    runs = plan_runs(preset, runs_dir, args.sweep)
    invocation = 'python -m benchmarks.reproduce ' + shlex.join(argv if argv is not None else sys.argv[1:])
    global INVOCATION
    INVOCATION = invocation
    results = Path(args.results_dir) / preset['name']

    prepared = {}
    try:
        for dataset, source in data.items():
            prepared[dataset] = prepare_data(source, dataset, runs_dir, dry_run=args.dry_run or args.report_only)
    except (FileNotFoundError, ValueError, subprocess.CalledProcessError) as e:
        print(f'reproduce: error: {e}', file=sys.stderr)
        return 2
    if args.dry_run:
        for dataset, (_, _, conv) in prepared.items():
            if conv:
                print('# data (once):', shlex.join(conv))
        for run in runs:
            ddir, dname, _ = prepared[run.dataset]
            print(f'# {run.group}/{run.name}: {run_status(run, preset)}')
            print(shlex.join(train_command(run, preset, ddir, dname)))
        print('# then per run (timm_alps.attacks.evaluate_robustness / transfer_attack): ' + _protocol_text(preset)
              + f' Results -> {results}')
        return 0

    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    failures = 0
    if not args.report_only:
        stopping = []

        def launch(run: Run) -> str:
            ddir, dname, _ = prepared[run.dataset]
            if stopping:
                return 'skipped'
            if deadline is not None and time.time() > deadline and run_status(run, preset) != 'finished':
                log(f'[reproduce] time budget spent: not launching {run.group}/{run.name}')
                return 'skipped'
            return train(run, train_command(run, preset, ddir, dname), preset, deadline, args.stop_at_budget,
                         log=log, threads=args.threads)

        from concurrent.futures import ThreadPoolExecutor, as_completed
        signal.signal(signal.SIGTERM, _stop_children)
        signal.signal(signal.SIGINT, _stop_children)
        evaluations = WhiteBoxEvaluations(preset['eval'], args.jobs, args.threads)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            # interrupted runs first (finish what was started), then the plan's order
            partial = [run for run in runs if run_status(run, preset) == 'partial']
            queue = partial + [run for run in runs if run not in partial]
            futures = {pool.submit(launch, run): run for run in queue}  # workers take them in this order
            try:
                for fut in as_completed(futures):
                    status = fut.result()
                    if status in ('partial', 'missing'):
                        failures += 1
                    elif status == 'finished' and not args.no_eval:  # attacked while the others train
                        evaluations.submit(futures[fut], data_source(futures[fut], data, prepared))
                if not args.no_eval:
                    evaluations.wait()
                    evaluations.close()
                    evaluate_black_box_all(runs, preset, data, prepared, log)
            except ValueError as e:
                print(f'reproduce: error: {e}', file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                # the children got SIGINT (they checkpoint); launch nothing more, then write what exists
                log('[reproduce] interrupted: waiting for the runs in progress to checkpoint')
                failures += 1
            finally:
                # launch nothing more and stop the evaluations an error or interrupt cut short (on the normal path
                # every run is done and the evaluations are closed, so both are no-ops)
                stopping.append(True)
                evaluations.close(terminate=True)
    path = write_results(preset, runs, results, invocation, data, args.sweep)
    log(f'[reproduce] {path} written ({time.time() - t_start:.0f}s)')
    return 1 if failures and deadline is None else 0


def data_source(run: Run, data: Dict[str, str], prepared: Dict[str, Tuple[str, str, List[str]]]) -> str:
    """Where `run`'s test images come from: the user's data source, or the prepared shards of the bundled subset."""
    return data[run.dataset] if data[run.dataset] != 'bundled' else prepared[run.dataset][0]


def _init_eval_process(threads: Optional[int]) -> None:
    if threads:
        import torch
        torch.set_num_threads(threads)


def _evaluate_in_process(run: Run, source: str, ev: Dict[str, Any]) -> None:
    evaluate(run, source, ev, log=lambda s: print(s, flush=True))


class WhiteBoxEvaluations:
    """The white-box evaluations of finished runs, each in a process of its own, up to `jobs` at once.

    The runs that finish last (together, with --jobs 2) are attacked side by side instead of one after the other
    while a core idles. Processes, not threads: the attacks and AutoAttack draw from torch's global RNG, which
    threads would share. Each result lands in its run's eval.json, so a run already evaluated is not submitted, and
    an evaluation cut short by `terminate` leaves no result: the next call redoes it.

    Args:
        ev: the preset's evaluation settings.
        jobs: evaluations at once.
        threads: intra-op threads of each evaluation process (None: torch's default).
    """

    def __init__(self, ev: Dict[str, Any], jobs: int, threads: Optional[int]):
        self.ev, self.jobs, self.threads = ev, jobs, threads
        self._pool = None  # started by the first submission
        self._pending: List[Any] = []

    def submit(self, run: Run, source: str) -> None:
        if 'errors' in _load_eval(run, self.ev):
            return
        if self._pool is None:
            import multiprocessing
            self._pool = multiprocessing.get_context('spawn').Pool(self.jobs, _init_eval_process, (self.threads,))
        self._pending.append(self._pool.apply_async(_evaluate_in_process, (run, source, self.ev)))

    def wait(self) -> None:
        """Block until every submitted evaluation is done; a failed one re-raises its error here."""
        for result in self._pending:
            result.get()
        self._pending.clear()

    def close(self, terminate: bool = False) -> None:
        """Let the processes exit (after `wait`), or with `terminate` stop the evaluations in progress."""
        if self._pool is not None:
            self._pool.terminate() if terminate else self._pool.close()
            self._pool.join()
            self._pool = None


def evaluate_black_box_all(runs: Sequence[Run], preset: Dict[str, Any], data: Dict[str, str],
                           prepared: Dict[str, Tuple[str, str, List[str]]], log: Any = print) -> None:
    """Black-box errors of every finished run that lacks them (cached), crafted once per ERM source for all the
    finished runs it attacks. Runs after the white-box evaluations: both write the run's eval.json."""
    ev = preset['eval']
    by_source: Dict[Tuple[str, str], Tuple[Run, List[Run]]] = {}
    for run in runs:
        if run_status(run, preset) != 'finished':
            continue
        source = transfer_source(run, preset['seeds'])
        if run_status(source, preset) == 'finished':
            src = data_source(run, data, prepared)
            by_source.setdefault((str(source.dir), src), (source, []))[1].append(run)
    for (_, src), (source, targets) in by_source.items():
        evaluate_black_box(source, targets, src, ev, log=log)


if __name__ == '__main__':
    sys.exit(main())
