""" Datasets as uint8 tensors: `_info.json`, shard / npz splits, any map-style dataset, seeded subsets

* `read_info` is the one reader of a shard folder's `_info.json` (timm's wds split info, written by `convert`).
* `decode_dataset` is the one decoder: (PIL image | uint8 array | uint8 tensor, class index) samples of any dataset
  become uint8 N x C x H x W images and int64 labels; `load_split_tensors` reads shard folders through it.
* `subset_indices` draws the seeded (class-balanced when labels are known) subsets behind `max_samples`.
"""
import io
import itertools
import json
import os
import tarfile
import zlib
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from .sources import open_npz, read_npz, read_npz_split

__all__ = [
    'INFO_FILE', 'EVAL_SPLITS', 'read_info', 'default_eval_split', 'decode_dataset', 'subset_indices',
    'dataset_labels', 'split_labels', 'load_split_tensors', 'shard_image_shape', 'ShardError', 'BadShard',
    'check_shards',
]

PathLike = Union[str, os.PathLike]
INFO_FILE = '_info.json'
EVAL_SPLITS = ('validation', 'val', 'test')  # preference order of the default evaluation split
_IMAGE_EXTS = ('png', 'jpg', 'jpeg', 'webp', 'bmp', 'ppm', 'pgm', 'tif', 'tiff')
_HIGH_DEPTH_MODES = ('I', 'F', 'I;16', 'I;16B', 'I;16L', 'I;16N')


# -- _info.json -------------------------------------------------------------------------------------------------------
def read_info(root: PathLike) -> Optional[Dict[str, Any]]:
    """Read and check the `_info.json` of a webdataset shard folder (the format timm's wds reader uses).

    Args:
        root: Folder that may hold `_info.json` (a file path, e.g. an npz, simply has none).

    Returns:
        The info dict, or None when `root/_info.json` does not exist. Its 'splits' maps each split name to a dict with
        'filenames' (shard files, relative to root) and 'num_samples'; 'classes' (names in index order) is optional.

    Raises:
        ValueError: The file is not JSON, not a mapping, has no 'splits' mapping, or a split lacks a list of shard
            filenames or a non-negative 'num_samples' (or 'shard_lengths' that disagree with it).
    """
    path = Path(root) / INFO_FILE
    if not path.is_file():
        return None
    fix = f'rewrite it with `python -m timm_alps.data SRC {root}`'
    try:
        info = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f'{path} is not valid JSON ({e}); {fix}') from e
    if not isinstance(info, dict):
        raise ValueError(f'{path} must hold a JSON object, got {type(info).__name__}; {fix}')
    splits = info.get('splits')
    if not isinstance(splits, dict) or not splits:
        raise ValueError(f"{path} has no 'splits' mapping (split name -> filenames, num_samples); {fix}")
    for name, s in splits.items():
        files = s.get('filenames') if isinstance(s, dict) else None
        if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
            raise ValueError(f"{path}: split {name!r} needs a non-empty list 'filenames' of shard files; {fix}")
        n, lengths = s.get('num_samples'), s.get('shard_lengths')
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{path}: split {name!r} needs an int 'num_samples' >= 0, got {n!r}; {fix}")
        if lengths is not None and (not isinstance(lengths, list) or len(lengths) != len(files)
                                    or not all(isinstance(v, int) for v in lengths) or sum(lengths) != n):
            raise ValueError(f"{path}: split {name!r} has 'shard_lengths' {lengths!r} that do not give one count per "
                             f"shard summing to num_samples={n}; {fix}")
    classes = info.get('classes')
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
        raise ValueError(f"{path}: 'classes' must be a list of class names, got {classes!r}; {fix}")
    return info


