"""Find the job folders of one or more sweep folders and read what each job left behind.

A job folder is one holding `.hydra/` (every Hydra job, even one that crashed at once) or
`config.yaml` (written by `pipeline.run` once its checks pass). Every folder found becomes a `Job`,
with or without results, so that nothing is dropped without being listed.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

RESULT_FILES = ("results.json", "eval_results.json")  # train.py, eval.py
ERROR_FILE = "job_error.txt"  # written by the sweep callback when a job raised
# Overrides that do not define a setting: the replicate axis, resuming, and bookkeeping that may
# differ between machines whose sweeps are merged (output folders, loggers, Hydra's own options).
IGNORED_KEYS = ("seed", "resume", "checkpoint_every")
IGNORED_PREFIXES = ("paths.", "logger", "hydra.")


@dataclass
class Job:
    """One job folder. `results` is None when the job has none usable; `problem` says why."""

    path: Path
    overrides: tuple[str, ...]
    seed: int | None
    method: str | None
    results: dict | None
    status: str = "ok"  # ok | failed | missing | unreadable | duplicate
    problem: str | None = None
    environment: dict = field(default_factory=dict)  # environment.json: machine, packages, commit, start weights
    start: str = ""  # the config that decides the starting model (model, align): equal -> same start weights
    settings: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        self.settings = setting_key(self.overrides, self.method)

    @property
    def used(self) -> bool:
        return self.status == "ok" and self.results is not None


def override_key(override: str) -> str:
    """`+probe.eps=0.1` -> `probe.eps`: the config key an override sets."""
    return override.split("=", 1)[0].lstrip("+~")


def setting_key(overrides: tuple[str, ...], method: str | None) -> tuple[str, ...]:
    """The group a job belongs to: its overrides minus seed and bookkeeping, sorted.

    Sorted so that the same settings typed in another order (another machine, a resumed
    sweep) land in the same group. A folder without Hydra overrides falls back to its method.
    """
    kept = sorted(o for o in overrides if override_key(o) not in IGNORED_KEYS
                  and not override_key(o).startswith(IGNORED_PREFIXES))
    if not overrides and method:
        return (f"method={method}",)
    return tuple(kept)


def _natural(path: Path) -> list:
    """Sort `2_...` before `10_...` so jobs list in Hydra's order."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def unreadable_sweep_dirs(sweep_dirs: list[Path]) -> int:
    """The command lines' check of their folders: 0 when each is a folder and jobs are under them;
    else the exit status (2: not a folder, 1: no job), its reason printed on one line."""
    missing = [d for d in sweep_dirs if not d.is_dir()]
    if missing:
        print(f"error: not a folder: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    if not any(find_job_dirs(d) for d in sweep_dirs):
        print(f"error: no job folders (.hydra/ or config.yaml) under {', '.join(map(str, sweep_dirs))}",
              file=sys.stderr)
        return 1
    return 0


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job folder under `sweep_dir` (itself included), not descending into jobs or W&B dirs."""
    found = []
    for root, dirs, files in os.walk(sweep_dir):
        if ".hydra" in dirs or "config.yaml" in files:
            found.append(Path(root))
            dirs.clear()
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "wandb"]
    return sorted(found, key=_natural)


def _load_yaml(path: Path) -> object:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _read_results(path: Path) -> tuple[dict | None, str | None]:
    """(results, None) or (None, why not)."""
    for name in RESULT_FILES:
        f = path / name
        if not f.exists():
            continue
        try:
            results = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            return None, f"{name} unreadable: {e}"
        if not isinstance(results, dict) or not isinstance(results.get("after"), dict):
            return None, f"{name} has no 'after' metrics"
        return results, None
    return None, None


def _override_value(overrides: tuple[str, ...], key: str) -> str | None:
    for o in overrides:
        if override_key(o) == key and "=" in o:
            return o.split("=", 1)[1]
    return None


def _as_int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def read_job(path: Path) -> Job:
    """A job with its overrides, seed, method and results, or the reason it has no results."""
    raw = _load_yaml(path / ".hydra" / "overrides.yaml")
    overrides = tuple(str(o) for o in raw) if isinstance(raw, list) else ()
    config = _load_yaml(path / "config.yaml")
    config = config if isinstance(config, dict) else {}
    results, unreadable = _read_results(path)
    error = (path / ERROR_FILE).read_text().strip().splitlines() if (path / ERROR_FILE).exists() else None
    info = results or {}
    method = info.get("method") or (config.get("method") or {}).get("name") or _override_value(overrides, "method")
    seed = _as_int(info.get("seed", config.get("seed", _override_value(overrides, "seed"))))
    job = Job(path, overrides, seed, method, results)
    try:
        job.environment = json.loads((path / "environment.json").read_text())
    except (OSError, json.JSONDecodeError):
        pass
    job.start = json.dumps([config.get("model"), config.get("align")], sort_keys=True)
    if unreadable:
        job.status, job.problem = "unreadable", unreadable
    elif results is None:
        job.status = "failed" if error else "missing"
        job.problem = f"failed: {error[-1]}" if error else "no results.json (interrupted, killed or still running)"
    elif error:
        job.problem = f"raised after writing its results (kept): {error[-1]}"
    return job


def mark_duplicates(jobs: list[Job]) -> None:
    """A seed run twice with the same settings (merged sweeps) would count twice: keep the first."""
    seen: dict[tuple, Path] = {}
    for job in jobs:
        if not job.used or job.seed is None:
            continue
        key = (job.settings, job.seed)
        if key in seen:
            job.status, job.problem = "duplicate", f"same settings and seed as {seen[key]} (not counted)"
        else:
            seen[key] = job.path


def collect(sweep_dirs: list[Path]) -> list[Job]:
    """Every job of the given sweep folders, in Hydra's order, duplicates marked."""
    jobs = [read_job(p) for d in sweep_dirs for p in find_job_dirs(Path(d))]
    mark_duplicates(jobs)
    return jobs
