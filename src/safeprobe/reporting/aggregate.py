"""Group a sweep's jobs by their settings and summarize every metric over seeds.

A group is the set of jobs whose overrides agree once `seed` (and bookkeeping such as
paths) is removed. Next to each group's means, the paired difference against SFT (the group
whose overrides differ only in `method=sft`) is computed seed by seed: seeds share data
order and initialization, so the paired interval is much tighter than comparing two means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from safeprobe.reporting.environments import environment_differences
from safeprobe.reporting.jobs import Job, collect, override_key
from safeprobe.reporting.stats import Stat, summarize

STAGES = ("before", "after", "before_repair", "train")
MAIN_METRICS = ("harmful_score", "refusal_rate", "unusable_rate", "refusal_margin", "fine_tune_accuracy", "test_loss")
REFERENCE = "sft"


@dataclass
class Group:
    settings: tuple[str, ...]
    jobs: list[Job]
    label: str = ""
    stats: dict[tuple[str, str], Stat] = field(default_factory=dict)
    diffs: dict[tuple[str, str], Stat] = field(default_factory=dict)  # (method - SFT) per seed
    reference: Group | None = None

    @property
    def method(self) -> str | None:
        return self.jobs[0].method if self.jobs else None

    @property
    def seeds(self) -> list[int]:
        return sorted(j.seed for j in self.jobs if j.seed is not None)

    def values(self, stage: str, metric: str) -> dict[int | None, float]:
        """seed -> value of one metric (jobs without a seed keyed by position)."""
        out = {}
        for i, job in enumerate(self.jobs):
            value = (job.results.get(stage) or {}).get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[job.seed if job.seed is not None else f"#{i}"] = float(value)
        return out


@dataclass
class Summary:
    sweep_dirs: list[Path]
    jobs: list[Job]
    groups: list[Group]
    common: tuple[str, ...]  # settings shared by every group, shown once
    varying: tuple[str, ...]  # keys that tell groups apart

    @property
    def problems(self) -> list[Job]:
        return [j for j in self.jobs if j.problem]

    def environment_warnings(self) -> list[str]:
        """What differs between the counted jobs' machines, packages, code or starting weights
        (such jobs agree only statistically, not bit for bit: docs/reproducibility.md)."""
        used = [j for j in self.jobs if j.used and j.environment]
        lines = environment_differences({str(j.path.name): j.environment for j in used})
        by_start: dict[str, dict[str, str]] = {}
        for j in used:
            by_start.setdefault(j.start, {})[j.path.name] = j.environment.get("start_weights_sha256")
        for names in by_start.values():
            if len({v for v in names.values() if v}) > 1:
                lines.append("starting weights (sha256) differ between jobs with the same model and alignment "
                             "settings: " + ", ".join(f"{v and v[:12]} ({n})" for n, v in names.items()))
        return lines


def _group_jobs(jobs: list[Job]) -> list[Group]:
    """Groups in order of first appearance (Hydra's job order)."""
    groups: dict[tuple[str, ...], Group] = {}
    for job in jobs:
        if job.used:
            groups.setdefault(job.settings, Group(job.settings, [])).jobs.append(job)
    return list(groups.values())


def _label(groups: list[Group]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(settings common to all groups, keys that vary); each group's label lists the varying ones."""
    common = tuple(s for s in groups[0].settings if all(s in g.settings for g in groups)) if groups else ()
    varying = []
    for g in groups:
        own = [s for s in g.settings if s not in common]
        g.label = ", ".join(own) or "all jobs"
        varying += [override_key(s) for s in own if override_key(s) not in varying]
    return common, tuple(varying)


def _setting(g: Group, group: str) -> str | None:
    """The option a group chose for a config group (align, post), None when left at none."""
    value = next((s.split("=", 1)[1] for s in g.settings if override_key(s) == group), None)
    return None if value in (None, "none", "null") else value


def _is_control(g: Group) -> bool:
    """Plain SFT fine-tuning, after no alignment stage or the plain (SFT) one, with no repair."""
    return g.method == REFERENCE and _setting(g, "align") in (None, REFERENCE) and _setting(g, "post") is None


def _link_references(groups: list[Group], fallback: str | None = None) -> None:
    """Point each group at its matching SFT control: the same settings apart from the defense's
    own (method, method.*, post, post.*, align, align.method.*), with plain SFT fine-tuning,
    no repair, and the plain alignment stage (align=sft) when the group had one — the
    alignment-stage defenses' control in their papers — or none when it had none.
    Groups without one (e.g. an ablation swept apart from its SFT runs) get the group labelled
    `fallback`, when given."""
    def context(g: Group) -> tuple[str, ...]:  # the settings apart from the defense
        def own(key: str) -> bool:
            return key.split(".")[0] in ("method", "post") or key == "align" or key.startswith("align.method")
        return tuple(s for s in g.settings if not own(override_key(s)))

    controls = {(context(g), _setting(g, "align")): g for g in groups if _is_control(g)}
    default = None
    if fallback is not None:
        default = next((g for g in groups if g.label == fallback), None)
        if default is None:
            raise ValueError(f"reference {fallback!r} is not a group; groups: " + "; ".join(g.label for g in groups))
    for g in groups:
        if not _is_control(g):
            stage = REFERENCE if _setting(g, "align") is not None else None
            g.reference = controls.get((context(g), stage)) or default


def _ordered(found: set[str]) -> list[str]:
    """The four main metrics first, then any other (per-judge harmful scores, timings)."""
    return [m for m in MAIN_METRICS if m in found] + sorted(found - set(MAIN_METRICS))


def _summarize(group: Group) -> None:
    for stage in STAGES:
        metrics = {m for job in group.jobs for m in (job.results.get(stage) or {})}
        for metric in _ordered(metrics):
            values = group.values(stage, metric)
            if not values:
                continue
            group.stats[stage, metric] = summarize(list(values.values()))
            if group.reference is not None:
                ref = group.reference.values(stage, metric)
                paired = [values[s] - ref[s] for s in values if s in ref and isinstance(s, int)]
                group.diffs[stage, metric] = summarize(paired)


def aggregate(sweep_dirs: list[Path | str], reference: str | None = None) -> Summary:
    """Read every job under the sweep folders and summarize each group's metrics
    (`reference`: the label of the group to compare groups without an SFT twin with)."""
    dirs = [Path(d) for d in sweep_dirs]
    jobs = collect(dirs)
    groups = _group_jobs(jobs)
    common, varying = _label(groups)
    _link_references(groups, reference)
    for g in groups:
        _summarize(g)
    return Summary(dirs, jobs, groups, common, varying)
