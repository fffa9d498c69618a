"""Training-step overhead of ALPS against timm's Mixup, measured in one run with interleaved repetitions.

    python -m benchmarks.overhead [--model preact_resnet18] [--batch-size 128] [--reps 15] [--device cuda]

Each repetition times one full step (forward, loss, backward, SGD step) of every variant in a shuffled order, so
drifts in machine load hit all variants alike; the medians and their ratios to timm Mixup are printed and written
to benchmarks/results/overhead.md (or --out).
"""
import argparse
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import timm
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

import timm_alps  # noqa: F401  (registers preact_resnet18)
from timm_alps import ALPSMixup
from benchmarks.machine import machine_line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='preact_resnet18')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--num-classes', type=int, default=10)
    parser.add_argument('--reps', type=int, default=15)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', action='store_true', help='bf16 autocast (GPU)')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch default)')
    parser.add_argument('--clock', choices=('wall', 'cpu'), default='wall',
                        help='cpu: process CPU time, robust to other load on a shared machine (use with --threads 1)')
    parser.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'overhead.md'))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.clock == 'cpu' and device.type != 'cpu':
        parser.error('--clock cpu measures host CPU time: only meaningful with --device cpu')
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == 'cpu' else time.perf_counter
    torch.manual_seed(0)

    model = timm.create_model(args.model, num_classes=args.num_classes).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(args.num_classes, (args.batch_size,), device=device)

    timm_mixup = Mixup(mixup_alpha=1.0, label_smoothing=0.0, num_classes=args.num_classes)
    fused = ALPSMixup(num_classes=args.num_classes, seed=0)
    handle = ALPSMixup(num_classes=args.num_classes, seed=0, model=model)
    soft_ce = SoftTargetCrossEntropy()
    variants = {
        'plain CE': (lambda a, b: (a, b), lambda logits, t: F.cross_entropy(logits, t)),
        'timm Mixup + SoftTargetCrossEntropy': (timm_mixup, soft_ce),
        'ALPS fused (ALPSMixup + ALPSSoftTargetCrossEntropy)': (fused, fused.make_loss()),
        'ALPS model-handle (ALPSMixup(model=...))': (handle, handle.make_loss()),
    }

    def step(mix, criterion):
        inputs, target = mix(x, y)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = criterion(model(inputs), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed(mix, criterion):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = clock()
        step(mix, criterion)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        return clock() - start

    for mix, criterion in variants.values():
        for _ in range(args.warmup):
            step(mix, criterion)
    times = {name: [] for name in variants}
    order = list(variants)
    rng = random.Random(0)
    for _ in range(args.reps):
        rng.shuffle(order)
        for name in order:
            times[name].append(timed(*variants[name]))

    reference = statistics.median(times['timm Mixup + SoftTargetCrossEntropy'])
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        q1, _, q3 = statistics.quantiles(samples, n=4)
        rows.append(f'| {name} | {1000 * median:.1f} | {1000 * q1:.1f}-{1000 * q3:.1f} | {median / reference:.3f} |')
    command = 'python -m benchmarks.overhead ' + ' '.join(argv if argv is not None else __import__('sys').argv[1:])
    report = '\n'.join([
        f'### {args.model}, batch {args.batch_size}, 32x32, {device.type}{" bf16" if args.amp else ""}'
        f'{" channels_last" if args.channels_last else ""}',
        '',
        f'Machine: {machine_line(device)}; torch {torch.__version__}, timm {timm.__version__}. '
        f'{args.reps} interleaved repetitions after {args.warmup} warm-up steps per variant; '
        f'{"process CPU time" if args.clock == "cpu" else "wall-clock time"}.',
        f'Command: `{command.strip()}`',
        '',
        f'| variant | median step ({args.clock}, ms) | IQR (ms) | ratio to timm Mixup |',
        '|---|---|---|---|',
        *rows,
        '',
    ])
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = '# Training-step overhead of ALPS\n\nGoals: fused <= 1.02x timm Mixup; model-handle <= 1.40x.\n\n'
    existing = out.read_text() if out.exists() else header
    out.write_text(existing.rstrip() + '\n\n' + report)


if __name__ == '__main__':
    main()