def default_eval_split(dataset: Optional[str], root: Optional[PathLike]) -> str:
    """The evaluation split to use when none is given.

    Args:
        dataset: timm dataset name ('wds/<name>', 'torch/<name>', 'hfds/<name>', ...; '' or a name without one of
            timm's reader prefixes for an image folder).
        root: Its data folder (may be None for a downloaded torch/ dataset).

    Returns:
        'test' for torch/ datasets (they have train and test); for a shard folder, the first of EVAL_SPLITS
        ('validation', 'val', 'test') that its `_info.json` lists; for an image folder, the first of them that is a
        sub-folder of root (timm's own search does not look for 'test'); 'validation' otherwise (hfds/, tfds/, ...).

    Raises:
        ValueError: root's `_info.json` is invalid (see `read_info`).
    """
    dataset = dataset or ''
    prefix = dataset.split('/', 1)[0].lower() if '/' in dataset else ''
    if prefix == 'torch':
        return 'test'
    if root is not None and prefix == 'wds':
        info = read_info(root)
        if info is not None:
            return next((s for s in EVAL_SPLITS if s in info['splits']), EVAL_SPLITS[0])
    if root is not None and prefix not in ('wds', 'hfds', 'hfids', 'tfds'):  # timm reads the rest as folders / tars
        return next((s for s in EVAL_SPLITS if (Path(root) / s).is_dir()), EVAL_SPLITS[0])
    return EVAL_SPLITS[0]


# -- the decoder -------------------------------------------------------------------------------------------------------
def _image_chw(img: Any, where: str) -> np.ndarray:
    """uint8 C x H x W array (C = 1 or 3) of one raw image."""
    if isinstance(img, Image.Image):
        if img.mode in _HIGH_DEPTH_MODES:
            raise ValueError(f'{where}: PIL image of mode {img.mode!r} has more than 8 bits per pixel; convert the '
                             f'images to 8-bit L or RGB first')
        if img.mode not in ('L', 'RGB'):  # '1' and 'LA' stay grayscale; palette, RGBA, CMYK, ... become RGB
            img = img.convert('L' if img.mode in ('1', 'LA', 'La') else 'RGB')
        arr = np.asarray(img)
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if isinstance(img, torch.Tensor):
        channels_first, arr = True, img.detach().cpu()
        if arr.dtype != torch.uint8:
            raise TypeError(f'{where}: image is a {arr.dtype} tensor; decode_dataset needs raw uint8 images (build '
                            f'the dataset without a transform, e.g. no ToTensor / normalisation)')
        arr = arr.numpy()
    elif isinstance(img, np.ndarray):
        channels_first, arr = False, img
        if arr.dtype != np.uint8:
            raise TypeError(f'{where}: image is a {arr.dtype} numpy array; decode_dataset needs raw uint8 images')
    else:
        raise TypeError(f'{where}: image is a {type(img).__name__}; decode_dataset takes PIL images, uint8 numpy '
                        f'arrays (H x W or H x W x C) and uint8 tensors (C x H x W or H x W x C)')
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim != 3:
        raise ValueError(f'{where}: image has shape {tuple(arr.shape)}; expected H x W, C x H x W or H x W x C')
    first, last = arr.shape[0] in (1, 3), arr.shape[-1] in (1, 3)
    if first and last:  # e.g. 3 x 32 x 3: the type's convention decides (tensors CHW, numpy HWC as PIL)
        first = channels_first
    elif not (first or last):
        raise ValueError(f'{where}: image of shape {tuple(arr.shape)} has no channel axis of size 1 or 3 '
                         f'(first for C x H x W, last for H x W x C); drop alpha / extra channels first')
    return arr if first else arr.transpose(2, 0, 1)


def _label(target: Any, where: str) -> int:
    if isinstance(target, torch.Tensor):
        integral = not (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool)
        one = target.numel() == 1
    elif isinstance(target, (np.ndarray, np.generic)):
        integral, one = np.issubdtype(target.dtype, np.integer), target.size == 1
    elif isinstance(target, bool) or not isinstance(target, int):
        raise TypeError(f'{where}: label must be an integer class index, got {type(target).__name__} {target!r}')
    else:
        integral = one = True
    if not (integral and one):
        raise TypeError(f'{where}: label must be one integer class index, got {type(target).__name__} of '
                        f'{target.dtype} with shape {tuple(target.shape)} (one-hot / soft targets are not raw labels)')
    target = int(target)
    if target < 0:
        raise ValueError(f'{where}: label {target} is negative (an unlabelled sample?); class indices start at 0')
    return target


