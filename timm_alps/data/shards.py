""" `convert`: a dataset to webdataset tar shards (PNG + class index) with timm's `_info.json`

Command line: `python -m timm_alps.data SRC OUT_DIR` (console script `timm-alps-convert`).
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
from PIL import Image

from .sources import FORMATS, detect_format, read_source
from .tensors import INFO_FILE

__all__ = ['convert', 'main']


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


def _shuffled(indices: np.ndarray, seed: int) -> np.ndarray:
    # its own stream (not the per-class draw's), so --no-shuffle keeps the same samples, only in source order
    return np.random.default_rng([seed, 1]).permutation(indices)


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
        shuffle: bool = True,
        num_classes: Optional[int] = None,
) -> Dict[str, Any]:
    """Convert a dataset to webdataset shards (PNG + class index) with timm's `_info.json`.

    Args:
        src: An `.npz` (x_<split> uint8 NHWC, y_<split>, optional lossless_mask_<split>; class names from a sibling
            `.json` with "classes"), a folder holding (or being) `cifar-10-batches-py` / `cifar-100-python`, a folder
            with SVHN `<split>_32x32.mat`, or an image folder (class sub-folders, optionally under split folders).
        out_dir: Output directory (created).
        format: One of FORMATS; 'auto' detects it from src.
        splits: Splits to convert, default all the source has.
        per_class: Samples kept per class (class-balanced, seeded draw): one int for every split or one per split;
            None keeps all.
        shard_size: Maximum samples per tar shard. timm's wds reader hands whole shards to loader workers and caps each
            worker at its share of samples, so pick a worker count that divides the number of shards.
        lossless_only: Keep only samples whose npz lossless_mask_<split> is True.
        name: Dataset name used in shard file names, default from src.
        seed: Seed (int >= 0) of the per-class draw and of the shuffle.
        compress: gzip the shards (`.tar.gz`, read transparently by webdataset); pays off for small images, where
            tar headers are as large as the PNGs.
        shuffle: Write each split's samples in a seeded random order across all its shards (default). Image folders
            and many arrays are sorted by class; written in that order, every shard would hold one or two classes,
            and timm's wds reader (shard shuffle + a small sample buffer) would feed class-correlated batches. False
            keeps the source order.
        num_classes: For an npz without a class-name `.json`: the class count (labels in [0, num_classes)). Without
            it the classes are the label values 0..max, and a label set where most of those would be empty (e.g.
            {0, 1000000}) is refused.

    Returns:
        The info dict written to `out_dir/_info.json` (timm's split info plus the conversion settings).

    Raises:
        FileNotFoundError: src (or a split of it) does not exist.
        ValueError: A bad argument (named in the message), an unreadable source or a class with too few samples.
    """
    src, out_dir = Path(src), Path(out_dir)
    if not src.exists():
        raise FileNotFoundError(f'Source {src} does not exist')
    if format not in FORMATS:
        raise ValueError(f'Unknown format {format!r}; choose one of {FORMATS}')
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f'shard_size must be a positive int, got {shard_size!r}')
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f'seed must be an int >= 0, got {seed!r}')
    if splits is not None and (isinstance(splits, str) or not splits
                               or not all(isinstance(s, str) and s for s in splits) or len(set(splits)) != len(splits)):
        raise ValueError(f'splits must be a list of distinct, non-empty split names, got {splits!r}')
    if name is not None and (not isinstance(name, str) or not name or any(c in name for c in '/\\:')):
        raise ValueError(f'name must be a non-empty file name part (no / \\ or :), got {name!r}')
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f'out_dir {out_dir} exists and is not a directory')
    per_split = list(per_class) if isinstance(per_class, (list, tuple)) else [per_class]
    for n in per_split:
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f'per_class values must be positive ints or None, got {per_class!r}')
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 2):
        raise ValueError(f'num_classes must be an int >= 2, got {num_classes!r}')
    fmt = detect_format(src) if format == 'auto' else format
    if lossless_only and fmt != 'npz':
        raise ValueError(f'lossless_only needs an npz source with lossless_mask_<split> arrays, got format {fmt!r}')
    data, classes = read_source(src, fmt, splits, num_classes)

    if not isinstance(per_class, (list, tuple)):
        per_split = per_split * len(data)
    if len(per_split) != len(data):
        raise ValueError(f'per_class has {len(per_split)} values for {len(data)} splits {list(data)}')
    name = name or (src.stem if fmt in ('npz', 'folder') else fmt)
    name = name.replace('-', '_').replace(' ', '_')  # '-' separates name, split and shard index in file names
    out_dir.mkdir(parents=True, exist_ok=True)

    info = dict(name=name, classes=classes, num_classes=len(classes), source=str(src.name), format=fmt,
                lossless_only=lossless_only, seed=seed, shuffle=bool(shuffle), splits={})
    for (split, (images, labels, mask)), n in zip(data.items(), per_split):
        if lossless_only and mask is None:
            raise ValueError(f'lossless_only but {src} has no lossless_mask_{split}')
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError(f'Labels of split {split!r} must lie in [0, {len(classes)}), '
                             f'got [{labels.min()}, {labels.max()}]')
        indices = _select(labels, len(classes), n, mask if lossless_only else None, seed, split)
        if shuffle:
            indices = _shuffled(indices, seed)
        info['splits'][split] = _write_split(images, labels, indices, out_dir, name, split, shard_size, compress)
        info['splits'][split]['per_class'] = n
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=1) + '\n')
    return info


def _per_class(value: str) -> Union[int, List[int]]:
    try:
        parts = [int(v) for v in value.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected an int or comma separated ints (e.g. 400,100), got {value!r}')
    return parts[0] if len(parts) == 1 else parts


def _splits(value: str) -> List[str]:
    parts = [s.strip() for s in value.split(',')]
    if not all(parts):
        raise argparse.ArgumentTypeError(f'expected comma separated split names (e.g. train,test), got {value!r}')
    return parts


def _non_negative_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f'expected an int >= 0, got {value!r}')
    return v


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command line entry point of `convert` (`python -m timm_alps.data` / `timm-alps-convert`).

    Bad arguments exit with status 2 and one error line naming the argument.
    """
    parser = argparse.ArgumentParser(
        prog='timm-alps-convert', description='Convert a dataset to timm webdataset shards (PNG + class index), '
        'samples shuffled across shards. Read back with '
        "timm.data.create_dataset('wds/<name>', root=OUT_DIR, split='train').")
    parser.add_argument('src', help='.npz file, torchvision CIFAR / SVHN folder, or image folder')
    parser.add_argument('out_dir', help='output directory for the shards and _info.json')
    parser.add_argument('--format', default='auto', choices=FORMATS)
    parser.add_argument('--splits', default=None, type=_splits,
                        help='comma separated splits, default all (e.g. train,test)')
    parser.add_argument('--per-class', default=None, type=_per_class,
                        help='samples per class: one int, or one per split in --splits order (e.g. 400,100)')
    parser.add_argument('--shard-size', '--max-shard-size', dest='shard_size', type=int, default=2500,
                        help='maximum samples per shard (default 2500); with timm\'s wds reader, use a number of '
                             'loader workers that divides the shard count, or some samples are skipped each epoch')
    parser.add_argument('--lossless-only', action='store_true', help='keep samples whose npz lossless_mask is True')
    parser.add_argument('--name', default=None, help='dataset name in shard file names (default from SRC)')
    parser.add_argument('--seed', type=_non_negative_int, default=0,
                        help='seed of the --per-class draw and of the shuffle (default 0)')
    parser.add_argument('--no-shuffle', dest='shuffle', action='store_false',
                        help='keep the source order (by default each split is shuffled across its shards, seeded)')
    parser.add_argument('--compress', action='store_true', help='gzip the shards (.tar.gz)')
    parser.add_argument('--num-classes', type=int, default=None, metavar='N',
                        help='npz without a class-name .json: the class count (default: the largest label + 1, '
                             'refused when most of those classes would be empty)')
    args = parser.parse_args(argv)
    try:
        info = convert(
            args.src, args.out_dir, format=args.format, splits=args.splits, per_class=args.per_class,
            shard_size=args.shard_size, lossless_only=args.lossless_only, name=args.name, seed=args.seed,
            compress=args.compress, shuffle=args.shuffle, num_classes=args.num_classes)
    except (OSError, ValueError) as e:  # the user's input: one line, no traceback
        parser.exit(2, f'{parser.prog}: error: {e}\n')
    for split, s in info['splits'].items():
        size = sum((Path(args.out_dir) / f).stat().st_size for f in s['filenames'])
        print(f"{split}: {s['num_samples']} samples in {len(s['filenames'])} shard(s), {size / 2 ** 20:.2f} MiB"
              f"{', shuffled' if info['shuffle'] else ''}")
    print(f"classes ({info['num_classes']}): {', '.join(info['classes'])}")
