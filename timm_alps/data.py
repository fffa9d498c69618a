""" Small-image datasets for timm: a webdataset shard converter, the bundled CIFAR-10 subset, an in-memory loader

* `convert` / `python -m timm_alps.data SRC OUT_DIR` (console script `timm-alps-convert`) turns an `.npz` of uint8
  arrays, torchvision's CIFAR-10 / CIFAR-100 / SVHN files or an image folder into webdataset tar shards with timm's
  `_info.json`, read by `timm.data.create_dataset('wds/<name>', root=OUT_DIR, split='train')`. Each sample is a
  PNG image (lossless) plus its class index (`.cls`), so timm's wds reader decodes it with its defaults.
* `BUNDLED_DATA_DIR`: a class-balanced CIFAR-10 subset (4,000 train / 1,000 test) shipped with the package.
* `InMemoryLoader`: keeps a small dataset as uint8 on the device and makes each batch with one gather (shuffle,
  random crop with padding, horizontal flip) plus one fused uint8 -> float normalise, like airbench's loader.
  `load_split_tensors` reads a shard directory or an npz split into tensors for it and for benchmarks.
"""
import argparse
import gzip
import io
import json
import math
import os
import tarfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from .models import CIFAR10_MEAN, CIFAR10_STD

__all__ = [
    'BUNDLED_DATA_DIR', 'FORMATS', 'convert', 'main', 'load_split_tensors', 'InMemoryLoader',
]

BUNDLED_DATA_DIR = Path(__file__).resolve().parent / 'datasets' / 'cifar10_subset'
FORMATS = ('auto', 'npz', 'cifar10', 'cifar100', 'svhn', 'folder')
PADDING_MODES = ('constant', 'edge', 'reflect', 'symmetric')
_IMG_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.gif', '.tif', '.tiff', '.ppm', '.pgm')
_SPLIT_NAMES = ('train', 'val', 'validation', 'test')
_TORCHVISION_DIRS = {'cifar10': 'cifar-10-batches-py', 'cifar100': 'cifar-100-python'}