def _stack(samples: Iterable[Tuple[str, Any, Any]], n: int, source: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, C, H, W) + int64 (n,) from exactly n (description, image, label) samples of `source`."""
    images: Optional[np.ndarray] = None
    labels = np.empty(n, np.int64)
    first, count = '', 0
    for where, img, target in samples:
        if count == n:
            raise ValueError(f'{source}: more than the {n} samples expected')
        chw = _image_chw(img, where)
        if images is None:
            images, first = np.empty((n, *chw.shape), np.uint8), where
        elif chw.shape[1:] != images.shape[2:]:
            raise ValueError(f'{where} is {chw.shape[1]}x{chw.shape[2]} but {first} is {images.shape[2]}x'
                             f'{images.shape[3]}: uint8 tensors need one image size (resize the images first)')
        elif chw.shape[0] > images.shape[1]:  # first RGB image after grayscale ones: those become RGB too (once)
            images = np.repeat(images, chw.shape[0], axis=1)
        images[count] = chw  # a grayscale image among RGB ones broadcasts to 3 equal channels
        labels[count] = _label(target, where)
        count += 1
    if count != n:
        raise ValueError(f'{source}: expected {n} samples, got {count}')
    if images is None:
        raise ValueError(f'{source} holds no sample')
    return torch.from_numpy(images), torch.from_numpy(labels)


def _sample(item: Any, where: str) -> Tuple[Any, Any]:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise TypeError(f'{where}: expected an (image, label) pair, got {type(item).__name__}')
    return item[0], item[1]


def _as_indices(indices: Any, n: int, what: str) -> np.ndarray:
    idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
    if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
        raise TypeError(f'{what} must be a 1-D sequence of integer indices, got {idx.dtype} {idx.shape}')
    bad = idx[(idx < 0) | (idx >= n)]
    if len(bad):
        raise ValueError(f'{what} holds {int(bad[0])}, outside [0, {n}) of a dataset of {n} samples')
    return idx.astype(np.int64)


def decode_dataset(dataset: Any, indices: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode a dataset of raw (image, class index) samples once into uint8 images and int64 labels.

    This is the one place where datasets become tensors (`InMemoryLoader.from_dataset`, `load_split_tensors` on
    shard folders, the training script's fast loader and the robustness benchmark use it).

    Args:
        dataset: A map-style dataset (len + integer indexing: a timm / torchvision dataset without transform, a
            list of pairs, ...) of (image, label) samples; an iterable dataset (e.g. timm's 'wds/' reader) is read
            in full when `indices` is None. Images are PIL images (any 8-bit mode: grayscale stays one channel,
            others become RGB), uint8 numpy arrays (H x W, H x W x C) or uint8 tensors (C x H x W, H x W x C; the
            axis of size 1 or 3 is the channel axis; when both ends qualify, tensors are C x H x W and arrays
            H x W x C). Labels are non-negative ints (Python, numpy or one-element integer tensors).
        indices: Samples to decode, in this order (e.g. from `subset_indices`); default all.

    Returns:
        (uint8 N x C x H x W images, int64 N labels). C is 1 when every image is grayscale, else 3 (grayscale images
        among RGB ones are repeated over 3 channels).

    Raises:
        TypeError: A sample is not a pair, an image is not one of the types above (e.g. a float tensor left by a
            transform), a label is not an integer, or `indices` is given for a dataset that cannot be indexed.
        ValueError: No sample, an index out of range, a negative label, an image without a 1- or 3-channel axis or
            with more than 8 bits, or images of different sizes. Messages name the offending sample.
    """
    name = type(dataset).__name__
    # torch's IterableDataset inherits a __getitem__ that raises: such datasets (timm's 'wds/' reader) are iterated
    indexable = (not isinstance(dataset, torch.utils.data.IterableDataset) and hasattr(dataset, '__getitem__')
                 and hasattr(dataset, '__len__'))
    if indexable:
        try:
            n_all = len(dataset)
        except TypeError:
            indexable = False
    if not indexable:
        if indices is not None:
            raise TypeError(f'{name} cannot be indexed (an iterable / streaming dataset); indices need a map-style '
                            f'dataset')
        if not hasattr(dataset, '__iter__'):
            raise TypeError(f'decode_dataset needs a dataset of (image, label) samples, got {name}')
        items = list(dataset)
        return _stack(((f'sample {i} of {name}', *_sample(s, f'sample {i} of {name}')) for i, s in enumerate(items)),
                      len(items), name)
    idx = np.arange(n_all) if indices is None else _as_indices(indices, n_all, 'indices')
    if len(idx) == 0:
        raise ValueError(f'nothing to decode: {name} holds no sample' if n_all == 0 else 'indices is empty')

    def samples() -> Iterator[Tuple[str, Any, Any]]:
        for i in idx.tolist():
            where = f'sample {i} of {name}'
            yield (where, *_sample(dataset[i], where))
    return _stack(samples(), len(idx), name)


