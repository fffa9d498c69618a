"""Where the run executes: device, process group, determinism."""
import argparse
import dataclasses
import logging
import os

import torch
from timm import utils

from .config import Config
from .errors import TrainError

__all__ = ['Env', 'setup_env']

_logger = logging.getLogger('train')


@dataclasses.dataclass(frozen=True)
class Env:
    """The process's place in the run (derived, never from the user's flags directly)."""
    device: torch.device
    distributed: bool = False
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    progress: bool = False  # a progress bar (every rank agrees: the log cadence drives a collective)

    @property
    def rank0(self) -> bool:
        return self.rank == 0


def setup_env(config: Config, progress: bool) -> Env:
    """Device, process group (torchrun's environment), determinism."""
    try:
        if torch.device(config.device).type == 'cuda' and not torch.cuda.is_available():
            raise RuntimeError('no CUDA device is available (leave --device out to train on the CPU)')
        dist = argparse.Namespace(device=config.device, dist_backend=config.dist_backend, dist_url=config.dist_url)
        device = utils.init_distributed_device(dist)  # timm's: fills dist.rank, world_size, ...
    except (RuntimeError, AssertionError, ValueError) as e:
        raise TrainError(f'could not set up device {config.device!r}: {e}') from e
    if dist.distributed:
        flag = torch.tensor([int(progress)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        progress = bool(flag.item())
        _logger.info(f'Process {dist.rank}/{dist.world_size} on {device} ({torch.distributed.get_backend()}).')
    if config.sync_bn and device.type == 'cpu':
        raise TrainError('--sync-bn needs GPUs (torch.nn.SyncBatchNorm has no CPU kernel); on CPU BatchNorm '
                         'statistics are averaged after each epoch (--dist-bn reduce)')
    if config.deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    return Env(device, dist.distributed, dist.world_size, dist.rank, dist.local_rank, progress)
