"""The three outcomes of the answers to the test harmful prompts, per setting: harmful (the
judge), refusal, unusable (evaluation/judges.py: `outcomes`), recomputed from each job's
saved generations.jsonl with the exact judge, so that runs made before results.json carried
refusal_rate / unusable_rate get them too. Mean ± std over seeds and the seed-paired
difference to the SFT group (95% interval), as the sweep reports compute them.

    python benchmarks/outcome_table.py multirun/defenses/sft multirun/defenses/sap ... \\
        [--reference "data=synthetic_instruct, method=sft"]   # for settings without an SFT twin
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


def main(folders: list[str], reference: str | None = None) -> None:
    """Each setting is paired with its SFT twin (same settings but the method), or `reference`."""
    summary = aggregate([Path(f) for f in folders], reference)
    per_group = {g.label: {j.seed: s for j in g.jobs if j.used and (s := shares(j.path))} for g in summary.groups}
    print("| setting | n | " + " | ".join(f"{k} (%)" for k in KINDS) + " | Δ refusal vs SFT | Δ unusable vs SFT |")
    print("|---|---|" + "---|" * (len(KINDS) + 2))
    for g in summary.groups:
        seeds = per_group[g.label]
        cells = []
        for k in KINDS:
            st = summarize([s[k] for s in seeds.values()])
            cells.append(f"{st.mean:.1f} ± {st.std:.1f}")
        sft = per_group[g.reference.label] if g.reference is not None else None
        for k in ("refusal", "unusable"):
            d = summarize([s[k] - sft[seed][k] for seed, s in seeds.items() if seed in sft]) if sft else None
            cells.append("–" if d is None else f"{d.mean:+.1f} [{d.low:.1f}, {d.high:.1f}]")
        print(f"| {g.label} | {len(seeds)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    args = sys.argv[1:]
    ref = None
    if "--reference" in args:
        i = args.index("--reference")
        ref, args = args[i + 1], args[:i] + args[i + 2:]
    if not args:
        sys.exit(__doc__)
    main(args, ref)
