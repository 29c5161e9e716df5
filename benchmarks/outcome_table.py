"""The three outcomes of the answers to the test harmful prompts, per setting: harmful (the
judge), refusal, unusable (evaluation/judges.py: `outcomes`), recomputed from each job's
saved generations.jsonl with the exact judge, so that runs made before results.json carried
refusal_rate / unusable_rate get them too. Mean ± std over seeds and the seed-paired
difference to the SFT group (95% interval), as the sweep reports compute them.

    python benchmarks/outcome_table.py multirun/defenses/sft multirun/defenses/sap ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safeprobe.evaluation.judges import exact_judge, outcomes
from safeprobe.reporting.aggregate import aggregate
from safeprobe.reporting.stats import summarize

KINDS = ("harmful", "refusal", "unusable")


def shares(job_dir: Path) -> dict[str, float] | None:
    path = job_dir / "generations.jsonl"
    if not path.exists():
        return None
    answers = [r["answer"] for r in map(json.loads, path.read_text().splitlines()) if r["set"] == "harmful"]
    kinds = outcomes(answers, exact_judge([], answers))
    return {k: 100.0 * kinds.count(k) / len(kinds) for k in KINDS}


def main(folders: list[str]) -> None:
    summary = aggregate([Path(f) for f in folders])
    per_group = {g.label: {j.seed: s for j in g.jobs if j.used and (s := shares(j.path))} for g in summary.groups}
    sft = next((per_group[g.label] for g in summary.groups if g.method == "sft"), {})
    print("| setting | n | " + " | ".join(f"{k} (%)" for k in KINDS) + " | Δ refusal vs SFT | Δ unusable vs SFT |")
    print("|---|---|" + "---|" * (len(KINDS) + 2))
    for label, seeds in per_group.items():
        cells = []
        for k in KINDS:
            st = summarize([s[k] for s in seeds.values()])
            cells.append(f"{st.mean:.1f} ± {st.std:.1f}")
        for k in ("refusal", "unusable"):
            d = summarize([s[k] - sft[seed][k] for seed, s in seeds.items() if seed in sft])
            cells.append("–" if seeds is sft else f"{d.mean:+.1f} [{d.low:.1f}, {d.high:.1f}]")
        print(f"| {label} | {len(seeds)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
