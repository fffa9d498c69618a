"""FastCollateALPSMixup: ALPS mixing inside the collate function, for timm's prefetcher loader.

timm's default training path (`create_loader(..., use_prefetcher=True)`) mixes uint8 images while collating, with
`FastCollateMixup`. `FastCollateALPSMixup` is its ALPS counterpart: each uint8 image is mixed with a random
partner (lam ~ Beta(alps_alpha, alps_beta)) and keeps its own (smoothed) label; the loss from `make_loss()` applies
the adversarial label from the training forward (the fused path: no model runs inside a loader worker).

Mixing is vectorised over the batch (one stack, one float blend, one rounding) where timm loops per sample; the
arithmetic is timm's (float32 ``x * lam + x' * (1 - lam)``, rounded half to even as ``np.rint``), so for the same
lam and partner the pixels are identical to `FastCollateMixup`'s.

Random streams: every process that collates (the main process with num_workers=0, or each DataLoader worker)
draws from its own private generator, seeded from (seed, DDP rank, worker id, torch's per-worker seed, epoch given
to `set_epoch`); see `ALPSMixup._rng`. What is exact:
- num_workers=0: the draws are a function of the seed (and rank) alone; `state_dict()`/`load_state_dict()` resume
  them exactly.
- num_workers>0: workers draw independent streams. torch gives each worker a seed drawn from the global RNG when the
  workers start, so the draws are reproducible given the seed and `torch.manual_seed` (timm's train.py seeds it with
  ``--seed`` + rank), but a resumed run does not repeat bit for bit what the uninterrupted run would have drawn.
  Calling ``collate_fn.set_epoch(epoch)`` each epoch before iterating makes the streams of a resumed run differ from
  those of epochs already trained; without it (timm's train.py as is), a resumed run can replay the draws of its
  first epoch, exactly as timm's own `FastCollateMixup` and augmentations do.
"""
from typing import Any, Sequence, Tuple

import numpy as np
import torch
from timm.data import FastCollateMixup
from torch.utils.data import default_collate

from .labels import validate_target
from .loss import as_class_target
from .mixup import _ALPSMixingBase

__all__ = ['FastCollateALPSMixup']


class FastCollateALPSMixup(_ALPSMixingBase, FastCollateMixup):
    """ALPS mixing while collating uint8 images: ``collate(batch) -> (uint8 (B, C, H, W), float32 (B, K))``.

    Use as the ``collate_fn`` of timm's ``create_loader(..., use_prefetcher=True)`` (it is a `FastCollateMixup`,
    so the prefetcher's ``loader.mixup_enabled`` switch reaches it) or of a plain `torch.utils.data.DataLoader`.
    Any batch size works, odd ones included. Targets are each sample's own (smoothed) label; build the loss with
    `make_loss()` (``'ce'`` or ``'bce'``), which applies the adversarial label once.

    Args:
        alps_alpha: alpha of the Beta(alpha, beta) distribution of lam, the weight of the sample itself.
        alps_beta: beta of that distribution (paper: Beta(8, 2)).
        alps_eps: L1 radius of the adversarial label ball in [0, 2], used by `make_loss()`.
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
            seed: int = None,
            rank: int = None,
    ):
        _ALPSMixingBase.__init__(self, alps_alpha, alps_beta, alps_eps, prob, mode, label_smoothing, num_classes,
                                 seed, rank)
        # timm's own attributes, so code that inspects a FastCollateMixup sees "no MixUp/CutMix" (ALPS replaces it)
        FastCollateMixup.__init__(self, mixup_alpha=0.0, cutmix_alpha=0.0, prob=self.prob, switch_prob=0.0,
                                  mode=self.mode, correct_lam=False, label_smoothing=self.label_smoothing,
                                  num_classes=self.num_classes)

    @staticmethod
    def _stack(images: Sequence[Any]) -> torch.Tensor:
        first = images[0]
        if isinstance(first, np.ndarray):
            if any(not isinstance(im, np.ndarray) or im.shape != first.shape for im in images):
                raise ValueError('all images of a batch must be numpy arrays of one shape, got '
                                 f'{sorted({getattr(im, "shape", type(im).__name__) for im in images}, key=str)}')
            stacked = torch.from_numpy(np.stack(images))
        elif isinstance(first, torch.Tensor):
            if any(not isinstance(im, torch.Tensor) or im.shape != first.shape for im in images):
                raise ValueError('all images of a batch must be tensors of one shape, got '
                                 f'{sorted({tuple(getattr(im, "shape", ())) for im in images})}')
            stacked = torch.stack(list(images))
        else:
            raise TypeError(f'images must be uint8 CHW numpy arrays or tensors (timm\'s prefetcher transforms), got '
                            f'{type(first).__name__}')
        if stacked.dtype != torch.uint8 or stacked.ndim != 4:
            raise TypeError(f'images must be uint8 (C, H, W), got {stacked.dtype} of shape {tuple(stacked.shape[1:])}: '
                            f'build the dataset transform with use_prefetcher=True (no ToTensor/Normalize)')
        return stacked

    def mix(self, images: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
        """Blend uint8 images (B, C, H, W) with their partners: rint(lam * x + (1 - lam) * x[partner]) as uint8.

        float32 arithmetic in timm's order, so each pixel equals `FastCollateMixup`'s for the same lam and partner.
        """
        lam = lam.view(-1, 1, 1, 1)
        mixed = images.float().mul_(lam)
        mixed += images[partner].float().mul_(1.0 - lam)
        # torch.round rounds half to even as np.rint; a convex blend of [0, 255] stays in range, clamp guards it
        return mixed.round_().clamp_(0, 255).to(torch.uint8)

    def __call__(self, batch: Sequence[Tuple[Any, Any]], _=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Collate a list of (uint8 CHW image, class index) pairs into (uint8 (B, C, H, W), float32 (B, K))."""
        if len(batch) == 0:
            raise ValueError('cannot collate an empty batch')
        if not isinstance(batch[0], (tuple, list)) or len(batch[0]) != 2:
            raise TypeError('batch must be a list of (image, target) pairs')
        images = self._stack([b[0] for b in batch])
        target = as_class_target(default_collate([b[1] for b in batch]))
        validate_target(target, self.num_classes, images.shape[0])
        if self.mixup_enabled:
            lam, partner = self.sample(images.shape[0])
            images = self.mix(images, lam, partner)
        return images, self.base_target(target)

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self._alps_repr()})'
