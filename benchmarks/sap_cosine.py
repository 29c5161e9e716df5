"""Cosine between SAP's update gradient and the unsafe direction over training, per setting.

    python benchmarks/sap_cosine.py multirun/evidence/main multirun/evidence/eps ...

Reads each job's csv/metrics.csv (`sap/cos_update_unsafe`, logged every log_every_n_steps)
and prints a markdown table: mean over seeds of the mean cosine in each quarter of training,
with the standard deviation over seeds. > 0: the descent step lowers the safety loss.
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

KEY = "sap/cos_update_unsafe"
IGNORED = ("seed", "logger", "trainer.enable_progress_bar")


def setting(job: Path) -> str:
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    return " ".join(o for o in overrides if o.split("=", 1)[0] not in IGNORED)


def quarters(metrics: Path) -> list[float] | None:
    rows = [(int(r["step"]), float(r[KEY])) for r in csv.DictReader(metrics.open()) if r.get(KEY)]
    if not rows:
        return None
    last = max(s for s, _ in rows) + 1
    bins = defaultdict(list)
    for step, cos in rows:
        bins[min(3, 4 * step // last)].append(cos)
    return [statistics.fmean(bins[q]) for q in range(4)]


def main(sweep_dirs: list[str]) -> None:
    by_setting = defaultdict(list)
    for d in sweep_dirs:
        for metrics in sorted(Path(d).glob("*/csv/metrics.csv")):
            q = quarters(metrics)
            if q is not None:
                by_setting[setting(metrics.parent.parent)].append(q)
    print("| setting | seeds | 1st quarter | 2nd | 3rd | 4th |\n|---|---|---|---|---|---|")
    for name, runs in sorted(by_setting.items()):
        cells = []
        for q in range(4):
            values = [r[q] for r in runs]
            sd = statistics.stdev(values) if len(values) > 1 else float("nan")
            cells.append(f"{statistics.fmean(values):+.3f} ± {sd:.3f}")
        print(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
