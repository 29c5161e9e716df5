"""Entry points shared by train.py and eval.py: one-line config errors, Hydra mains."""

from __future__ import annotations

import logging
import sys
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


@contextmanager
def one_line_errors():
    """Inside a Hydra task: ConfigError -> one line on stderr and exit code 2; RunError -> one
    line and exit code 1."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # tips and banners, not results
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    except ConfigError as e:
        config_error(e)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
