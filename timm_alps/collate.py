"""FastCollateALPSMixup: ALPS mixing inside the collate function, for timm's prefetcher loader.

timm's default training path (`create_loader(..., use_prefetcher=True)`) mixes uint8 images while collating, with
`FastCollateMixup`. `FastCollateALPSMixup` is its ALPS counterpart: each uint8 image is mixed with a random
partner (lam ~ Beta(alps_alpha, alps_beta)) and keeps its own (smoothed) label; the loss from `make_loss()` applies
the adversarial label from the training forward (the fused path: no model runs inside a loader worker).

Mixing is vectorised over cache-sized chunks of the batch where timm loops per sample (see `mix`); the arithmetic
is timm's (float32 ``x * lam + x' * (1 - lam)``, rounded half to even as ``np.rint``), so for the same lam and
partner the pixels are identical to `FastCollateMixup`'s. Cost against timm's: benchmarks/results/collate_cost.md.

Random streams: every process that collates (the main process with num_workers=0, or each DataLoader worker)
draws from its own private generator, seeded from (seed, DDP rank, worker id, torch's per-worker seed, epoch given
to `set_epoch`). What is exact:
- num_workers=0: the draws are a function of the seed (and rank) alone; `state_dict()`/`load_state_dict()` resume
  them exactly.
- num_workers>0: workers draw independent streams. torch gives each worker a seed drawn from the global RNG when the
  workers start, so the draws are reproducible given the seed and `torch.manual_seed` (timm's train.py seeds it with
  ``--seed`` + rank), but a resumed run does not repeat bit for bit what the uninterrupted run would have drawn.
  Calling ``collate_fn.set_epoch(epoch)`` each epoch before iterating makes the streams of a resumed run differ from
  those of epochs already trained; without it (timm's train.py as is), a resumed run can replay the draws of its
  first epoch, exactly as timm's own `FastCollateMixup` and augmentations do.
"""
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from timm.data import FastCollateMixup
from torch.utils.data import default_collate

from .labels import validate_target
from .mixup import _ALPSMixingBase

__all__ = ['FastCollateALPSMixup']

_CHUNK_BYTES = 1 << 18  # float32 working set per blended chunk (256 KiB), sized to stay in a core's L2 cache


