""" `InMemoryLoader`: a small dataset kept as uint8 on the device, batches made there (airbench-style)
"""
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..models import CIFAR10_MEAN, CIFAR10_STD
from .tensors import decode_dataset, load_split_tensors

__all__ = ['PADDING_MODES', 'InMemoryLoader']

PADDING_MODES = ('constant', 'edge', 'reflect', 'symmetric')


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
    def from_path(cls, src: Union[str, os.PathLike], split: str = 'train', max_samples: Optional[int] = None,
                  **kwargs: Any) -> 'InMemoryLoader':
        """Loader over one split of a shard folder (e.g. BUNDLED_DATA_DIR) or an npz.

        Args:
            src: Shard folder with `_info.json`, or an npz (see `load_split_tensors`).
            split: Split name; `is_training` defaults to `split == 'train'` (use False for evaluation splits).
            max_samples: Keep a class-balanced random subset of this many samples, drawn with `kwargs['seed']`.
            **kwargs: Passed to `InMemoryLoader(...)`.
        """
        kwargs.setdefault('is_training', split == 'train')
        images, targets, classes = load_split_tensors(src, split, max_samples=max_samples, seed=kwargs.get('seed', 0))
        return cls(images, targets, classes=kwargs.pop('classes', classes), **kwargs)

    @classmethod
    def from_dataset(cls, dataset: Any, indices: Optional[Sequence[int]] = None, **kwargs: Any) -> 'InMemoryLoader':
        """Loader over any dataset of raw (image, class index) samples, decoded once by `decode_dataset`.

        Args:
            dataset: E.g. a timm or torchvision dataset built without transforms.
            indices: Samples to keep (e.g. from `subset_indices`); default all.
            **kwargs: Passed to `InMemoryLoader(...)`; `classes` defaults to `dataset.classes`.
        """
        images, targets = decode_dataset(dataset, indices)
        kwargs.setdefault('classes', getattr(dataset, 'classes', None))
        return cls(images, targets, **kwargs)

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

