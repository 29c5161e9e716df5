"""Fine-tune with SAP or a baseline: `python train.py [-m] [overrides]` (see README)."""

import hydra
from omegaconf import DictConfig

from safeprobe.cli import guarded, one_line_errors, run_rank
from safeprobe.config import TrainConfig


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | list[float] | None:
    # returns the sweep objective for Hydra sweepers such as Optuna: the metrics after fine-tuning
    # that `objective` names (default [harmful_score]), see safeprobe/reporting/search.py
    from safeprobe.pipeline import run  # heavy imports after the command line is checked
    from safeprobe.reporting.search import objective_values, sweep_objective

    with one_line_errors():
        objective = sweep_objective(cfg)
        results = run(cfg)
        # None: a rank > 0 of several processes (rank 0 reports)
        return objective_values(results, objective) if results is not None else None


if __name__ == "__main__":
    if not run_rank():  # a rank Lightning started for a run's fit (docs/distributed.md)
        guarded(main, TrainConfig)()
