"""The run's data: what the dataset is (`inspect_data`), which loader reads it (`choose_loader`, the one place that
decides), and the loaders (`build_loaders`).

`--loader fast` keeps a small dataset as uint8 tensors on the device (`InMemoryLoader`: crop/flip/normalise batched
there); `--loader timm` is timm's `create_loader` (streaming webdataset shards, image folders, torch/ datasets, timm's
augmentations, the prefetcher with mixing in the collate).

timm_alps shards are checked before training (`check_shards`): a missing, truncated or corrupt shard stops the run
naming it, on either loader, unless `--tolerate-bad-shards`, which trains on what can be read and counts the rest.
"""
import dataclasses
import logging
import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from timm.data import create_dataset, create_loader

from .. import data as alps_data
from .config import TIMM_LOADER_FLAGS, Config
from .errors import TrainError

__all__ = ['Source', 'Loaders', 'inspect_data', 'choose_loader', 'build_loaders']

_logger = logging.getLogger('train')

_STREAMING = ('wds/', 'tfds/', 'hfids/')


@dataclasses.dataclass
class Source:
    """What is known of the dataset before a loader is chosen.

    Attributes:
        info: the `_info.json` of timm_alps shards, else None.
        classes: class names, when the dataset knows them.
        train_chw: (C, H, W) of the training images when the split can be held in memory (map-style datasets and
            timm_alps shards), None when it streams or its images differ in size.
        mixed_sizes: why a map-style split cannot be one uint8 tensor (two sampled images of different sizes), else
            None.
        train_samples: samples the fast loader would hold (after --max-train-samples).
        timm_datasets: timm's (train, eval) datasets, when they were opened to learn the above.
        bad_shards: damaged shards (`timm_alps.data.BadShard`) whose unreadable part is left out under
            --tolerate-bad-shards; skipped_shards / skipped_samples count them (samples: of the shards that say how
            many they hold).
    """
    info: Optional[Dict[str, Any]]
    classes: Optional[List[str]]
    train_chw: Optional[Tuple[int, int, int]]
    train_samples: int
    timm_datasets: Optional[Tuple[Any, Any]] = None
    bad_shards: Tuple[Any, ...] = ()
    mixed_sizes: Optional[str] = None

    @property
    def skipped_shards(self) -> int:
        return len(self.bad_shards)

    @property
    def skipped_samples(self) -> int:
        return sum(b.lost or 0 for b in self.bad_shards)


def _open_timm_datasets(config: Config) -> Tuple[Any, Any]:
    common = dict(root=config.data_dir, download=config.dataset_download, batch_size=config.batch_size,
                  seed=config.seed)
    streaming = config.dataset.startswith(_STREAMING)
    try:
        return tuple(
            create_dataset(config.dataset, split=split, is_training=training, **common,
                           **(dict(num_samples=k) if streaming else {}))
            for split, training, k in ((config.train_split, True, config.max_train_samples),
                                       (config.val_split, False, config.max_eval_samples)))
    except (OSError, ValueError, RuntimeError, KeyError, AssertionError) as e:
        raise TrainError(f"could not open dataset '{config.dataset}' in '{config.data_dir}' (splits "
                         f"{config.train_split}/{config.val_split}): {e}") from e


def _is_map_style(ds) -> bool:
    return not isinstance(ds, torch.utils.data.IterableDataset) and hasattr(ds, '__getitem__') and \
        hasattr(ds, '__len__')


def _dataset_classes(ds) -> Optional[List[str]]:
    """Class names of a timm / torchvision dataset, when it knows them."""
    classes = getattr(ds, 'classes', None)
    if classes is None:
        classes = getattr(getattr(ds, 'reader', None), 'class_to_idx', None) or None
    if isinstance(classes, dict):
        classes = sorted(classes, key=classes.get)
    return list(classes) if classes else None


def _check_shards(config: Config) -> Tuple[Any, ...]:
    """Every shard of both splits against `_info.json`: stop naming the first damaged one, or (tolerated) return
    them."""
    bad = []
    for split in dict.fromkeys((config.train_split, config.val_split)):
        try:
            bad += alps_data.check_shards(config.data_dir, split)
        except (OSError, ValueError) as e:
            raise TrainError(f"could not read split '{split}' of '{config.data_dir}': {e}") from e
    if bad and not config.tolerate_bad_shards:
        more = f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''
        raise TrainError(f'{bad[0].problem}{more}. Re-create the shards (python -m timm_alps.data), or pass '
                         f'--tolerate-bad-shards to train on the shards that can be read.')
    return tuple(bad)


