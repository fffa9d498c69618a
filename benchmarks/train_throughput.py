"""Training throughput of train_timm.py against a bare fp32 loop over pre-loaded tensors, in one run.

train_timm.py runs twice per round: with its defaults (on a CPU with native bf16 -- AMX or AVX512-BF16 -- that is
bf16 autocast + channels_last) and with `--no-amp` (fp32, contiguous, the same arithmetic as the bare loop, which
isolates the script's own overhead). All sides train the same model with the same batch size and ALPS (ALPSMixup + fused ALPSSoftTargetCrossEntropy),
SGD with momentum. The bare loop has no data pipeline at all: the normalised training images sit in one tensor and
batches are slices of it (no shuffle, no crop/flip), and it does nothing but forward, loss, backward and step.
train_timm.py runs end to end through its `main()` exactly as from the command line (in-memory loader with
shuffle/crop/flip/normalise, the ALPS task, non-finite checks, LR schedule, EMA-free, evaluation, checkpoints,
summary, curves); the benchmark times each call of its `train_one_epoch` (the training loop, which is what the
bare loop does) and also reports the wall time of the whole `main()`.

The machine may be shared, so both sides are measured in CPU time of this process (`time.process_time`, one
intra-op thread by default so that no thread waits on a descheduled sibling) as well as wall time, rounds
alternate (bare, script, bare, script, ...), and the first epoch / pass of each round is warm-up. Ratios use the
median over rounds.

    python -m benchmarks.train_throughput       # writes benchmarks/results/train_throughput.md
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def bare_loop(args, images: torch.Tensor, labels: torch.Tensor, steps: int, passes: int):
    """(img per CPU-second, img per wall-second) of the plainest ALPS training loop; median of passes 2.."""
    import timm
    from timm_alps import ALPSMixup, ALPSSoftTargetCrossEntropy
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10, **args.model_kwargs)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    mixup_fn = ALPSMixup(alps_alpha=8, alps_beta=2, alps_eps=0.3, num_classes=10, seed=0)
    criterion = ALPSSoftTargetCrossEntropy(eps=0.3)
    b = args.batch_size
    cpu, wall = [], []
    for _ in range(passes):
        c0, w0 = time.process_time(), time.perf_counter()
        for i in range(steps):
            x, y = mixup_fn(images[i * b:(i + 1) * b], labels[i * b:(i + 1) * b])
            loss = criterion(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        cpu.append(steps * b / (time.process_time() - c0))
        wall.append(steps * b / (time.perf_counter() - w0))
    return statistics.median(cpu[1:]), statistics.median(wall[1:])


def script_run(args, argv):
    """(img per CPU-second, img per wall-second) of train_timm.py's training loop (median of epochs 2..), and the
    wall seconds of its whole main()."""
    from timm_alps.train import run as engine  # train_timm.py's engine
    original = engine.train_one_epoch
    cpu, wall = [], []

    def timed(epoch, task, loader, *a, **k):
        c0, w0 = time.process_time(), time.perf_counter()
        out = original(epoch, task, loader, *a, **k)
        n = len(loader) * loader.batch_size
        cpu.append(n / (time.process_time() - c0))
        wall.append(n / (time.perf_counter() - w0))
        return out

    engine.train_one_epoch = timed
    try:
        t0 = time.perf_counter()
        if engine.main(argv) != 0:
            raise RuntimeError('train_timm.py did not finish')
        total = time.perf_counter() - t0
    finally:
        engine.train_one_epoch = original
    return statistics.median(cpu[1:]), statistics.median(wall[1:]), total


def cpu_name() -> str:
    """CPU model and its bf16 capability, from /proc/cpuinfo (Linux)."""
    try:
        with open('/proc/cpuinfo') as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((l.split(':', 1)[1].strip() for l in info.splitlines() if l.startswith('model name')), '?')
    flags = next((l.split(':', 1)[1].split() for l in info.splitlines() if l.startswith('flags')), [])
    bf16 = [f for f in ('amx_bf16', 'avx512_bf16') if f in flags]
    return f'{model} ({", ".join(bf16) if bf16 else "no native bf16"})'


def main(argv=None):
    from timm.utils import ParseKwargs
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='preact_resnet18_w16')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    p.add_argument('-b', '--batch-size', type=int, default=128)
    p.add_argument('--samples', type=int, default=2048, help='training samples per epoch')
    p.add_argument('--epochs', type=int, default=3, help='epochs (script) / passes (bare) per round')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--threads', type=int, default=1, help='torch intra-op threads for both sides')
    p.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'results', 'train_throughput.md'))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from timm_alps import data as alps_data
    from timm_alps.models import CIFAR10_MEAN, CIFAR10_STD
    x, y, _ = alps_data.load_split_tensors(alps_data.BUNDLED_DATA_DIR, 'train')
    x, y = x[:args.samples], y[:args.samples]
    images = (x.float() / 255 - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    steps = args.samples // args.batch_size

    script_argv = ['--model', args.model, '-b', str(args.batch_size), '--epochs', str(args.epochs),
                   '--max-train-samples', str(args.samples), '--no-progress', '--seed', '0']
    if args.model_kwargs:
        script_argv += ['--model-kwargs'] + [f'{k}={v}' for k, v in args.model_kwargs.items()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            b_cpu, b_wall = bare_loop(args, images, y, steps, passes=args.epochs)
            s_cpu, s_wall, total = script_run(args, script_argv + ['--output', tmp, '--experiment', f'r{r}'])
            f_cpu, f_wall, _ = script_run(args, script_argv + ['--no-amp', '--output', tmp, '--experiment', f'f{r}'])
            rows.append((b_cpu, s_cpu, f_cpu, b_wall, s_wall, f_wall, total))
            print(f'round {r}: img/CPU-s bare fp32 {b_cpu:.0f}, script default {s_cpu:.0f} ({s_cpu / b_cpu:.3f}), '
                  f'script --no-amp {f_cpu:.0f} ({f_cpu / b_cpu:.3f}); main() {total:.1f}s', flush=True)
    med = [statistics.median(col) for col in zip(*rows)]
    ratio_cpu, ratio_fp32, ratio_wall = med[1] / med[0], med[2] / med[0], med[4] / med[3]
    load = os.getloadavg()
    cli = ' '.join(sys.argv[1:] if argv is None else argv)
    from timm_alps.train import cpu_has_native_bf16
    native = cpu_has_native_bf16()
    lines = [
        '# Training throughput: train_timm.py vs a bare fp32 loop',
        '',
        f'Command: `python -m benchmarks.train_throughput{" " + cli if cli else ""}`',
        '',
        f'Machine: {cpu_name()}, {platform.machine()}, {os.cpu_count()} CPU core(s) shared with other processes (load '
        f'average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} over 1/5/15 min at the end), torch '
        f'{torch.__version__}, {args.threads} intra-op thread(s), device cpu. train_timm.py\'s default precision '
        f'here: {"bf16 autocast + channels_last (native bf16 detected)" if native else "fp32 (no native bf16)"}.',
        '',
        f'Model `{args.model}`{" " + str(args.model_kwargs) if args.model_kwargs else ""}, batch {args.batch_size}, '
        f'{steps} updates per epoch, ALPS fused, SGD momentum. {args.rounds} alternating rounds of {args.epochs} '
        f'epochs (script: `timm_alps.train.main({" ".join(script_argv)} ...)`, then the same with `--no-amp`) / '
        f'{args.epochs} passes (bare fp32 loop); each round\'s first epoch/pass is warm-up, the others\' median is '
        f'reported.',
        '',
        '| round | bare fp32 img/CPU-s | script default img/CPU-s | ratio | script --no-amp img/CPU-s | ratio | '
        'bare img/s (wall) | script default img/s (wall) | ratio | script default main() wall (s) |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r, (b_cpu, s_cpu, f_cpu, b_wall, s_wall, f_wall, total) in enumerate(rows):
        lines.append(f'| {r} | {b_cpu:.0f} | {s_cpu:.0f} | {s_cpu / b_cpu:.3f} | {f_cpu:.0f} | {f_cpu / b_cpu:.3f} | '
                     f'{b_wall:.0f} | {s_wall:.0f} | {s_wall / b_wall:.3f} | {total:.1f} |')
    lines += [
        '',
        f'**Default train_timm.py / bare fp32 loop, median over rounds: {ratio_cpu:.3f} in CPU time, {ratio_wall:.3f} '
        f'in wall time** (goal >= 1.6 on a CPU with native bf16). train_timm.py --no-amp / bare fp32 loop: '
        f'{ratio_fp32:.3f} in CPU time (the script\'s overhead; goal >= 0.90). CPU time is the number to trust on a '
        f'shared machine: wall time also counts the time other processes held the cores.',
        '',
        'Not in the loop numbers but in `main()` wall: start-up, reading the shards, evaluation on the 1,000 test '
        'images after every epoch, checkpoints, summary.csv and curves.png.',
    ]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print(f'ratio {ratio_cpu:.3f} (CPU time), {ratio_wall:.3f} (wall); written to {args.out}')


if __name__ == '__main__':
    main()