class _ArrayImages:
    """Images of a uint8 NHWC array, as PIL images (grayscale for one channel)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> Image.Image:
        img = self.array[i]
        return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


class _FileImages:
    """Image files, opened on access; grayscale stays 'L', anything else becomes 'RGB'."""

    def __init__(self, paths: List[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Image.Image:
        with Image.open(self.paths[i]) as img:
            return img.convert('L' if img.mode in ('L', '1') else 'RGB')


def _detect_format(src: Path) -> str:
    if src.is_file():
        if src.suffix == '.npz':
            return 'npz'
        raise ValueError(f'Cannot tell the format of file {src}: only .npz files are read directly; '
                         f'pass a directory or --format')
    for fmt, dirname in _TORCHVISION_DIRS.items():
        if src.name == dirname or (src / dirname).is_dir():
            return fmt
    if any((src / f'{s}_32x32.mat').is_file() for s in ('train', 'test', 'extra')):
        return 'svhn'
    return 'folder'


def _read_npz(src: Path, splits: Optional[Sequence[str]]):
    if src.suffix != '.npz' or not src.is_file():
        raise ValueError(f'npz format needs an .npz file, got {src}')
    data = np.load(src)
    found = [k[2:] for k in data.files if k.startswith('x_')]
    splits = list(splits or found)
    out = {}
    for split in splits:
        if f'x_{split}' not in data.files or f'y_{split}' not in data.files:
            raise ValueError(f"{src} has no arrays 'x_{split}' and 'y_{split}' (keys: {sorted(data.files)}); "
                             f"expected x_<split> (uint8 NHWC) and y_<split> (int class index) per split")
        x, y = data[f'x_{split}'], data[f'y_{split}']
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"x_{split} in {src} must be uint8 NHWC with 1 or 3 channels, got "
                             f"{x.dtype} {x.shape}")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f'y_{split} in {src} must be {len(x)} integer labels, got {y.dtype} {y.shape}')
        if len(x) == 0:
            raise ValueError(f'split {split!r} of {src} is empty (x_{split} has shape {x.shape}); '
                             f'drop it or pass the splits that hold images')
        mask = data[f'lossless_mask_{split}'] if f'lossless_mask_{split}' in data.files else None
        out[split] = (_ArrayImages(x), y.astype(np.int64), mask)
    classes = None
    meta_path = src.with_suffix('.json')
    if meta_path.is_file():
        classes = json.loads(meta_path.read_text()).get('classes')
    if classes is None:
        classes = [str(c) for c in range(int(max(y.max() for _, y, _ in out.values())) + 1)]
    return out, list(classes)


def _read_torchvision(src: Path, fmt: str, splits: Optional[Sequence[str]]):
    import torchvision.datasets as tvd
    if fmt == 'svhn':
        splits = list(splits or [s for s in ('train', 'test', 'extra') if (src / f'{s}_32x32.mat').is_file()])
        out = {}
        for split in splits:
            if split not in ('train', 'test', 'extra') or not (src / f'{split}_32x32.mat').is_file():
                raise FileNotFoundError(f'SVHN split {split!r} needs {src / f"{split}_32x32.mat"} (download=False)')
            ds = tvd.SVHN(str(src), split=split, download=False)
            out[split] = (_ArrayImages(ds.data.transpose(0, 2, 3, 1)), np.asarray(ds.labels, np.int64), None)
        return out, [str(c) for c in range(10)]

    root = src.parent if src.name == _TORCHVISION_DIRS[fmt] else src
    if not (root / _TORCHVISION_DIRS[fmt]).is_dir():
        raise FileNotFoundError(f'{fmt} needs torchvision\'s {_TORCHVISION_DIRS[fmt]} folder in {root} '
                                f'(download=False: fetch it first with torchvision)')
    cls = tvd.CIFAR10 if fmt == 'cifar10' else tvd.CIFAR100
    out, classes = {}, None
    for split in splits or ('train', 'test'):
        if split not in ('train', 'test'):
            raise ValueError(f'{fmt} has splits train and test, got {split!r}')
        ds = cls(str(root), train=split == 'train', download=False)
        out[split] = (_ArrayImages(ds.data), np.asarray(ds.targets, np.int64), None)
        classes = ds.classes
    return out, list(classes)


def _read_folder(src: Path, splits: Optional[Sequence[str]]):
    def scan(d: Path):
        return {c.name: sorted(f for f in c.rglob('*') if f.suffix.lower() in _IMG_EXTS)
                for c in sorted(d.iterdir()) if c.is_dir()}

    def has_classes(d: Path) -> bool:
        return d.is_dir() and any(c.is_dir() for c in d.iterdir())

    # split folders (train/, test/, ...) holding class folders, otherwise SRC itself holds the classes of one split
    split_dirs = {s: src / s for s in (splits or _SPLIT_NAMES) if has_classes(src / s)}
    if not split_dirs and (splits is None or len(splits) == 1):
        split_dirs = {splits[0] if splits else 'train': src}
    elif splits is not None and len(split_dirs) < len(splits):
        raise FileNotFoundError(f'No split folder(s) {[s for s in splits if s not in split_dirs]} with class '
                                f'sub-folders in {src}')
    scans = {s: scan(d) for s, d in split_dirs.items()}
    classes = sorted(set().union(*[set(c for c, files in sc.items() if files) for sc in scans.values()]))
    if not classes:
        raise ValueError(f'No class sub-folders with images ({", ".join(_IMG_EXTS)}) found in {src}')
    out = {}
    for split, sc in scans.items():
        paths, labels = [], []
        for c, files in sc.items():
            if files:
                paths += files
                labels += [classes.index(c)] * len(files)
        out[split] = (_FileImages(paths), np.asarray(labels, np.int64), None)
    return out, classes


def _select(labels: np.ndarray, num_classes: int, per_class: Optional[int], mask: Optional[np.ndarray],
            seed: int, split: str) -> np.ndarray:
    """Indices kept: those in mask, then `per_class` drawn per class with a seeded RNG, in source order."""
    keep = np.arange(len(labels)) if mask is None else np.flatnonzero(mask)
    if per_class is None:
        return keep
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        idx = keep[labels[keep] == c]
        if len(idx) < per_class:
            raise ValueError(f'per_class={per_class} but class {c} of split {split!r} has only {len(idx)} '
                             f'(eligible) samples; lower --per-class')
        chosen.append(rng.permutation(idx)[:per_class])
    return np.sort(np.concatenate(chosen))


def _png(img: Image.Image) -> bytes:
    with io.BytesIO() as buf:
        img.save(buf, format='PNG', compress_level=9)
        return buf.getvalue()


def _write_shard(path: Path, members: List[Tuple[str, bytes]], compress: bool) -> None:
    # fixed mtime / owner (tar and gzip headers) so the same input gives byte-identical shards
    with open(path, 'wb') as f:
        gz = gzip.GzipFile(filename='', mode='wb', fileobj=f, mtime=0) if compress else None
        with tarfile.open(fileobj=gz or f, mode='w', format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
        if gz is not None:
            gz.close()


def _write_split(images, labels, indices, out_dir: Path, name: str, split: str, shard_size: int,
                 compress: bool) -> Dict[str, Any]:
    num_shards = max(1, math.ceil(len(indices) / shard_size))
    for stale in out_dir.glob(f'{name}-{split}-[0-9][0-9][0-9][0-9].tar*'):  # from an earlier run, not in the new info
        stale.unlink()
    filenames, lengths = [], []
    for s in range(num_shards):
        chunk = indices[s * shard_size:(s + 1) * shard_size]
        members = []
        for i in chunk:
            key = f'{split}_{i:07d}'  # source index, so a sample can be traced back to its source
            members += [(f'{key}.png', _png(images[int(i)])), (f'{key}.cls', str(int(labels[i])).encode())]
        fname = f'{name}-{split}-{s:04d}.tar' + ('.gz' if compress else '')
        _write_shard(out_dir / fname, members, compress)
        filenames.append(fname)
        lengths.append(len(chunk))
    return dict(name=split, num_samples=int(len(indices)), filenames=filenames, shard_lengths=lengths)


def convert(
        src: Union[str, os.PathLike],
        out_dir: Union[str, os.PathLike],
        format: str = 'auto',
        splits: Optional[Sequence[str]] = None,
        per_class: Union[None, int, Sequence[Optional[int]]] = None,
        shard_size: int = 2500,
        lossless_only: bool = False,
        name: Optional[str] = None,
        seed: int = 0,
        compress: bool = False,
) -> Dict[str, Any]:
    """Convert a dataset to webdataset shards (PNG + class index) with timm's `_info.json`.

    Args:
        src: An `.npz` (x_<split> uint8 NHWC, y_<split>, optional lossless_mask_<split>; class names from a sibling
            `.json` with "classes"), a folder holding (or being) `cifar-10-batches-py` / `cifar-100-python`, a folder
            with SVHN `<split>_32x32.mat`, or an image folder (class sub-folders, optionally under split folders).
        out_dir: Output directory (created).
        format: One of FORMATS; 'auto' detects it from src.
        splits: Splits to convert, default all the source has.
        per_class: Samples kept per class (class-balanced, seeded draw, source order kept): one int for every split
            or one per split; None keeps all.
        shard_size: Maximum samples per tar shard. timm's wds reader hands whole shards to loader workers and caps each
            worker at its share of samples, so pick a worker count that divides the number of shards.
        lossless_only: Keep only samples whose npz lossless_mask_<split> is True.
        name: Dataset name used in shard file names, default from src.
        seed: Seed of the per-class draw.
        compress: gzip the shards (`.tar.gz`, read transparently by webdataset); pays off for small images, where
            tar headers are as large as the PNGs.

    Returns:
        The info dict written to `out_dir/_info.json`.
    """
    src, out_dir = Path(src), Path(out_dir)
    if not src.exists():
        raise FileNotFoundError(f'Source {src} does not exist')
    if format not in FORMATS:
        raise ValueError(f'Unknown format {format!r}; choose one of {FORMATS}')
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f'shard_size must be a positive int, got {shard_size!r}')
    fmt = _detect_format(src) if format == 'auto' else format
    if fmt == 'folder' and not src.is_dir():
        raise ValueError(f'folder format needs a directory, got {src}')
    if lossless_only and fmt != 'npz':
        raise ValueError(f'lossless_only needs an npz source with lossless_mask_<split> arrays, got format {fmt!r}')
    if fmt == 'npz':
        data, classes = _read_npz(src, splits)
    elif fmt == 'folder':
        data, classes = _read_folder(src, splits)
    else:
        data, classes = _read_torchvision(src, fmt, splits)

    per_split = list(per_class) if isinstance(per_class, (list, tuple)) else [per_class] * len(data)
    if len(per_split) != len(data):
        raise ValueError(f'per_class has {len(per_split)} values for {len(data)} splits {list(data)}')
    for n in per_split:
        if n is not None and (not isinstance(n, int) or n < 1):
            raise ValueError(f'per_class values must be positive ints or None, got {per_class!r}')
    name = name or (src.stem if fmt in ('npz', 'folder') else fmt)
    name = name.replace('-', '_').replace(' ', '_')  # '-' separates name, split and shard index in file names
    out_dir.mkdir(parents=True, exist_ok=True)

    info = dict(name=name, classes=classes, num_classes=len(classes), source=str(src.name), format=fmt,
                lossless_only=lossless_only, seed=seed, splits={})
    for (split, (images, labels, mask)), n in zip(data.items(), per_split):
        if lossless_only and mask is None:
            raise ValueError(f'lossless_only but {src} has no lossless_mask_{split}')
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError(f'Labels of split {split!r} must lie in [0, {len(classes)}), '
                             f'got [{labels.min()}, {labels.max()}]')
        indices = _select(labels, len(classes), n, mask if lossless_only else None, seed, split)
        info['splits'][split] = _write_split(images, labels, indices, out_dir, name, split, shard_size, compress)
        info['splits'][split]['per_class'] = n
    (out_dir / '_info.json').write_text(json.dumps(info, indent=1) + '\n')
    return info


def _parse_per_class(value: Optional[str]) -> Union[None, int, List[int]]:
    if value is None:
        return None
    parts = [int(v) for v in value.split(',')]
    return parts[0] if len(parts) == 1 else parts


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command line entry point of `convert` (`python -m timm_alps.data` / `timm-alps-convert`)."""
    parser = argparse.ArgumentParser(
        prog='timm-alps-convert', description='Convert a dataset to timm webdataset shards (PNG + class index). '
        "Read back with timm.data.create_dataset('wds/<name>', root=OUT_DIR, split='train').")
    parser.add_argument('src', help='.npz file, torchvision CIFAR / SVHN folder, or image folder')
    parser.add_argument('out_dir', help='output directory for the shards and _info.json')
    parser.add_argument('--format', default='auto', choices=FORMATS)
    parser.add_argument('--splits', default=None, help='comma separated splits, default all (e.g. train,test)')
    parser.add_argument('--per-class', default=None,
                        help='samples per class: one int, or one per split in --splits order (e.g. 400,100)')
    parser.add_argument('--shard-size', '--max-shard-size', dest='shard_size', type=int, default=2500,
                        help='maximum samples per shard (default 2500); with timm\'s wds reader, use a number of '
                             'loader workers that divides the shard count, or some samples are skipped each epoch')
    parser.add_argument('--lossless-only', action='store_true', help='keep samples whose npz lossless_mask is True')
    parser.add_argument('--name', default=None, help='dataset name in shard file names (default from SRC)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the --per-class draw')
    parser.add_argument('--compress', action='store_true', help='gzip the shards (.tar.gz)')
    args = parser.parse_args(argv)
    info = convert(
        args.src, args.out_dir, format=args.format, splits=args.splits.split(',') if args.splits else None,
        per_class=_parse_per_class(args.per_class), shard_size=args.shard_size, lossless_only=args.lossless_only,
        name=args.name, seed=args.seed, compress=args.compress)
    for split, s in info['splits'].items():
        size = sum((Path(args.out_dir) / f).stat().st_size for f in s['filenames'])
        print(f"{split}: {s['num_samples']} samples in {len(s['filenames'])} shard(s), {size / 2 ** 20:.2f} MiB")
    print(f"classes ({info['num_classes']}): {', '.join(info['classes'])}")