def inspect_data(config: Config) -> Source:
    """Read what the dataset is without decoding it: timm_alps shards through `_info.json` (every shard checked),
    anything else by opening timm's datasets (kept for the timm loader)."""
    info = None
    if config.dataset.startswith('wds/'):
        info = alps_data.read_info(config.data_dir)  # read once already by resolve_config: valid
    if info is not None:
        bad = _check_shards(config)
        try:
            chw = alps_data.shard_image_shape(config.data_dir, config.train_split, config.tolerate_bad_shards)
        except (OSError, ValueError) as e:
            raise TrainError(f"could not read split '{config.train_split}' of '{config.data_dir}': {e}") from e
        source = Source(info, info.get('classes'), chw, 0, None, bad)
        n = info['splits'][config.train_split]['num_samples'] - source.skipped_samples
        source.train_samples = min(n, config.max_train_samples or n)
        return source
    ds_train, ds_eval = _open_timm_datasets(config)
    chw, n, mixed = None, 0, None
    if _is_map_style(ds_train) and len(ds_train):
        chw, mixed = _sampled_image_shape(ds_train)
        n = min(len(ds_train), config.max_train_samples or len(ds_train))
    return Source(None, _dataset_classes(ds_train), chw, n, (ds_train, ds_eval), mixed_sizes=mixed)


def _sampled_image_shape(ds, samples: int = 16) -> Tuple[Optional[Tuple[int, ...]], Optional[str]]:
    """The image shape of a map-style dataset judged from `samples` evenly spaced images (decoding all of them is the
    fast loader's job), or (None, why) when two differ in size: a folder of photos is rarely one size, and only
    timm's loader resizes. PIL images give (C, H, W) with C 3 when any sampled one has colour, as `decode_dataset`
    stacks them; arrays and tensors their shape."""
    n = min(samples, len(ds))  # a dataset smaller than `samples` is read whole
    picks = sorted({round(k * (len(ds) - 1) / max(n - 1, 1)) for k in range(n)})
    channels, sizes = [], {}
    for i in picks:
        img = ds[i][0]
        if hasattr(img, 'getbands'):  # PIL: the mode (grayscale or colour) may differ, the size may not
            channels.append(len(img.getbands()))
            sizes[i] = (img.height, img.width)
        else:
            sizes[i] = tuple(img.shape)
    first = picks[0]
    for i, size in sizes.items():
        if size != sizes[first]:
            return None, f"sample {i} is {'x'.join(map(str, size))} but sample {first} is " \
                         f"{'x'.join(map(str, sizes[first]))}"
    return ((max(channels), *sizes[first]) if channels else sizes[first]), None


def choose_loader(config: Config, source: Source, input_size: Tuple[int, int, int], size_required: bool) -> str:
    """'fast' or 'timm': the one place the loader kind is decided.

    Args:
        input_size: the model's input (C, H, W) from timm's data config.
        size_required: the input size was given (--img-size/--input-size) or the model takes only that size; the
            fast loader cannot resize.
    """
    resize = size_required and source.train_chw is not None and tuple(input_size[1:]) != source.train_chw[1:]
    if config.loader == 'fast':
        if source.mixed_sizes:
            raise TrainError(f"--loader fast holds the training images as one uint8 tensor, but they differ in size "
                             f"({source.mixed_sizes}): use --loader timm (resizes as timm does)")
        if source.train_chw is None:
            raise TrainError(f"--loader fast needs a map-style dataset or timm_alps shards; '{config.dataset}' "
                             f"streams. Use --loader timm.")
        if resize:
            h, w = source.train_chw[1:]
            why = '--input-size/--img-size' if config.input_size or config.img_size else \
                f'model {config.model} takes only {input_size[1]}x{input_size[2]} images; pass --img-size'
            raise TrainError(f'{why}: the fast loader cannot resize {h}x{w} images; use --loader timm (resizes as '
                             f'timm does)')
        return 'fast'
    if config.loader == 'timm':
        return 'timm'
    timm_only = any(getattr(config, d) != unset for d, unset in TIMM_LOADER_FLAGS.items())
    fits = source.train_chw is not None and source.train_samples and \
        source.train_samples * math.prod(source.train_chw) <= config.fast_loader_max_mb * 2 ** 20
    return 'timm' if timm_only or not fits or resize else 'fast'


class _Subset(torch.utils.data.Subset):
    """A `Subset` that passes the ``transform`` timm's `create_loader` sets on to the dataset it selects from."""

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, transform):
        self.dataset.transform = transform


def _subset(ds, k: Optional[int], seed: int) -> Optional[torch.Tensor]:
    """Seeded random subset of k samples of a map-style dataset (class-balanced when its labels are known)."""
    if not k or k >= len(ds):
        return None
    return alps_data.subset_indices(len(ds), k, seed, labels=alps_data.dataset_labels(ds))


def _fast_tensors(config: Config, source: Source):
    """Both splits as uint8 tensors: shards read straight into memory, map-style datasets decoded once;
    --max-*-samples take a seeded random (class-balanced) subset."""
    splits = ((config.train_split, config.max_train_samples), (config.val_split, config.max_eval_samples))
    if source.info is not None:
        out = []
        for split, k in splits:
            try:  # only the subset's images are decoded
                x, y, _ = alps_data.load_split_tensors(config.data_dir, split, max_samples=k, seed=config.seed,
                                                       tolerate_bad_shards=config.tolerate_bad_shards)
            except (OSError, ValueError) as e:
                raise TrainError(f"could not read split '{split}' of '{config.data_dir}': {e}") from e
            out.append((x, y))
        return out
    out = []
    for ds, (_, k) in zip(source.timm_datasets, splits):
        try:
            out.append(alps_data.decode_dataset(ds, _subset(ds, k, config.seed)))
        except (TypeError, ValueError) as e:
            raise TrainError(f'the fast loader could not decode {config.dataset or "the image folder"}: {e}; use '
                             f'--loader timm') from e
    return out


