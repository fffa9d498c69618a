"""The ALPS start stall: does an ALPS-native remedy (ramping eps up) avoid it as well as an LR warm-up does?

On the `cpu` preset (CIFAR-10, preact_resnet18_w16, batch 128, SGD Nesterov at LR 0.1 from step 0, ALPS eps 0.3
Beta(8, 2)) ALPS seed 1 sat at the uniform loss ln 10 for its whole first epoch (benchmarks/results/cpu/notes.md).
This study trains the first epoch of that preset for several seeds and several arms, one training at a time:

- ``preset``: the preset as is (no remedy);
- ``lr-warmup``: timm's LR warm-up over the first epoch (``--warmup-epochs 1 --sched-on-updates``: linear from
  1e-5 to 0.1 over the 390 updates);
- ``eps-ramp``: the ALPS label radius ramped per update, eps_t = 0.3 * min(1, t / 390) (t = updates done);
- ``eps-mix-ramp``: eps ramped as above and the input mixing too: lam_t = 1 - min(1, t / 390) * (1 - lam), with
  lam drawn exactly as in the preset (the ramp is applied after the draw, so no random stream changes).

The ramps are set from outside `timm_alps.train.main(argv)` (train_timm.py's engine, run in-process,
unchanged): the loss's ``eps`` attribute is set before each training forward and `ALPSMixup.sample`'s lam is rescaled after the draw. Neither consumes random
numbers, so every arm sees the same initial weights, batches, lam and partners as the preset at the same seed.

Per update the script records the trained loss and the preset's objective (the ALPS loss at eps 0.3) computed on
the same logits and targets under no_grad, so arms with a ramped eps are judged on the same scale.

A run is **stalled** when, from update 100 on, the eps-0.3 ALPS objective averaged over any block of 50 updates
(100-149, 150-199, ..., 350-389) is above 2.25, i.e. within 0.05 of ln 10 = 2.303, the value of the uniform prediction
for any target: the network still sits at (or has fallen back to) the uniform prediction 100+ updates in. Learning
runs are near 1.9 by update 300. The definition is fixed from the known stall (preset, seed 1: blocks 2.30 ... 2.19,
so it creeps off the plateau only late in the epoch) before any other run had finished; eval top-1 is reported
beside it but is not part of the test (that stalled run still scores 23.6% on the eval images).

Usage (one training at a time; finished runs are skipped, so rerunning continues where it stopped)::

    OMP_NUM_THREADS=1 python benchmarks/stall_study.py --code /work/frozen --data-dir /work/runs/data/cifar10 \\
        --out /work/runs/stall --seeds 1 0 2 3 4 5 --arms preset lr-warmup eps-ramp
    python benchmarks/stall_study.py --out /work/runs/stall --table benchmarks/results/stall/table.md
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from statistics import mean
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EPS = 0.3
UPDATES_PER_EPOCH = 50000 // 128  # CIFAR-10 train at batch 128, last partial batch dropped (as the preset logs)
STALL_LOSS, STALL_FROM, STALL_WINDOW = math.log(10) - 0.05, 100, 50
LOG_STEPS = (25, 100, 200, 300, 389)

# name -> (extra train_timm flags, eps ramp length in updates, mixing ramp length in updates; 0 = no ramp)
ARMS: Dict[str, tuple] = {
    'preset': ([], 0, 0),
    'lr-warmup': (['--warmup-epochs', '1', '--sched-on-updates'], 0, 0),
    'eps-ramp': ([], UPDATES_PER_EPOCH, 0),
    'eps-mix-ramp': ([], UPDATES_PER_EPOCH, UPDATES_PER_EPOCH),
}


def preset_argv(data_dir: str, seed: int, output: str, experiment: str) -> List[str]:
    """The `cpu` preset's alps command (benchmarks/results/cpu/commands.md), cut to its first epoch.

    The preset's milestones (3, 5) only act from epoch 4 on, so epoch 1 of this 1-epoch run is the 6-epoch run's.
    """
    return ['--data-dir', data_dir, '--dataset', 'wds/cifar10', '--model', 'preact_resnet18_w16', '--num-classes', '10',
            '-b', '128', '--epochs', '1', '--opt', 'sgd', '--lr', '0.1', '--momentum', '0.9', '--weight-decay', '1e-4',
            '--sched', 'multistep', '--decay-milestones', '3', '5', '--decay-rate', '0.1', '--warmup-epochs', '0',
            '--seed', str(seed), '--output', output, '--experiment', experiment, '--checkpoint-hist', '1',
            '--no-progress', '--log-interval', '100', '--method', 'alps', '--alps-eps', str(EPS), '--alps-beta', '8',
            '2', '--max-eval-samples', '2000', '--channels-last']


def run_name(arm: str, seed: int) -> str:
    return f'{arm}-s{seed}'


def train_one(args) -> None:
    """Child process: one (arm, seed) epoch through the frozen engine's `main`, with the arm's ramps patched in."""
    sys.path.insert(0, args.code)
    import torch
    import timm_alps
    from timm import utils
    from timm_alps import train as engine  # train_timm.py's engine
    from timm_alps.labels import adversarial_label
    from timm_alps.loss import ALPSSoftTargetCrossEntropy
    from timm_alps.mixup import ALPSMixup
    for mod in (timm_alps,):
        if not os.path.abspath(mod.__file__).startswith(os.path.abspath(args.code) + os.sep):
            raise SystemExit(f'{mod.__name__} imported from {mod.__file__}, not from --code {args.code}')

    extra, eps_steps, mix_steps = ARMS[args.arm]
    name = run_name(args.arm, args.seed)
    argv = preset_argv(args.data_dir, args.seed, os.path.join(args.out, 'train'), name)
    # Replace the preset's --warmup-epochs 0 rather than repeating the flag.
    if '--warmup-epochs' in extra:
        i = argv.index('--warmup-epochs')
        del argv[i:i + 2]
    argv += extra
    shutil.rmtree(os.path.join(args.out, 'train', name), ignore_errors=True)  # a half-done epoch restarts

    record = dict(step=0, loss=[], objective=[], eps=[], mix=[])

    def ramp(steps: int) -> float:
        return 1.0 if steps == 0 else min(1.0, record['step'] / steps)

    loss_forward = ALPSSoftTargetCrossEntropy.forward

    def forward(self, x, target):
        if not torch.is_grad_enabled():
            return loss_forward(self, x, target)
        self.eps = EPS * ramp(eps_steps)
        loss = loss_forward(self, x, target)
        with torch.no_grad():
            xf = x.detach().float()
            objective = torch.sum(-adversarial_label(xf, target, EPS) * torch.log_softmax(xf, -1), -1).mean()
        record['loss'].append(round(float(loss.detach()), 5))
        record['objective'].append(round(float(objective), 5))
        record['eps'].append(round(self.eps, 5))
        record['step'] += 1
        return loss

    sample = ALPSMixup.sample

    def sample_ramped(self, batch_size, device):
        lam, partner = sample(self, batch_size, device)
        r = ramp(mix_steps)
        record['mix'].append(round(r, 5))
        if r < 1.0:
            lam = 1.0 - r * (1.0 - lam)
        return lam, partner

    ALPSSoftTargetCrossEntropy.forward = forward
    ALPSMixup.sample = sample_ramped
    utils.setup_default_logging()
    t0 = time.time()
    rc = engine.main(argv)
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f'the training engine returned {rc}')

    import csv
    with open(os.path.join(args.out, 'train', name, 'summary.csv'), newline='') as f:
        summary = list(csv.DictReader(f))[-1]
    result = dict(
        arm=args.arm, seed=args.seed, argv=argv, eps_ramp_steps=eps_steps, mix_ramp_steps=mix_steps,
        wall_s=round(wall, 1), torch=torch.__version__, threads=torch.get_num_threads(),
        train_loss=float(summary['train_loss']), eval_loss=float(summary['eval_loss']),
        eval_top1=float(summary['eval_top1']), **{k: record[k] for k in ('loss', 'objective', 'eps', 'mix')})
    os.makedirs(os.path.join(args.out, 'results'), exist_ok=True)
    path = os.path.join(args.out, 'results', name + '.json')
    with open(path + '.tmp', 'w') as f:
        json.dump(result, f)
    os.replace(path + '.tmp', path)


def load_results(out: str) -> List[dict]:
    folder = os.path.join(out, 'results')
    if not os.path.isdir(folder):
        return []
    rows = []
    for f in sorted(os.listdir(folder)):
        if f.endswith('.json'):
            with open(os.path.join(folder, f)) as fh:
                rows.append(json.load(fh))
    return rows


def stalled(r: dict) -> bool:
    return max(block_means(r)) > STALL_LOSS


def block_means(r: dict) -> List[float]:
    obj = r['objective']
    return [mean(obj[i:i + STALL_WINDOW]) for i in range(STALL_FROM, len(obj), STALL_WINDOW)]


HEADER = """# The ALPS start stall: first epoch of the `cpu` preset, per seed and remedy

