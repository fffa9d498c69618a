"""Checkpoints of a run: what each save holds besides timm's (`CheckpointState`), and continuing from one
(`resume_training`). Files are written atomically by `timm_alps.checkpoint.AtomicCheckpointSaver`."""
import logging
from typing import Any, Dict, Optional, Tuple

import torch
from timm.scheduler import PlateauLRScheduler

from ..checkpoint import (CheckpointError, capture_rank_state, find_resume_checkpoint, load_training_checkpoint,
                          restore_rank_state)
from .config import Config
from .env import Env
from .errors import TrainError
from .loop import TrainState

__all__ = ['Resumed', 'resume_training', 'CheckpointState', 'CollectiveOnlySaver']

_logger = logging.getLogger('train')


class Resumed:
    """Where a resumed run continues: the checkpoint's path and contents, the epoch and the batches of it done."""

    def __init__(self, path: str = '', checkpoint: Optional[Dict[str, Any]] = None, start_epoch: int = 0,
                 skip_batches: int = 0):
        self.path, self.checkpoint, self.start_epoch, self.skip_batches = path, checkpoint, start_epoch, skip_batches


def resume_training(config: Config, env: Env, output_dir: str, task, optimizer, loss_scaler, lr_scheduler, mixer,
                    loader_train, state: TrainState) -> Resumed:
    """Load a checkpoint into the plain (not yet DDP/compiled) modules and restore every random stream."""
    try:
        if config.resume == 'auto':
            path, skipped = find_resume_checkpoint(output_dir)
            for p, why in skipped:
                _logger.warning(f'--resume auto: skipping {p}: {why}')
        else:
            path = config.resume
        checkpoint = load_training_checkpoint(path)
    except CheckpointError as e:
        raise TrainError(str(e)) from None
    if checkpoint.get('arch') not in (None, config.model):
        raise TrainError(f"--resume: '{path}' holds a {checkpoint['arch']} but --model is {config.model}")
    try:
        task.load_checkpoint_state(checkpoint['state_dict'], checkpoint.get('task_state'))
        if config.model_ema and checkpoint.get('state_dict_ema') is not None:
            task.load_checkpoint_state(checkpoint['state_dict_ema'], checkpoint.get('task_state_ema'), ema=True)
        optimizer.load_state_dict(checkpoint['optimizer'])
    except (RuntimeError, ValueError, KeyError) as e:
        raise TrainError(f"--resume: '{path}' does not match this model/optimizer "
                         f"(different --model, --model-kwargs, --num-classes or --opt?): {e}") from e
    if loss_scaler is not None and loss_scaler.state_dict_key in checkpoint:
        loss_scaler.load_state_dict(checkpoint[loss_scaler.state_dict_key])
    if checkpoint.get('scheduler') is not None and isinstance(lr_scheduler, PlateauLRScheduler):
        # Only the plateau schedule has history; the others are functions of epoch/step, re-derived from the current
        # flags (so a resume may extend --epochs).
        lr_scheduler.load_state_dict(checkpoint['scheduler'])
    state.step = int(checkpoint.get('step', 0))
    start_epoch, skip_batches = int(checkpoint['epoch']) + 1, 0
    if checkpoint.get('batch_idx') is not None:
        start_epoch, skip_batches = int(checkpoint['epoch']), int(checkpoint['batch_idx']) + 1
    per_rank = checkpoint.get('rank_state') or []
    if env.rank < len(per_rank):
        try:
            state.resume_loss = restore_rank_state(per_rank[env.rank], mixer=mixer, loader=loader_train)
        except (ValueError, TypeError, KeyError) as e:
            raise TrainError(f"--resume: '{path}' holds random streams this run cannot continue (different "
                             f"--method or ALPS flags?): {e}") from e
    else:
        _logger.warning(f'--resume: no saved RNG state for rank {env.rank} (world size changed?); continuing with '
                        f'fresh random streams.')
    if env.rank0:
        where = f'epoch {start_epoch}' + (f', batch {skip_batches}' if skip_batches else '')
        _logger.info(f"Resumed from '{path}' at {where} (step {state.step}).")
    return Resumed(path, checkpoint, start_epoch, skip_batches)


class CheckpointState:
    """What each save adds to timm's checkpoint: the schedule, the position in the run and every rank's random
    streams (gathered from all ranks, so a resumed DDP run continues each rank exactly). Mid-epoch: the loader as it
    was when the epoch began (a resume replays the epoch and skips the batches done)."""

    def __init__(self, env: Env, state: TrainState, lr_scheduler, mixer, loader_train):
        self.env, self.state, self.lr_scheduler, self.mixer, self.loader_train = \
            env, state, lr_scheduler, mixer, loader_train

    def __call__(self) -> Dict[str, Any]:
        state = self.state
        mid_epoch = state.batch_idx is not None
        mine = capture_rank_state(
            self.mixer, self.loader_train, loader_state=state.loader_epoch_state if mid_epoch else None,
            epoch_loss=(state.monitor.loss_sum.item(), state.monitor.sample_count.item())
            if mid_epoch and state.monitor is not None else None)
        gathered = [mine]
        if self.env.distributed:
            gathered = [None] * self.env.world_size
            torch.distributed.all_gather_object(gathered, mine)
        return dict(scheduler=self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
                    step=state.step, batch_idx=state.batch_idx, rank_state=gathered)


class CollectiveOnlySaver:
    """Stand-in saver on ranks > 0: joins the collective of each save (gathering RNG states), writes nothing."""

    def __init__(self, extra_state_fn):
        self.extra_state_fn = extra_state_fn

    def save_checkpoint(self, epoch, metric=None) -> Tuple[None, None]:
        self.extra_state_fn()
        return None, None

    def save_recovery(self, epoch, batch_idx=0) -> None:
        self.extra_state_fn()
