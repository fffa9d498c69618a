"""`main`: a training run from the command line to the last checkpoint, as a table of contents of the engine."""
import argparse
import dataclasses
import errno
import logging
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from timm import utils
from timm.data import resolve_data_config
from timm.models import create_model
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import NativeScaler

from ..checkpoint import AtomicCheckpointSaver, CheckpointError, estimate_checkpoint_bytes
from ..task import ALPSTask
from .config import Config, parse_args, resolve_config
from .data import Loaders, Source, build_loaders, check_classes, choose_loader, inspect_data, set_loader_epoch
from .env import Env, setup_env
from .errors import Interrupted, NonFiniteError, TrainError
from .loop import SignalFlag, TrainState, check_finite, train_one_epoch, validate
from .mixing import Regularisation, create_collate_mixer, create_regularisation, mixes_in_collate
from .output import (claim_output_dir, is_own_resume, plot_curves, resolve_output_dir, start_log_file,
                     stop_log_file, write_args)
from .resume import CheckpointState, CollectiveOnlySaver, Resumed, resume_training

__all__ = ['main', 'cli']

_logger = logging.getLogger('train')


@dataclasses.dataclass
class Training:
    """What the loop runs: the model, the task (model + criterion), optimizer, schedule, precision."""
    model: nn.Module
    task: ALPSTask
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    num_epochs: int
    amp_autocast: Any
    loss_scaler: Optional[NativeScaler]


def _fixed_input_size(model: nn.Module) -> Optional[Tuple[int, int]]:
    """(H, W) a model only accepts (e.g. a ViT's patch embedding with strict_img_size), else None."""
    pe = getattr(model, 'patch_embed', None)
    if pe is not None and getattr(pe, 'strict_img_size', False):
        return tuple(pe.img_size)
    return None


def build_model(config: Config, source: Source) -> Tuple[nn.Module, int, Dict[str, Any], bool]:
    """The model (on the CPU), its class count, timm's data config for it, and whether that input size is required
    (given by the user or the only one the model takes)."""
    num_classes = check_classes(config, source)
    try:
        model = create_model(config.model, pretrained=config.pretrained, num_classes=num_classes,
                             drop_rate=config.drop, drop_path_rate=config.drop_path,
                             checkpoint_path=config.initial_checkpoint or None, **config.model_kwargs)
    except (TypeError, ValueError, RuntimeError, FileNotFoundError, AssertionError) as e:
        raise TrainError(f"could not create model '{config.model}' with --model-kwargs "
                         f"{dict(config.model_kwargs)}: {e}") from e
    fixed, given = _fixed_input_size(model), config.input_size is not None or config.img_size is not None
    data_config = resolve_data_config(vars(config), model=model, verbose=False)
    if fixed and tuple(data_config['input_size'][1:]) != fixed:
        if given:
            raise TrainError(f"--input-size/--img-size {data_config['input_size'][1]}: model {config.model} only "
                             f"takes {fixed[0]}x{fixed[1]} images (its img_size); pass --img-size {fixed[0]} or "
                             f"build it for your size with --model-kwargs img_size=N")
        data_config['input_size'] = (data_config['input_size'][0], *fixed)  # its pretrained_cfg may say otherwise
    return model, model.num_classes if num_classes is None else num_classes, data_config, bool(fixed or given)