def _read_shards(root: Path, split: str) -> Tuple[np.ndarray, np.ndarray, Optional[List[str]]]:
    info = json.loads((root / '_info.json').read_text())
    if split not in info.get('splits', {}):
        raise ValueError(f"Split {split!r} not in {root / '_info.json'} (splits: {list(info.get('splits', {}))})")
    images, labels = [], []
    for fname in info['splits'][split]['filenames']:
        with tarfile.open(root / fname, 'r:*') as tar:
            sample = {}
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = m.name.rsplit('/', 1)[-1].split('.', 1)
                if sample and key != sample['key']:
                    raise ValueError(f'Sample {sample["key"]} in {fname} lacks an image or a .cls entry')
                sample['key'] = key
                data = tar.extractfile(m).read()
                if ext == 'cls':
                    sample['cls'] = int(data)
                elif ext in ('png', 'jpg', 'jpeg', 'webp'):
                    with Image.open(io.BytesIO(data)) as img:
                        sample['img'] = np.asarray(img if img.mode in ('L', 'RGB') else img.convert('RGB'))
                if 'cls' in sample and 'img' in sample:
                    images.append(sample['img'])
                    labels.append(sample['cls'])
                    sample = {}
    if len(labels) != info['splits'][split]['num_samples']:
        raise ValueError(f"{root} split {split!r}: read {len(labels)} samples, _info.json says "
                         f"{info['splits'][split]['num_samples']}")
    shapes = {img.shape for img in images}
    if len(shapes) > 1:
        raise ValueError(f'{root} split {split!r} mixes image shapes {sorted(shapes)}; in-memory tensors need one '
                         f'size and channel count (resize / convert the source first)')
    x = np.stack(images)
    return (x[..., None] if x.ndim == 3 else x), np.asarray(labels, np.int64), info.get('classes')