class FastCollateALPSMixup(_ALPSMixingBase, FastCollateMixup):
    """ALPS mixing while collating uint8 images: ``collate(batch) -> (uint8 (B, C, H, W), float32 (B, K))``.

    Use as the ``collate_fn`` of timm's ``create_loader(..., use_prefetcher=True)`` (it is a `FastCollateMixup`,
    so the prefetcher's ``loader.mixup_enabled`` switch reaches it) or of a plain `torch.utils.data.DataLoader`.
    Any batch size works, odd ones included. Targets are each sample's own (smoothed) label; build the loss with
    `make_loss()` (``'ce'`` or ``'bce'``), which applies the adversarial label once.

    Args:
        alps_alpha: alpha of the Beta(alpha, beta) distribution of lam, the weight of the sample itself.
        alps_beta: beta of that distribution (paper: Beta(8, 2)).
        alps_eps: L1 radius of the adversarial label ball in [0, 2], used by `make_loss()`; setting it later (in
            the main process) reaches the losses made, see `ALPSMixup.alps_eps`.
        prob: probability that a sample ('elem'), pair ('pair') or the batch ('batch') is mixed at all.
        mode: 'elem', 'pair' or 'batch', as in `ALPSMixup`.
        label_smoothing: smoothing of the returned labels (timm's Mixup defaults to 0.1, this class to 0).
        num_classes: number of classes K.
        seed: seed of the private generators, an integer in [0, 2**64), or None to draw one from torch's RNG.
        rank: DDP rank mixed into the streams; default: torch.distributed's rank when initialised, else 0.
    """

    def __init__(
            self,
            alps_alpha: float = 8.0,
            alps_beta: float = 2.0,
            alps_eps: float = 0.3,
            prob: float = 1.0,
            mode: str = 'elem',
            label_smoothing: float = 0.0,
            num_classes: int = 1000,
            seed: Optional[int] = None,
            rank: Optional[int] = None,
    ):
        _ALPSMixingBase.__init__(self, alps_alpha, alps_beta, alps_eps, prob, mode, label_smoothing, num_classes,
                                 seed, rank)
        # timm's own attributes, so code that inspects a FastCollateMixup sees "no MixUp/CutMix" (ALPS replaces it)
        FastCollateMixup.__init__(self, mixup_alpha=0.0, cutmix_alpha=0.0, prob=self.prob, switch_prob=0.0,
                                  mode=self.mode, correct_lam=False, label_smoothing=self.label_smoothing,
                                  num_classes=self.num_classes)

    @staticmethod
    def _as_arrays(images: Sequence[Any]) -> List[np.ndarray]:
        """The batch's images as uint8 (C, H, W) numpy arrays of one shape (tensors as zero-copy views)."""
        first = images[0]
        if isinstance(first, np.ndarray):
            kind = np.ndarray
        elif isinstance(first, torch.Tensor):
            kind = torch.Tensor
        else:
            raise TypeError(f'images must be uint8 CHW numpy arrays or tensors (timm\'s prefetcher transforms), got '
                            f'{type(first).__name__}')
        if any(not isinstance(im, kind) or im.shape != first.shape for im in images):
            shapes = sorted({str(tuple(getattr(im, 'shape', ()))) + type(im).__name__ for im in images})
            raise ValueError(f'all images of a batch must be {kind.__name__}s of one shape, got {shapes}')
        if kind is torch.Tensor:
            if first.device.type != 'cpu':
                raise ValueError(f'images must be on the CPU (collate runs in the loader), got {first.device}')
            images = [im.numpy() for im in images]
        dtype = images[0].dtype
        if dtype != np.uint8 or images[0].ndim != 3 or any(im.dtype != dtype for im in images):
            raise TypeError(f'images must be uint8 (C, H, W), got {dtype} of shape {tuple(images[0].shape)}: build '
                            f'the dataset transform with use_prefetcher=True (no ToTensor/Normalize)')
        return list(images)

    def mix(self, images: Sequence[np.ndarray], lam: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
        """Blend uint8 images (C, H, W) with their partners: rint(lam * x + (1 - lam) * x[partner]) as uint8.

        float32 arithmetic in timm's order (``x * lam + x' * (1 - lam)``, ``np.rint``, clipped to [0, 255]), so each
        pixel equals `FastCollateMixup`'s for the same lam and partner. Vectorised over chunks of about
        `_CHUNK_BYTES` of float32 pixels, whose temporaries stay in cache (a whole 224x224 batch in float32 would
        stream through memory several times), and done in numpy: on one thread (as in DataLoader workers) numpy's
        uint8 gather and float-to-uint8 cast are several times faster than torch's.

        Returns:
            uint8 tensor (B, C, H, W).
        """
        out = np.empty((len(images), *images[0].shape), dtype=np.uint8)
        lam = lam.numpy().astype(np.float32).reshape(-1, 1, 1, 1)
        partner = partner.tolist()
        step = max(1, _CHUNK_BYTES // (4 * images[0].size))
        for start in range(0, len(images), step):
            stop = min(start + step, len(images))
            mixed = np.stack(images[start:stop], dtype=np.float32)
            mixed *= lam[start:stop]
            other = np.stack([images[j] for j in partner[start:stop]], dtype=np.float32)
            other *= 1 - lam[start:stop]
            mixed += other
            np.rint(mixed, out=mixed)
            np.clip(mixed, 0, 255, out=mixed)  # a convex blend stays in range; the clip guards the cast
            out[start:stop] = mixed
        return torch.from_numpy(out)

    def __call__(self, batch: Sequence[Tuple[Any, Any]], _=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Collate a list of (uint8 CHW image, class index) pairs into (uint8 (B, C, H, W), float32 (B, K))."""
        if len(batch) == 0:
            raise ValueError('cannot collate an empty batch')
        if not isinstance(batch[0], (tuple, list)) or len(batch[0]) != 2:
            raise TypeError('batch must be a list of (image, target) pairs')
        images = self._as_arrays([b[0] for b in batch])
        target = validate_target(default_collate([b[1] for b in batch]), self.num_classes, len(images))
        if self.mixup_enabled:
            lam, partner = self.sample(len(images))
            return self.mix(images, lam, partner), self.base_target(target)
        return torch.from_numpy(np.stack(images)), self.base_target(target)

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self._alps_repr()})'
