"""Entry points shared by train.py and eval.py: one-line config errors, Hydra mains."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from safeprobe.config import ConfigError, RunError, check_cli_overrides


def config_error(e: Exception) -> None:
    print(f"config error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def _sweep_job_dir() -> Path | None:
    """The job's folder when this process runs a job of a multirun, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    return Path(hc.runtime.output_dir) if hc.mode == RunMode.MULTIRUN else None


def _fail(line: str, code: int) -> None:
    """One line on stderr. A single run then exits with `code`; a sweep job records the line in
    its folder (the sweep report lists it with this reason) and returns, so the other jobs
    still run and the sweep ends with a non-zero status (reporting/callback.py)."""
    print(line, file=sys.stderr, flush=True)
    job_dir = _sweep_job_dir()
    if job_dir is None:
        sys.exit(code)
    from safeprobe.reporting.jobs import ERROR_FILE

    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / ERROR_FILE).write_text(line + "\n")


def guarded(fn: Callable, schema: type) -> Callable:
    """Check command-line overrides before Hydra composes; turn ConfigError into one line."""
    def main(*args, **kwargs):
        try:
            check_cli_overrides(sys.argv[1:], schema)
        except ConfigError as e:
            config_error(e)
        return fn(*args, **kwargs)

    return main


class Interrupted(BaseException):
    """SIGTERM (SLURM, Docker, spot instances) or Ctrl-C: the run stops where it is. A
    BaseException, so that nothing on the way catches it as an error of its own; `where` is
    filled in by the pipeline."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.where = signum, None


def _stop(signum, frame):
    raise Interrupted(signum)


@contextmanager
def one_line_errors():
    """Inside a Hydra task: ConfigError -> one line on stderr and exit code 2; RunError -> one
    line and exit code 1 (in a sweep: recorded, and the next job runs, see `_fail`);
    SIGTERM / Ctrl-C -> one line saying where the run stopped, exit code 128 + the signal's
    number (143 / 130), as shells and schedulers expect."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # tips and banners, not results
        logging.getLogger(name).setLevel(logging.WARNING)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    try:
        yield
    except ConfigError as e:
        _fail(f"config error: {e}", 2)
    except RunError as e:
        _fail(f"error: {e}", 1)
    except Interrupted as e:  # stops a whole sweep too
        where = f" while {e.where}" if e.where else ""
        print(f"error: stopped by {e}{where}; no results were written; run the same command again to start over",
              file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
