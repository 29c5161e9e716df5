"""One row per setting: harmful score after fine-tuning (test and validation split), mean and
95% interval over seeds, with SFT's interval shaded. Reads a sweep report's summary.csv.

    python benchmarks/settings_plot.py multirun/evidence/all/summary.csv docs/results/synthetic_settings.png \\
        --reference "data=synthetic_instruct, method=sft" --skip synthetic_classify synthetic_poison
"""

from __future__ import annotations

import argparse
import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SPLITS = (("harmful_score", "test", "tab:blue"), ("val/harmful_score", "validation", "tab:orange"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("summary_csv")
    p.add_argument("out_png")
    p.add_argument("--reference", required=True, help="label of the SFT group, shaded")
    p.add_argument("--skip", nargs="*", default=[], help="leave out settings containing these strings")
    a = p.parse_args()
    rows = [r for r in csv.DictReader(open(a.summary_csv)) if r["stage"] == "after"]
    cell = {(r["setting"], r["metric"]): r for r in rows}
    settings = [s for s in dict.fromkeys(r["setting"] for r in rows) if not any(k in s for k in a.skip)]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(settings) + 1.5))
    for offset, (metric, name, color) in zip((-0.15, 0.15), SPLITS, strict=True):
        ref = cell[a.reference, metric]
        ax.axvspan(float(ref["ci95_low"]), float(ref["ci95_high"]), color=color, alpha=0.08)
        for i, s in enumerate(settings):
            r = cell.get((s, metric))
            if r is None:
                continue
            mean, lo, hi = float(r["mean"]), float(r["ci95_low"]), float(r["ci95_high"])
            ax.errorbar(mean, i + offset, xerr=[[mean - lo], [hi - mean]], fmt="o", color=color, capsize=3,
                        label=name if i == 0 else None)
    ax.set_yticks(range(len(settings)), [s.replace("method=", "").replace("data=synthetic_", "") for s in settings])
    ax.invert_yaxis()
    ax.set_xlabel("harmful score after fine-tuning (%): mean, 95% interval over seeds (shaded: SFT)")
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.out_png, dpi=110)


if __name__ == "__main__":
    main()