CIFAR-10 (50k train images, eval on the first 2,000 test images: `--max-eval-samples 2000`), `preact_resnet18_w16`,
batch 128, SGD Nesterov momentum 0.9, LR 0.1 from step 0, weight decay 1e-4, ALPS eps 0.3, Beta(8, 2), channels-last:
the `cpu` preset's ALPS command with `--epochs 1` (its LR milestones act later, so this is its first epoch; checked:
seed 1's preset arm logs 2.31 / 2.26 at updates 100 / 200, as the 6-epoch run did). Code: commit `0155200` (frozen
pre-session checkout), driven by `benchmarks/stall_study.py`; exact commands in [commands.md](commands.md), each run's
argv and per-update losses in `runs/`. Machine: AMD EPYC, 2 cores, CPU only, one training at a time with 1 thread,
**shared with other agents' jobs (load average 3-11)**: the wall times measure the load, not the arms.

Arms: `preset` (no remedy); `lr-warmup` (`--warmup-epochs 1 --sched-on-updates`: LR linear 1e-5 -> 0.1 over the
390 updates); `eps-ramp` (ALPS eps = 0.3 * min(1, t / 390) at update t, everything else as the preset);
`eps-mix-ramp` (eps ramp, and lam -> 1 - min(1, t / 390) * (1 - lam)). The ramps consume no random numbers, so the
arms of a seed share initial weights, batches, lam and partners.

