"""FastCollateALPSMixup: uint8 mixing while collating, as timm's FastCollateMixup, with per-worker streams."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from timm.data import FastCollateMixup
from timm.data.loader import PrefetchLoader
from torch.utils.data import DataLoader, Dataset

from timm_alps import ALPSSoftTargetCrossEntropy, FastCollateALPSMixup


def make_batch(batch_size, numpy=True, seed=0, k=10):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(batch_size, 3, 5, 4), dtype=np.uint8)
    labels = rng.integers(0, k, size=batch_size)
    return [(im if numpy else torch.from_numpy(im), int(y)) for im, y in zip(images, labels)]


@pytest.mark.parametrize('numpy', [True, False])
@pytest.mark.parametrize('batch_size', [1, 2, 7, 16])
@pytest.mark.parametrize('mode', ['elem', 'pair', 'batch'])
def test_dtype_shape_and_own_labels(numpy, batch_size, mode):
    batch = make_batch(batch_size, numpy)
    collate = FastCollateALPSMixup(mode=mode, num_classes=10, label_smoothing=0.1, seed=0)
    images, target = collate(batch)
    assert images.dtype == torch.uint8 and images.shape == (batch_size, 3, 5, 4)
    assert target.dtype == torch.float32 and target.shape == (batch_size, 10)
    labels = torch.tensor([y for _, y in batch])
    torch.testing.assert_close(target, F.one_hot(labels, 10).float() * 0.9 + 0.01)  # own label, never the partner's


@pytest.mark.parametrize('numpy', [True, False])
@pytest.mark.parametrize('batch_size', [3, 8])
def test_pixels_are_the_rounded_blend_with_the_partner(numpy, batch_size):
    batch = make_batch(batch_size, numpy, seed=1)
    images, _ = FastCollateALPSMixup(num_classes=10, seed=3)(batch)
    lam, partner = FastCollateALPSMixup(num_classes=10, seed=3).sample(batch_size)
    x = torch.stack([torch.as_tensor(b[0]) for b in batch]).double()
    lam = lam.double().view(-1, 1, 1, 1)
    expected = lam * x + (1 - lam) * x[partner]
    assert (images.double() - expected).abs().max() <= 0.5 + 1e-4
    assert (lam < 1).all() and sorted(partner.tolist()) == list(range(batch_size))


@pytest.mark.parametrize('numpy', [True, False])
def test_pixels_equal_timm_fast_collate_mixup_for_the_same_lam_and_partner(numpy, monkeypatch):
    batch_size = 12
    batch = make_batch(batch_size, numpy, seed=2)
    lam = torch.rand(batch_size, generator=torch.Generator().manual_seed(0))
    lam[::3] = torch.tensor([0.5, 0.25, 0.75, 0.125])  # exact halves: round-half-to-even must match np.rint
    flip = torch.arange(batch_size).flip(0)  # timm's partner: j = B - 1 - i
    collate = FastCollateALPSMixup(num_classes=10, seed=0)
    monkeypatch.setattr(collate, 'sample', lambda b, device='cpu': (lam, flip))
    ours, _ = collate(batch)
    timm_collate = FastCollateMixup(mixup_alpha=1.0, mode='elem', label_smoothing=0.0, num_classes=10)
    monkeypatch.setattr(timm_collate, '_params_per_elem',
                        lambda n: (lam.numpy().astype(np.float32), np.zeros(n, dtype=bool)))
    theirs, _ = timm_collate(batch)
    assert torch.equal(ours, theirs)


def test_prob_zero_one_and_mixup_enabled():
    batch = make_batch(9)
    original = torch.stack([torch.from_numpy(b[0]) for b in batch])
    assert torch.equal(FastCollateALPSMixup(prob=0.0, num_classes=10, seed=0)(batch)[0], original)
    mixed = FastCollateALPSMixup(prob=1.0, num_classes=10, seed=0)(batch)[0]
    lam, partner = FastCollateALPSMixup(prob=1.0, num_classes=10, seed=0).sample(9)
    assert (lam < 1).all()
    moved = partner != torch.arange(9)
    assert all(not torch.equal(mixed[i], original[i]) for i in torch.nonzero(moved).view(-1).tolist())
    collate = FastCollateALPSMixup(num_classes=10, seed=0)
    collate.mixup_enabled = False
    assert torch.equal(collate(batch)[0], original)


def test_prefetch_loader_switches_mixing_off():
    collate = FastCollateALPSMixup(num_classes=10, seed=0)
    loader = PrefetchLoader(DataLoader(make_batch(4), batch_size=4, collate_fn=collate), device=torch.device('cpu'))
    assert loader.mixup_enabled  # timm's PrefetchLoader sees a FastCollateMixup
    loader.mixup_enabled = False  # what timm's train.py does at --mixup-off-epoch
    assert collate.mixup_enabled is False


class PatternDataset(Dataset):
    """Every batch of `batch_size` consecutive items holds the same images: outputs differ only by the draws."""

    def __init__(self, batch_size, batches):
        self.batch_size, self.n = batch_size, batch_size * batches

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        j = i % self.batch_size
        return np.full((1, 2, 2), 10 + 30 * j, dtype=np.uint8), j


def run_loader(collate, num_workers, batch_size=5, batches=8, torch_seed=0, persistent=False):
    torch.manual_seed(torch_seed)
    loader = DataLoader(PatternDataset(batch_size, batches), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate, persistent_workers=persistent)
    return [images for images, _ in loader]


@pytest.mark.parametrize('num_workers', [1, 4])
def test_workers_draw_independent_reproducible_streams(num_workers):
    collate = FastCollateALPSMixup(num_classes=10, seed=42)
    first = run_loader(collate, num_workers)
    assert len(first) == 8 and all(b.dtype == torch.uint8 and b.shape == (5, 1, 2, 2) for b in first)
    # same seed and torch seed: the same batches
    assert all(torch.equal(a, b) for a, b in zip(first, run_loader(FastCollateALPSMixup(num_classes=10, seed=42),
                                                                  num_workers)))
    # no two batches share their draws (workers do not repeat each other, batches do not repeat)
    keys = {tuple(b.flatten().tolist()) for b in first}
    assert len(keys) == len(first)
    # another seed, epoch or rank: other draws
    for other in (FastCollateALPSMixup(num_classes=10, seed=43), FastCollateALPSMixup(num_classes=10, seed=42, rank=1)):
        assert not torch.equal(run_loader(other, num_workers)[0], first[0])
    collate.set_epoch(1)
    assert not torch.equal(run_loader(collate, num_workers)[0], first[0])


def test_main_process_stream_and_exact_resume():
    collate = FastCollateALPSMixup(num_classes=10, seed=42)
    first = run_loader(collate, 0, batches=4)
    assert len({tuple(b.flatten().tolist()) for b in first}) == 4
    again = run_loader(FastCollateALPSMixup(num_classes=10, seed=42), 0, batches=4, torch_seed=123)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # num_workers=0: the seed alone decides
    state = collate.state_dict()
    expected = run_loader(collate, 0, batches=2)
    resumed = FastCollateALPSMixup(num_classes=10, seed=42)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(run_loader(resumed, 0, batches=2), expected))
    # a resumed run that only tells the epoch does not replay epoch 0
    later = FastCollateALPSMixup(num_classes=10, seed=42)
    later.set_epoch(5)
    assert not torch.equal(run_loader(later, 0, batches=1)[0], first[0])


def test_persistent_workers_continue_their_streams_across_epochs():
    torch.manual_seed(0)
    loader = DataLoader(PatternDataset(5, 4), batch_size=5, num_workers=2, persistent_workers=True,
                        collate_fn=FastCollateALPSMixup(num_classes=10, seed=42))
    epochs = [[tuple(images.flatten().tolist()) for images, _ in loader] for _ in range(2)]
    assert len(set(epochs[0]) | set(epochs[1])) == 8


def test_make_loss_and_from_mixup_args():
    collate = FastCollateALPSMixup.from_mixup_args(
        dict(mixup_alpha=0.0, cutmix_alpha=0.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5, mode='batch',
             label_smoothing=0.1, num_classes=10), alps_eps=0.2)
    assert collate.label_path == 'fused' and collate.mode == 'batch' and collate.label_smoothing == 0.1
    loss = collate.make_loss()
    assert isinstance(loss, ALPSSoftTargetCrossEntropy) and loss.eps == 0.2
    assert collate.make_loss('bce', target_threshold=0.2).eps == 0.2
    with pytest.raises(ValueError, match="mixup_args\\['cutmix_alpha'\\]"):
        FastCollateALPSMixup.from_mixup_args(dict(cutmix_alpha=1.0))


@pytest.mark.parametrize('batch, error, match', [
    ([], ValueError, 'empty batch'),
    ([(np.zeros((3, 2, 2), np.float32), 0)], TypeError, 'uint8'),
    ([(np.zeros((3, 2, 2), np.uint8), 0), (np.zeros((3, 2, 3), np.uint8), 1)], ValueError, 'one shape'),
    ([(torch.zeros(3, 2, 2, dtype=torch.uint8), 0), (np.zeros((3, 2, 2), np.uint8), 1)], ValueError, 'one shape'),
    ([('image', 0)], TypeError, 'numpy arrays or tensors'),
    ([(np.zeros((3, 2, 2), np.uint8), 10)], ValueError, 'out of range'),
    ([np.zeros((3, 2, 2), np.uint8)], TypeError, r'\(image, target\) pairs'),
])
def test_bad_batches_are_named(batch, error, match):
    with pytest.raises(error, match=match):
        FastCollateALPSMixup(num_classes=10, seed=0)(batch)


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(alps_alpha=float('inf')), ValueError, 'alps_alpha=inf'),
    (dict(alps_eps=None), TypeError, 'alps_eps'),
    (dict(mode='half'), ValueError, "mode='half'"),
    (dict(seed=False), TypeError, 'seed'),
    (dict(num_classes=1), ValueError, 'num_classes=1'),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        FastCollateALPSMixup(**kwargs)


def test_ddp_rank_is_read_from_torch_distributed_and_fixed_when_pickled(monkeypatch):
    import pickle
    default = FastCollateALPSMixup(num_classes=10, seed=42).sample(16)[0]
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.distributed, 'get_rank', lambda group=None: 1)
    collate = FastCollateALPSMixup(num_classes=10, seed=42)
    as_rank_1 = FastCollateALPSMixup(num_classes=10, seed=42, rank=1).sample(16)[0]
    torch.testing.assert_close(collate.sample(16)[0], as_rank_1)
    assert not torch.equal(as_rank_1, default)
    copy = pickle.loads(pickle.dumps(FastCollateALPSMixup(num_classes=10, seed=42)))  # as sent to spawned workers
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: False)
    assert copy.rank == 1
    torch.testing.assert_close(copy.sample(16)[0], as_rank_1)


@pytest.mark.slow  # a spawned worker imports torch and timm afresh (~10 s)
def test_spawned_worker():
    torch.manual_seed(0)
    loader = DataLoader(PatternDataset(4, 2), batch_size=4, num_workers=1, multiprocessing_context='spawn',
                        collate_fn=FastCollateALPSMixup(num_classes=10, seed=42))
    batches = [images for images, _ in loader]
    assert len(batches) == 2 and not torch.equal(batches[0], batches[1])


@settings(max_examples=60, deadline=None)
@given(batch_size=st.integers(1, 12), mode=st.sampled_from(['elem', 'pair', 'batch']), prob=st.floats(0, 1),
       seed=st.integers(0, 2 ** 64 - 1), smoothing=st.floats(0, 0.5), numpy=st.booleans(),
       hw=st.tuples(st.integers(1, 40), st.integers(1, 40)))
def test_collate_properties(batch_size, mode, prob, seed, smoothing, numpy, hw):
    rng = np.random.default_rng(seed % 2 ** 32)
    images = rng.integers(0, 256, size=(batch_size, 3, *hw), dtype=np.uint8)
    labels = rng.integers(0, 7, size=batch_size)
    batch = [(im if numpy else torch.from_numpy(im), int(y)) for im, y in zip(images, labels)]
    kwargs = dict(mode=mode, prob=prob, seed=seed, label_smoothing=smoothing, num_classes=7)
    out, target = FastCollateALPSMixup(**kwargs)(batch)
    lam, partner = FastCollateALPSMixup(**kwargs).sample(batch_size)
    assert out.dtype == torch.uint8 and out.shape == (batch_size, 3, *hw)
    assert target.dtype == torch.float32 and target.shape == (batch_size, 7)
    torch.testing.assert_close(target, F.one_hot(torch.from_numpy(labels), 7).float() * (1 - smoothing) + smoothing / 7)
    x = torch.from_numpy(images).double()
    expected = lam.double().view(-1, 1, 1, 1) * x + (1 - lam.double().view(-1, 1, 1, 1)) * x[partner]
    assert (out.double() - expected).abs().max() <= 0.5 + 1e-4
    unmixed = lam == 1
    assert torch.equal(out[unmixed], torch.from_numpy(images)[unmixed])  # lam = 1 leaves the image bit for bit
    if mode == 'pair':
        assert torch.equal(partner[partner], torch.arange(batch_size))


_TWO_RANKS_SCRIPT = '''
import sys
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
sys.path.insert(0, {tests!r})
from test_collate import PatternDataset
from timm_alps import FastCollateALPSMixup

dist.init_process_group('gloo')
collate = FastCollateALPSMixup(num_classes=10, seed=42)  # no rank given: read from the process group
lam, partner = collate.sample(64)
torch.manual_seed(0)
loader = DataLoader(PatternDataset(5, 3), batch_size=5, num_workers=1, collate_fn=collate)
images = torch.cat([x for x, _ in loader])
torch.save(dict(lam=lam, partner=partner, images=images), {out!r}.format(dist.get_rank()))
dist.destroy_process_group()
'''


@pytest.mark.slow  # two processes import torch and timm (~15 s)
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason='needs torch.distributed with gloo')
def test_two_real_gloo_ranks_draw_independent_reproducible_streams(tmp_path):
    """Two real DDP ranks (torchrun, gloo), same seed, no rank passed: each rank draws its own stream, in the main
    process and in its DataLoader worker, and each equals what `rank=r` gives without a process group."""
    import os
    import subprocess
    from distributed_helpers import torchrun_command
    script = tmp_path / 'ranks.py'
    script.write_text(_TWO_RANKS_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)),
                                               out=str(tmp_path / 'rank{}.pt')))
    r = subprocess.run(torchrun_command(2) + [str(script)],
                       env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f'rank{rank}.pt') for rank in (0, 1)]
    assert not torch.equal(ranks[0]['lam'], ranks[1]['lam'])
    assert not torch.equal(ranks[0]['images'], ranks[1]['images'])
    for rank, got in enumerate(ranks):
        lam, partner = FastCollateALPSMixup(num_classes=10, seed=42, rank=rank).sample(64)
        torch.testing.assert_close(got['lam'], lam)
        assert torch.equal(got['partner'], partner)
        collate = FastCollateALPSMixup(num_classes=10, seed=42, rank=rank)
        torch.manual_seed(0)
        loader = DataLoader(PatternDataset(5, 3), batch_size=5, num_workers=1, collate_fn=collate)
        assert torch.equal(got['images'], torch.cat([x for x, _ in loader]))
