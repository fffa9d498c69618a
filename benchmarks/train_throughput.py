"""End-to-end training throughput of train_timm.py against a bare loop over pre-loaded tensors.

Both sides train the same model with the same batch size, optimizer and ALPS (ALPSMixup + fused
ALPSSoftTargetCrossEntropy). The bare loop has no data pipeline at all: the normalised training images sit in one
tensor and batches are slices of it (no shuffle, no crop/flip). train_timm.py does everything it normally does
(in-memory loader with crop/flip/normalise, the ALPS task, loss monitoring, LR schedule, checkpoints, summary,
curves); its throughput is the training-loop img/s it writes to summary.csv for each epoch after the first (the
first pays one-off warm-up), and the wall time of the whole process is reported too.

Runs alternate (bare, script, bare, script, ...) so that load from other processes hits both sides alike; the
ratio of medians is reported.

    python -m benchmarks.train_throughput                  # CPU, writes benchmarks/results/train_throughput.md
    python -m benchmarks.train_throughput --rounds 5 --model-kwargs width=16
"""
import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bare_loop(args, images: torch.Tensor, labels: torch.Tensor, steps: int, repeats: int) -> float:
    """img/s of the plainest ALPS training loop over pre-loaded, pre-normalised tensors (median of `repeats`)."""
    import timm
    import timm_alps
    from timm_alps import ALPSMixup, ALPSSoftTargetCrossEntropy
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10, **args.model_kwargs)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    mixup_fn = ALPSMixup(alps_alpha=8, alps_beta=2, alps_eps=0.3, num_classes=10, seed=0)
    criterion = ALPSSoftTargetCrossEntropy(eps=0.3)
    b = args.batch_size
    rates = []
    for _ in range(repeats + 1):  # the first pass is warm-up
        t0 = time.perf_counter()
        for i in range(steps):
            x, y = mixup_fn(images[i * b:(i + 1) * b], labels[i * b:(i + 1) * b])
            loss = criterion(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        rates.append(steps * b / (time.perf_counter() - t0))
    return statistics.median(rates[1:])


def script_run(args, out_dir: str, name: str):
    """(median training-loop img/s over epochs 2.., wall seconds) of one train_timm.py run."""
    cmd = [sys.executable, os.path.join(REPO, 'train_timm.py'), '--model', args.model, '-b', str(args.batch_size),
           '--epochs', str(args.epochs), '--max-train-samples', str(args.samples), '--output', out_dir,
           '--experiment', name, '--no-progress', '--seed', '0']
    if args.model_kwargs:
        cmd += ['--model-kwargs'] + [f'{k}={v}' for k, v in args.model_kwargs.items()]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f'train_timm.py failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}')
    with open(os.path.join(out_dir, name, 'summary.csv'), newline='') as f:
        rates = [float(row['train_img_per_sec']) for row in csv.DictReader(f)][1:]
    return statistics.median(rates), wall, ' '.join(cmd[1:]).replace(REPO + '/', '')


def main(argv=None):
    from timm.utils import ParseKwargs
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='preact_resnet18_w16')
    p.add_argument('--model-kwargs', nargs='*', default={'width': 8}, action=ParseKwargs)
    p.add_argument('-b', '--batch-size', type=int, default=128)
    p.add_argument('--samples', type=int, default=2048, help='training samples per epoch')
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'results', 'train_throughput.md'))
    args = p.parse_args(argv)

    from timm_alps import data as alps_data
    from timm_alps.models import CIFAR10_MEAN, CIFAR10_STD
    x, y, _ = alps_data.load_split_tensors(alps_data.BUNDLED_DATA_DIR, 'train')
    x, y = x[:args.samples], y[:args.samples]
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    images = ((x.float() / 255) - mean) / std
    steps = args.samples // args.batch_size

    bare, script, walls, cmd = [], [], [], ''
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            bare.append(bare_loop(args, images, y, steps, repeats=args.epochs - 1))
            rate, wall, cmd = script_run(args, tmp, f'r{r}')
            script.append(rate)
            walls.append(wall)
            print(f'round {r}: bare {bare[-1]:.0f} img/s, train_timm.py {rate:.0f} img/s ({wall:.1f}s wall)',
                  flush=True)
    ratio = statistics.median(script) / statistics.median(bare)
    load = os.getloadavg()
    cli = ' '.join(sys.argv[1:] if argv is None else argv)
    lines = [
        '# Training throughput: train_timm.py vs a bare loop',
        '',
        f'Command: `python -m benchmarks.train_throughput{" " + cli if cli else ""}`',
        '',
        f'Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), torch '
        f'{torch.__version__}, {torch.get_num_threads()} threads, device cpu; load average at the end '
        f'{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min; other processes share these cores).',
        '',
        f'Model `{args.model}` {args.model_kwargs}, batch {args.batch_size}, {steps} updates per epoch '
        f'({steps * args.batch_size} images), ALPS fused, SGD; {args.rounds} alternating rounds, '
        f'{args.epochs} epochs each (train_timm.py: median of epochs 2..{args.epochs}; bare: median of '
        f'{args.epochs - 1} passes after one warm-up pass).',
        '',
        'train_timm.py run by each round:',
        '',
        f'    python {cmd}',
        '',
        '| round | bare loop (img/s) | train_timm.py loop (img/s) | train_timm.py process wall (s) |',
        '|---|---|---|---|',
    ]
    for r in range(args.rounds):
        lines.append(f'| {r} | {bare[r]:.0f} | {script[r]:.0f} | {walls[r]:.1f} |')
    lines += [
        '',
        f'**Ratio train_timm.py / bare loop (median over rounds): {ratio:.3f}** (goal >= 0.90).',
        '',
        'The process wall time also includes interpreter and library start-up, reading the shards, evaluation '
        'on the 1,000 test images after each epoch, checkpoints and the curves PNG.',
    ]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print(f'ratio {ratio:.3f}; written to {args.out}')


if __name__ == '__main__':
    main()
