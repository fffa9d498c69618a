""" Small-image datasets for timm: a webdataset shard converter, the bundled CIFAR-10 subset, one decoder, a loader

* `convert` / `python -m timm_alps.data SRC OUT_DIR` (console script `timm-alps-convert`) turns an `.npz` of uint8
  arrays, torchvision's CIFAR-10 / CIFAR-100 / SVHN files or an image folder into webdataset tar shards with timm's
  `_info.json`, read by `timm.data.create_dataset('wds/<name>', root=OUT_DIR, split='train')`. Each sample is a
  PNG image (lossless) plus its class index (`.cls`); samples are shuffled across shards (seeded) by default.
* `BUNDLED_DATA_DIR`: a class-balanced CIFAR-10 subset (4,000 train / 1,000 test) shipped with the package.
* `check_shards` walks a split's shards against `_info.json` (missing, truncated, corrupt: `ShardError`);
  `read_info` reads a shard folder's `_info.json`; `default_eval_split` picks the evaluation split of a dataset.
* `decode_dataset` turns any dataset of raw (image, label) samples into uint8 N x C x H x W + int64 tensors;
  `load_split_tensors` does it for a shard folder or an npz split; `subset_indices` draws the seeded,
  class-balanced subsets behind `max_samples` (labels without decoding: `split_labels`, `dataset_labels`).
* `InMemoryLoader`: keeps a small dataset as uint8 on the device and makes each batch with one gather (shuffle,
  random crop with padding, horizontal flip) plus one fused uint8 -> float normalise, like airbench's loader.
"""
from pathlib import Path

from .loader import PADDING_MODES, InMemoryLoader
from .shards import convert, main
from .sources import FORMATS
from .tensors import (EVAL_SPLITS, INFO_FILE, BadShard, ShardError, check_shards, dataset_labels, decode_dataset,
                      default_eval_split, load_split_tensors, read_info, shard_image_shape, split_labels,
                      subset_indices)

__all__ = [
    'BUNDLED_DATA_DIR', 'BadShard', 'EVAL_SPLITS', 'FORMATS', 'INFO_FILE', 'PADDING_MODES', 'InMemoryLoader',
    'ShardError', 'check_shards', 'convert',
    'dataset_labels', 'decode_dataset', 'default_eval_split', 'load_split_tensors', 'main', 'read_info',
    'shard_image_shape', 'split_labels', 'subset_indices',
]

BUNDLED_DATA_DIR = Path(__file__).resolve().parent.parent / 'datasets' / 'cifar10_subset'
