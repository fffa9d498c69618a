"""The loop: one training epoch (`train_one_epoch`) and one evaluation (`validate`), with the run's position
(`TrainState`), the running loss (`LossMonitor`) and the signal flag they read."""
import dataclasses
import logging
import math
import signal
import time
from contextlib import nullcontext
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm import utils

from .config import Config
from .env import Env
from .errors import Interrupted, NonFiniteError
from .mixing import Regularisation

__all__ = ['LossMonitor', 'TrainState', 'SignalFlag', 'train_one_epoch', 'validate', 'check_finite']

_logger = logging.getLogger('train')


class LossMonitor:
    """Running training loss and count of non-finite losses, accumulated on the loss's device.

    `update` only queues device ops (no host sync per step); `check` and `summary` read back, so call
    them at log intervals / epoch end. Non-finite losses are left out of the mean.
    """

    def __init__(self, device: Union[str, torch.device] = 'cpu'):
        self.device = torch.device(device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.sample_count = torch.zeros((), dtype=torch.float64, device=self.device)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)
        self.first_nonfinite_step = torch.full((), -1, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def update(self, loss: torch.Tensor, n: int, step: int) -> None:
        """Record the loss of `n` samples at global `step`."""
        loss = loss.detach().double()
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss * n, 0.0)
        self.sample_count += finite.double() * n
        self.nonfinite += (~finite).long()
        first = (~finite) & (self.first_nonfinite_step < 0)
        self.first_nonfinite_step = torch.where(first, step, self.first_nonfinite_step)

    def check(self, signal: int = 0, distributed: bool = False) -> Tuple[int, int, int]:
        """One read-back (and one small all-reduce under DDP): (largest signal number seen by any rank, non-finite
        losses so far, first global step with a non-finite loss or -1)."""
        none = 2 ** 62
        first = torch.where(self.first_nonfinite_step < 0, none, self.first_nonfinite_step)
        flags = torch.stack([torch.full_like(self.nonfinite, signal), self.nonfinite, -first])
        if distributed:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        sig, count, neg_first = flags.tolist()
        return int(sig), int(count), (-1 if -neg_first == none else int(-neg_first))

    def summary(self, distributed: bool = False) -> float:
        """Mean finite loss per sample (over all ranks if distributed); NaN when there was none."""
        totals = torch.stack([self.loss_sum, self.sample_count])
        if distributed:
            torch.distributed.all_reduce(totals)
        loss_sum, count = totals.tolist()
        return loss_sum / count if count else float('nan')


@dataclasses.dataclass
class TrainState:
    """Where the run is: read by the checkpoint callback, advanced by the training loop, set by a resume."""
    rank0: bool = True
    loader_epoch_state: Any = None  # the loader's state when the current epoch began
    step: int = 0  # optimizer updates done
    batch_idx: Optional[int] = None  # last trained batch of the current epoch; None at epoch boundaries
    skipped: int = 0  # updates skipped for a non-finite loss
    monitor: Optional[LossMonitor] = None
    resume_loss: Optional[Tuple[float, float]] = None  # (loss sum, samples) of a resumed, half-done epoch


class SignalFlag:
    """First SIGINT/SIGTERM asks for a checkpoint and a clean exit at the next step; a second one kills."""

    def __init__(self):
        self.signum = 0
        self._old = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


