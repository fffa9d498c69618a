#!/usr/bin/env python3
"""ALPS training script in the style of timm's train.py (the `timm-alps-train` console script, from a clone).

    python train_timm.py                                   # ALPS on the bundled CIFAR-10 subset, CPU-friendly
    python train_timm.py --alps-eps 0.3 --alps-beta 8 2    # the same, flags spelled out
    python train_timm.py --dataset torch/cifar10 --data-dir data --dataset-download --model preact_resnet18 \
        --epochs 200 --sched multistep --decay-milestones 101 151 --lr 0.1 --weight-decay 1e-4  # the paper
    torchrun --nproc_per_node 4 train_timm.py ...          # DDP (NCCL on GPUs, gloo on CPU)

The engine is the package `timm_alps.train`; `python train_timm.py --help` lists the flags.
"""
import sys

from timm_alps.train import TrainError, cli, main, parse_args  # noqa: F401 (the script's API: main, parse_args)

if __name__ == '__main__':
    sys.exit(cli(prog='train_timm.py'))
