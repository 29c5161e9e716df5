"""A compact markdown table from a sweep report's summary.csv: after fine-tuning, one row per
setting, `mean ± std` of each metric and its paired difference vs SFT `[95% interval]`.

    python benchmarks/compact_table.py multirun/evidence/all/summary.csv \\
        harmful_score refusal_margin refusal_margin/sequence val/harmful_score fine_tune_accuracy
"""

from __future__ import annotations

import csv
import sys


def fmt(x: str, digits: int) -> str:
    return "–" if x in ("", None) else f"{float(x):.{digits}f}"


def main(path: str, metrics: list[str]) -> None:
    rows = [r for r in csv.DictReader(open(path)) if r["stage"] == "after"]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    cells = {(r["setting"], r["metric"]): r for r in rows}
    print("| setting | n | " + " | ".join(f"{m} | Δ vs SFT" for m in metrics) + " |")
    print("|---|---|" + "---|---|" * len(metrics))
    for s in settings:
        n = max((int(cells[s, m]["n"]) for m in metrics if (s, m) in cells), default=0)
        out = []
        for m in metrics:
            r = cells.get((s, m))
            d = 1 if "score" in m or "accuracy" in m or "compliance" in m else 2
            if r is None:
                out += ["–", "–"]
                continue
            out.append(f"{fmt(r['mean'], d)} ± {fmt(r['std'], d)}")
            diff = r["diff_vs_sft_mean"]
            out.append("–" if diff == "" else
                       f"{float(diff):+.{d}f} [{fmt(r['diff_vs_sft_ci95_low'], d)}, {fmt(r['diff_vs_sft_ci95_high'], d)}]")
        print(f"| {s} | {n} | " + " | ".join(out) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
