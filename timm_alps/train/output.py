"""The output folder: where a run writes, who may write there (one run at a time, a resume only into its own run),
and what it holds besides checkpoints (args.yaml, summary.csv, log.txt, curves.png)."""
import fcntl
import logging
import os
from datetime import datetime
from typing import Any, Dict, List, Optional

import yaml
from timm.models import safe_model_name

from ..checkpoint import CheckpointError, check_output_dir, list_checkpoints
from .config import Config
from .errors import TrainError

__all__ = ['resolve_output_dir', 'OutputFolder', 'claim_output_dir', 'write_args', 'start_log_file',
           'stop_log_file', 'plot_curves']

_logger = logging.getLogger('train')

RUN_FILES = ('args.yaml', 'summary.csv', 'curves.png', 'log.txt')


def resolve_output_dir(config: Config) -> str:
    """--output/--experiment; a resume of a checkpoint file without --experiment continues in that file's folder;
    otherwise a new folder named by time, model and method."""
    base = config.output or os.path.join('.', 'output', 'train')
    if config.experiment:
        return os.path.join(base, config.experiment)
    if config.resume and config.resume != 'auto':
        return os.path.dirname(os.path.abspath(config.resume))
    name = '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(config.model), config.method])
    return os.path.join(base, name)


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _contents(output_dir: str) -> List[str]:
    return sorted(f for f in (os.listdir(output_dir) if os.path.isdir(output_dir) else []) if not f.startswith('.'))


def _refusal(config: Config, output_dir: str) -> Optional[str]:
    """Why this run may not write into `output_dir` as it stands (None: it may).

    A folder holding files belongs to the run that wrote them: `--resume auto` (or `--resume` of one of its
    checkpoints) continues it, `--overwrite` replaces it, anything else is refused.
    """
    existing = _contents(output_dir)
    if not existing or is_own_resume(config, output_dir) or config.overwrite:
        return None
    name = os.path.basename(os.path.normpath(output_dir))
    if config.resume:
        return (f"--resume {config.resume} would continue into '{output_dir}', which holds another run "
                f"({len(existing)} file(s), e.g. {existing[0]}); nothing was changed. Continue that run with "
                f"--resume auto --experiment {name}, pick a new --experiment for the continued run, or replace "
                f"the run in it with --overwrite.")
    return (f"output folder '{output_dir}' already holds {len(existing)} file(s) (e.g. {existing[0]}). Continue it "
            f"with --resume auto --experiment {name}, replace it with --overwrite, or pick another --experiment.")


def is_own_resume(config: Config, output_dir: str) -> bool:
    """Does --resume continue the run of `output_dir` (`auto`, or one of the folder's own checkpoints)?"""
    return config.resume == 'auto' or bool(config.resume) and _same_dir(
        os.path.dirname(os.path.abspath(config.resume)), output_dir)


class OutputFolder:
    """An output folder held by this run: an exclusive `flock` on the folder itself (no lock file is added to it),
    released by `release` or when the process ends, however it ends."""

    def __init__(self, path: str, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def claim_output_dir(config: Config, output_dir: str, checkpoint_bytes: int) -> OutputFolder:
    """Take the folder for this run: refuse a folder in use by another run (lock) or holding another run, clear it
    under --overwrite, then check it is writable with room for checkpoints.

    Args:
        checkpoint_bytes: the estimated size of one checkpoint. A new run needs room for three (last, best, the
            temporary copy of a save); a resumed run replaces its checkpoints, so it needs room for one.

    Raises:
        TrainError: the one-line reason; the folder is left as it was.
    """
    why = _refusal(config, output_dir)  # before creating anything
    if why:
        raise TrainError(why)
    created = not os.path.isdir(output_dir)
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd = os.open(output_dir, os.O_RDONLY)
    except OSError as e:
        raise TrainError(f"output folder '{output_dir}' is not writable ({e.strerror or e}); choose another with "
                         f"--output, or fix its permissions. Nothing was trained.") from None
    folder = OutputFolder(output_dir, fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise TrainError(f"output folder '{output_dir}' is in use by another training run; wait for it to "
                             f"finish or pick another --experiment.") from None
        why = _refusal(config, output_dir)  # again under the lock: another run may have written meanwhile
        if why:
            raise TrainError(why)
        own = is_own_resume(config, output_dir)
        if config.overwrite and not own:  # the run in the folder is replaced: its files go first
            for path in list_checkpoints(output_dir) + [os.path.join(output_dir, f) for f in RUN_FILES]:
                if os.path.exists(path):
                    os.remove(path)
        # A new run: last + best + the temporary file of a save. A resumed run with checkpoints on disk replaces
        # them at each save: it needs room for the temporary file only.
        need = 3 * checkpoint_bytes
        if own and list_checkpoints(output_dir):
            need = checkpoint_bytes
        try:
            check_output_dir(output_dir, need)
        except CheckpointError as e:
            raise TrainError(str(e)) from None
    except BaseException:
        folder.release()
        if created and not _contents(output_dir):
            try:
                os.rmdir(output_dir)
            except OSError:
                pass
        raise
    return folder


def write_args(output_dir: str, values: Dict[str, Any]) -> None:
    """args.yaml: the resolved flags (a valid -c config) and the derived values of the run."""
    tmp = os.path.join(output_dir, '.args.yaml.part')
    with open(tmp, 'w') as f:
        f.write(yaml.safe_dump(values, default_flow_style=False))
    os.replace(tmp, os.path.join(output_dir, 'args.yaml'))


_SAVER_LOGGER = 'timm.utils.checkpoint_saver'


class _LogFile(logging.FileHandler):
    """log.txt: a failed write (e.g. a full disk) is reported once by the run's own error, not as a traceback per
    record."""

    def handleError(self, record):
        pass


def start_log_file(output_dir: str) -> logging.Handler:
    """log.txt gets everything; the saver's per-epoch "Current checkpoints:" listing goes there only."""
    handler = _LogFile(os.path.join(output_dir, 'log.txt'))
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
    logging.root.addHandler(handler)
    saver_logger = logging.getLogger(_SAVER_LOGGER)
    saver_logger.addHandler(handler)
    saver_logger.propagate = False
    return handler


def stop_log_file(handler: Optional[logging.Handler]) -> None:
    if handler is None:
        return
    logging.root.removeHandler(handler)
    saver_logger = logging.getLogger(_SAVER_LOGGER)
    saver_logger.removeHandler(handler)
    saver_logger.propagate = True
    handler.close()


def plot_curves(summary_csv: str, png_path: str, method: str = '', num_classes: int = 0) -> None:
    """Loss and accuracy per epoch from summary.csv (train loss, eval loss, eval top-1; chance level dashed)."""
    import csv
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    with open(summary_csv, newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    ep = [int(r['epoch']) + 1 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(ep, [float(r['train_loss']) for r in rows], 'o-', label=f'train ({method} targets)' if method else 'train')
    ax1.plot(ep, [float(r['eval_loss']) for r in rows], 'o-', label='eval')
    ax1.set(xlabel='epoch', ylabel='cross-entropy', title='loss')
    ax2.plot(ep, [float(r['eval_top1']) for r in rows], 'o-', color='C2', label='eval top-1')
    if num_classes:
        ax2.axhline(100.0 / num_classes, color='gray', ls='--', lw=1, label=f'chance ({100.0 / num_classes:.3g}%)')
    ax2.set(xlabel='epoch', ylabel='accuracy (%)', title='eval accuracy', ylim=(0, 100))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(summary_csv))), fontsize=9)
    fig.tight_layout()
    tmp = png_path + '.part.png'
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, png_path)
