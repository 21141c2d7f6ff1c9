"""What every `python -m taskmerge.*` entry point shares: user errors reported as one line, SIGTERM turned
into a clean exit, and a Hydra callback that checks a run's inputs before Hydra creates its directory."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from taskmerge.errors import UserError

USER_ERROR_EXIT = 2


def report_user_error(error: UserError) -> None:
    """Print `error` as one line on stderr and exit with status 2; `HYDRA_FULL_ERROR=1` re-raises it instead,
    traceback included."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"taskmerge: error: {error}", file=sys.stderr, flush=True)
    sys.exit(USER_ERROR_EXIT)


@contextlib.contextmanager
def user_errors_reported() -> Iterator[None]:
    """Run the block; a `UserError` escaping it ends the process with its one-line message."""
    try:
        yield
    except UserError as error:
        report_user_error(error)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into `SystemExit(143)` so `finally` blocks remove staging directories and temporary files;
    left alone when something else (e.g. submitit) already handles the signal."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_exit)


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def check_writable(directory: Path, option: str) -> None:
    """`directory` exists or can be created, and a file can be written in it (tried, not inferred from mode
    bits, which root ignores)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise UserError(f"{option}={directory} cannot be written ({error.strerror or error}); choose another {option}") from None


class CheckInputs(Callback):
    """Hydra callback: checks the whole config, the run directory and its lock before Hydra creates the run
    directory, so a bad input leaves nothing behind."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from taskmerge import tracking, validation

        with user_errors_reported():
            plain = validation.resolve(config, config.hydra.runtime.choices)
            validation.check_run(plain)
            run_dir = Path(config.hydra.run.dir)
            check_writable(run_dir, "hydra.run.dir")
            tracking.check_unlocked(run_dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with user_errors_reported():
            check_writable(Path(config.hydra.sweep.dir), "hydra.sweep.dir")
