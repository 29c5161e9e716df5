"""Sweep reports: aggregate a multirun's results.json files over seeds into tables, a plot and W&B.

    python -m safeprobe.reporting <sweep_dir> [<sweep_dir> ...] [--no-wandb]

and, at the end of every `train.py -m`, the Hydra callback in `callback.py`.
"""

from safeprobe.reporting.aggregate import Summary, aggregate
from safeprobe.reporting.report import write_report
from safeprobe.reporting.wandb_summary import WandbTarget, sweep_group

__all__ = ["Summary", "WandbTarget", "aggregate", "sweep_group", "write_report"]
