"""Aggregate sweep folders and write every output: the one function the callback and the CLI share."""

from __future__ import annotations

import logging
from pathlib import Path

from safeprobe.reporting.aggregate import Summary, aggregate
from safeprobe.reporting.plot import plot
from safeprobe.reporting.tables import job_rows, markdown, summary_rows, write_csv
from safeprobe.reporting.wandb_summary import WandbTarget, log_summary

log = logging.getLogger(__name__)


def write_report(sweep_dirs: list[Path | str], out_dir: Path | str | None = None,
                 wandb: WandbTarget | None = None, reference: str | None = None) -> tuple[Summary, list[Path]]:
    """summary.csv, jobs.csv, summary.md, summary.png into out_dir (default: the first sweep folder).

    `wandb=None` skips W&B; `reference`: see aggregate(). Returns the summary and the files written.
    """
    summary = aggregate(sweep_dirs, reference)
    out = Path(out_dir or sweep_dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "summary.csv", out / "jobs.csv", out / "summary.md"]
    write_csv(written[0], summary_rows(summary))
    write_csv(written[1], job_rows(summary))
    written[2].write_text(markdown(summary))
    plot_path = out / "summary.png"
    if plot(summary, plot_path):
        written.append(plot_path)
    else:
        plot_path = None
        log.warning("summary.png not written: no job has both harmful score and fine-tune accuracy")
    for job in summary.problems:
        log.warning("job %s (%s): %s", job.path, job.status, job.problem)
    for line in summary.environment_warnings():
        log.warning("the compared jobs differ in %s (they agree only statistically)", line)
    if wandb is not None:
        written.append(log_summary(summary, out, plot_path, wandb))
    return summary, written
