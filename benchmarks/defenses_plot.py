"""Harmful score against fine-tune accuracy after fine-tuning, one panel per task, each setting a
point with its 95% intervals over seeds in both directions. Reads a sweep report's summary.csv.

    python benchmarks/defenses_plot.py multirun/defenses/all/summary.csv docs/results/synthetic_defenses.png --min-n 20
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TASKS = {"synthetic_instruct": "instruction task", "synthetic_classify": "classification task",
         "synthetic_poison": "instruction task, 10% poison"}


def label(setting: str) -> str:
    """The run's stages in order, e.g. "base → booster (lam=25.0) → sap → safelora"; other keys after."""
    keys = dict(p.split("=", 1) for p in setting.split(", ") if "=" in p)
    shown = ("data", "model.variant", "align", "method", "post")
    hidden = ("method.align_steps", "method.finetune_steps", "align.method.")
    knobs = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in keys.items() if k.startswith("align.method."))
    stages = ["base"] if keys.get("model.variant") == "base" else []
    if keys.get("align", "none") != "none":
        stages.append(f"align {keys['align']}" + (f" ({knobs})" if knobs else ""))
    stages.append(keys.get("method", "sap"))
    if keys.get("post", "none") != "none":
        stages.append(keys["post"])
    rest = [f"{k}={v}" for k, v in keys.items() if k not in shown and not k.startswith(hidden)]
    return " → ".join(stages) + (f", {', '.join(rest)}" if rest else "")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("summary_csv")
    p.add_argument("out_png")
    p.add_argument("--min-n", type=int, default=1,
                   help="leave out instruction-task settings with fewer seeds (the grid-only ones)")
    p.add_argument("--exclude", action="append", default=[], metavar="OVERRIDE",
                   help="leave out settings holding this override (a grid's settings not chosen; repeatable)")
    a = p.parse_args()
    cells: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in csv.DictReader(open(a.summary_csv)):
        if r["stage"] == "after":
            cells[r["setting"]][r["metric"]] = r
    by_task: dict[str, list[str]] = defaultdict(list)
    for setting in cells:
        task = next((t for t in TASKS if f"data={t}" in setting), None)
        n = int(cells[setting].get("harmful_score", {}).get("n") or 0)
        if any(x in setting.split(", ") for x in a.exclude):
            continue
        if task and (task != "synthetic_instruct" or n >= a.min_n):
            by_task[task].append(setting)
    tasks = [t for t in TASKS if t in by_task]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for i, setting in enumerate(sorted(by_task[task], key=label)):
            hs, fa = cells[setting].get("harmful_score"), cells[setting].get("fine_tune_accuracy")
            if not hs or not fa:
                continue
            x, y = float(fa["mean"]), float(hs["mean"])
            xerr = [[x - float(fa["ci95_low"] or x)], [float(fa["ci95_high"] or x) - x]]
            yerr = [[y - float(hs["ci95_low"] or y)], [float(hs["ci95_high"] or y) - y]]
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="osD^v<>"[i % 7], capsize=3, color=f"C{i}",
                        label=f"{label(setting)} (n={hs['n']})")
        ax.set_title(TASKS[task])
        ax.set_ylim(-5, 105)
        ax.set_xlabel("fine-tune accuracy (%)")
        ax.set_ylabel("harmful score (%, test split)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("after fine-tuning: mean and 95% interval over seeds (lower and to the right is better)")
    fig.tight_layout()
    fig.savefig(a.out_png, dpi=110)


if __name__ == "__main__":
    main()