# -- subsets -----------------------------------------------------------------------------------------------------------
def _count(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f'{what} must be an int >= {minimum}, got {value!r}')
    return int(value)


def _balanced_counts(counts: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Per-class sample counts summing to k < counts.sum(), as equal as possible (water-filling): classes with fewer
    samples than their share give all of them, the others get q or q + 1 (the +1s go to randomly drawn classes)."""
    m = len(counts)
    sizes, order = torch.sort(counts, stable=True)
    before = torch.cumsum(sizes, 0) - sizes  # samples in the smaller classes
    share = (k - before) // torch.arange(m, 0, -1)  # the share of class i if all smaller ones gave everything
    # once a class exceeds its share every larger one does too, so the exhausted classes are a prefix
    full = int((sizes <= share).long().cumprod(0).sum())
    take = sizes.clone()
    rest = m - full
    q, r = divmod(k - int(before[full]) if full < m else 0, rest)
    take[full:] = q
    take[full + torch.randperm(rest, generator=generator)[:r]] += 1
    out = torch.empty_like(take)
    out[order] = take
    return out


def subset_indices(n: int, k: int, seed: int, labels: Optional[Sequence[int]] = None) -> torch.Tensor:
    """A seeded random subset of k of n samples, class-balanced when the labels are given.

    Args:
        n: Number of samples.
        k: Subset size; k >= n keeps all n.
        seed: Seed of the draw, any int (the same seed gives the same subset).
        labels: n integer labels (list, numpy array or tensor). With them, each class contributes as equally as
            possible: classes smaller than their share give all their samples, the others k_c or k_c + 1 (which
            classes get the +1 is part of the seeded draw), the samples within a class drawn at random.

    Returns:
        Sorted int64 indices into [0, n) (source order kept), no repeats.

    Raises:
        ValueError: n < 0, k < 1, a seed that is not an int, or labels that are not n integers.
    """
    n, k = _count(n, 'n', 0), _count(k, 'k (the subset size)', 1)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f'seed must be an int, got {seed!r}')
    if labels is not None:
        try:
            labels = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels))
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f'labels must be {n} integer class indices ({e})') from None
        integral = not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool)
        if labels.shape != (n,) or not (integral or n == 0):
            raise ValueError(f'labels must be {n} integer class indices, got {labels.dtype} {tuple(labels.shape)}')
    if k >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(int(seed) % 2 ** 64)  # any int: torch takes 64 bits
    perm = torch.randperm(n, generator=g)
    if labels is None:
        return perm[:k].sort().values
    _, cls, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    take = _balanced_counts(counts, k, g)
    grouped = perm[torch.argsort(cls[perm], stable=True)]  # samples by class, in random order within each class
    cls_grouped = cls[grouped]
    rank = torch.arange(n) - (torch.cumsum(counts, 0) - counts)[cls_grouped]
    return grouped[rank < take[cls_grouped]].sort().values


def dataset_labels(dataset: Any) -> Optional[torch.Tensor]:
    """The labels of a map-style dataset read without decoding any image, or None when they cannot be known so.

    Reads torchvision's `targets` / `labels`, `samples` of (path, label) pairs (torchvision ImageFolder, timm's
    folder reader via `dataset.reader`), and follows `torch.utils.data.Subset`. A dataset with a
    `target_transform` gives None (its labels are only known after the transform).

    Args:
        dataset: The dataset.

    Returns:
        int64 labels, one per sample, or None.
    """
    if isinstance(dataset, torch.utils.data.Subset):
        inner = dataset_labels(dataset.dataset)
        return None if inner is None else inner[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    if getattr(dataset, 'target_transform', None) is not None or not hasattr(dataset, '__len__'):
        return None
    candidates = [getattr(dataset, 'targets', None), getattr(dataset, 'labels', None)]
    for holder in (dataset, getattr(dataset, 'reader', None)):
        samples = getattr(holder, 'samples', None)
        if isinstance(samples, (list, tuple)) and samples and isinstance(samples[0], (list, tuple)):
            candidates.append([s[1] for s in samples])
    for c in candidates:
        if c is None:
            continue
        try:
            labels = torch.as_tensor(np.asarray(c.cpu() if isinstance(c, torch.Tensor) else c))
        except (TypeError, ValueError, RuntimeError):
            continue
        integral = not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool)
        if integral and labels.shape == (len(dataset),):
            return labels.long()
    return None


# -- shard folders and npz splits --------------------------------------------------------------------------------------
def _split_info(root: Path, split: str) -> Dict[str, Any]:
    info = read_info(root)
    if info is None:
        raise FileNotFoundError(f'{root} has no {INFO_FILE}; make shards with `python -m timm_alps.data SRC {root}`')
    if split not in info['splits']:
        raise ValueError(f"Split {split!r} not in {root / INFO_FILE} (splits: {list(info['splits'])})")
    return info


class ShardError(ValueError):
    """A shard that is missing, not a tar file, truncated or corrupt; `path` names it."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f'shard {path} {problem}')
        self.path = path