# -- training -------------------------------------------------------------------------------------------------------
def train_one_epoch(epoch, task, loader, optimizer, config: Config, env: Env, state: TrainState, num_epochs: int,
                    lr_scheduler=None, saver=None, amp_autocast=nullcontext, loss_scaler=None, stop=None,
                    skip_batches=0, regularisation: Optional[Regularisation] = None):
    """One pass over the loader with --grad-accum-steps batches per update; returns dict(loss, img_per_sec).

    `regularisation.set_step` is told the updates done before every batch (the --alps-eps-warmup-epochs ramp).
    """
    task.train()
    monitor = state.monitor = LossMonitor(env.device)
    if skip_batches and state.resume_loss is not None:  # the epoch's loss so far, before the interruption
        monitor.loss_sum.fill_(state.resume_loss[0])
        monitor.sample_count.fill_(state.resume_loss[1])
    n_batches, accum = len(loader), config.grad_accum_steps
    last_group_start = (n_batches - 1) // accum * accum  # the last update may accumulate fewer batches
    check_every = 1 if env.device.type == 'cpu' else config.log_interval
    bar = None
    if env.progress and state.rank0:
        from tqdm import tqdm
        bar = tqdm(total=n_batches, initial=skip_batches, desc=f'Epoch {epoch + 1}/{num_epochs}', leave=False,
                   dynamic_ncols=True, unit='batch')
    ddp = task.trainable_module if isinstance(task.trainable_module, nn.parallel.DistributedDataParallel) else None
    samples, group_finite, t0 = 0, None, time.perf_counter()
    for batch_idx, (input, target) in enumerate(loader):
        if batch_idx < skip_batches:  # mid-epoch resume: same batches as before the interruption, not trained
            continue
        last = batch_idx == n_batches - 1
        need_update = last or (batch_idx + 1) % accum == 0
        group_size = (n_batches - last_group_start) if batch_idx >= last_group_start else accum
        if config.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        if regularisation is not None:
            regularisation.set_step(state.step)
        with (ddp.no_sync() if ddp is not None and not need_update else nullcontext()):
            with amp_autocast():
                loss = task(input, target)['loss']
            if config.on_nonfinite == 'skip':
                finite = torch.isfinite(loss.detach())
                group_finite = finite if group_finite is None else group_finite & finite
            scaled = loss / group_size if group_size > 1 else loss
            params = None
            if need_update and config.clip_grad is not None:
                params = task.get_clip_parameters(exclude_head='agc' in config.clip_mode)
            if loss_scaler is not None:
                loss_scaler(scaled, optimizer, clip_grad=config.clip_grad, clip_mode=config.clip_mode,
                            parameters=params,
                            need_update=need_update)
            else:
                scaled.backward()
        monitor.update(loss, input.shape[0], state.step)
        samples += input.shape[0]
        if bar is not None:
            bar.update(1)
        if not need_update:
            continue
        if group_finite is not None:
            ok = group_finite.to(torch.int32)
            if env.distributed:  # every rank must take the same decision, or the next all-reduce hangs
                torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
            group_finite = None
            if not bool(ok):
                _logger.warning(f'Skipping update at epoch {epoch} step {state.step}: non-finite loss')
                optimizer.zero_grad(set_to_none=True)
                state.skipped += 1
                continue
        if loss_scaler is None:
            if config.clip_grad is not None:
                utils.dispatch_clip_grad(params, value=config.clip_grad, mode=config.clip_mode)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.batch_idx = batch_idx
        task.update_ema(step=state.step)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=state.step)

        update_idx = batch_idx // accum
        if (update_idx + 1) % check_every == 0 or last:
            # One small read-back (and all-reduce under DDP) per check, never per step on accelerators.
            signum, count, first = monitor.check(stop.signum if stop else 0, env.distributed)
            if count and config.on_nonfinite == 'stop':
                raise NonFiniteError(f'non-finite loss at epoch {epoch}, step {first}')
            if signum and not last:
                if saver is not None:
                    saver.save_recovery(epoch, batch_idx=batch_idx)
                raise Interrupted(signum)
        if update_idx % config.log_interval == 0 and (env.progress or config.log_interval * accum < n_batches):
            shown = utils.reduce_tensor(loss.detach(), env.world_size) if env.distributed else loss
            if bar is not None:
                bar.set_postfix(loss=f'{shown.item():.3f}', lr=f'{optimizer.param_groups[0]["lr"]:.3g}')
            elif state.rank0:
                _logger.info(f'Train: {epoch} [{batch_idx:>4d}/{n_batches}]  Loss: {shown.item():#.3g}  '
                             f'LR: {optimizer.param_groups[0]["lr"]:.3e}')
        if config.recovery_interval and saver is not None and (update_idx + 1) % config.recovery_interval == 0 \
                and not last:
            saver.save_recovery(epoch, batch_idx=batch_idx)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    state.batch_idx = None
    return dict(loss=monitor.summary(env.distributed), img_per_sec=samples * env.world_size / max(elapsed, 1e-9))


@torch.no_grad()
def validate(model, loader, config: Config, env: Env, num_classes: int, amp_autocast=nullcontext) -> Dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) over the whole eval set, summed exactly across ranks (each rank holds a
    disjoint shard, so no DDP wrapper and no padded duplicates)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # shards may differ in size: no DDP collectives per forward
    model.eval()
    k = min(5, num_classes)
    totals = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss sum, top1, top5, count
    for input, target in loader:
        if config.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            output = model(input)
        output = output.float()
        target = target.to(output.device)
        topk = output.topk(k, dim=1).indices == target.view(-1, 1)
        totals += torch.stack([
            nn.functional.cross_entropy(output, target, reduction='sum').double(),
            topk[:, 0].sum().double(), topk.any(dim=1).sum().double(),
            torch.tensor(float(target.numel()), dtype=torch.float64, device=output.device)])
    if env.distributed:
        torch.distributed.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    n = max(n, 1.0)
    return dict(loss=loss / n, top1=100.0 * top1 / n, top5=100.0 * top5 / n)


def check_finite(epoch: int, modules: Sequence[nn.Module], metrics: Sequence[Dict[str, float]]) -> None:
    """Stop before saving when the weights (or the evaluation computed from them) are NaN/inf."""
    for m in metrics:
        if not math.isfinite(m['loss']):
            raise NonFiniteError(f'non-finite evaluation loss after epoch {epoch}')
    for module in modules:
        tensors = [t for t in module.state_dict().values() if torch.is_tensor(t) and t.is_floating_point()]
        if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            raise NonFiniteError(f'non-finite weights after epoch {epoch}')