@dataclasses.dataclass
class Loaders:
    """The training and evaluation loaders, and the collate-level mixer they were built with (or None)."""
    train: Any
    eval: Any
    collate_mixer: Optional[Any] = None


def build_loaders(config: Config, kind: str, source: Source, data_config: Dict[str, Any], num_classes: int,
                  device: torch.device, rank: int, world_size: int, distributed: bool, collate_mixer=None) -> Loaders:
    """The loaders of `kind`.

    fast: `InMemoryLoader` (crop/flip/normalise batched on the device; each rank evaluates a disjoint slice, so summed
    metrics are exact). timm: `create_loader` with timm's augmentation flags; `collate_mixer` (MixUp/ALPS on timm's
    prefetcher path) mixes in the collate, as in timm's train.py.
    """
    eval_bs = config.validation_batch_size or config.batch_size
    try:
        if kind == 'fast':
            (xt, yt), (xe, ye) = _fast_tensors(config, source)
            norm = dict(mean=data_config['mean'], std=data_config['std'], device=device,
                        channels_last=config.channels_last)
            pad = 4 if config.crop_pad is None else config.crop_pad
            train = alps_data.InMemoryLoader(
                xt, yt, batch_size=config.batch_size, is_training=True, padding=0 if config.no_aug else pad,
                hflip=0.0 if config.no_aug else config.hflip, drop_last=True, seed=config.seed, rank=rank,
                world_size=world_size, **norm)
            evaluate = alps_data.InMemoryLoader(xe[rank::world_size], ye[rank::world_size], batch_size=eval_bs,
                                                is_training=False, **norm)
            max_label = int(max(yt.max(), ye.max()))
            if max_label >= num_classes:
                raise TrainError(f'the dataset has labels up to {max_label} but the model has {num_classes} '
                                 f'classes; pass --num-classes {max_label + 1}')
            return _nonempty(Loaders(train, evaluate), config)
        ds_train, ds_eval = source.timm_datasets or _open_timm_datasets(config)
        subsets = []
        for ds, k in ((ds_train, config.max_train_samples), (ds_eval, config.max_eval_samples)):
            idx = _subset(ds, k, config.seed) if _is_map_style(ds) else None
            subsets.append(ds if idx is None else _Subset(ds, idx.tolist()))
        loader_kw = dict(input_size=data_config['input_size'], mean=data_config['mean'], std=data_config['std'],
                         num_workers=config.workers, distributed=distributed, device=device,
                         use_prefetcher=not config.no_prefetcher, pin_memory=device.type == 'cuda',
                         # fresh workers each epoch, seeded from the main process's RNG: a resume at an epoch
                         # boundary (which restores that RNG) replays the same augmentations
                         persistent_workers=False)
        train = create_loader(
            subsets[0], batch_size=config.batch_size, is_training=True, no_aug=config.no_aug, hflip=config.hflip,
            re_prob=config.reprob, re_mode=config.remode, re_count=config.recount, scale=config.scale,
            ratio=config.ratio, color_jitter=0.4 if config.color_jitter is None else config.color_jitter,
            auto_augment=config.aa, interpolation=config.train_interpolation or 'random', collate_fn=collate_mixer,
            **loader_kw)
        evaluate = create_loader(subsets[1], batch_size=eval_bs, is_training=False, crop_pct=data_config['crop_pct'],
                                 interpolation=data_config['interpolation'], **loader_kw)
        return _nonempty(Loaders(train, evaluate, collate_mixer), config)
    except (ValueError, TypeError, AssertionError) as e:
        raise TrainError(f'could not build the data loaders: {e}') from e


def _nonempty(loaders: Loaders, config: Config) -> Loaders:
    if len(loaders.train) == 0:
        raise TrainError(f'the training set is smaller than one batch ({config.batch_size} per process); lower '
                         f'--batch-size')
    return loaders


def check_classes(config: Config, source: Source) -> Optional[int]:
    """--num-classes, else the dataset's class count (None: the model's own)."""
    n = len(source.classes) if source.classes else None
    if config.num_classes is not None and n and config.num_classes < n:
        raise TrainError(f'--num-classes {config.num_classes} but the dataset has {n} classes; pass '
                         f'--num-classes {n} or leave it out')
    return config.num_classes if config.num_classes is not None else n


def set_loader_epoch(loader, epoch: int, distributed: bool) -> None:
    """Tell the loader (or its dataset / sampler, as timm's train.py does) the epoch."""
    dataset = getattr(loader, 'dataset', None)
    if hasattr(loader, 'set_epoch'):
        loader.set_epoch(epoch)
    elif hasattr(dataset, 'set_epoch'):
        dataset.set_epoch(epoch)
    elif distributed and hasattr(getattr(loader, 'sampler', None), 'set_epoch'):
        loader.sampler.set_epoch(epoch)
