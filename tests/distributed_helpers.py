"""Shared by the tests that start real torch.distributed (gloo) processes."""
import socket
import sys
from typing import List


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int) -> List[str]:
    """`python -m torch.distributed.run` with `nproc` processes on this machine, before the script and its args."""
    return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc),
            '--master_addr', '127.0.0.1', '--master_port', str(free_port())]
