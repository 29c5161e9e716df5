"""One extra W&B run per sweep (job_type "summary") in the sweep's group: tables and the plot.

The jobs of a multirun are grouped in W&B by their sweep folder (`pipeline._hydra_job`);
the summary run joins that group so the aggregate sits next to the runs it summarizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from safeprobe.reporting.aggregate import Summary
from safeprobe.reporting.tables import job_rows, summary_rows


@dataclass
class WandbTarget:
    """Where the summary run goes; mode None follows tracking.wandb_mode (offline unless logged in)."""

    group: str
    project: str = "safeprobe"
    entity: str | None = None
    mode: str | None = None
    tags: list[str] = field(default_factory=list)


def sweep_group(sweep_dir: str | Path) -> str:
    """The W&B group of a sweep's jobs: must match `pipeline._hydra_job`."""
    return Path(sweep_dir).as_posix().replace("/", "_")


def _table(rows: list[dict]):
    import wandb

    columns = list(dict.fromkeys(k for r in rows for k in r))
    return wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows], allow_mixed_types=True)


def log_summary(summary: Summary, out_dir: Path, plot_path: Path | None, target: WandbTarget) -> Path:
    """Log the summary run (its files under out_dir/wandb/) and return its local folder."""
    import wandb

    from safeprobe.tracking import wandb_mode

    config = {"sweep_dirs": [str(d) for d in summary.sweep_dirs], "jobs": len(summary.jobs),
              "counted": sum(j.used for j in summary.jobs), "listed": len(summary.problems)}
    run = wandb.init(project=target.project, entity=target.entity, group=target.group, job_type="summary",
                     name="summary", dir=str(out_dir), mode=wandb_mode(target.mode), tags=list(target.tags),
                     config=config)
    failed = True
    try:
        logged = {"summary/table": _table(summary_rows(summary)), "summary/jobs": _table(job_rows(summary))}
        if plot_path is not None:
            logged["summary/plot"] = wandb.Image(str(plot_path))
        run.log(logged)
        run.summary.update(config)
        failed = False
    finally:
        run.finish(exit_code=1 if failed else 0)
    return Path(run.dir).parent
