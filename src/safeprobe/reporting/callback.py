"""Hydra callback: write the sweep report at the end of every multirun (conf/hydra/default.yaml).

The report is written once, by the process that launched the sweep, after all its jobs. Hydra
calls `on_multirun_start` / `on_multirun_end` only there; a launcher that runs jobs in other
processes (joblib, submitit: conf/hydra/launcher/) sends them a pickled copy of this callback,
which gets `on_job_start` / `on_job_end` only. That copy is made without the pending report
(`__getstate__`) and checks the process it is in, so a worker never reports: it only keeps
its failed job's error next to the job.

Hydra calls `on_multirun_end` only when every job succeeded: when a job raises, the sweep
re-raises after the batch and exits with status 1 without calling it. That is exactly the
sweep whose report matters most (which jobs failed?), so the launching process also registers
the report to run at interpreter exit when `on_multirun_end` never came; the exit status stays
Hydra's. Reporting errors are logged, never raised: a broken report must not turn a good sweep
red, and it cannot turn a failed sweep green.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import traceback
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from safeprobe.reporting.jobs import ERROR_FILE, find_job_dirs
from safeprobe.reporting.report import write_report
from safeprobe.reporting.wandb_summary import WandbTarget, sweep_group

log = logging.getLogger(__name__)


def _this_process() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()


def _raised(job_dir: Path) -> bool:
    """The job raised: on_job_end kept its traceback (a job's one-line stop, cli._fail, writes its line)."""
    try:
        return (job_dir / ERROR_FILE).read_text().startswith("Traceback")
    except OSError:
        return False


def wandb_target(config: DictConfig, sweep_dir: str) -> WandbTarget | None:
    """The sweep's own W&B settings (logger.wandb); None when the sweep logs no W&B."""
    w = OmegaConf.select(config, "logger.wandb")
    if w is None or not w.get("enabled", False):
        return None
    return WandbTarget(group=sweep_group(sweep_dir), project=w.get("project") or "safeprobe",
                       entity=w.get("entity"), mode=w.get("mode"), tags=list(w.get("tags") or []))


class SweepReport(Callback):
    """Aggregates the multirun's results.json files into the sweep folder (and W&B)."""

    def __init__(self, wandb: bool = True) -> None:
        self.wandb = wandb  # False: files only, even when the sweep logs to W&B
        self._pending: tuple[Path, WandbTarget | None] | None = None
        self._launcher: tuple[str, int] | None = None  # (host, pid) of the process that launched the sweep

    def __getstate__(self) -> dict:
        """The copy a launcher sends to a worker process carries no report to write."""
        return {**self.__dict__, "_pending": None}

    def _launching(self) -> bool:
        """True in the process that launched the sweep while its report is still to write."""
        return self._pending is not None and self._launcher == _this_process()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = str(config.hydra.sweep.dir)
        self._pending = (Path(sweep_dir), wandb_target(config, sweep_dir) if self.wandb else None)
        self._launcher = _this_process()
        if self._pending[1] is not None:
            # imported now, not at exit: with jobs in other processes this one has not imported W&B,
            # and W&B's import starts thread pools, which Python refuses once it is shutting down
            import wandb  # noqa: F401
        atexit.register(self._report_unfinished)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """Keep a failed job's error next to it, so the report can say why it has no results."""
        if self._launching():  # the job ran in this process (Hydra's basic launcher)
            # atexit runs the last registered first; a job's W&B registers its own shutdown
            # while it runs, and the summary run must start before that shutdown.
            atexit.unregister(self._report_unfinished)
            atexit.register(self._report_unfinished)
        if job_return.status != JobStatus.FAILED:
            return
        error = getattr(job_return, "_return_value", None)  # `.return_value` re-raises it
        try:
            out = Path(job_return.hydra_cfg.hydra.runtime.output_dir)
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            (out / ERROR_FILE).write_text(text)
        except Exception:  # bookkeeping must not mask the job's own failure
            log.exception("could not record the failure of a job")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        problems = self._report()
        if problems:  # jobs that stopped with their one line (cli._fail) let the sweep go on; its status says so
            raise SystemExit(1)

    def _report_unfinished(self) -> None:
        """At exit without `on_multirun_end`: a job raised (Hydra then skips the callback), or the
        sweep was stopped (Ctrl-C, SIGTERM, a launcher's own error) with jobs perhaps not run."""
        if not self._launching():
            return
        sweep_dir = self._pending[0]
        raised = [d for d in find_job_dirs(sweep_dir) if _raised(d)] if sweep_dir.is_dir() else []
        if raised:
            log.warning("%d job(s) raised, so Hydra skipped its end-of-sweep callback: reporting at exit",
                        len(raised))
        else:
            log.error("multirun ended early (interrupted, or the launcher failed): reporting the jobs there are")
        self._report()

    def _report(self) -> int:
        """Write the report; the number of jobs without usable results."""
        if not self._launching():
            return 0
        sweep_dir, target = self._pending
        self._pending = None
        problems = [d for d in find_job_dirs(sweep_dir) if (d / ERROR_FILE).exists()]
        try:
            if not find_job_dirs(sweep_dir):
                log.warning("sweep report skipped: no job folders under %s", sweep_dir)
                return 0
            if target is None:
                log.info("no W&B summary run (logger.wandb.enabled or hydra.callbacks.sweep_report.wandb is false)")
            summary, written = write_report([sweep_dir], wandb=target)
        except Exception:  # see the module docstring
            log.exception("sweep report failed; the jobs' results are untouched. Retry with: "
                          "python -m safeprobe.reporting %s", sweep_dir)
            return len(problems)
        print("\n" + (sweep_dir / "summary.md").read_text(), flush=True)
        log.info("sweep report: %s", ", ".join(map(str, written)))
        if summary.problems:
            log.error("%d job(s) without usable results, listed in %s", len(summary.problems),
                      sweep_dir / "summary.md")
        return len(summary.problems)