def place_model(config: Config, env: Env, model: nn.Module) -> nn.Module:
    """The model on the device, in the run's memory format, with synchronized BatchNorm when asked."""
    model.to(device=env.device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    if env.distributed and config.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def wrap_for_training(config: Config, env: Env, training: 'Training', resumed: Resumed, state: TrainState) -> None:
    """After a resume (which loads into the plain modules): torch.compile, DDP, the schedule moved to where the run
    continues (as timm's train.py)."""
    if config.torchcompile:
        training.task.compile(backend=config.torchcompile)
    if env.distributed:
        ddp_kwargs = dict(broadcast_buffers=False) if config.no_ddp_bb else {}
        training.task.prepare_distributed(device_ids=[env.device] if env.device.type == 'cuda' else None, **ddp_kwargs)
    if training.lr_scheduler is not None and resumed.checkpoint is not None:
        training.lr_scheduler.step(resumed.start_epoch)
        if config.sched_on_updates:
            training.lr_scheduler.step_update(num_updates=state.step)


def build_training(config: Config, env: Env, model: nn.Module, reg: Regularisation,
                   updates_per_epoch: int) -> Training:
    """Task, optimizer, schedule and precision (bf16 autocast on CPUs with native bf16: see resolve_precision)."""
    task = ALPSTask(model, reg.mixup_fn, reg.criterion, device=env.device, verbose=False)
    try:  # combinations timm itself rejects (e.g. --opt-kwargs a optimizer lacks, --sched rsqrt without warm-up)
        optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=config), **config.opt_kwargs)
        lr_scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(config),
                                                       updates_per_epoch=updates_per_epoch)
    except (ValueError, TypeError, AssertionError, ImportError) as e:
        raise TrainError(f'could not create optimizer --opt {config.opt} / scheduler --sched {config.sched}: '
                         f'{e}') from e
    if config.model_ema:
        task.setup_ema(decay=config.model_ema_decay, use_warmup=config.model_ema_warmup)
    amp_dtype = torch.bfloat16 if config.amp_dtype == 'bfloat16' else torch.float16
    amp_autocast = partial(torch.autocast, device_type=env.device.type, dtype=amp_dtype) if config.amp else \
        nullcontext
    loss_scaler = NativeScaler(device=env.device.type) if config.amp and amp_dtype == torch.float16 and \
        env.device.type == 'cuda' else None
    return Training(model, task, optimizer, lr_scheduler, num_epochs, amp_autocast, loss_scaler)


def _on_rank0(env: Env, fn):
    """Run `fn` on rank 0; every rank raises the same TrainError instead of hanging in a collective."""
    error, result = None, None
    if env.rank0:
        try:
            result = fn()
        except TrainError as e:
            error = str(e)
    if env.distributed:
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise TrainError(error)
    return result


def run_args(config: Config, env: Env, num_classes: int) -> Dict[str, Any]:
    """args.yaml: every resolved flag (so `-c args.yaml` repeats the run) and, apart, the derived values."""
    derived = dict(num_classes=num_classes, distributed=env.distributed, world_size=env.world_size, rank=env.rank,
                   local_rank=env.local_rank, progress=env.progress, prefetcher=not config.no_prefetcher)
    return {**config.to_dict(), **derived}


def main(argv: Optional[List[str]] = None) -> int:
    """Train; returns the exit status (0, or 128 + signal number after a checkpoint on SIGINT/SIGTERM).

    Raises:
        TrainError: bad input or environment (reported before anything is written), or a run that had to stop.
    """
    config = resolve_config(parse_args(argv))  # every flag checked and resolved, frozen
    env = setup_env(config, progress=not config.no_progress and sys.stderr.isatty())
    utils.random_seed(config.seed, env.rank)

    source = inspect_data(config)  # what the dataset is; every shard checked
    model, num_classes, data_config, size_required = build_model(config, source)
    kind = choose_loader(config, source, data_config['input_size'], size_required)
    collate_mixer = create_collate_mixer(config, num_classes, env.rank) if mixes_in_collate(config, kind) else None
    loaders = build_loaders(config, kind, source, data_config, num_classes, env.device, env.rank, env.world_size,
                            env.distributed, collate_mixer)
    model = place_model(config, env, model)
    updates_per_epoch = math.ceil(len(loaders.train) / config.grad_accum_steps)
    reg = create_regularisation(config, num_classes, model, env.rank, collate_mixer, updates_per_epoch)
    training = build_training(config, env, model, reg, updates_per_epoch)
    if env.rank0:
        _log_plan(config, model, kind, loaders, updates_per_epoch, reg, source)

    output_dir = resolve_output_dir(config)
    state = TrainState(rank0=env.rank0)
    # The collate mixer's generator lives in the worker processes when there are any: not the main process's to save.
    mixer_state = reg.mixup_fn if reg.mixup_fn is not None else (collate_mixer if config.workers == 0 else None)
    resumed = Resumed()
    if config.resume:  # before DDP / compile, so state loads into the plain modules
        resumed = resume_training(config, env, output_dir, training.task, training.optimizer, training.loss_scaler,
                                  training.lr_scheduler, mixer_state, loaders.train, state)
    wrap_for_training(config, env, training, resumed, state)

    modules = [training.task.get_trainable_module()] + \
        ([training.task.get_trainable_module(ema=True)] if config.model_ema else [])
    folder = _on_rank0(env, lambda: claim_output_dir(
        config, output_dir, estimate_checkpoint_bytes(modules, training.optimizer)))  # nothing written before this
    try:
        return train(config, env, output_dir, training, reg, loaders, state, resumed, source, num_classes,
                     CheckpointState(env, state, training.lr_scheduler, mixer_state, loaders.train))
    finally:
        if folder is not None:
            folder.release()