def _tar_samples(path: Path, read_images: bool) -> Iterator[Tuple[str, bytes, int]]:
    """(description, encoded image bytes, label) of each sample of one tar shard; a damaged shard raises
    `ShardError` after the samples that could be read."""
    try:
        with tarfile.open(path, 'r:*') as tar:
            key, data, label = None, None, None
            for m in itertools.chain(tar, [None]):  # lazily: members are read as the tar is walked
                if m is not None:
                    folder, _, base = m.name.rpartition('/')
                    if not m.isfile() or '.' not in base:
                        continue
                    stem, ext = base.split('.', 1)
                    k = f'{folder}/{stem}' if folder else stem
                if key is not None and (m is None or k != key):  # the previous sample is complete
                    if data is None or label is None:
                        raise ShardError(path, f'is damaged: sample {key} lacks an image or a .cls entry')
                    yield f'sample {key} of {path}', data, label
                    key, data, label = None, None, None
                if m is None:
                    break
                key, ext = k, ext.lower()
                # read members as the tar is walked: seeking back in a .tar.gz would decompress it again
                if ext == 'cls':
                    raw = tar.extractfile(m).read()
                    try:
                        label = int(raw)
                    except ValueError:
                        raise ShardError(path, f'has {key}.cls holding {raw[:20]!r}, not a class index') from None
                elif ext in _IMAGE_EXTS and data is None:
                    data = tar.extractfile(m).read() if read_images else b''
    except FileNotFoundError:
        raise ShardError(path, 'is missing') from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:  # not a tar, truncated, bad gzip stream
        raise ShardError(path, f'is truncated or corrupt ({type(e).__name__}: {e})') from None


