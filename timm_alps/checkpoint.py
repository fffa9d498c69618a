"""Crash-safe checkpoints for long ALPS runs: atomic writes, full training state, and finding a good one to resume.

`AtomicCheckpointSaver` is timm's `CheckpointSaver` with every write made atomic (temporary file in the same
folder, flush + fsync, `os.replace`, fsync of the folder), so a `kill -9`, a power cut or a full disk in the middle
of a save never leaves a truncated ``last.pth.tar``: the previous file stays in place until the new one is complete.
It also stores what timm's saver leaves out but an exact resume needs (scheduler, step counters, RNG states, the
ALPS sampler and the data loader) through an ``extra_state_fn`` callback.
"""
import errno
import glob
import logging
import os
import random
import shutil
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from timm.utils import CheckpointSaver, load_checkpoint_metadata
from timm.utils.model import get_state_dict

__all__ = [
    'AtomicCheckpointSaver', 'CheckpointError', 'atomic_torch_save', 'capture_rng_state', 'restore_rng_state',
    'capture_rank_state', 'restore_rank_state', 'load_training_checkpoint', 'find_resume_checkpoint', 'check_output_dir',
]

_logger = logging.getLogger(__name__)

CHECKPOINT_EXT = '.pth.tar'
# Keys `train_timm.py` needs to continue a run; a file without them is not a training checkpoint.
_REQUIRED_KEYS = ('state_dict', 'optimizer', 'epoch')


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, read, or used to resume."""


def _fsync_dir(path: str) -> None:
    # The rename is only durable once the directory entry is on disk; some filesystems refuse O_RDONLY on dirs.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomically(path: str, write_fn: Callable[[Any], None]) -> None:
    """Call ``write_fn(file)`` on a temporary file beside `path`, fsync it, then rename it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.part', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:
        try:
            os.unlink(tmp_path)
        except OSError:
            pass
        if not isinstance(e, Exception) or isinstance(e, CheckpointError):
            raise
        # torch's zip writer reports a failed write (e.g. ENOSPC) as RuntimeError, plain files as OSError.
        full = getattr(e, 'errno', None) == errno.ENOSPC or 'No space left' in str(e)
        hint = ' (no space left on the device)' if full else ''
        raise CheckpointError(f"could not write checkpoint '{path}'{hint}: {e}. "
                              f"Files already in {folder} were left untouched.") from e
    _fsync_dir(folder)


def atomic_torch_save(obj: Any, path: str) -> None:
    """`torch.save` that either fully replaces `path` or leaves it as it was.

    Raises:
        CheckpointError: the write failed (e.g. no space left); the temporary file is removed.
    """
    _write_atomically(path, lambda f: torch.save(obj, f))


class _TaskWithExtraState:
    """What timm's `CheckpointSaver._save` sees as its task: the real task's (or the bare model's) checkpoint state,
    plus ``extra`` merged into the non-EMA part. `get_checkpoint_state` is the hook timm's saver offers for adding
    to a checkpoint, so the saver's own `_save` writes the file and nothing of its body is copied here."""

    def __init__(self, task, model, model_ema, extra: Dict[str, Any]):
        self.task, self.model, self.model_ema, self.extra = task, model, model_ema, extra

    def get_checkpoint_state(self, ema: bool = False, unwrap_fn=None) -> Dict[str, Any]:
        kwargs = {} if unwrap_fn is None else dict(unwrap_fn=unwrap_fn)
        if self.task is not None:
            state = self.task.get_checkpoint_state(ema=ema, **kwargs)
        else:
            module = self.model_ema if ema else self.model
            key = 'state_dict_ema' if ema else 'state_dict'
            state = {} if module is None else {key: get_state_dict(module, **kwargs)}
        if not ema:
            state.update(self.extra)
        return state