def _log_plan(config: Config, model, kind: str, loaders: Loaders, updates_per_epoch: int, reg: Regularisation,
              source: Source) -> None:
    precision = f'{config.amp_dtype} autocast' if config.amp else 'fp32'
    _logger.info(f'Model {config.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), method '
                 f'{config.method}, {type(loaders.train).__name__}, {updates_per_epoch} updates/epoch, '
                 f'{precision}{", channels_last" if config.channels_last else ""}.')
    if reg.eps_warmup is not None:
        _logger.info(f'ALPS radius ramps linearly from 0 to {reg.eps_warmup.eps:g} over the first '
                     f'{reg.eps_warmup.warmup_updates} updates (--alps-eps-warmup-epochs '
                     f'{config.alps_eps_warmup_epochs:g}).')


def train(config: Config, env: Env, output_dir: str, training: Training, reg: Regularisation, loaders: Loaders,
          state: TrainState, resumed: Resumed, source: Source, num_classes: int, extra_state) -> int:
    """Write the run's files, then the epochs: train, evaluate, summary row, checkpoint, curves."""
    task, optimizer, lr_scheduler = training.task, training.optimizer, training.lr_scheduler
    saver, log_file = None, None
    summary = os.path.join(output_dir, 'summary.csv')
    stop = SignalFlag()
    best_metric, best_epoch, last_path = None, None, None
    try:
        if env.rank0:
            saved_args = run_args(config, env, num_classes)
            saver = AtomicCheckpointSaver(  # args: plain values, as timm's train.py stores them
                model=training.model, optimizer=optimizer, args=argparse.Namespace(**saved_args),
                amp_scaler=training.loss_scaler,
                checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing=config.eval_metric == 'loss',
                max_history=config.checkpoint_hist, task=task, extra_state_fn=extra_state)
            log_file = start_log_file(output_dir)
            if resumed.checkpoint is not None and resumed.checkpoint.get('saver') and \
                    is_own_resume(config, output_dir):
                saver.load_state_dict(resumed.checkpoint['saver'])
            write_args(output_dir, saved_args)
            utils.trim_summary(summary, resumed.start_epoch)
            _logger.info(f'Output folder: {output_dir}')
            for b in source.bad_shards:  # after log.txt is open: the record of what this run did not train on
                _logger.warning(f'--tolerate-bad-shards: left out what cannot be read of {b.problem}'
                                + (f' ({b.lost} samples)' if b.lost is not None else ''))
            if source.bad_shards:
                _logger.warning(f'--tolerate-bad-shards: {source.skipped_shards} damaged shard(s) '
                                f'({source.skipped_samples} samples) left out; summary.csv counts them '
                                f'(train_skipped_shards, train_skipped_samples).')
        elif env.distributed:
            saver = CollectiveOnlySaver(extra_state)  # non-zero ranks join the all_gather of every save
        resumed.checkpoint = None
        share_bn = env.distributed and config.dist_bn in ('broadcast', 'reduce') and not config.sync_bn
        skip_batches = resumed.skip_batches
        for epoch in range(resumed.start_epoch, training.num_epochs):
            reg.set_epoch(epoch, task)
            set_loader_epoch(loaders.train, epoch, env.distributed)
            state.loader_epoch_state = loaders.train.state_dict() if hasattr(loaders.train, 'state_dict') else None
            t_epoch = time.perf_counter()
            train_metrics = train_one_epoch(
                epoch, task, loaders.train, optimizer, config, env, state, training.num_epochs,
                lr_scheduler=lr_scheduler, saver=saver, amp_autocast=training.amp_autocast,
                loss_scaler=training.loss_scaler, stop=stop, skip_batches=skip_batches, regularisation=reg)
            if source.skipped_shards:
                train_metrics.update(skipped_shards=source.skipped_shards, skipped_samples=source.skipped_samples)
            skip_batches = 0
            if share_bn:
                utils.distribute_bn(task.get_trainable_module(), env.world_size, config.dist_bn == 'reduce')
            eval_metrics = validate(task.get_eval_model(), loaders.eval, config, env, num_classes,
                                    training.amp_autocast)
            checked = [eval_metrics]
            if config.model_ema:
                ema_model = task.get_eval_model(ema=True)
                if share_bn:
                    utils.distribute_bn(ema_model, env.world_size, config.dist_bn == 'reduce')
                eval_metrics = validate(ema_model, loaders.eval, config, env, num_classes,
                                        training.amp_autocast)  # as timm: the EMA is reported
                checked.append(eval_metrics)
            check_finite(epoch, [task.get_trainable_module()], checked)
            lr = optimizer.param_groups[0]['lr']
            if lr_scheduler is not None:
                lr_scheduler.step(epoch + 1, eval_metrics[config.eval_metric])
            if saver is not None:
                if env.rank0:
                    utils.update_summary(epoch, train_metrics, eval_metrics, summary, lr=lr)
                best_metric, best_epoch = saver.save_checkpoint(epoch, metric=eval_metrics[config.eval_metric])
                last_path = os.path.join(output_dir, 'last.pth.tar')
            if env.rank0:
                _logger.info(
                    f"Epoch {epoch + 1}/{training.num_epochs}  train_loss {train_metrics['loss']:.4f}  "
                    f"eval_loss {eval_metrics['loss']:.4f}  eval_top1 {eval_metrics['top1']:.2f}%  lr {lr:.3g}  "
                    f"{time.perf_counter() - t_epoch:.1f}s ({train_metrics['img_per_sec']:.0f} img/s)"
                    + ('  *best' if best_epoch == epoch else ''))
                try:
                    plot_curves(summary, os.path.join(output_dir, 'curves.png'), config.method, num_classes)
                except Exception as e:  # a figure is not worth stopping a long run for
                    _logger.warning(f'could not draw curves.png: {e}')
            signum = stop.signum
            if env.distributed:  # all ranks must leave together, or the others hang in the next collective
                flag = torch.tensor([signum], device=env.device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                signum = int(flag.item())
            if signum:
                raise Interrupted(signum)
    except NonFiniteError as e:
        kept = last_path or (resumed.path or 'none (no epoch finished)')
        raise TrainError(f'{e}. Stopped without saving the diverged weights; last good checkpoint: {kept}. Lower '
                         f'--lr, add --clip-grad, or pass --on-nonfinite skip.', exit_code=1) from None
    except Interrupted as e:
        if env.rank0:
            _logger.warning(f'{e} received: checkpoint saved in {output_dir}; continue with --resume auto '
                            f'--experiment {os.path.basename(output_dir)}'
                            + (f' --output {config.output}' if config.output else ''))
        return 128 + e.signum
    except (CheckpointError, OSError) as e:
        raise TrainError(_write_failure(e, output_dir, config), exit_code=1) from None
    finally:
        stop.restore()
        stop_log_file(log_file)
    if env.rank0 and best_metric is not None:
        _logger.info(f'*** Best {config.eval_metric}: {best_metric:.4f} (epoch {best_epoch + 1}); results in '
                     f'{output_dir}')
    if state.skipped and env.rank0:
        _logger.warning(f'{state.skipped} update(s) skipped for non-finite loss.')
    return 0


def _free_bytes(path: str) -> Optional[int]:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _write_failure(e: Exception, output_dir: str, config: Config) -> str:
    """One line for a failed write that says when the disk is full (torch reports it as a failed zip write), and
    how to continue."""
    free = _free_bytes(output_dir)
    full = getattr(e, 'errno', None) == errno.ENOSPC or 'No space left' in str(e) or (free is not None and
                                                                                     free < 2 ** 20)
    resume = f'--resume auto --experiment {os.path.basename(os.path.normpath(output_dir))}' + (
        f' --output {config.output}' if config.output else '')
    if full:
        left = f' ({free / 2 ** 20:.1f} MiB free)' if free is not None else ''
        return (f"no space left on the device of '{output_dir}'{left}: stopped; the last complete checkpoint is "
                f"still there. Free space, then continue with {resume}.")
    return f'{e} Stopping; the last complete checkpoint is still in {output_dir} (continue with {resume}).'


def cli(argv: Optional[List[str]] = None, prog: str = 'timm-alps-train') -> int:
    """Command-line entry point (`timm-alps-train`, `python train_timm.py`): errors are one line on stderr, with
    exit status 2 (bad input) or 1 (a run that had to stop)."""
    utils.setup_default_logging()
    try:
        return main(argv)
    except TrainError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)  # once, on stderr, no traceback
        return e.exit_code
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def console_main() -> None:
    sys.exit(cli())
