""" Readers of the datasets `convert` takes: an npz of uint8 arrays, torchvision's CIFAR / SVHN files, image folders

Each reader returns `({split: (images, labels, lossless_mask)}, class names)`, where `images` indexes to PIL images
(decoded on access) and `labels` is an int64 numpy array of class indices.
"""
import json
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

__all__ = ['FORMATS', 'detect_format', 'read_source', 'read_npz', 'read_npz_split']

FORMATS = ('auto', 'npz', 'cifar10', 'cifar100', 'svhn', 'folder')
_IMG_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.gif', '.tif', '.tiff', '.ppm', '.pgm')
_SPLIT_NAMES = ('train', 'val', 'validation', 'test')
_TORCHVISION_DIRS = {'cifar10': 'cifar-10-batches-py', 'cifar100': 'cifar-100-python'}

Source = Tuple[Dict[str, tuple], List[str]]


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


def detect_format(src: Path) -> str:
    """The `FORMATS` entry of a source path: npz file, torchvision CIFAR / SVHN folder, else an image folder."""
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


def open_npz(src: Path) -> np.lib.npyio.NpzFile:
    """`np.load` of an .npz archive (no pickles), with a message naming the file when it is not one.

    Raises:
        ValueError: src is not a zip of arrays (a corrupt or truncated file, a single .npy, a pickle).
    """
    try:
        data = np.load(src, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        # numpy reads a file that is neither a zip nor an .npy as a pickle, which it refuses: say what it is not
        why = f'{type(e).__name__}: {e}' if not isinstance(e, ValueError) else 'not a zip archive'
        raise ValueError(f'{src} cannot be read as an .npz archive ({why}); expected the output of numpy.savez '
                         f'with arrays x_<split> and y_<split>') from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f'{src} holds a single array, not an .npz archive of x_<split> and y_<split> arrays')
    return data


def read_npz_split(data, src: Path, split: str, labels_only: bool = False):
    """(uint8 NHWC images or None when labels_only, int64 labels, lossless mask or None) of one validated npz split.

    Args:
        data: The opened `np.load(src)`.
        src: Its path, for messages.
        split: Split name; the npz holds x_<split>, y_<split> and optionally lossless_mask_<split>.
        labels_only: Skip loading (and checking the dtype of) the images.

    Raises:
        ValueError: Missing arrays, wrong dtype / shape, or an empty split.
    """
    if f'x_{split}' not in data.files or f'y_{split}' not in data.files:
        raise ValueError(f"{src} has no arrays 'x_{split}' and 'y_{split}' (keys: {sorted(data.files)}); "
                         f"expected x_<split> (uint8 NHWC) and y_<split> (int class index) per split")
    y = data[f'y_{split}']
    x = None
    if not labels_only:
        x = data[f'x_{split}']
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"x_{split} in {src} must be uint8 NHWC with 1 or 3 channels, got {x.dtype} {x.shape}")
    if y.ndim != 1 or (x is not None and len(y) != len(x)) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f'y_{split} in {src} must be one integer label per image, got {y.dtype} {y.shape}')
    if len(y) == 0:
        raise ValueError(f'split {split!r} of {src} is empty (y_{split} has shape {y.shape}); '
                         f'drop it or pass the splits that hold images')
    mask = data[f'lossless_mask_{split}'] if f'lossless_mask_{split}' in data.files else None
    if mask is not None and mask.shape != y.shape:
        raise ValueError(f'lossless_mask_{split} in {src} must hold one bool per label, got shape {mask.shape}')
    return x, y.astype(np.int64), (None if mask is None else mask.astype(bool))


def read_npz(src: Path, splits: Optional[Sequence[str]], num_classes: Optional[int] = None,
             sparse_ok: bool = True) -> Source:
    """An npz's splits and class names: from a sibling .json's "classes", else `num_classes` numbered classes, else
    one per label value up to the largest. With ``sparse_ok=False`` (the converter) that last guess is refused when
    most of its classes would hold no sample (labels {0, 1000000} are two classes, not 1,000,001)."""
    if src.suffix != '.npz' or not src.is_file():
        raise ValueError(f'npz format needs an .npz file, got {src}')
    with open_npz(src) as data:
        splits = list(splits or [k[2:] for k in data.files if k.startswith('x_')])
        if not splits:
            raise ValueError(f'{src} has no x_<split> arrays (keys: {sorted(data.files)}); expected x_<split> '
                             f'(uint8 NHWC) and y_<split> (int class index) per split, e.g. x_train, y_train')
        out = {}
        for split in splits:
            x, y, mask = read_npz_split(data, src, split)
            out[split] = (_ArrayImages(x), y, mask)
    classes = None
    meta_path = src.with_suffix('.json')
    if meta_path.is_file():
        classes = json.loads(meta_path.read_text()).get('classes')
    largest = int(max(y.max() for _, y, _ in out.values()))
    if classes is None and num_classes is not None:
        if largest >= num_classes:
            raise ValueError(f'num_classes={num_classes} but {src} has label {largest}; class indices must lie in '
                             f'[0, num_classes)')
        classes = [str(c) for c in range(num_classes)]
    if classes is None:
        classes = [str(c) for c in range(largest + 1)]
        present = len(np.unique(np.concatenate([y for _, y, _ in out.values()])))
        if not sparse_ok and 2 * present < len(classes):
            raise ValueError(f'the labels of {src} take {present} distinct values up to {largest}: as class '
                             f'indices that is {len(classes)} classes, {len(classes) - present} of them empty. '
                             f'Relabel to 0..{present - 1}, name the classes in {src.with_suffix(".json").name} '
                             f'("classes": [...]), or give the class count explicitly (--num-classes N)')
    elif num_classes is not None and num_classes != len(classes):
        raise ValueError(f'num_classes={num_classes} but {src.with_suffix(".json").name} names {len(classes)} '
                         f'classes')
    return out, list(classes)


def _read_torchvision(src: Path, fmt: str, splits: Optional[Sequence[str]]) -> Source:
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


def _read_folder(src: Path, splits: Optional[Sequence[str]]) -> Source:
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


def read_source(src: Path, fmt: str, splits: Optional[Sequence[str]], num_classes: Optional[int] = None) -> Source:
    """Open the splits of a source of a known format (not 'auto'); see `convert` for the layouts and `num_classes`."""
    if fmt == 'npz':
        return read_npz(src, splits, num_classes, sparse_ok=False)
    if num_classes is not None:
        raise ValueError(f'num_classes applies to npz sources (their classes are label values); the {fmt} format '
                         f'names its classes')
    if fmt == 'folder':
        if not src.is_dir():
            raise ValueError(f'folder format needs a directory, got {src}')
        return _read_folder(src, splits)
    return _read_torchvision(src, fmt, splits)
