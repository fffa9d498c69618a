"""DDP on CPU with gloo: `torchrun --nproc_per_node 2 -m timm_alps.train` (train_timm.py's engine) matches one
process on the same global batch."""
import argparse
import csv
import os
import subprocess
import sys

import pytest
import torch

from distributed_helpers import torchrun_command  # tests/distributed_helpers.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason='needs torch.distributed with gloo')

# A LayerNorm model: per-sample normalisation, so 2 x 16 samples on two ranks compute exactly what 32 samples on one
# process do (BatchNorm statistics would differ per rank by design).
VIT = ['--model', 'test_vit', '--model-kwargs', 'img_size=32', 'patch_size=8', '--num-classes', '10',
       '--max-train-samples', '64', '--max-eval-samples', '64', '--epochs', '2', '--no-progress', '--log-interval', '1',
       '--no-amp']  # fp32: bf16 rounding would differ between batch sizes 16 and 32


def _run(args, nproc=1):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    if nproc > 1:
        cmd = torchrun_command(nproc)
    else:
        cmd = [sys.executable]
    r = subprocess.run(cmd + ['-m', 'timm_alps.train'] + args, cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r.stdout + r.stderr


def _summary(path):
    with open(os.path.join(path, 'summary.csv'), newline='') as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def test_two_gloo_ranks_match_single_process_on_same_global_batch(tmp_path):
    """ALPS fused loss with no input mixing (--alps-prob 0, so partners drawn per rank do not matter): the
    adversarial labels, the sharded data, the gradient all-reduce and the reduced metrics must reproduce the
    single-process run on the same global batch. Tolerance 1e-5 relative: the only difference is the order of
    float additions in the gradient average (measured difference ~1e-7)."""
    common = VIT + ['--alps-prob', '0', '--output', str(tmp_path)]
    out = _run(common + ['-b', '16', '--experiment', 'ddp'], nproc=2)
    assert 'Process 1/2 on cpu (gloo)' in out
    _run(common + ['-b', '32', '--experiment', 'single'])
    ddp, single = _summary(tmp_path / 'ddp'), _summary(tmp_path / 'single')
    assert len(ddp) == len(single) == 2
    for a, b in zip(ddp, single):
        for key in ('train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr'):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a, b)
    # the model was updated (not a trivially equal pair of untrained runs)
    assert ddp[0]['eval_loss'] != ddp[1]['eval_loss']
    ckpt = _load(tmp_path / 'ddp' / 'last.pth.tar')
    assert ckpt['args'].world_size == 2 and len(ckpt['rank_state']) == 2


def test_ddp_alps_model_label_per_rank_streams_and_resume(tmp_path):
    """The model-handle path under DDP (extra forward on the module inside the wrapper, with BatchNorm), per-rank
    ALPS streams, and a DDP resume that continues every rank's streams."""
    common = ['--model', 'preact_resnet18_w16', '--model-kwargs', 'width=4', '--max-train-samples', '128',
              '--max-eval-samples', '64', '-b', '16', '--no-progress', '--alps-label', 'model', '--output',
              str(tmp_path), '--experiment', 'run']
    _run(common + ['--epochs', '1'], nproc=2)
    ckpt = _load(tmp_path / 'run' / 'last.pth.tar')
    g0, g1 = (r['alps_mixup']['generator'] for r in ckpt['rank_state'])
    assert not torch.equal(g0, g1), 'ranks must draw their own lambda and partners'
    assert ckpt['step'] == 4  # 128 samples / (2 ranks x 16)
    out = _run(common + ['--epochs', '2', '--resume', 'auto'], nproc=2)
    assert 'Resumed from' in out
    rows = _summary(tmp_path / 'run')
    assert [r['epoch'] for r in rows] == [0.0, 1.0]
    assert _load(tmp_path / 'run' / 'last.pth.tar')['step'] == 8