def _shard_samples(root: Path, split_info: Dict[str, Any], read_images: bool = True,
                   tolerate_bad_shards: bool = False) -> Iterator[Tuple[str, bytes, int]]:
    """(description, encoded image bytes, label) of each sample of a split, in shard order.

    A sample is a run of tar members sharing a key (webdataset's grouping: the member path up to the first dot of its
    file name). With read_images=False the image bytes are b'' (only the .cls members are read). A damaged shard
    raises `ShardError`, or with `tolerate_bad_shards` ends after its readable samples (as timm's wds reader does).
    """
    for fname in split_info['filenames']:
        try:
            yield from _tar_samples(root / fname, read_images)
        except ShardError:
            if not tolerate_bad_shards:
                raise


class BadShard(NamedTuple):
    """A shard `check_shards` found damaged: its path, what is wrong, and the samples of it that cannot be read
    (None when `_info.json` has no per-shard counts)."""
    path: str
    problem: str
    lost: Optional[int]


def check_shards(root: PathLike, split: str) -> List[BadShard]:
    """Walk every shard of a split (tar headers and labels, no image decoding) against its `_info.json`.

    Returns:
        The missing, unreadable, truncated or short shards (empty when the split is whole).

    Raises:
        FileNotFoundError / ValueError: no `_info.json`, or the split is not in it.
    """
    root = Path(root)
    split_info = _split_info(root, split)['splits'][split]
    lengths = split_info.get('shard_lengths') or [None] * len(split_info['filenames'])
    bad, total = [], 0
    for fname, expected in zip(split_info['filenames'], lengths):
        found, problem = 0, None
        try:
            for _ in _tar_samples(root / fname, read_images=False):
                found += 1
        except ShardError as e:
            problem = str(e)
        if problem is None and expected is not None and found != expected:
            problem = f'shard {root / fname} holds {found} samples, {INFO_FILE} says {expected}'
        if problem is not None:
            bad.append(BadShard(str(root / fname), problem, None if expected is None else max(0, expected - found)))
        total += found
    if not bad and total != split_info['num_samples']:
        bad.append(BadShard(str(root), f'{root} split {split!r}: read {total} samples, {INFO_FILE} says '
                            f"{split_info['num_samples']}", None))
    return bad


def _open_image(data: bytes, where: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, SyntaxError, ValueError) as e:  # what Pillow raises for truncated / unknown image data
        raise ValueError(f'{where}: cannot decode the image ({e})') from None
    return img


def _check_count(root: Path, split: str, found: int, expected: int) -> None:
    if found != expected:
        raise ValueError(f'{root} split {split!r}: read {found} samples, {INFO_FILE} says {expected}')


def split_labels(src: PathLike, split: str = 'train', lossless_only: bool = False) -> torch.Tensor:
    """The labels of one split of a shard folder or an npz, without decoding images (for `subset_indices`).

    Args:
        src: Folder with `_info.json` and shards (from `convert`), or an `.npz` with x_<split> / y_<split>.
        split: Split name.
        lossless_only: For an npz, only the samples whose lossless_mask_<split> is True.

    Returns:
        int64 labels in the order `load_split_tensors` returns the samples.

    Raises:
        FileNotFoundError: src does not exist, or a folder has no `_info.json`.
        ValueError: Unknown split, invalid `_info.json` / npz arrays, or a shard count mismatch.
    """
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f'{src} does not exist')
    if src.is_dir():
        if lossless_only:
            raise ValueError('lossless_only applies to npz sources; shards were filtered when converted')
        split_info = _split_info(src, split)['splits'][split]
        labels = [label for _, _, label in _shard_samples(src, split_info, read_images=False)]
        _check_count(src, split, len(labels), split_info['num_samples'])
        return torch.tensor(labels, dtype=torch.long)
    with open_npz(src) as data:
        _, y, mask = read_npz_split(data, src, split, labels_only=True)
    return torch.from_numpy(_lossless(y, mask, src, split, lossless_only))


def _lossless(a: np.ndarray, mask: Optional[np.ndarray], src: Path, split: str, lossless_only: bool) -> np.ndarray:
    if not lossless_only:
        return a
    if mask is None:
        raise ValueError(f'lossless_only but {src} has no lossless_mask_{split}')
    return a[mask]