# Keys timm's saver writes itself; extra state never replaces them.
_BASE_KEYS = frozenset(('epoch', 'arch', 'optimizer', 'version', 'args', 'state_dict', 'state_dict_ema', 'metric',
                        'saver', 'amp_scaler', 'task_state', 'task_state_ema'))


class AtomicCheckpointSaver(CheckpointSaver):
    """timm's `CheckpointSaver` (same files, history and ``model_best``) with durable writes and extra state.

    timm's saver writes ``tmp.pth.tar`` and renames it over ``last.pth.tar``; here the written file is fsync'd before
    the rename, the rename never unlinks the old ``last`` first, and the folder is fsync'd after it, so a ``kill -9``,
    a power cut or a full disk in the middle of a save leaves the previous ``last`` in place.

    Args:
        *args, **kwargs: as for `timm.utils.CheckpointSaver`.
        extra_state_fn: called at every save; the dict it returns is merged into the checkpoint (e.g. scheduler,
            step, ``rank_state``). Keys of the base checkpoint cannot be overridden.
    """

    def __init__(self, *args, extra_state_fn: Optional[Callable[[], Dict[str, Any]]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra_state_fn = extra_state_fn
        # Temporary files of writes that a kill interrupted: never valid, never read, safe to drop.
        for folder in {self.checkpoint_dir, self.recovery_dir}:
            folder = folder or '.'
            stale = glob.glob(os.path.join(folder, '.*' + CHECKPOINT_EXT + '.*.part')) + \
                glob.glob(os.path.join(folder, '*' + CHECKPOINT_EXT + '.link.part')) + \
                [os.path.join(folder, n + CHECKPOINT_EXT) for n in ('tmp', self.recovery_prefix + '_tmp')]
            for path in stale:
                try:
                    os.remove(path)
                except OSError:
                    pass

    def save_checkpoint(self, epoch, metric=None):
        """As timm's, then drop mid-epoch recovery files: the new ``last`` supersedes them."""
        result = super().save_checkpoint(epoch, metric)
        for path in glob.glob(os.path.join(self.recovery_dir or self.checkpoint_dir,
                                           self.recovery_prefix + '-*' + self.extension)):
            try:
                os.remove(path)
            except OSError:
                pass
        self.curr_recovery_file = self.prev_recovery_file = ''
        return result

    def _save(self, save_path, epoch, metric=None):
        # timm's own save into its temporary file, with the extra state added through the task hook, then fsync.
        extra = {k: v for k, v in (self.extra_state_fn() if self.extra_state_fn else {}).items()
                 if k not in _BASE_KEYS}
        task = self.task
        self.task = _TaskWithExtraState(task, self.model, self.model_ema, extra)
        try:
            super()._save(save_path, epoch, metric)
            with open(save_path, 'rb+') as f:
                os.fsync(f.fileno())
        except Exception as e:
            try:
                os.unlink(save_path)
            except OSError:
                pass
            full = getattr(e, 'errno', None) == errno.ENOSPC or 'No space left' in str(e)
            hint = ' (no space left on the device)' if full else ''
            raise CheckpointError(f"could not write checkpoint '{save_path}'{hint}: {e}. Files already in "
                                  f"{os.path.dirname(os.path.abspath(save_path))} were left untouched.") from e
        finally:
            self.task = task

    def _replace(self, src, dst):
        # timm unlinks `dst` first (for Windows); on POSIX that opens a window with no `last` at all.
        os.replace(src, dst)
        _fsync_dir(os.path.dirname(os.path.abspath(dst)))

    def _duplicate(self, src, dst):
        if self.can_hardlink:
            tmp = dst + '.link.part'
            try:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                os.link(src, tmp)
                os.replace(tmp, dst)
                _fsync_dir(os.path.dirname(os.path.abspath(dst)))
                return
            except (OSError, NotImplementedError):
                self.can_hardlink = False
                if os.path.exists(tmp):
                    os.unlink(tmp)
        _write_atomically(dst, lambda f: _copy_into(src, f))


def _copy_into(src: str, f) -> None:
    with open(src, 'rb') as s:
        shutil.copyfileobj(s, f, length=16 * 1024 * 1024)


# -- random state ---------------------------------------------------------------------------------------------------
def capture_rng_state() -> Dict[str, Any]:
    """Torch (CPU and every CUDA device), numpy and python RNG states, in a form `torch.load(weights_only=True)`
    accepts (numpy's key array is stored as a tensor)."""
    np_state = np.random.get_state()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])),
        'python': random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`; CUDA states are restored only when the device count matches."""
    torch.set_rng_state(state['torch'])
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state['python']
    random.setstate((py[0], tuple(py[1]), py[2]))
    cuda = state.get('cuda')
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            _logger.warning(f'Checkpoint holds RNG states of {len(cuda)} CUDA devices but {torch.cuda.device_count()} '
                            'are visible: CUDA RNG not restored, the resumed run will not be bit-identical.')


def capture_rank_state(mixer=None, loader=None, loader_state=None, epoch_loss=None) -> Dict[str, Any]:
    """Everything one process needs to continue its random streams exactly: RNG states, the mixer's private
    generator and the data loader's position.

    Args:
        mixer: an object with ``state_dict()`` (e.g. `ALPSMixup`, a collate mixer), or None.
        loader: a loader with ``state_dict()`` (e.g. `InMemoryLoader`), or None.
        loader_state: the loader state to store instead of ``loader.state_dict()`` (mid-epoch: the state at the
            start of the epoch, so a resume replays the epoch and skips the batches already trained).
        epoch_loss: (loss sum, sample count) of the epoch so far, for a mid-epoch save.
    """
    if loader_state is None and loader is not None and hasattr(loader, 'state_dict'):
        loader_state = loader.state_dict()
    return dict(rng=capture_rng_state(),
                alps_mixup=mixer.state_dict() if hasattr(mixer, 'state_dict') else None,
                loader=loader_state, epoch_loss=epoch_loss)


def restore_rank_state(state: Dict[str, Any], mixer=None, loader=None) -> Optional[Tuple[float, float]]:
    """Inverse of `capture_rank_state`; returns the saved ``epoch_loss`` (or None)."""
    restore_rng_state(state['rng'])
    if state.get('alps_mixup') is not None and hasattr(mixer, 'load_state_dict'):
        mixer.load_state_dict(state['alps_mixup'])
    if state.get('loader') is not None and hasattr(loader, 'load_state_dict'):
        loader.load_state_dict(state['loader'])
    return state.get('epoch_loss')


# -- reading and finding checkpoints --------------------------------------------------------------------------------
def _torch_load(path: str) -> Any:
    # timm's loader of training checkpoints: weights_only with argparse.Namespace allowed, tensors memory-mapped.
    return load_checkpoint_metadata(path)


def load_training_checkpoint(path: str) -> Dict[str, Any]:
    """Load and sanity-check a training checkpoint written by `train_timm.py`.

    Args:
        path: checkpoint file (tensors are memory-mapped, so reading only metadata is cheap).

    Raises:
        CheckpointError: the file is missing, unreadable, truncated/corrupt or not a training checkpoint; the
            message says what to do.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume: no checkpoint at '{path}'. Give the path of a .pth.tar written by "
                              f"train_timm.py, or '--resume auto' with the run's --output/--experiment folder.")
    try:
        checkpoint = _torch_load(path)
    except Exception as e:  # zip/pickle errors differ by torch version; all mean the same to the user
        raise CheckpointError(
            f"--resume: checkpoint '{path}' is corrupt or truncated ({type(e).__name__}: {e}). It was probably "
            f"written by an interrupted process; use '--resume auto' to fall back to the latest good checkpoint "
            f"in {os.path.dirname(os.path.abspath(path))}.") from e
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in _REQUIRED_KEYS):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"--resume: '{path}' is not a training checkpoint (needs {list(_REQUIRED_KEYS)}, "
                              f"found {found}). To start from pretrained weights only, use --initial-checkpoint.")
    return checkpoint


def _resume_position(checkpoint: Dict[str, Any]) -> Tuple[int, int]:
    # Completed optimizer updates order checkpoints; older files without `step` fall back to the epoch.
    return int(checkpoint.get('step', -1)), int(checkpoint['epoch'])


def list_checkpoints(output_dir: str) -> List[str]:
    """Checkpoint files train_timm.py writes in `output_dir` (last, recovery, numbered and best)."""
    patterns = ('last', 'recovery-*', 'checkpoint-*', 'model_best')
    files = []
    for p in patterns:
        files.extend(sorted(glob.glob(os.path.join(output_dir, p + CHECKPOINT_EXT))))
    return files


def find_resume_checkpoint(output_dir: str) -> Tuple[str, List[Tuple[str, str]]]:
    """The most advanced readable training checkpoint in `output_dir` (``--resume auto``).

    Every candidate is opened (tensors memory-mapped); unreadable ones are skipped and reported, so a checkpoint
    corrupted by a crash falls back to the previous good one.

    Returns:
        (path, skipped): the chosen file and a list of (path, reason) for files that could not be used.

    Raises:
        CheckpointError: no usable checkpoint in the folder.
    """
    if not os.path.isdir(output_dir):
        raise CheckpointError(f"--resume auto: output folder '{output_dir}' does not exist; pass the --output and "
                              f"--experiment of the run to continue.")
    best, best_pos, skipped = None, None, []
    for path in list_checkpoints(output_dir):
        try:
            pos = _resume_position(load_training_checkpoint(path))
        except CheckpointError as e:
            skipped.append((path, str(e)))
            continue
        # `last` is listed first, so on ties it wins over its hard-linked numbered copy.
        if best_pos is None or pos > best_pos:
            best, best_pos = path, pos
    if best is None:
        reasons = ''.join(f'\n  {p}: {r}' for p, r in skipped)
        raise CheckpointError(f"--resume auto: no usable checkpoint in '{output_dir}'.{reasons}")
    return best, skipped


# -- output folder ----------------------------------------------------------------------------------------------------
def check_output_dir(output_dir: str, need_bytes: int = 0) -> None:
    """Fail before training if `output_dir` cannot hold checkpoints: create it, write+fsync+delete a probe file,
    and compare free space with `need_bytes`.

    Raises:
        CheckpointError: the folder cannot be created or written, or has less than `need_bytes` free.
    """
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix='.write-test-', dir=output_dir)
        try:
            with os.fdopen(fd, 'wb') as f:
                f.write(b'\0' * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.unlink(probe)
    except OSError as e:
        raise CheckpointError(f"output folder '{output_dir}' is not writable ({e.strerror or e}); choose another "
                              f"with --output, or fix its permissions/space. Nothing was trained.") from e
    free = shutil.disk_usage(output_dir).free
    if need_bytes and free < need_bytes:
        raise CheckpointError(
            f"output folder '{output_dir}' has {free / 2 ** 20:.1f} MiB free but checkpoints need about "
            f"{need_bytes / 2 ** 20:.1f} MiB (last + best + temporary copy); free space or use another --output. "
            f"Nothing was trained.")


def estimate_checkpoint_bytes(modules: Sequence[torch.nn.Module], optimizer: torch.optim.Optimizer) -> int:
    """Rough size of one checkpoint: model (+EMA) tensors plus optimizer state (assumed one buffer per parameter
    per state entry of the optimizer's defaults, e.g. momentum)."""
    total = 0
    for m in modules:
        total += sum(t.numel() * t.element_size() for t in m.state_dict().values() if torch.is_tensor(t))
    params = sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g['params'])
    return total + 2 * params
