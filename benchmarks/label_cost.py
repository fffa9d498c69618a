"""Cost of the fused ALPS loss against timm's SoftTargetCrossEntropy, forward + backward, at ImageNet-1k and -22k sizes.

    python -m benchmarks.label_cost [--rounds 15] [--reps 5] [--threads 1] [--clock wall|cpu] [--before DIR]
                                    [--device cpu|cuda] [--out FILE] [--append]

Targets are what `ALPSMixup` hands the loss: dense (B, K) float32 rows (the sample's own label), without and with
label smoothing 0.1. Both losses get the same targets and the same logits; one step is
`criterion(logits, target).backward()`. Every round times `--reps` steps of each variant in a shuffled order, so
drifts in machine load hit all variants alike; the table gives the median over rounds of the time per step, its
interquartile range, and the median (IQR) over rounds of the per-round ratio to timm.

Variants: timm `SoftTargetCrossEntropy`; `timm_alps.ALPSSoftTargetCrossEntropy(eps=0.3)` (the real class, on the
mixer's targets); the label alone (`timm_alps.adversarial_label`, forward only, to show where the time goes); the
label followed by timm's soft-target formula inline; with `--before DIR`, the
`adversarial_label` of DIR/timm_alps/labels.py (e.g. a checkout of an older commit) followed by the same soft-target
cross-entropy, the fused loss as it was.
"""
import argparse
import importlib.util
import os
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from timm_alps import ALPSMixup, ALPSSoftTargetCrossEntropy, adversarial_label
from benchmarks.machine import SHARED_MACHINE_NOTE, machine_line

POINTS = ((128, 1000), (64, 21843))
SMOOTHING = (0.0, 0.1)
EPS = 0.3


