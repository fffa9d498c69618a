""" The one description of the machine a benchmark ran on, shared by every benchmark

* `machine_line(device)`: one line for a results table (GPU names and CUDA, or the CPU model, cores and threads).
* `environment()`: the record for `environment.json`: PyTorch's own `torch.utils.collect_env` report (versions,
  OS, CPU, GPU, CUDA/cuDNN, relevant pip packages) plus timm, timm_alps, the thread count and the git commit.
"""
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

REPO = Path(__file__).resolve().parent.parent

__all__ = ['cpu_name', 'machine_line', 'environment', 'SHARED_MACHINE_NOTE']

SHARED_MACHINE_NOTE = ('the machine was shared with other jobs while this ran: variants were interleaved so load '
                       'affects them alike, but absolute times may be inflated')


def cpu_name() -> Optional[str]:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def machine_line(device: Union[str, torch.device, None] = None) -> str:
    """'NVIDIA H100 80GB HBM3 (CUDA 12.8)' or 'CPU <model>, <n> cores, <t> torch threads'.

    Args:
        device: the device the benchmark ran on; None describes every GPU if there is one, else the CPU.
    """
    device = torch.device(device) if device is not None else None
    if (device is None or device.type == 'cuda') and torch.cuda.is_available():
        indices = [device.index] if device is not None and device.index is not None else \
            range(torch.cuda.device_count())
        names = [torch.cuda.get_device_name(i) for i in indices]
        return f'{", ".join(names)} (CUDA {torch.version.cuda})'
    return f'CPU {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads'


def _git_commit() -> Optional[str]:
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> Dict[str, Any]:
    """Software and machine, for the record: `torch.utils.collect_env.get_env_info()` and what it lacks."""
    from torch.utils import collect_env
    import timm
    try:
        import timm_alps
        alps_version = getattr(timm_alps, '__version__', None)
    except ImportError:
        alps_version = None
    info = collect_env.get_env_info()._asdict()
    return dict(info, torch=torch.__version__, timm=timm.__version__, timm_alps=alps_version, machine=machine_line(),
                cpu=cpu_name(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                host=platform.node(), git_commit=_git_commit())
