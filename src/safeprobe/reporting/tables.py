"""summary.csv (long format, every metric), jobs.csv (every job folder) and summary.md."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from safeprobe.reporting.aggregate import MAIN_METRICS, Group, Summary
from safeprobe.reporting.jobs import override_key
from safeprobe.reporting.stats import Stat

TITLES = {"harmful_score": "harmful score (%)", "refusal_rate": "refusals (%)", "unusable_rate": "unusable (%)",
          "refusal_margin": "refusal margin", "fine_tune_accuracy": "fine-tune accuracy (%)", "test_loss": "test loss"}
DECIMALS = {"harmful_score": 1, "refusal_rate": 1, "unusable_rate": 1, "fine_tune_accuracy": 1}  # percentages; else 3


def _num(x: float) -> float | None:
    """NaN as an empty CSV cell / W&B null rather than the string 'nan'."""
    return None if x is None or math.isnan(x) else round(x, 6)


def _setting_columns(summary: Summary, group: Group) -> dict[str, str]:
    values = {override_key(s): s.split("=", 1)[1] if "=" in s else s for s in group.settings}
    return {k: values.get(k, "") for k in summary.varying}


def summary_rows(summary: Summary) -> list[dict]:
    """One row per group x stage x metric, with the paired difference vs SFT where it exists."""
    rows = []
    for g in summary.groups:
        for (stage, metric), st in g.stats.items():
            diff = g.diffs.get((stage, metric))
            rows.append({"setting": g.label, **_setting_columns(summary, g), "method": g.method,
                         "stage": stage, "metric": metric, "n": st.n, "mean": _num(st.mean),
                         "std": _num(st.std), "ci95_low": _num(st.low), "ci95_high": _num(st.high),
                         "seeds": " ".join(map(str, g.seeds)),
                         "diff_vs_sft_n": diff.n if diff else None,
                         "diff_vs_sft_mean": _num(diff.mean) if diff else None,
                         "diff_vs_sft_ci95_low": _num(diff.low) if diff else None,
                         "diff_vs_sft_ci95_high": _num(diff.high) if diff else None})
    return rows


def job_rows(summary: Summary) -> list[dict]:
    """Every job folder found, with its status, the reason when it is not counted, and its after-metrics."""
    labels = {g.settings: g.label for g in summary.groups}
    rows = []
    for j in summary.jobs:
        after = (j.results or {}).get("after") or {}
        rows.append({"job_dir": str(j.path), "setting": labels.get(j.settings, ", ".join(j.settings)),
                     "method": j.method, "seed": j.seed, "status": j.status, "problem": j.problem or "",
                     **{f"after/{m}": after.get(m) for m in MAIN_METRICS}})
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _fmt(x: float, metric: str) -> str:
    return f"{x:.{DECIMALS.get(metric, 3)}f}"


def cell(st: Stat | None, metric: str) -> str:
    """`mean ± std [low, high]`; a dash where there is nothing, the mean alone for one seed."""
    if st is None or st.n == 0:
        return "–"
    if st.n == 1:
        return f"{_fmt(st.mean, metric)} (n=1)"
    return f"{_fmt(st.mean, metric)} ± {_fmt(st.std, metric)} [{_fmt(st.low, metric)}, {_fmt(st.high, metric)}]"


def diff_cell(st: Stat | None, metric: str) -> str:
    """`mean [low, high] (n pairs)` of a paired difference."""
    if st is None or st.n == 0:
        return "–"
    sign = "+" if st.mean > 0 else ""
    if st.n == 1:
        return f"{sign}{_fmt(st.mean, metric)} (1 pair)"
    return f"{sign}{_fmt(st.mean, metric)} [{_fmt(st.low, metric)}, {_fmt(st.high, metric)}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(r) + " |" for r in rows]]


def means_table(summary: Summary) -> list[str]:
    header = ["setting", "stage", "n", *(TITLES[m] for m in MAIN_METRICS)]
    rows = []
    for g in summary.groups:
        for stage in ("before", "after"):
            stats = [g.stats.get((stage, m)) for m in MAIN_METRICS]
            n = max((s.n for s in stats if s), default=0)
            rows.append([g.label, stage, str(n), *(cell(s, m) for s, m in zip(stats, MAIN_METRICS, strict=True))])
    return _table(header, rows)


def diffs_table(summary: Summary) -> list[str]:
    groups = [g for g in summary.groups if g.diffs]
    if not groups:
        return ["No paired differences: no SFT group with the same other settings and seeds."]
    header = ["setting", "vs", "pairs", *(f"Δ {TITLES[m]}" for m in MAIN_METRICS)]
    rows = []
    for g in groups:
        stats = [g.diffs.get(("after", m)) for m in MAIN_METRICS]
        pairs = max((s.n for s in stats if s), default=0)
        rows.append([g.label, g.reference.label, str(pairs),
                     *(diff_cell(s, m) for s, m in zip(stats, MAIN_METRICS, strict=True))])
    return _table(header, rows)


VAL_METRICS = ("val/harmful_score", "val/refusal_margin")


def val_table(summary: Summary) -> list[str]:
    """After fine-tuning, on the validation harmful split: the numbers to choose settings by."""
    header = ["setting", "n", *(TITLES[m[4:]] for m in VAL_METRICS), *(f"Δ {TITLES[m[4:]]} vs SFT" for m in VAL_METRICS)]
    rows = []
    for g in summary.groups:
        stats = [g.stats.get(("after", m)) for m in VAL_METRICS]
        diffs = [g.diffs.get(("after", m)) for m in VAL_METRICS]
        n = max((st.n for st in stats if st), default=0)
        rows.append([g.label, str(n), *(cell(st, m[4:]) for st, m in zip(stats, VAL_METRICS, strict=True)),
                     *(diff_cell(d, m[4:]) for d, m in zip(diffs, VAL_METRICS, strict=True))])
    return _table(header, rows)


def problems_list(summary: Summary) -> list[str]:
    if not summary.problems:
        return ["None: every job folder has results."]
    return [f"- `{j.path}` ({j.status}): {j.problem}" for j in summary.problems]


def markdown(summary: Summary) -> str:
    used = sum(j.used for j in summary.jobs)
    lines = ["# Sweep summary", "",
             "Sweep folder(s): " + ", ".join(f"`{d}`" for d in summary.sweep_dirs),
             f"Jobs: {len(summary.jobs)} found, {used} counted, {len(summary.problems)} listed below.",
             "Settings shared by all groups: " + (", ".join(f"`{s}`" for s in summary.common) or "none"), "",
             "Cells: mean ± standard deviation over seeds [95% Student-t interval]; n = number of seeds.", "",
             *means_table(summary), "",
             "## Paired differences vs SFT (after fine-tuning)", "",
             "Method minus SFT, seed by seed over the seeds both have: mean [95% interval].", "",
             *diffs_table(summary), "",
             *(["## Validation split (choose settings here; report the test split above)", "", *val_table(summary), ""]
               if any(("after", VAL_METRICS[0]) in g.stats for g in summary.groups) else []),
             "## Failed or missing jobs", "", *problems_list(summary), "",
             "## Machines and versions", "", *environment_list(summary), ""]
    return "\n".join(lines)


def environment_list(summary: Summary) -> list[str]:
    warnings = summary.environment_warnings()
    if not warnings:
        return ["Every counted job ran on the same kernel path (CPU, SIMD capability, threads, GPU, kernel "
                "variables), with the same packages and commit, from the same starting weights per model."]
    return ["**Warning**: the counted jobs differ in what decides the last bits of their numbers, so they agree "
            "only statistically, not bit for bit (docs/reproducibility.md):", "",
            *(f"- {w}" for w in warnings)]
