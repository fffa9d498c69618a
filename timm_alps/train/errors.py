"""The engine's three ways of stopping: a one-line user error, a diverged run, a signal."""
import signal


class TrainError(Exception):
    """A problem reported as one clear line: bad input or environment (exit status 2), or a run that had to stop
    (non-finite loss, failed write: exit status 1)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(' '.join(str(message).split()))  # one line, whatever the wrapped error looked like
        self.exit_code = exit_code


class NonFiniteError(RuntimeError):
    """Training loss, evaluation or weights turned NaN/inf."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
