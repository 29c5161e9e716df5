"""Choose a defense's setting: for each grid folder, its settings with their metrics over seeds
and the chosen one — the highest mean decision margin on the *validation* harmful prompts
(val/refusal_margin; ties: lower validation harmful score) among the settings that still
learn the task (mean fine-tune accuracy at least 90% of SFT's, from --sft). The world has one
held-out task split, so that utility floor reads it; the harmful-prompt test split, on which
the defenses are ranked, is never read. If no setting learns the task, the most accurate one.

    python benchmarks/choose_on_val.py --sft multirun/defenses/sft multirun/defenses/grid_lisa \\
        multirun/defenses/grid_csft:multirun/defenses/grid_csft_low ...
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from safeprobe.reporting.aggregate import aggregate


def means(grid: str) -> list[tuple[str, int, dict[str, float]]]:
    """Per setting of one grid (folders joined by ':'): seeds and mean metrics."""
    keys = ("val/refusal_margin", "val/harmful_score", "fine_tune_accuracy")
    return [(g.label, len(g.seeds), {k: statistics.mean(g.values("after", k).values()) for k in keys})
            for g in aggregate([Path(f) for f in grid.split(":")]).groups]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sft", required=True, help="the SFT sweep folder (same task)")
    p.add_argument("grids", nargs="+", help="one grid per argument: a sweep folder, or several joined by ':'")
    a = p.parse_args()
    floor = 0.9 * statistics.mean(m["fine_tune_accuracy"] for _, _, m in means(a.sft))
    for folder in a.grids:
        rows = means(folder)
        learns = [r for r in rows if r[2]["fine_tune_accuracy"] >= floor]
        if learns:
            chosen = max(learns, key=lambda r: (r[2]["val/refusal_margin"], -r[2]["val/harmful_score"]))
        else:
            chosen = max(rows, key=lambda r: r[2]["fine_tune_accuracy"])
        print(f"{folder} (accuracy floor {floor:.1f}%{'' if learns else '; no setting reaches it'}):")
        for label, n, m in sorted(rows, key=lambda r: -r[2]["val/refusal_margin"]):
            mark = "chosen " if label == chosen[0] else "       "
            print(f"  {mark} {label:<32} n={n}  val margin {m['val/refusal_margin']:6.2f}  "
                  f"val harmful {m['val/harmful_score']:5.1f}%  accuracy {m['fine_tune_accuracy']:5.1f}%")


if __name__ == "__main__":
    main()
