"""What turns a batch into training targets: the mixer (in the training step or in timm's collate), the criterion
it calls for, the criterion of the epochs after --alps-off-epoch / --mixup-off-epoch, and the eps ramp."""
import dataclasses
from typing import Any, Dict, Optional

import torch.nn as nn
from timm.data import FastCollateMixup, Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from .. import ALPSMixup, EpsWarmup, FastCollateALPSMixup
from ..task import ALPSTask
from .config import Config

__all__ = ['Regularisation', 'create_regularisation', 'mixes_in_collate']


def mixes_in_collate(config: Config, loader_kind: str) -> bool:
    """Mixing runs in timm's collate (as in timm's train.py) on the prefetcher path, except ALPS's model-handle
    label, which needs the model in the training step."""
    return loader_kind == 'timm' and not config.no_prefetcher and (
        config.method == 'mixup' or (config.method == 'alps' and config.alps_label == 'fused'))


def _mixup_args(config: Config, num_classes: int) -> Dict[str, Any]:
    return dict(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, cutmix_minmax=config.cutmix_minmax,
                prob=config.mixup_prob, switch_prob=config.mixup_switch_prob, mode=config.mixup_mode,
                label_smoothing=config.smoothing, num_classes=num_classes)


def _alps_args(config: Config, num_classes: int) -> Dict[str, Any]:
    alpha, beta = config.alps_beta
    return dict(alps_alpha=alpha, alps_beta=beta, alps_eps=config.alps_eps, prob=config.alps_prob,
                mode=config.alps_mode, label_smoothing=config.smoothing, num_classes=num_classes)


@dataclasses.dataclass
class Regularisation:
    """The mixer in the training step (or None), the mixer in the collate (or None), the criterion the mixer asks
    for, and the plain criterion of the epochs after the off epoch. `set_epoch` is the one place that switches
    mixing off; `eps_warmup` (an `EpsWarmup`, or None) the one that sets the ALPS radius of
    --alps-eps-warmup-epochs, from the optimizer updates done before each batch."""
    method: str
    mixup_fn: Optional[Any]
    collate_mixer: Optional[Any]
    criterion: nn.Module
    plain_criterion: nn.Module
    off_epoch: int = 0
    eps_warmup: Optional[EpsWarmup] = None

    @property
    def stateful_mixer(self):
        """The mixer whose radius and generator the main process owns."""
        return self.mixup_fn if self.mixup_fn is not None else self.collate_mixer

    def active(self, epoch: int) -> bool:
        return not (self.off_epoch and epoch >= self.off_epoch)

    def set_step(self, num_updates: int) -> None:
        """The radius of the next update (`num_updates` done, so a resumed run recomputes it exactly)."""
        if self.eps_warmup is not None:
            self.eps_warmup.step(num_updates)

    def set_epoch(self, epoch: int, task: ALPSTask) -> None:
        on = self.active(epoch)
        for mixer in (self.mixup_fn, self.collate_mixer):
            if mixer is not None:
                mixer.mixup_enabled = on
                if hasattr(mixer, 'set_epoch'):
                    mixer.set_epoch(epoch)
        if self.method == 'alps':  # no label shift either: the mixer's model handle and the fused loss go
            if isinstance(self.mixup_fn, ALPSMixup) and not on:
                self.mixup_fn.set_model(None)
            task.criterion = self.criterion if on else self.plain_criterion


def create_collate_mixer(config: Config, num_classes: int, rank: int):
    """The collate-level mixer of timm's prefetcher path (see `mixes_in_collate`)."""
    if config.method == 'mixup':
        return FastCollateMixup(**_mixup_args(config, num_classes))
    # Each worker and rank derives its own stream from the seed (and the epoch, see Regularisation.set_epoch).
    return FastCollateALPSMixup(**_alps_args(config, num_classes), seed=config.seed, rank=rank)


def create_regularisation(config: Config, num_classes: int, model: nn.Module, rank: int = 0, collate_mixer=None,
                          updates_per_epoch: int = 1) -> Regularisation:
    """The mixer for --method and the criterion it calls for (the mixer owns the ALPS label path), with the eps
    ramp of --alps-eps-warmup-epochs over `updates_per_epoch` updates per epoch."""
    bce = dict(target_threshold=config.bce_target_thresh, pos_weight=config.bce_pos_weight)
    if config.method == 'alps':
        mixer, mixup_fn = collate_mixer, None
        if mixer is None:
            mixup_fn = mixer = ALPSMixup(**_alps_args(config, num_classes), seed=config.seed + rank,
                                         model=model if config.alps_label == 'model' else None)
        criterion = mixer.make_loss('bce', **bce) if config.bce_loss else mixer.make_loss()
        plain = BinaryCrossEntropy(**bce) if config.bce_loss else SoftTargetCrossEntropy()
        warmup_updates = round(config.alps_eps_warmup_epochs * updates_per_epoch)
        eps_warmup = EpsWarmup(mixer, warmup_updates) if warmup_updates else None
        return Regularisation('alps', mixup_fn, collate_mixer, criterion, plain, config.alps_off_epoch, eps_warmup)
    if config.method == 'mixup':
        mixup_fn = None if collate_mixer is not None else Mixup(**_mixup_args(config, num_classes))
        criterion = BinaryCrossEntropy(**bce) if config.bce_loss else SoftTargetCrossEntropy()
        return Regularisation('mixup', mixup_fn, collate_mixer, criterion, criterion, config.mixup_off_epoch)
    if config.bce_loss:
        criterion = BinaryCrossEntropy(smoothing=config.smoothing, **bce)
    elif config.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=config.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    return Regularisation(config.method, None, None, criterion, criterion)