def load_split_tensors(
        src: Union[str, os.PathLike],
        split: str = 'train',
        lossless_only: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[List[str]]]:
    """Load one split of a shard directory (from `convert`) or of an npz into memory.

    Args:
        src: Directory with `_info.json` and shards, or an `.npz` with x_<split> / y_<split>.
        split: Split name.
        lossless_only: For an npz, keep only the samples whose lossless_mask_<split> is True.

    Returns:
        (uint8 images N x C x H x W, int64 labels N, class names or None when the source has none)
    """
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f'{src} does not exist')
    if src.is_dir():
        if not (src / '_info.json').is_file():
            raise FileNotFoundError(f'{src} has no _info.json; make shards with `python -m timm_alps.data`')
        if lossless_only:
            raise ValueError('lossless_only applies to npz sources; shards were filtered when converted')
        x, y, classes = _read_shards(src, split)
    else:
        data, classes = _read_npz(src, [split])
        images, y, mask = data[split]
        x = images.array
        if lossless_only:
            if mask is None:
                raise ValueError(f'lossless_only but {src} has no lossless_mask_{split}')
            x, y = x[mask], y[mask]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y), classes


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)


def _pad_index(n: int, pad: int, mode: str) -> torch.Tensor:
    """Source index in [0, n) of each of the n + 2 * pad positions of an 'edge', 'reflect' or 'symmetric' pad."""
    i = torch.arange(-pad, n + pad)
    if mode == 'edge':
        return i.clamp(0, n - 1)
    if mode == 'reflect':
        i = i.abs()
        return torch.where(i >= n, 2 * (n - 1) - i, i)
    i = torch.where(i < 0, -i - 1, i)  # symmetric
    return torch.where(i >= n, 2 * n - 1 - i, i)