def _load_labels(root: str):
    path = Path(root) / 'timm_alps' / 'labels.py'
    spec = importlib.util.spec_from_file_location('labels_before', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _quartiles(values):
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method='inclusive')
    return median, q1, q3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rounds', type=int, default=15)
    parser.add_argument('--reps', type=int, default=5, help='steps per variant per round')
    parser.add_argument('--threads', type=int, default=1, help='torch intra-op threads')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--clock', choices=('wall', 'cpu'), default='wall',
                        help='cpu: this process\'s CPU time, robust to other load on a shared machine (CPU, 1 thread)')
    parser.add_argument('--before', default=None, help='a checkout whose timm_alps/labels.py is the "before" label')
    parser.add_argument('--before-rounds', type=int, default=5, help='rounds in which the (slow) before variant runs')
    parser.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'label_cost.md'))
    parser.add_argument('--append', action='store_true', help='append this run to --out instead of replacing it')
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.reps < 1:
        parser.error('--rounds must be >= 2 and --reps >= 1')
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock == 'cpu' and device.type != 'cpu':
        parser.error('--clock cpu measures host CPU time: only meaningful with --device cpu')
    clock = time.process_time if args.clock == 'cpu' else time.perf_counter
    before = _load_labels(args.before) if args.before else None
    load_start = os.getloadavg()
    timm_ce, alps_ce = SoftTargetCrossEntropy(), ALPSSoftTargetCrossEntropy(eps=EPS)

    def inline_fused(logits, target):  # the ALPS loss without the class around it: label, then timm's formula
        label = adversarial_label(logits, target, EPS)
        return torch.sum(-label * F.log_softmax(logits, dim=-1), dim=-1).mean()

    def old_fused(logits, target):
        label = before.adversarial_label(logits, target, EPS)
        return torch.sum(-label * F.log_softmax(logits, dim=-1), dim=-1).mean()

    rows = []
    for batch, k in POINTS:
        for smoothing in SMOOTHING:
            generator = torch.Generator().manual_seed(0)
            mixer = ALPSMixup(num_classes=k, label_smoothing=smoothing, seed=0)
            _, target = mixer(torch.zeros(batch, 1), torch.randint(k, (batch,), generator=generator))
            target = target.to(device)
            logits = (torch.randn(batch, k, generator=generator) * 3).to(device).requires_grad_()

            def step(criterion, target=target):
                criterion(logits, target).backward()
                logits.grad = None

            def label_only(_):
                adversarial_label(logits, target, EPS)

            variants = {'timm': (step, timm_ce), 'alps': (step, alps_ce), 'label': (label_only, None),
                        'inline': (step, inline_fused)}
            if before is not None:
                variants['before'] = (step, old_fused)
            times = {name: [] for name in variants}
            order = list(variants)
            shuffle = random.Random(0)
            for fn, criterion in variants.values():  # warm-up
                fn(criterion)
            for round_index in range(args.rounds):
                shuffle.shuffle(order)
                for name in order:
                    if name == 'before' and round_index >= args.before_rounds:
                        continue
                    fn, criterion = variants[name]
                    if device.type == 'cuda':
                        torch.cuda.synchronize()
                    start = clock()
                    for _ in range(args.reps):
                        fn(criterion)
                    if device.type == 'cuda':
                        torch.cuda.synchronize()
                    times[name].append((clock() - start) / args.reps * 1e3)
            ratios = [a / t for a, t in zip(times['alps'], times['timm'])]
            inline_ratios = [a / t for a, t in zip(times['inline'], times['timm'])]
            row = dict(batch=batch, k=k, smoothing=smoothing, ratio=_quartiles(ratios),
                       inline_ratio=_quartiles(inline_ratios),
                       **{name: _quartiles(values) for name, values in times.items()})
            if before is not None:
                row['before_ratio'] = _quartiles([b / t for b, t in zip(times['before'], times['timm'])])
            rows.append(row)
            print(_format_row(row, before is not None), flush=True)
    load_end = os.getloadavg()

    command = 'python -m benchmarks.label_cost ' + ' '.join(argv if argv is not None else os.sys.argv[1:])
    header = ['B', 'K', 'smoothing', 'timm SoftTargetCE (ms)', 'ALPS loss (ms)', 'ALPS / timm',
              'label alone (ms)', 'label + CE inline (ms)', 'inline / timm'] + (['before: fused loss (ms)', 'before / timm'] if before is not None else [])
    lines = [
        '# Fused ALPS loss vs timm SoftTargetCrossEntropy (forward + backward)',
        '',
        f'Command: `OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS", "unset")} {command.strip()}`',
        '',
        f'Machine: {machine_line(device)}; torch {torch.__version__}; load average (1 min) '
        f'{load_start[0]:.1f} at start, {load_end[0]:.1f} at end. Note: {SHARED_MACHINE_NOTE}.',
        '',
        f'Clock: {"process CPU time (time.process_time)" if args.clock == "cpu" else "wall time"}. '
        f'Each cell: median over {args.rounds} rounds of the mean time per step over {args.reps} steps, '
        f'[interquartile range]; ratios are medians [IQR] of the per-round ratio. eps={EPS}; targets are '
        f'`ALPSMixup` outputs (dense float32 (B, K) rows); ALPS loss = `ALPSSoftTargetCrossEntropy(eps={EPS})`.'
        + (f' The before variant ran in the first {min(args.before_rounds, args.rounds)} rounds only.'
           if before is not None else ''),
        '',
        '| ' + ' | '.join(header) + ' |',
        '|' + '---|' * len(header),
    ]
    lines += [_format_row(row, before is not None) for row in rows]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = '\n'.join(lines) + '\n'
    if args.append and out.exists():
        text = out.read_text() + '\n' + text
    out.write_text(text)
    print(f'wrote {args.out}')


def _cell(quartiles, digits=3):
    median, q1, q3 = quartiles
    return f'{median:.{digits}f} [{q1:.{digits}f}, {q3:.{digits}f}]'


def _format_row(row, with_before):
    cells = [str(row['batch']), str(row['k']), f'{row["smoothing"]:g}', _cell(row['timm']), _cell(row['alps']),
             _cell(row['ratio'], 2), _cell(row['label']),
             _cell(row['inline']), _cell(row['inline_ratio'], 2)]
    if with_before:
        cells += [_cell(row['before'], 1), _cell(row['before_ratio'], 1)]
    return '| ' + ' | '.join(cells) + ' |'


if __name__ == '__main__':
    main()
