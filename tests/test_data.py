import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image
from timm.data import create_dataset

from timm_alps.data import (BUNDLED_DATA_DIR, InMemoryLoader, convert, dataset_labels, decode_dataset,
                            default_eval_split, load_split_tensors, main, read_info, shard_image_shape, split_labels,
                            subset_indices)


def make_npz(path, n_train=(5, 7, 6), n_test=(3, 3, 3), size=(6, 5), channels=3, seed=0, mask=False):
    """Toy uint8 NHWC npz with a shuffled label order; class c has n_train[c] / n_test[c] samples."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, counts in (('train', n_train), ('test', n_test)):
        y = rng.permutation(np.repeat(np.arange(len(counts)), counts))
        arrays[f'x_{split}'] = rng.integers(0, 256, (len(y), *size, channels), dtype=np.uint8)
        arrays[f'y_{split}'] = y
        if mask:
            arrays[f'lossless_mask_{split}'] = rng.random(len(y)) < 0.7
    np.savez(path, **arrays)
    return arrays


def read_timm(root, name, split, mode='RGB'):
    ds = create_dataset(f'wds/{name}', root=str(root), split=split, input_img_mode=mode)
    pairs = list(ds)
    return np.stack([np.asarray(img) for img, _ in pairs]), np.array([t for _, t in pairs])


def source_positions(images, source):
    """Index in `source` (N x H x W x C, distinct images) of each of `images`."""
    where = {img.tobytes(): i for i, img in enumerate(source)}
    return np.array([where[img.tobytes()] for img in images])


@pytest.mark.parametrize('compress,shuffle', [(False, True), (True, False)])
def test_npz_round_trip_through_timm(tmp_path, compress, shuffle):
    src = make_npz(tmp_path / 'toy.npz')
    (tmp_path / 'toy.json').write_text(json.dumps({'classes': ['a', 'b', 'c']}))
    info = convert(tmp_path / 'toy.npz', tmp_path / 'out', shard_size=4, compress=compress, shuffle=shuffle)

    on_disk = json.loads((tmp_path / 'out' / '_info.json').read_text())
    assert on_disk == info == read_info(tmp_path / 'out')
    assert on_disk['classes'] == ['a', 'b', 'c'] and on_disk['name'] == 'toy'
    assert on_disk['shuffle'] is shuffle and on_disk['seed'] == 0
    for split in ('train', 'test'):
        s = on_disk['splits'][split]
        n = len(src[f'y_{split}'])
        assert s['name'] == split and s['num_samples'] == n and sum(s['shard_lengths']) == n
        assert len(s['filenames']) == -(-n // 4) and all((tmp_path / 'out' / f).is_file() for f in s['filenames'])
        x, y = read_timm(tmp_path / 'out', 'toy', split)
        pos = source_positions(x, src[f'x_{split}'])
        assert sorted(pos) == list(range(n)) and (pos != np.arange(n)).any() == shuffle  # a permutation of the input
        np.testing.assert_array_equal(x, src[f'x_{split}'][pos])
        np.testing.assert_array_equal(y, src[f'y_{split}'][pos])
        xt, yt, classes = load_split_tensors(tmp_path / 'out', split)  # same samples, same order as timm's reader
        assert xt.dtype == torch.uint8 and xt.shape == (n, 3, 6, 5) and classes == ['a', 'b', 'c']
        np.testing.assert_array_equal(xt.permute(0, 2, 3, 1).numpy(), x)
        np.testing.assert_array_equal(yt.numpy(), y)
        assert torch.equal(split_labels(tmp_path / 'out', split), yt)
        wds = create_dataset('wds/toy', root=str(tmp_path / 'out'), split=split)  # timm's iterable reader
        xd, yd = decode_dataset(wds)
        assert torch.equal(xd, xt) and torch.equal(yd, yt)
        with pytest.raises(TypeError, match='cannot be indexed'):
            decode_dataset(wds, [0])


def class_sorted_npz(path, classes=10, per_class=30, size=(4, 4)):
    """npz whose train split is sorted by class (as an image folder is), distinct random images."""
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(classes), per_class)
    x = rng.integers(0, 256, (len(y), *size, 3), dtype=np.uint8)
    np.savez(path, x_train=x, y_train=y)
    return x, y


def test_shuffle_mixes_classes_and_is_seeded(tmp_path):
    x, y = class_sorted_npz(tmp_path / 'sorted.npz')
    kw = dict(shard_size=50)
    info = convert(tmp_path / 'sorted.npz', tmp_path / 'a', **kw)
    convert(tmp_path / 'sorted.npz', tmp_path / 'b', **kw)
    convert(tmp_path / 'sorted.npz', tmp_path / 'c', seed=1, **kw)
    convert(tmp_path / 'sorted.npz', tmp_path / 'd', shuffle=False, **kw)
    assert info['shuffle'] is True and len(info['splits']['train']['filenames']) == 6
    for f in info['splits']['train']['filenames']:  # deterministic from the seed: byte-identical shards
        assert (tmp_path / 'a' / f).read_bytes() == (tmp_path / 'b' / f).read_bytes()
    shuffled, seed1, ordered = (load_split_tensors(tmp_path / d, 'train') for d in 'acd')
    pos = source_positions(shuffled[0].permute(0, 2, 3, 1).numpy(), x)
    assert sorted(pos) == list(range(len(y))) and torch.equal(shuffled[1], torch.from_numpy(y[pos]))
    assert not torch.equal(shuffled[1], seed1[1]) and torch.equal(ordered[1], torch.from_numpy(y))
    # the first shard: every class of a shuffled conversion, one or two of an ordered one
    first = [len(torch.unique(t[1][:50])) for t in (shuffled, seed1, ordered)]
    assert first[0] >= 8 and first[1] >= 8 and first[2] == 2
    # per-class draws keep the same samples with or without the shuffle
    a = convert(tmp_path / 'sorted.npz', tmp_path / 'e', per_class=5)
    b = convert(tmp_path / 'sorted.npz', tmp_path / 'f', per_class=5, shuffle=False)
    xa, xb = (load_split_tensors(tmp_path / d, 'train')[0] for d in 'ef')
    assert a['splits']['train']['num_samples'] == b['splits']['train']['num_samples'] == 50
    assert a['shuffle'] and not b['shuffle'] and not torch.equal(xa, xb)
    assert sorted(source_positions(xa.permute(0, 2, 3, 1).numpy(), x)) == \
        sorted(source_positions(xb.permute(0, 2, 3, 1).numpy(), x))


@pytest.mark.slow  # a fresh interpreter importing torch + timm: ~10 s on a loaded 2-core machine
def test_python_m_runs_without_runtime_warning(tmp_path):
    make_npz(tmp_path / 'toy.npz')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-W', 'error::RuntimeWarning', '-m', 'timm_alps.data',
                           str(tmp_path / 'toy.npz'), str(tmp_path / 'out'), '--seed', '3'],
                          capture_output=True, text=True, env=env, cwd=str(Path(__file__).resolve().parents[1]))
    assert proc.returncode == 0, proc.stderr
    assert 'Warning' not in proc.stderr and 'train: 18 samples in 1 shard(s)' in proc.stdout
    info = read_info(tmp_path / 'out')
    assert info['shuffle'] is True and info['seed'] == 3


@pytest.mark.parametrize('argv,match', [
    (['--per-class', 'x'], "--per-class: expected an int"),
    (['--per-class', '0'], 'per_class values must be positive'),
    (['--seed', '-1'], '--seed: expected an int >= 0'),
    (['--shard-size', '0'], 'shard_size must be a positive int'),
    (['--splits', 'train,'], '--splits: expected comma separated split names'),
    (['--splits', 'valid'], "no arrays 'x_valid'"),
    (['--name', 'a/b'], 'name must be a non-empty file name part'),
    (['--format', 'cifar100'], 'cifar-100-python'),
])
def test_cli_rejects_bad_arguments(tmp_path, capsys, argv, match):
    make_npz(tmp_path / 'toy.npz')
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / 'toy.npz'), str(tmp_path / 'out'), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and match in err and 'Traceback' not in err
    assert not (tmp_path / 'out' / '_info.json').exists()


def test_grayscale_and_cli(tmp_path, capsys):
    src = make_npz(tmp_path / 'gray.npz', channels=1)
    main([str(tmp_path / 'gray.npz'), str(tmp_path / 'out'), '--splits', 'test', '--name', 'g-ray', '--no-shuffle'])
    assert 'test: 9 samples in 1 shard(s)' in capsys.readouterr().out
    info = json.loads((tmp_path / 'out' / '_info.json').read_text())
    assert list(info['splits']) == ['test'] and info['classes'] == ['0', '1', '2']
    x, y = read_timm(tmp_path / 'out', 'g_ray', 'test', mode='L')
    np.testing.assert_array_equal(x, src['x_test'][..., 0])
    xt, _, _ = load_split_tensors(tmp_path / 'out', 'test')
    assert xt.shape == (9, 1, 6, 5)


def test_per_class_lossless_deterministic(tmp_path):
    src = make_npz(tmp_path / 'toy.npz', n_train=(30, 25, 40), n_test=(10, 10, 10), mask=True)
    kw = dict(splits=['train', 'test'], per_class=[8, 2], lossless_only=True, shard_size=5, seed=3, shuffle=False)
    info = convert(tmp_path / 'toy.npz', tmp_path / 'a', **kw)
    convert(tmp_path / 'toy.npz', tmp_path / 'b', **kw)
    for f in info['splits']['train']['filenames'] + info['splits']['test']['filenames']:
        assert (tmp_path / 'a' / f).read_bytes() == (tmp_path / 'b' / f).read_bytes()
    for split, k in (('train', 8), ('test', 2)):
        x, y, _ = load_split_tensors(tmp_path / 'a', split)
        assert torch.bincount(y).tolist() == [k] * 3
        # every kept image is a lossless source image of the same label
        sx, sy, sm = src[f'x_{split}'], src[f'y_{split}'], src[f'lossless_mask_{split}']
        flat = {sx[i].tobytes(): i for i in np.flatnonzero(sm)}
        idx = [flat[img.tobytes()] for img in x.permute(0, 2, 3, 1).numpy()]
        assert idx == sorted(idx) and (sy[idx] == y.numpy()).all()
    other = convert(tmp_path / 'toy.npz', tmp_path / 'c', **dict(kw, seed=4))
    assert other['splits']['train']['num_samples'] == 24
    assert not torch.equal(*(load_split_tensors(tmp_path / d, 'train')[0] for d in 'ac'))
    with pytest.raises(ValueError, match='per_class=50'):
        convert(tmp_path / 'toy.npz', tmp_path / 'd', splits=['train'], per_class=50)


def test_folder_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    for split, n in (('train', 3), ('test', 2)):
        for c in ('cat', 'dog'):
            (tmp_path / 'src' / split / c).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                Image.fromarray(img).save(tmp_path / 'src' / split / c / f'{i}.png')
                expected.setdefault(split, []).append((img, ['cat', 'dog'].index(c)))
    info = convert(tmp_path / 'src', tmp_path / 'out', name='pets', shuffle=False)
    assert info['format'] == 'folder' and info['classes'] == ['cat', 'dog']
    assert list(info['splits']) == ['train', 'test']
    for split in ('train', 'test'):
        x, y = read_timm(tmp_path / 'out', 'pets', split)
        np.testing.assert_array_equal(x, np.stack([img for img, _ in expected[split]]))
        assert y.tolist() == [c for _, c in expected[split]]
    # a folder of class folders is one 'train' split
    info = convert(tmp_path / 'src' / 'test', tmp_path / 'out2')
    assert list(info['splits']) == ['train'] and info['splits']['train']['num_samples'] == 4


def test_torchvision_cifar_format(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, 'check_integrity', lambda *a, **k: True)
    base = tmp_path / 'cifar-10-batches-py'
    base.mkdir()
    rng = np.random.default_rng(0)
    data = {}
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        data[name] = dict(data=rng.integers(0, 256, (2, 3072), dtype=np.uint8), labels=[int(rng.integers(10)), 9])
        (base / name).write_bytes(pickle.dumps(data[name]))
    (base / 'batches.meta').write_bytes(pickle.dumps({'label_names': [f'c{i}' for i in range(10)]}))
    info = convert(base, tmp_path / 'out', shuffle=False)
    assert info['format'] == 'cifar10' and info['classes'][9] == 'c9'
    x, y, _ = load_split_tensors(tmp_path / 'out', 'train')
    src = np.concatenate([data[f'data_batch_{i}']['data'] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(x.numpy(), src)
    assert y.tolist() == sum((data[f'data_batch_{i}']['labels'] for i in range(1, 6)), [])


def test_convert_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        convert(tmp_path / 'missing.npz', tmp_path / 'out')
    make_npz(tmp_path / 'toy.npz')
    with pytest.raises(ValueError, match="Unknown format 'jpeg'"):
        convert(tmp_path / 'toy.npz', tmp_path / 'out', format='jpeg')
    np.savez(tmp_path / 'bad.npz', images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.zeros(2))
    with pytest.raises(ValueError, match="no arrays 'x_train'"):
        convert(tmp_path / 'bad.npz', tmp_path / 'out', splits=['train'])
    np.savez(tmp_path / 'float.npz', x_train=np.zeros((2, 4, 4, 3), np.float32), y_train=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match='uint8 NHWC'):
        convert(tmp_path / 'float.npz', tmp_path / 'out')
    with pytest.raises(ValueError, match='lossless_mask_train'):
        convert(tmp_path / 'toy.npz', tmp_path / 'out', lossless_only=True)
    with pytest.raises(FileNotFoundError, match='cifar-100-python'):
        convert(tmp_path, tmp_path / 'out', format='cifar100')
    with pytest.raises(ValueError, match='shard_size'):
        convert(tmp_path / 'toy.npz', tmp_path / 'out', shard_size=0)
    with pytest.raises(FileNotFoundError, match='_info.json'):
        load_split_tensors(tmp_path, 'train')
    np.savez(tmp_path / 'empty.npz', x_train=np.zeros((0, 4, 4, 3), np.uint8), y_train=np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="split 'train' of .*empty.npz is empty"):
        load_split_tensors(tmp_path / 'empty.npz', 'train')
    with pytest.raises(ValueError, match='is empty'):
        convert(tmp_path / 'empty.npz', tmp_path / 'out')


def test_bundled_subset():
    info = json.loads((BUNDLED_DATA_DIR / '_info.json').read_text())
    assert info['lossless_only'] and info['classes'][0] == 'airplane' and (BUNDLED_DATA_DIR / 'README.md').is_file()
    assert info == read_info(BUNDLED_DATA_DIR) and info['shuffle'] is False  # source order, already class-mixed
    assert default_eval_split('wds/cifar10', BUNDLED_DATA_DIR) == 'test'
    assert shard_image_shape(BUNDLED_DATA_DIR, 'test') == (3, 32, 32)
    assert sum(f.stat().st_size for f in BUNDLED_DATA_DIR.iterdir()) < 12e6
    for split, k in (('train', 400), ('test', 100)):
        assert info['splits'][split]['num_samples'] == 10 * k
        x, y, classes = load_split_tensors(BUNDLED_DATA_DIR, split)
        assert x.shape == (10 * k, 3, 32, 32) and torch.bincount(y).tolist() == [k] * 10
        assert len(classes) == 10 and x.float().std() > 40  # real images, not blank
    # timm's reader sees the same first test sample
    img, target = next(iter(create_dataset('wds/cifar10', root=str(BUNDLED_DATA_DIR), split='test')))
    np.testing.assert_array_equal(np.asarray(img), x[0].permute(1, 2, 0).numpy())
    assert target == y[0]


def toy_images(n=50, c=3, h=8, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g), torch.arange(n) % 5


def raw_loader(x, y, **kw):
    """Loader whose output equals the uint8 pixel values (mean 0, std 1/255)."""
    return InMemoryLoader(x, y, mean=(0.,), std=(1 / 255,), device='cpu', **kw)


def collect(loader):
    xs, ys = zip(*list(loader))
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize('padding_mode', ['constant', 'edge', 'reflect', 'symmetric'])
def test_crop_flip_exact(padding_mode):
    x, y = toy_images()
    loader = raw_loader(x, y, batch_size=16, padding=3, padding_mode=padding_mode, seed=1)
    idx, dy, dx, flip = loader.epoch_plan(0)
    out, targets = collect(loader)
    assert out.dtype == torch.float32 and out.shape == (50, 3, 8, 6) and torch.equal(targets, y[idx])
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (3, 3), (3, 3)), mode=padding_mode)
    for j in range(len(idx)):
        ref = padded[idx[j], :, dy[j]:dy[j] + 8, dx[j]:dx[j] + 6]
        ref = ref[..., ::-1] if flip[j] else ref
        np.testing.assert_array_equal(out[j].numpy(), ref)
    assert 0 < flip.sum() < 50 and set(dx.tolist()) == set(range(7))
    assert torch.equal(idx.sort().values, torch.arange(50))


def test_flip_probability_and_normalise():
    x, y = toy_images(n=20)
    out = collect(raw_loader(x, y, padding=0, hflip=1.))
    idx = raw_loader(x, y, padding=0, hflip=1.).epoch_plan(0)[0]
    assert torch.equal(out[0], x[idx].flip(-1).float())
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    eval_out, eval_y = collect(InMemoryLoader(x, y, is_training=False, mean=mean, std=std, device='cpu', batch_size=7))
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(eval_out, ref)
    assert torch.equal(eval_y, y)


def test_determinism_resume_and_len():
    x, y = toy_images()
    a = raw_loader(x, y, batch_size=16, seed=5)
    assert len(a) == 4 and len(raw_loader(x, y, batch_size=16, drop_last=True)) == 3
    epochs = [collect(a) for _ in range(3)]
    assert a.state_dict() == {'seed': 5, 'epoch': 3}
    assert not torch.equal(epochs[0][0], epochs[1][0])
    b = raw_loader(x, y, batch_size=16, seed=5)
    assert all(torch.equal(u, v) for u, v in zip(collect(b), epochs[0]))
    resumed = raw_loader(x, y, batch_size=16, seed=123)
    resumed.load_state_dict({'seed': 5, 'epoch': 2})
    assert all(torch.equal(u, v) for u, v in zip(collect(resumed), epochs[2]))
    b.set_epoch(1)
    assert all(torch.equal(u, v) for u, v in zip(collect(b), epochs[1]))
    assert not torch.equal(collect(raw_loader(x, y, batch_size=16, seed=6))[0], epochs[0][0])
    assert [len(xb) for xb, _ in raw_loader(x, y, batch_size=16, drop_last=True)] == [16] * 3


def test_channels_last_and_dtype():
    x, y = toy_images()
    ref, _ = collect(InMemoryLoader(x, y, device='cpu', seed=2))
    loader = InMemoryLoader(x, y, device='cpu', seed=2, channels_last=True, batch_size=64)
    xb, _ = next(iter(loader))
    assert xb.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(xb, ref)
    half, _ = next(iter(InMemoryLoader(x, y, device='cpu', seed=2, img_dtype=torch.bfloat16, batch_size=64)))
    assert half.dtype == torch.bfloat16


@pytest.mark.parametrize('is_training', [True, False])
def test_distributed_shards(is_training):
    x, y = toy_images(n=50, c=1)
    ranks = [raw_loader(x, y, batch_size=8, seed=9, rank=r, world_size=3, is_training=is_training) for r in range(3)]
    plans = [r.epoch_plan(4)[0] for r in ranks]
    assert len({len(p) for p in plans}) == 1 and len({len(r) for r in ranks}) == 1
    seen = torch.cat(plans)
    if is_training:  # disjoint slices of one permutation, the 50 % 3 leftover skipped
        assert len(plans[0]) == 16 and len(set(seen.tolist())) == 48
        full = raw_loader(x, y, seed=9).epoch_plan(4)[0]
        assert set(seen.tolist()) == set(full[:48].tolist())
    else:  # every sample, padded by wrapping to equal counts
        assert len(plans[0]) == 17 and set(seen.tolist()) == set(range(50))
    out = [collect(r)[0] for r in ranks]
    assert all(o.shape == (len(plans[0]), 1, 8, 6) for o in out)


def test_from_path_and_from_dataset(tmp_path):
    src = make_npz(tmp_path / 'toy.npz', size=(8, 8))
    loader = InMemoryLoader.from_path(tmp_path / 'toy.npz', 'test', batch_size=4, device='cpu')
    assert not loader.is_training and loader.classes == ['0', '1', '2'] and len(loader) == 3
    xb, yb = collect(loader)
    assert torch.equal(yb, torch.from_numpy(src['y_test']))
    pil = [(Image.fromarray(img), int(t)) for img, t in zip(src['x_test'], src['y_test'])]
    xb2, yb2 = collect(InMemoryLoader.from_dataset(pil, is_training=False, batch_size=4, device='cpu'))
    assert torch.equal(xb, xb2) and torch.equal(yb, yb2)


def test_loader_errors():
    x, y = toy_images()
    with pytest.raises(ValueError, match='mean / std'):
        InMemoryLoader(x, y, mean=(0.5, 0.5), device='cpu')
    with pytest.raises(ValueError, match='rank'):
        InMemoryLoader(x, y, rank=2, world_size=2, device='cpu')
    with pytest.raises(TypeError, match='uint8'):
        InMemoryLoader(x.float(), y, device='cpu')
    with pytest.raises(ValueError, match='targets'):
        InMemoryLoader(x, y[:3], device='cpu')
    with pytest.raises(ValueError, match='padding_mode'):
        InMemoryLoader(x, y, padding_mode='wrap', device='cpu')


# -- read_info / default_eval_split ------------------------------------------------------------------------------------
def write_info(root, info):
    root.mkdir(parents=True, exist_ok=True)
    (root / '_info.json').write_text(info if isinstance(info, str) else json.dumps(info))
    return root


GOOD_SPLIT = dict(name='train', num_samples=3, filenames=['x-train-0000.tar'], shard_lengths=[3])


@pytest.mark.parametrize('info,match', [
    ('{"splits": ', 'not valid JSON'),
    ('\xff\xfe', 'not valid JSON'),
    ([1, 2], 'must hold a JSON object'),
    ({'classes': ['a']}, "no 'splits' mapping"),
    ({'splits': {}}, "no 'splits' mapping"),
    ({'splits': {'train': dict(GOOD_SPLIT, filenames=[])}}, "'filenames'"),
    ({'splits': {'train': dict(GOOD_SPLIT, filenames='x.tar')}}, "'filenames'"),
    ({'splits': {'train': dict(GOOD_SPLIT, num_samples=-1)}}, "'num_samples' >= 0"),
    ({'splits': {'train': dict(GOOD_SPLIT, num_samples='3')}}, "'num_samples' >= 0"),
    ({'splits': {'train': dict(GOOD_SPLIT, shard_lengths=[2])}}, "'shard_lengths'"),
    ({'splits': {'train': GOOD_SPLIT}, 'classes': 'abc'}, "'classes' must be a list"),
])
def test_read_info_rejects_invalid_files(tmp_path, info, match):
    root = write_info(tmp_path / 'd', info)
    with pytest.raises(ValueError, match=match):
        read_info(root)
    with pytest.raises(ValueError, match=match):  # every reader of _info.json goes through read_info
        load_split_tensors(root, 'train')


def test_read_info_missing_and_default_eval_split(tmp_path):
    assert read_info(tmp_path) is None and read_info(tmp_path / 'nowhere') is None
    make_npz(tmp_path / 'toy.npz')
    assert read_info(tmp_path / 'toy.npz') is None
    good = {'splits': {'train': GOOD_SPLIT}}
    assert read_info(write_info(tmp_path / 'ok', good)) == good
    for splits, expected in ((['train', 'test'], 'test'), (['train', 'val', 'test'], 'val'),
                             (['test', 'validation'], 'validation'), (['train'], 'validation')):
        root = write_info(tmp_path / '_'.join(splits), {'splits': {s: dict(GOOD_SPLIT, name=s) for s in splits}})
        assert default_eval_split('wds/x', root) == expected
        assert default_eval_split('torch/cifar10', root) == 'test'
    assert default_eval_split('wds/x', tmp_path / 'nowhere') == 'validation'
    assert default_eval_split('torch/cifar10', None) == 'test'
    assert default_eval_split('hfds/x', tmp_path) == 'validation'
    (tmp_path / 'folder' / 'test').mkdir(parents=True)
    (tmp_path / 'folder' / 'train').mkdir()
    assert default_eval_split('', tmp_path / 'folder') == 'test'  # timm's own split search skips 'test'
    (tmp_path / 'folder' / 'val').mkdir()
    assert default_eval_split(None, tmp_path / 'folder') == 'val'
    with pytest.raises(ValueError, match='not valid JSON'):
        default_eval_split('wds/x', write_info(tmp_path / 'bad', '{'))


# -- decode_dataset ----------------------------------------------------------------------------------------------------
def rgb(seed, h=4, w=5):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_decode_dataset_image_types():
    arrays = [rgb(i) for i in range(4)]
    expected = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    labels = [2, 0, 1, 2]
    variants = {
        'pil': [(Image.fromarray(a), t) for a, t in zip(arrays, labels)],
        'pil_rgba': [(Image.fromarray(a).convert('RGBA'), t) for a, t in zip(arrays, labels)],
        'numpy_hwc': [(a, np.int64(t)) for a, t in zip(arrays, labels)],
        'tensor_chw': [(torch.from_numpy(a).permute(2, 0, 1), torch.tensor(t)) for a, t in zip(arrays, labels)],
        'tensor_hwc': [(torch.from_numpy(a), t) for a, t in zip(arrays, labels)],
        'numpy_chw': [(a.transpose(2, 0, 1).copy(), t) for a, t in zip(arrays, labels)],
    }
    for kind, ds in variants.items():
        x, y = decode_dataset(ds)
        assert x.dtype == torch.uint8 and y.dtype == torch.int64, kind
        assert torch.equal(x, expected) and y.tolist() == labels, kind
    x, y = decode_dataset(variants['pil'], indices=torch.tensor([3, 1]))
    assert torch.equal(x, expected[[3, 1]]) and y.tolist() == [2, 0]
    x, y = decode_dataset(iter(variants['numpy_hwc']))  # an iterable (streaming) dataset is read in full
    assert torch.equal(x, expected)
    # read-only arrays (np.asarray of a PIL image, memory maps) decode without copies or warnings
    frozen = arrays[0].copy()
    frozen.flags.writeable = False
    assert torch.equal(decode_dataset([(frozen, 0)])[0][0], expected[0])


def test_decode_dataset_grayscale_channels():
    gray = [np.random.default_rng(i).integers(0, 256, (4, 5), dtype=np.uint8) for i in range(3)]
    x, _ = decode_dataset([(Image.fromarray(g), 0) for g in gray])
    assert x.shape == (3, 1, 4, 5) and torch.equal(x[:, 0], torch.from_numpy(np.stack(gray)))
    x1, _ = decode_dataset([(Image.fromarray(g).convert('1'), 0) for g in gray])
    assert x1.shape == (3, 1, 4, 5) and set(x1.unique().tolist()) <= {0, 255}
    assert decode_dataset([(torch.from_numpy(g)[None], 0) for g in gray])[0].shape == (3, 1, 4, 5)
    # grayscale among RGB, before and after the first RGB image: all become 3 equal channels
    mixed = [(gray[0], 0), (Image.fromarray(rgb(7)), 1), (Image.fromarray(gray[1]), 2), (gray[2][..., None], 0)]
    x, y = decode_dataset(mixed)
    assert x.shape == (4, 3, 4, 5) and y.tolist() == [0, 1, 2, 0]
    for i, g in ((0, gray[0]), (2, gray[1]), (3, gray[2])):
        assert torch.equal(x[i], torch.from_numpy(g).expand(3, 4, 5))
    assert torch.equal(x[1], torch.from_numpy(rgb(7)).permute(2, 0, 1))


class Pairs(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize('items,indices,error,match', [
    ([(rgb(0).astype(np.float32) / 255, 0)], None, TypeError, 'sample 0 of Pairs: image is a float32 numpy array'),
    ([(torch.rand(3, 4, 5), 0)], None, TypeError, 'float32 tensor.*without a transform'),
    ([(rgb(0), 0), ('cat.png', 1)], None, TypeError, 'sample 1 of Pairs: image is a str'),
    ([(rgb(0), 0), rgb(1)], None, TypeError, r'sample 1 of Pairs: expected an \(image, label\) pair'),
    ([(rgb(0), 0.5)], None, TypeError, 'sample 0 of Pairs: label must be an integer'),
    ([(rgb(0), True)], None, TypeError, 'label must be an integer'),
    ([(rgb(0), torch.tensor([0., 1.]))], None, TypeError, 'one-hot'),
    ([(rgb(0), -1)], None, ValueError, 'sample 0 of Pairs: label -1 is negative'),
    ([(rgb(0), 0), (rgb(1, h=6), 1)], None, ValueError, 'sample 1 of Pairs is 6x5 but sample 0 of Pairs is 4x5'),
    ([(np.zeros((4, 5, 4), np.uint8), 0)], None, ValueError, 'no channel axis of size 1 or 3'),
    ([(np.zeros((2, 4, 5, 3), np.uint8), 0)], None, ValueError, r'shape \(2, 4, 5, 3\)'),
    ([(Image.new('I;16', (5, 4)), 0)], None, ValueError, "mode 'I;16' has more than 8 bits"),
    ([], None, ValueError, 'holds no sample'),
    ([(rgb(0), 0)], [1], ValueError, r'indices holds 1, outside \[0, 1\)'),
    ([(rgb(0), 0)], [-1], ValueError, 'outside'),
    ([(rgb(0), 0)], [0.5], TypeError, 'integer indices'),
    ([(rgb(0), 0)], [], ValueError, 'indices is empty'),
])
def test_decode_dataset_errors(items, indices, error, match):
    with pytest.raises(error, match=match):
        decode_dataset(Pairs(items), indices)


def test_decode_dataset_iterable_rejects_indices():
    with pytest.raises(TypeError, match='cannot be indexed'):
        decode_dataset(iter([(rgb(0), 0)]), [0])
    with pytest.raises(TypeError, match='dataset of \\(image, label\\) samples'):
        decode_dataset(3)


def test_decode_timm_folder_dataset_and_labels(tmp_path):
    for c, n in (('cat', 3), ('dog', 2)):
        (tmp_path / c).mkdir()
        for i in range(n):
            Image.fromarray(rgb(10 * n + i)).save(tmp_path / c / f'{i}.png')
    ds = create_dataset('', root=str(tmp_path), split='train')
    labels = dataset_labels(ds)
    assert labels.tolist() == [0, 0, 0, 1, 1]
    x, y = decode_dataset(ds, subset_indices(len(ds), 2, seed=0, labels=labels))
    assert x.shape == (2, 3, 4, 5) and sorted(y.tolist()) == [0, 1]
    loader = InMemoryLoader.from_dataset(ds, indices=[4, 0], is_training=False, device='cpu', batch_size=8)
    assert loader.dataset_size == 2 and torch.equal(next(iter(loader))[1], torch.tensor([1, 0]))
    assert dataset_labels(torch.utils.data.Subset(ds, [4, 1])).tolist() == [1, 0]
    ds.target_transform = lambda t: 1 - t  # labels only known after the transform
    assert dataset_labels(ds) is None and dataset_labels(Pairs([])) is None

    class Targets(Pairs):
        targets = [0, 1]
    assert dataset_labels(Targets([(rgb(0), 0), (rgb(1), 1)])).tolist() == [0, 1]
    assert dataset_labels(Targets([(rgb(0), 0)])) is None  # targets that do not match the length are not trusted


# -- subset_indices / max_samples --------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 30), min_size=1, max_size=8), k=st.integers(1, 150), seed=st.integers(0, 2 ** 32),
       shuffle_seed=st.integers(0, 100))
def test_subset_indices_properties(counts, k, seed, shuffle_seed):
    labels = np.random.default_rng(shuffle_seed).permutation(np.repeat(np.arange(len(counts)), counts))
    n = len(labels)
    for lab in (None, labels, torch.from_numpy(labels), labels.tolist()):
        idx = subset_indices(n, k, seed, labels=lab)
        assert idx.dtype == torch.int64 and len(idx) == min(k, n)
        assert torch.equal(idx, idx.sort().values) and len(idx.unique()) == len(idx)
        assert len(idx) == 0 or (0 <= idx.min() and idx.max() < n)
        assert torch.equal(idx, subset_indices(n, k, seed, labels=lab))  # seeded: the same draw again
    idx = subset_indices(n, k, seed, labels=labels)
    got = np.bincount(labels[idx.numpy()], minlength=len(counts))
    # as equal as possible: a class gets fewer than another's count - 1 only when it gave all its samples
    for c in range(len(counts)):
        assert got[c] <= counts[c]
        assert got[c] == counts[c] or got[c] >= got.max() - 1


def test_subset_indices_draws_and_errors():
    labels = np.repeat(np.arange(4), [50, 3, 50, 50])
    idx = subset_indices(len(labels), 40, seed=0, labels=labels)
    counts = np.bincount(labels[idx.numpy()]).tolist()
    assert counts[1] == 3 and sorted(counts) == [3, 12, 12, 13]  # the small class gives all, the rest share 37
    draws = {tuple(subset_indices(153, 40, seed=s, labels=labels).tolist()) for s in range(5)}
    assert len(draws) == 5  # a different seed, a different subset
    assert torch.equal(subset_indices(10, 10, 0), torch.arange(10)) and torch.equal(subset_indices(10, 99, 0),
                                                                                    torch.arange(10))
    assert len(subset_indices(0, 3, 0)) == 0
    for bad in (dict(n=-1, k=3), dict(n=10, k=0), dict(n=10, k=-2), dict(n=10, k=2.5), dict(n=10, k=True),
                dict(n=10.0, k=3)):
        with pytest.raises(ValueError, match='must be an int >= '):
            subset_indices(seed=0, **bad)
    with pytest.raises(ValueError, match='seed must be an int'):
        subset_indices(10, 3, seed=0.5)
    assert len(subset_indices(10, 3, seed=2 ** 70)) == len(subset_indices(10, 3, seed=-5)) == 3
    with pytest.raises(ValueError, match='labels must be 10 integer class indices'):
        subset_indices(10, 3, 0, labels=np.zeros(9, np.int64))
    with pytest.raises(ValueError, match='labels must be 10 integer class indices'):
        subset_indices(10, 3, 0, labels=np.zeros(10))


def test_load_split_tensors_max_samples(tmp_path):
    src = make_npz(tmp_path / 'toy.npz', n_train=(20, 20, 5), size=(4, 4))
    convert(tmp_path / 'toy.npz', tmp_path / 'out', shard_size=7, compress=True)
    full_x, full_y, _ = load_split_tensors(tmp_path / 'out', 'train')
    for source in (tmp_path / 'out', tmp_path / 'toy.npz'):
        x, y, _ = load_split_tensors(source, 'train', max_samples=20, seed=4)
        assert len(y) == 20 and sorted(np.bincount(y.numpy()).tolist()) == [5, 7, 8]
        again = load_split_tensors(source, 'train', max_samples=20, seed=4)
        assert torch.equal(x, again[0]) and torch.equal(y, again[1])
        assert not torch.equal(y, load_split_tensors(source, 'train', max_samples=20, seed=5)[1]) or \
            not torch.equal(x, load_split_tensors(source, 'train', max_samples=20, seed=5)[0])
        # a subset of the split's own samples, in the split's order, labels kept with their images
        ref_x = full_x if source.is_dir() else torch.from_numpy(src['x_train']).permute(0, 3, 1, 2)
        ref_y = full_y if source.is_dir() else torch.from_numpy(src['y_train'])
        pos = source_positions(x.permute(0, 2, 3, 1).numpy(), ref_x.permute(0, 2, 3, 1).numpy())
        assert list(pos) == sorted(pos) and torch.equal(ref_y[pos], y)
        assert torch.equal(load_split_tensors(source, 'train', max_samples=1000)[1], ref_y)
        with pytest.raises(ValueError, match='max_samples must be an int >= 1'):
            load_split_tensors(source, 'train', max_samples=0)
    loader = InMemoryLoader.from_path(tmp_path / 'out', 'train', max_samples=9, seed=1, device='cpu')
    assert loader.dataset_size == 9 and torch.bincount(loader._targets).tolist() == [3, 3, 3]


def test_shards_with_missing_members(tmp_path):
    convert(make_npz(tmp_path / 'toy.npz') and tmp_path / 'toy.npz', tmp_path / 'out', splits=['test'])
    info = read_info(tmp_path / 'out')
    shard = tmp_path / 'out' / info['splits']['test']['filenames'][0]
    import tarfile
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, 'w') as tar:
        for m, data in members[:-1]:  # drop the last sample's .cls
            import io
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(ValueError, match='lacks an image or a .cls entry'):
        load_split_tensors(tmp_path / 'out', 'test')
    with pytest.raises(ValueError, match="Split 'nope' not in"):
        load_split_tensors(tmp_path / 'out', 'nope')
    with tarfile.open(shard, 'w') as tar:  # a truncated PNG
        for m, data in members:
            if m.name.endswith('.png'):
                data = data[:20]
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(ValueError, match=r'sample test_\d{7} of .*toy-test-0000.tar: cannot decode the image'):
        load_split_tensors(tmp_path / 'out', 'test')
