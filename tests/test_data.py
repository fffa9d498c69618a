import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_dataset

from timm_alps.data import BUNDLED_DATA_DIR, InMemoryLoader, convert, load_split_tensors, main


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


@pytest.mark.parametrize('compress', [False, True])
def test_npz_round_trip_through_timm(tmp_path, compress):
    src = make_npz(tmp_path / 'toy.npz')
    (tmp_path / 'toy.json').write_text(json.dumps({'classes': ['a', 'b', 'c']}))
    info = convert(tmp_path / 'toy.npz', tmp_path / 'out', shard_size=4, compress=compress)

    on_disk = json.loads((tmp_path / 'out' / '_info.json').read_text())
    assert on_disk == info and on_disk['classes'] == ['a', 'b', 'c'] and on_disk['name'] == 'toy'
    for split in ('train', 'test'):
        s = on_disk['splits'][split]
        n = len(src[f'y_{split}'])
        assert s['name'] == split and s['num_samples'] == n and sum(s['shard_lengths']) == n
        assert len(s['filenames']) == -(-n // 4) and all((tmp_path / 'out' / f).is_file() for f in s['filenames'])
        x, y = read_timm(tmp_path / 'out', 'toy', split)
        np.testing.assert_array_equal(x, src[f'x_{split}'])
        np.testing.assert_array_equal(y, src[f'y_{split}'])
        xt, yt, classes = load_split_tensors(tmp_path / 'out', split)
        assert xt.dtype == torch.uint8 and xt.shape == (n, 3, 6, 5) and classes == ['a', 'b', 'c']
        np.testing.assert_array_equal(xt.permute(0, 2, 3, 1).numpy(), src[f'x_{split}'])
        np.testing.assert_array_equal(yt.numpy(), src[f'y_{split}'])


def test_grayscale_and_cli(tmp_path, capsys):
    src = make_npz(tmp_path / 'gray.npz', channels=1)
    main([str(tmp_path / 'gray.npz'), str(tmp_path / 'out'), '--splits', 'test', '--name', 'g-ray'])
    assert 'test: 9 samples in 1 shard(s)' in capsys.readouterr().out
    info = json.loads((tmp_path / 'out' / '_info.json').read_text())
    assert list(info['splits']) == ['test'] and info['classes'] == ['0', '1', '2']
    x, y = read_timm(tmp_path / 'out', 'g_ray', 'test', mode='L')
    np.testing.assert_array_equal(x, src['x_test'][..., 0])
    xt, _, _ = load_split_tensors(tmp_path / 'out', 'test')
    assert xt.shape == (9, 1, 6, 5)


def test_per_class_lossless_deterministic(tmp_path):
    src = make_npz(tmp_path / 'toy.npz', n_train=(30, 25, 40), n_test=(10, 10, 10), mask=True)
    kw = dict(splits=['train', 'test'], per_class=[8, 2], lossless_only=True, shard_size=5, seed=3)
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
    info = convert(tmp_path / 'src', tmp_path / 'out', name='pets')
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
    info = convert(base, tmp_path / 'out')
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