**Stalled** (fixed after the known stall, preset seed 1, and before any other run had finished): from update 100
on, some block of 50 updates has a mean eps-0.3 ALPS objective above ln 10 - 0.05 = 2.253 (ln 10 = 2.303 is the
uniform prediction's value for any target). The objective is computed on the trained logits at eps 0.3 for every
arm, so the ramped arms are judged on the preset's scale.

"""


def write_table(out: str, path: str, arms: List[str]) -> None:
    rows = load_results(out)
    by = {(r['arm'], r['seed']): r for r in rows}
    seeds = sorted({r['seed'] for r in rows}, key=lambda s: (s != 1, s))
    arms = [a for a in arms if any(r['arm'] == a for r in rows)]
    lines = ['| seed | arm | obj. peak 0-24 | loss@25 | loss@100 | loss@200 | loss@300 | obj. worst block | obj. last 50 | epoch train loss | '
             'eval loss | eval top-1 % | stalled? | wall s |', '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for s in seeds:
        for a in arms:
            r = by.get((a, s))
            if r is None:
                continue
            at = ' | '.join(f"{r['loss'][i]:.3f}" + ('' if r['loss'][i] == r['objective'][i] else
                                                    f" ({r['objective'][i]:.3f})") for i in LOG_STEPS[:4])
            lines.append(f"| {s} | {a} | {max(r['objective'][:25]):.2f} | {at} | {max(block_means(r)):.3f} | {mean(r['objective'][-STALL_WINDOW:]):.3f} | {r['train_loss']:.4f} | "
                         f"{r['eval_loss']:.4f} | {r['eval_top1']:.2f} | {'**yes**' if stalled(r) else 'no'} | "
                         f"{r['wall_s']:.0f} |")
    summary = ['| arm | seeds run | stalled | eval top-1 % mean ± std (all seeds) | min | eval top-1 % mean (seeds where '
               'every arm ran) | obj. last 50, mean |', '|---|---|---|---|---|---|---|']
    common = [s for s in seeds if all((a, s) in by for a in arms)]
    for a in arms:
        rs = [by[(a, s)] for s in seeds if (a, s) in by]
        top = [r['eval_top1'] for r in rs]
        sd = (sum((t - mean(top)) ** 2 for t in top) / (len(top) - 1)) ** 0.5 if len(top) > 1 else math.nan
        cm = mean(by[(a, s)]['eval_top1'] for s in common) if common else math.nan
        summary.append(f"| {a} | {len(rs)} ({', '.join(str(r['seed']) for r in rs)}) | "
                       f"{sum(map(stalled, rs))} | {mean(top):.2f} ± {sd:.2f} | {min(top):.2f} | {cm:.2f} (n={len(common)}) | "
                       f"{mean(mean(r['objective'][-STALL_WINDOW:]) for r in rs):.3f} |")
    ref = 'lr-warmup'
    if ref in arms and common:
        summary += ['', f'Paired by seed (same initial weights and batches), eval top-1 of each arm minus `{ref}`, over '
                        f'seeds {", ".join(map(str, common))}:', '',
                    '| arm | mean difference (points) | std | seeds where the arm is at least as accurate |',
                    '|---|---|---|---|']
        for a in arms:
            if a == ref:
                continue
            d = [by[(a, s)]['eval_top1'] - by[(ref, s)]['eval_top1'] for s in common]
            sd = (sum((x - mean(d)) ** 2 for x in d) / (len(d) - 1)) ** 0.5 if len(d) > 1 else math.nan
            summary.append(f'| {a} | {mean(d):+.2f} | {sd:.2f} | {sum(x >= 0 for x in d)} of {len(d)} |')
    text = HEADER + '\n'.join(summary) + '\n\nPer run ("obj. peak 0-24" = the highest eps-0.3 ALPS objective of updates ' \
        '0-24, the early blow-up; training loss of the batch at update 25/100/200/300, as train_timm logs ' \
        'it at batch_idx; in brackets the eps-0.3 ALPS objective on the same logits where the trained loss differs; ' \
        '"obj. worst block" = the highest mean of that objective over the 50-update blocks from update 100 on, the ' \
        'stall test (stalled if above ln 10 - 0.05 = 2.253); "obj. last 50" = its mean over updates 340-389):\n\n' + '\n'.join(lines) + '\n'
    if path:
        with open(path, 'w') as f:
            f.write(text)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--code', default=REPO, help='checkout whose timm_alps and train_timm.py are trained')
    p.add_argument('--data-dir', default=None, help='CIFAR-10 converted with `python -m timm_alps.data`')
    p.add_argument('--out', default=os.path.join(REPO, 'runs', 'stall'))
    p.add_argument('--seeds', type=int, nargs='+', default=[1, 0, 2, 3, 4, 5])
    p.add_argument('--arms', nargs='+', default=['preset', 'lr-warmup', 'eps-ramp'], choices=list(ARMS))
    p.add_argument('--table', default=None, help='write the results table (markdown) here and exit')
    p.add_argument('--arm', choices=list(ARMS), help=argparse.SUPPRESS)  # child process: one run
    p.add_argument('--seed', type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm is not None:
        return train_one(args)
    if args.table is not None:
        return write_table(args.out, args.table, list(ARMS))
    if args.data_dir is None:
        p.error('--data-dir is required to train')
    os.makedirs(args.out, exist_ok=True)
    for seed in args.seeds:  # a seed's arms together, so a cut-off study still compares like with like
        for arm in args.arms:
            name = run_name(arm, seed)
            if os.path.exists(os.path.join(args.out, 'results', name + '.json')):
                print(f'{name}: done, skipped', flush=True)
                continue
            print(f'{time.strftime("%H:%M:%S")} {name}: training', flush=True)
            with open(os.path.join(args.out, name + '.log'), 'w') as log:
                rc = subprocess.call([sys.executable, os.path.abspath(__file__), '--code', args.code, '--data-dir',
                                      args.data_dir, '--out', args.out, '--arm', arm, '--seed', str(seed)],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=args.code)
            print(f'{time.strftime("%H:%M:%S")} {name}: exit {rc}', flush=True)


if __name__ == '__main__':
    main()
