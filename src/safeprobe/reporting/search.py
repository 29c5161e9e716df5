"""Hyperparameter search (conf/hparams_search/, docs/reporting.md): what a job returns to the
sweeper, and the study's storage.

`train.py` returns `objective_values(results, objective)`: the metrics after fine-tuning that the
top-level key `objective` names (default `[harmful_score]`), in the order of the sweeper's
`hydra.sweeper.direction`: one float for one metric, a list for several (Optuna's
multi-objective study). A metric the run did not produce ends the job with one line, as does
an objective whose length differs from the sweeper's directions (checked before the run).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from safeprobe.config import ConfigError, RunError

log = logging.getLogger(__name__)
DEFAULT_OBJECTIVE = ("harmful_score",)  # what train.py returned before `objective` existed


def sweep_objective(cfg: DictConfig) -> list[str]:
    """The run's `objective`, checked against the sweeper's directions when it has any."""
    names = OmegaConf.select(cfg, "objective", default=None)
    objective = [str(n) for n in names] if names is not None else list(DEFAULT_OBJECTIVE)
    directions = _sweeper_directions()
    if directions is not None and len(directions) != len(objective):
        raise ConfigError(f"objective={objective} names {len(objective)} metric(s) but hydra.sweeper.direction="
                          f"{directions} has {len(directions)}; allowed: one direction per objective metric, "
                          "in the same order")
    return objective


def _sweeper_directions() -> list[str] | None:
    """hydra.sweeper.direction of this job's sweep (Optuna's), else None."""
    try:
        from hydra.core.hydra_config import HydraConfig

        direction = OmegaConf.select(HydraConfig.get(), "sweeper.direction", default=None)
    except ValueError:  # not under Hydra (tests calling the pipeline directly)
        return None
    if direction is None:
        return None
    items = list(direction) if isinstance(direction, (list, ListConfig)) else [direction]
    return [getattr(d, "name", str(d)) for d in items]


def objective_values(results: dict, objective: list[str]) -> float | list[float]:
    """The run's objective metrics after fine-tuning: a float for one, a list for several."""
    after = results.get("after") or {}
    values = []
    for name in objective:
        value = after.get(name)
        if value is None or not math.isfinite(value):
            have = ", ".join(k for k, v in after.items() if v is not None)
            why = "has no value for it" if value is None else f"scored it {value}"
            raise RunError(f"objective metric {name!r}: this run {why} (results.json 'after'); it has: {have}")
        values.append(float(value))
    return values[0] if len(values) == 1 else values


def sqlite_file(storage: Any) -> Path | None:
    """The database file of an sqlite storage URL (sqlite:///relative or sqlite:////absolute)."""
    if not isinstance(storage, str) or not storage.startswith("sqlite:///"):
        return None
    path = storage[len("sqlite:///"):]
    return Path(path) if path and path != ":memory:" else None


class StudyStorage(Callback):
    """Registered by conf/hparams_search/: creates the folder of the sweeper's sqlite storage
    before the study opens (sqlite creates the file, not its folder), and says at the end where
    the study is and how many trials it holds. Both in the launching process only."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        db = sqlite_file(OmegaConf.select(config, "hydra.sweeper.storage", default=None))
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        storage = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
        name = OmegaConf.select(config, "hydra.sweeper.study_name", default=None)
        if storage is None or name is None:
            return
        try:
            import optuna

            trials = optuna.load_study(study_name=name, storage=storage).trials
        except Exception:  # a summary line must not fail the search
            log.exception("could not read the study %s back from %s", name, storage)
            return
        done = sum(t.state.name == "COMPLETE" for t in trials)
        log.info("study %r in %s: %d trials (%d complete, %d failed); the same command adds %s more",
                 name, storage, len(trials), done, sum(t.state.name == "FAIL" for t in trials),
                 OmegaConf.select(config, "hydra.sweeper.n_trials", default="n_trials"))
