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
    from safeprobe import distributed

    if not distributed.is_writer():  # a rank > 0 of a job on several processes: rank 0 records it
        return
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


def run_rank() -> bool:
    """A rank > 0 that Lightning started for a run's fit (it runs the command again, with the
    writer's config in SAFEPROBE_RUN_CONFIG): run the saved config, skipping Hydra (no second
    sweep, no log file), and return True; False for any other process (a rank > 0 that a
    scheduler started composes with Hydra, told to write neither .hydra/ nor a log file).
    An expected stop (a config or run error, SIGTERM / Ctrl-C) is one line on stderr and exit
    status 0: the writer reports the run's outcome, and Lightning stops every process when a
    rank ends otherwise."""
    import os

    from safeprobe import distributed

    config = os.environ.get(distributed.RUN_CONFIG)
    if distributed.is_writer():
        return False
    if not config:  # started by a scheduler (srun, torchrun): Hydra composes, but writes nothing here either
        given = [a.split("=")[0].lstrip("+~") for a in sys.argv[1:]]
        sys.argv += [o for o in ("hydra.output_subdir=null", "hydra/job_logging=stdout") if o.split("=")[0] not in given]
        return False
    from omegaconf import OmegaConf

    from safeprobe.pipeline import run

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # as the writer's (one_line_errors)
        logging.getLogger(name).setLevel(logging.WARNING)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    try:
        run(OmegaConf.load(config))
    except (ConfigError, RunError, Interrupted) as e:
        print(f"rank {distributed.rank_from_environment()}: stopped ({type(e).__name__}: {e})", file=sys.stderr,
              flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return True


class Interrupted(BaseException):
    """SIGTERM (SLURM, Docker, spot instances) or Ctrl-C: the run stops where it is. A
    BaseException, so that nothing on the way catches it as an error of its own; `where` (the
    phase) and `resume` (how to continue, when a checkpoint exists) are filled in by the pipeline."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.where, self.resume = signum, None, None


_between_steps = {"on": False, "signum": None}


def _stop(signum, frame):
    if _between_steps["on"] and _between_steps["signum"] is None:
        _between_steps["signum"] = signum  # checkpoint.Checkpoints saves and stops after this step
        return
    raise Interrupted(signum)


@contextmanager
def stop_between_steps():
    """Inside: the first SIGTERM / Ctrl-C is held until the current training step ends (see
    `pending_stop`), so that a checkpoint can be saved; a second one stops at once."""
    _between_steps.update(on=True, signum=None)
    try:
        yield
    except SystemExit as e:  # Lightning's SIGTERMException (a SystemExit with status 0), should its handler see it
        if type(e).__name__ != "SIGTERMException":
            raise
        raise Interrupted(_between_steps["signum"] or signal.SIGTERM) from None
    finally:
        _between_steps["on"] = False
    if _between_steps["signum"] is not None:  # arrived after the last step
        raise Interrupted(_between_steps["signum"])


def hold_signals() -> None:
    """(Re)install the handler that holds SIGTERM / Ctrl-C until the current step ends (main
    thread only), in place of the one Lightning installs at the start of fit. Lightning's raises
    SIGTERMException, a SystemExit with status 0, at the end of the step: a stopped run would end
    as a success, without its checkpoint and its line; on several processes it broadcasts from
    inside the handler, which deadlocks a rank that is in another collective at that moment."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, _stop)


def pending_stop() -> int | None:
    """The held signal's number, if one arrived."""
    return _between_steps["signum"]


def _lightning_misconfigured(e: Exception) -> bool:
    """Lightning's MisconfigurationException (e.g. trainer.accelerator=gpu on a machine without
    one; checked when the Trainer is built), without importing Lightning here."""
    module = sys.modules.get("lightning.fabric.utilities.exceptions")
    return module is not None and isinstance(e, module.MisconfigurationException)


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
    except Exception as e:
        if not _lightning_misconfigured(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _fail(f"config error: lightning rejected the trainer settings ({first}); allowed: settings this machine can run, "
              "e.g. trainer=cpu", 2)
    except Interrupted as e:  # stops a whole sweep too
        where = f" while {e.where}" if e.where else ""
        then = e.resume or "no results were written; run the same command again to start over"
        print(f"error: stopped by {e}{where}; {then}", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
