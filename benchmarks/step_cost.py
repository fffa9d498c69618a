"""End-to-end training step of ALPS (fused) against timm's Mixup + SoftTargetCrossEntropy, per number of classes.

    python -m benchmarks.step_cost [--model resnet18] [--img-size 64] [--batch-size 64] [--classes 10,1000,21843]

What a user sees: one full step (mixing, forward under bf16 autocast with channels_last, loss, backward, SGD step)
of the same model on the same batch. For each K the variants run interleaved in a shuffled order per repetition, so
drifts in machine load hit them alike; medians and the per-repetition ratios to timm are appended to
benchmarks/results/step_cost.md (or --out).
"""
import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from timm_alps import ALPSMixup
from benchmarks.machine import machine_line


def measure(args, num_classes: int, device: torch.device):
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=num_classes).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(num_classes, (args.batch_size,), device=device)
    timm_mixup = Mixup(mixup_alpha=1.0, label_smoothing=args.smoothing, num_classes=num_classes)
    alps = ALPSMixup(label_smoothing=args.smoothing, num_classes=num_classes, seed=0)
    variants = {
        'timm Mixup + SoftTargetCrossEntropy': (timm_mixup, SoftTargetCrossEntropy()),
        'ALPSMixup + make_loss() (fused)': (alps, alps.make_loss()),
    }

    def step(mix, criterion):
        inputs, target = mix(x, y)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = criterion(model(inputs), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == 'cuda':
            torch.cuda.synchronize()

    for variant in variants.values():
        for _ in range(args.warmup):
            step(*variant)
    times = {name: [] for name in variants}
    order, rng = list(variants), random.Random(0)
    for _ in range(args.reps):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            step(*variants[name])
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='resnet18')
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--classes', default='10,1000,21843')
    parser.add_argument('--smoothing', type=float, default=0.1, help="label smoothing of both mixers (timm's default)")
    parser.add_argument('--reps', type=int, default=30)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'step_cost.md'))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    command = 'python -m benchmarks.step_cost ' + ' '.join(sys.argv[1:] if argv is None else argv)
    rows = []
    for k in (int(c) for c in args.classes.split(',')):
        times = measure(args, k, device)
        reference = times['timm Mixup + SoftTargetCrossEntropy']
        for name, samples in times.items():
            median = statistics.median(samples)
            q1, _, q3 = statistics.quantiles(samples, n=4)
            # the ratio within each repetition (both variants ran back to back), so load drifts cancel
            r1, ratio, r3 = statistics.quantiles([a / b for a, b in zip(samples, reference)], n=4)
            rows.append(f'| {k} | {name} | {1000 * median:.1f} | {1000 * q1:.1f}-{1000 * q3:.1f} | '
                        f'{ratio:.3f} ({r1:.3f}-{r3:.3f}) |')
        print(rows[-2], rows[-1], sep='\n', flush=True)
    report = '\n'.join([
        f'### {args.model}, {args.img_size} px, batch {args.batch_size}, bf16 autocast + channels_last, '
        f'{device.type}, smoothing {args.smoothing:g}',
        '',
        f'Machine: {machine_line(device)}; torch {torch.__version__}, timm {timm.__version__}. {args.reps} '
        f'interleaved repetitions after {args.warmup} warm-up steps per variant; wall-clock time.',
        f'Command: `{command.strip()}`',
        '',
        '| classes | variant | median step (ms) | IQR (ms) | ratio to timm: median (IQR) of per-repetition ratios |',
        '|---|---|---|---|---|',
        *rows,
        '',
    ])
    print(report)
    out = Path(args.out)
    header = ('# End-to-end training step: ALPS against timm Mixup\n\n'
              'Goal: the fused ALPS step <= 1.01x timm Mixup + SoftTargetCrossEntropy at every K.\n')
    existing = out.read_text() if out.exists() else header
    out.write_text(existing.rstrip() + '\n\n' + report)


if __name__ == '__main__':
    main()
