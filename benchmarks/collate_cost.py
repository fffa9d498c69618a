"""Cost of collating a batch: timm's FastCollateMixup (per-sample loop) against FastCollateALPSMixup (vectorised).

    python -m benchmarks.collate_cost [--reps 15] [--threads 1] [--out benchmarks/results/collate_cost.md]

Both collates get the same list of (uint8 CHW image, class) pairs, as timm's prefetcher transforms produce them, and
mix every sample (prob 1, lam < 1) in 'elem' mode, timm's with MixUp alpha 1. Each repetition times every variant
once, in a shuffled order, so drifts in machine load hit all variants alike; medians and ratios are written to --out.
DataLoader workers run torch with one thread, hence the default --threads 1.
"""
import argparse
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from timm.data import FastCollateMixup

from benchmarks.machine import SHARED_MACHINE_NOTE, machine_line
from timm_alps import FastCollateALPSMixup

SHAPES = {'CIFAR 32x32': (3, 32, 32), 'ImageNet 224x224': (3, 224, 224)}


def make_batch(batch_size, shape, as_numpy, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(batch_size, *shape), dtype=np.uint8)
    return [(im.copy() if as_numpy else torch.from_numpy(im.copy()), int(y))
            for im, y in zip(images, rng.integers(0, 1000, batch_size))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--reps', type=int, default=15)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[128, 256])
    parser.add_argument('--out', default='benchmarks/results/collate_cost.md')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    timm_collate = FastCollateMixup(mixup_alpha=1.0, mode='elem', prob=1.0, label_smoothing=0.1, num_classes=1000)
    alps_collate = FastCollateALPSMixup(mode='elem', prob=1.0, label_smoothing=0.1, num_classes=1000, seed=0)
    cases = [(name, shape, b, as_numpy) for name, shape in SHAPES.items() for b in args.batch_sizes
             for as_numpy in (True, False)]
    times = {(case, v): [] for case in cases for v in ('timm', 'alps')}
    batches = {case: make_batch(case[2], case[1], case[3]) for case in cases}
    variants = {'timm': timm_collate, 'alps': alps_collate}
    for case in cases:  # warm-up
        for fn in variants.values():
            fn(batches[case])
    order = random.Random(0)
    for _ in range(args.reps):
        for case in cases:
            names = list(variants)
            order.shuffle(names)
            for v in names:
                start = time.perf_counter()
                variants[v](batches[case])
                times[(case, v)].append(time.perf_counter() - start)

    lines = [
        '# Collate cost: timm FastCollateMixup vs FastCollateALPSMixup',
        '',
        f'Command: `OMP_NUM_THREADS={args.threads} python -m benchmarks.collate_cost --reps {args.reps} '
        f'--threads {args.threads} --batch-sizes {" ".join(map(str, args.batch_sizes))}`',
        f'Machine: {machine_line("cpu")} (torch {torch.__version__}, numpy {np.__version__}); {SHARED_MACHINE_NOTE} '
        f'(shuffled order every repetition, medians of {args.reps} repetitions).',
        '',
        'Both mix every sample (prob 1, mode elem); timm draws MixUp alpha 1 lam and blends each sample with its '
        'mirror in a Python loop, ALPS blends its random partners in vectorised float32 numpy ops over cache-sized '
        'chunks of the batch (256 KiB of float32 pixels: 21 CIFAR images, 1 ImageNet image), with the same '
        'arithmetic and rounding. Times per batch, in milliseconds.',
        '',
        '| images | batch | input | timm FastCollateMixup (ms) | FastCollateALPSMixup (ms) | ALPS / timm |',
        '|---|---|---|---|---|---|',
    ]
    for case in cases:
        name, _, b, as_numpy = case
        t, a = (statistics.median(times[(case, v)]) * 1e3 for v in ('timm', 'alps'))
        lines.append(f'| {name} | {b} | {"numpy" if as_numpy else "tensor"} | {t:.2f} | {a:.2f} | {a / t:.2f}x |')
    text = '\n'.join(lines) + '\n'
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == '__main__':
    main()