class InMemoryLoader:
    """Batches of a dataset held as uint8 on the device; shuffle, crop, flip and normalise are batched there.

    Each epoch draws (from a generator seeded by `seed` and the epoch) one permutation plus a crop offset and a flip
    per position; a batch is then a single gather from the padded uint8 images (pixels packed in 32-bit words for
    3 channels) and one uint8 -> float normalise, with no host-device sync. Images with `padding` pixels on each
    side (`padding_mode` as torchvision's RandomCrop: 'constant' pads zeros, i.e. black, as
    `RandomCrop(32, padding=4)` of the MixUp code) are cropped back to H x W at a uniform random offset, then
    flipped left-right with probability `hflip`.

    Args:
        images: uint8 tensor N x C x H x W (any memory format), or a uint8 NHWC numpy array.
        targets: Class indices, N.
        batch_size: Samples per batch.
        is_training: Shuffle and augment; otherwise samples come in order, unaugmented.
        mean: Per-channel mean in [0, 1] units (timm convention), one value or C values; default CIFAR-10 train.
        std: Per-channel std in [0, 1] units, one value or C values; default CIFAR-10 train.
        padding: Crop padding in pixels (training only).
        padding_mode: 'constant' (zeros), 'edge', 'reflect' or 'symmetric'.
        hflip: Horizontal flip probability (training only).
        drop_last: Drop the last incomplete batch.
        device: Where images live and batches are made; default CUDA when available.
        channels_last: Yield channels_last batches.
        img_dtype: Floating dtype of the yielded images.
        seed: Seed of the per-epoch shuffle / augmentation streams; the same on every rank.
        rank: This process's rank for distributed sharding.
        world_size: Number of ranks; training ranks get disjoint strided slices of the epoch's permutation
            (the N % world_size leftover positions are skipped that epoch), evaluation ranks get equal slices of
            the data padded by wrapping around (as timm's OrderedDistributedSampler).
        classes: Class names, kept as an attribute.
    """

    def __init__(
            self,
            images: Union[torch.Tensor, np.ndarray],
            targets: Union[torch.Tensor, np.ndarray, Sequence[int]],
            batch_size: int = 128,
            is_training: bool = True,
            mean: Sequence[float] = CIFAR10_MEAN,
            std: Sequence[float] = CIFAR10_STD,
            padding: int = 4,
            padding_mode: str = 'constant',
            hflip: float = 0.5,
            drop_last: bool = False,
            device: Union[None, str, torch.device] = None,
            channels_last: bool = False,
            img_dtype: torch.dtype = torch.float32,
            seed: int = 0,
            rank: int = 0,
            world_size: int = 1,
            classes: Optional[List[str]] = None,
    ):
        if isinstance(images, np.ndarray):
            if images.ndim != 4:
                raise ValueError(f'numpy images must be uint8 NHWC, got shape {images.shape}')
            images = torch.from_numpy(images).permute(0, 3, 1, 2)
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f'images must be a uint8 N x C x H x W tensor, got '
                            f'{getattr(images, "dtype", type(images))} {tuple(getattr(images, "shape", ()))}')
        targets = torch.as_tensor(targets).long()
        if targets.shape != (len(images),):
            raise ValueError(f'targets must hold one class index per image ({len(images)}), got {tuple(targets.shape)}')
        n, c, h, w = images.shape
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f'batch_size must be a positive int, got {batch_size!r}')
        if padding_mode not in PADDING_MODES:
            raise ValueError(f'padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}')
        max_pad = min(h, w) if padding_mode in ('reflect', 'symmetric') else float('inf')
        if not isinstance(padding, int) or not 0 <= padding < max_pad:
            raise ValueError(f'padding must be an int in [0, {max_pad}) for {padding_mode} padding of {h}x{w} images, '
                             f'got {padding!r}')
        if not 0. <= hflip <= 1.:
            raise ValueError(f'hflip is a probability in [0, 1], got {hflip}')
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f'need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}')
        if not img_dtype.is_floating_point:
            raise TypeError(f'img_dtype must be a floating dtype, got {img_dtype}')
        mean, std = (torch.as_tensor(v, dtype=torch.float64).flatten() for v in (mean, std))
        if len(mean) not in (1, c) or len(std) not in (1, c) or (std <= 0).any():
            raise ValueError(f'mean / std need 1 or {c} values (std > 0) for {c}-channel images, '
                             f'got mean={mean.tolist()}, std={std.tolist()}')
        if n < world_size:
            raise ValueError(f'{n} samples cannot be split over world_size={world_size} ranks')

        self.device = torch.device(device if device is not None else 'cuda' if torch.cuda.is_available() else 'cpu')
        self.batch_size, self.is_training, self.drop_last = batch_size, is_training, drop_last
        self.padding = padding if is_training else 0
        self.padding_mode, self.hflip = padding_mode, hflip if is_training else 0.
        self.channels_last, self.img_dtype = channels_last, img_dtype
        self.seed, self.epoch, self.rank, self.world_size = seed, 0, rank, world_size
        self.classes = classes
        self.num_channels, self.img_size = c, (h, w)
        self.dataset_size = n
        self.num_samples = n // world_size if is_training else math.ceil(n / world_size)  # per rank and epoch

        # padded NHWC copy, each pixel's channels packed in one word so a crop + flip is one 1-D gather
        p = self.padding
        self._words = {1: 1, 2: 2, 3: 4, 4: 4}.get(c, c)
        padded = torch.zeros(n, h + 2 * p, w + 2 * p, self._words, dtype=torch.uint8)
        padded[:, p:p + h, p:p + w, :c] = images.permute(0, 2, 3, 1)
        if p and padding_mode != 'constant':
            # border rows, then border columns of all rows (corners included), copied from inside, as np.pad does
            for dim, size in ((1, h), (2, w)):
                border = torch.cat([torch.arange(p), torch.arange(size + p, size + 2 * p)])
                src = _pad_index(size, p, padding_mode)[border] + p
                padded.index_copy_(dim, border, padded.index_select(dim, src))
        word_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32}.get(self._words)
        packed = padded.view(word_dtype).squeeze(-1) if word_dtype is not None else padded
        self._pixels = packed.reshape(n * (h + 2 * p) * (w + 2 * p), *packed.shape[3:]).to(self.device)
        self._targets = targets.to(self.device)
        m, s = mean.expand(c), std.expand(c)
        # x_norm = x_uint8 * scale + shift, one fused pass after the gather
        self._scale = (1. / (255. * s)).view(1, c, 1, 1).to(self.device, img_dtype)
        self._shift = (-m / s).view(1, c, 1, 1).to(self.device, img_dtype)
        self._scale_row, self._shift_row = self._scale.view(c).repeat(w), self._shift.view(c).repeat(w)
        self._ar_h, self._ar_w = torch.arange(h, device=self.device), torch.arange(w, device=self.device)
        self.mean, self.std = tuple(m.tolist()), tuple(s.tolist())

    @classmethod
    def from_path(cls, src: Union[str, os.PathLike], split: str = 'train', **kwargs) -> 'InMemoryLoader':
        """Loader over one split of a shard directory (e.g. BUNDLED_DATA_DIR) or an npz; kwargs go to __init__.

        Use `is_training=False` for the evaluation split (in order, unaugmented).
        """
        kwargs.setdefault('is_training', split == 'train')
        images, targets, classes = load_split_tensors(src, split)
        return cls(images, targets, classes=kwargs.pop('classes', classes), **kwargs)

    @classmethod
    def from_dataset(cls, dataset, **kwargs) -> 'InMemoryLoader':
        """Loader over any dataset yielding (PIL image / HWC uint8 array / CHW uint8 tensor, class index), decoded
        once (e.g. a timm or torchvision dataset without transforms); kwargs go to __init__."""
        images, targets = [], []
        for img, target in dataset:
            if isinstance(img, Image.Image):
                img = torch.from_numpy(np.array(img.convert('L' if img.mode in ('L', '1') else 'RGB')))
                img = img[None] if img.ndim == 2 else img.permute(2, 0, 1)
            elif isinstance(img, np.ndarray):
                img = torch.from_numpy(img)
                img = img[None] if img.ndim == 2 else img.permute(2, 0, 1)
            if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8:
                raise TypeError(f'dataset images must be PIL, uint8 HWC arrays or uint8 CHW tensors (no transform), '
                                f'got {type(img).__name__} {getattr(img, "dtype", "")}')
            images.append(img)
            targets.append(int(target))
        kwargs.setdefault('classes', getattr(dataset, 'classes', None))
        return cls(torch.stack(images), torch.tensor(targets), **kwargs)

    def __len__(self) -> int:
        return self.num_samples // self.batch_size if self.drop_last else math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch the next iteration uses (iterating without it advances one epoch per pass)."""
        self.epoch = epoch

    def state_dict(self) -> Dict[str, int]:
        return dict(seed=self.seed, epoch=self.epoch)

    def load_state_dict(self, state_dict: Dict[str, int]) -> None:
        self.seed, self.epoch = int(state_dict['seed']), int(state_dict['epoch'])

    def epoch_plan(self, epoch: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's (sample indices, row offsets, column offsets, flips) for an epoch, on the CPU."""
        n, ws = self.dataset_size, self.world_size
        if not self.is_training:
            idx = torch.arange(self.num_samples * ws) % n
            zeros = torch.zeros(len(idx), dtype=torch.long)
            return idx[self.rank::ws], zeros[self.rank::ws], zeros[self.rank::ws], zeros[self.rank::ws].bool()
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        perm = torch.randperm(n, generator=g)
        offsets = torch.randint(0, 2 * self.padding + 1, (2, n), generator=g)
        flips = torch.rand(n, generator=g) < self.hflip
        sl = slice(self.rank, self.num_samples * ws, ws)
        return perm[sl], offsets[0, sl], offsets[1, sl], flips[sl]

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        idx, dy, dx, flip = (t.to(self.device, non_blocking=True) for t in self.epoch_plan(epoch))
        (h, w), p, bs = self.img_size, self.padding, self.batch_size
        hp, wp = h + 2 * p, w + 2 * p
        for start in range(0, len(self) * bs, bs):
            b_idx, b_dy, b_dx, b_flip = (t[start:start + bs] for t in (idx, dy, dx, flip))
            rows = b_dy[:, None] + self._ar_h
            cols = b_dx[:, None] + torch.where(b_flip[:, None], w - 1 - self._ar_w, self._ar_w)
            flat = ((b_idx[:, None, None] * hp + rows[:, :, None]) * wp + cols[:, None, :]).view(-1)
            words = self._pixels.index_select(0, flat)
            pixels = words.view(torch.uint8).view(len(b_idx), h, w, -1)[..., :self.num_channels]
            if self.channels_last:
                # NHWC rows with a per-(column, channel) scale keep the fused op's inner loop long and vectorised
                x = torch.addcmul(self._shift_row, pixels.reshape(len(b_idx), h, -1), self._scale_row)
                x = x.view(len(b_idx), h, w, self.num_channels).permute(0, 3, 1, 2)
            else:
                x = torch.empty((len(b_idx), self.num_channels, h, w), dtype=self.img_dtype, device=self.device)
                torch.addcmul(self._shift, pixels.permute(0, 3, 1, 2), self._scale, out=x)
            yield x, self._targets[b_idx]


if __name__ == '__main__':
    main()
