"""Entry points shared by train.py and eval.py: one-line config errors, Hydra mains."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager

from safeprobe.config import ConfigError, RunError, check_cli_overrides


def config_error(e: Exception) -> None:
    print(f"config error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


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
    line and exit code 1; SIGTERM / Ctrl-C -> one line saying where the run stopped, exit code
    128 + the signal's number (143 / 130), as shells and schedulers expect."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # tips and banners, not results
        logging.getLogger(name).setLevel(logging.WARNING)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    try:
        yield
    except ConfigError as e:
        config_error(e)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Interrupted as e:
        where = f" while {e.where}" if e.where else ""
        print(f"error: stopped by {e}{where}; no results were written; run the same command again to start over",
              file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