def load_split_tensors(
        src: PathLike,
        split: str = 'train',
        lossless_only: bool = False,
        max_samples: Optional[int] = None,
        seed: int = 0,
        tolerate_bad_shards: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[List[str]]]:
    """Load one split of a shard folder (from `convert`) or of an npz into memory.

    Args:
        src: Folder with `_info.json` and shards, or an `.npz` with x_<split> / y_<split>.
        split: Split name.
        lossless_only: For an npz, keep only the samples whose lossless_mask_<split> is True.
        max_samples: Keep a seeded, class-balanced random subset of this many samples (`subset_indices`), in
            source order; only those images are decoded. None keeps all.
        seed: Seed of that subset.
        tolerate_bad_shards: Read the samples of the shards that can be read (a truncated shard: those before the
            damage) instead of raising `ShardError` (`check_shards` says what is left out).

    Returns:
        (uint8 images N x C x H x W, int64 labels N, class names or None when the source has none)

    Raises:
        FileNotFoundError: src does not exist, or a folder has no `_info.json`.
        ValueError: Unknown split, invalid `_info.json` / npz arrays, max_samples < 1, a shard count mismatch, or
            images of different sizes (see `decode_dataset`).
        ShardError: a missing, truncated or corrupt shard (a ValueError naming it).
    """
    src = Path(src)
    if max_samples is not None:
        _count(max_samples, 'max_samples', 1)
    if not src.exists():
        raise FileNotFoundError(f'{src} does not exist')
    if src.is_dir():
        if lossless_only:
            raise ValueError('lossless_only applies to npz sources; shards were filtered when converted')
        info = _split_info(src, split)
        split_info = info['splits'][split]
        n = split_info['num_samples']
        desc = f'{src} split {split!r}'
        if tolerate_bad_shards or (max_samples is not None and max_samples < n):
            # one pass keeps every sample's encoded bytes (the whole split was to fit in memory decoded), then only
            # the drawn ones are decoded: a .tar.gz is decompressed once
            raw = list(_shard_samples(src, split_info, tolerate_bad_shards=tolerate_bad_shards))
            if not tolerate_bad_shards:
                _check_count(src, split, len(raw), n)
            n = len(raw)
            if not n:
                raise ValueError(f'{desc}: no shard could be read')
            keep = list(range(n)) if max_samples is None or max_samples >= n else \
                subset_indices(n, max_samples, seed, labels=[label for _, _, label in raw]).tolist()
            x, y = _stack(((raw[i][0], _open_image(raw[i][1], raw[i][0]), raw[i][2]) for i in keep), len(keep),
                          desc)
        else:
            samples = _shard_samples(src, split_info)
            x, y = _stack(((where, _open_image(data, where), label) for where, data, label in samples), n, desc)
        return x, y, info.get('classes')


    data, classes = read_npz(src, [split])
    images, y, mask = data[split]
    x, y = _lossless(images.array, mask, src, split, lossless_only), _lossless(y, mask, src, split, lossless_only)
    if max_samples is not None and max_samples < len(y):
        keep = subset_indices(len(y), max_samples, seed, labels=y).numpy()
        x, y = x[keep], y[keep]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y), classes


def shard_image_shape(root: PathLike, split: str, tolerate_bad_shards: bool = False) -> Tuple[int, int, int]:
    """(C, H, W) of the first image of a shard folder's split, as `load_split_tensors` would decode it.

    Args:
        root: Folder with `_info.json` and shards.
        split: Split name.
        tolerate_bad_shards: Look past damaged shards (see `load_split_tensors`).

    Raises:
        FileNotFoundError / ValueError: As `load_split_tensors`; also when the split holds no image.
    """
    root = Path(root)
    split_info = _split_info(root, split)['splits'][split]
    for where, data, _ in _shard_samples(root, split_info, tolerate_bad_shards=tolerate_bad_shards):
        return tuple(_image_chw(_open_image(data, where), where).shape)
    raise ValueError(f'{root} split {split!r} holds no sample')
