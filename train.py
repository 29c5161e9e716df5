"""Fine-tune with SAP or a baseline: `python train.py [-m] [overrides]` (see README)."""

import hydra
from omegaconf import DictConfig

from safeprobe.cli import guarded, one_line_errors, run_rank
from safeprobe.config import TrainConfig


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    # returns the sweep objective (lower is better) for Hydra sweepers such as Optuna
    from safeprobe.pipeline import run  # heavy imports after the command line is checked

    results = None
    with one_line_errors():
        results = run(cfg)
    return results["after"]["harmful_score"] if results else None  # None: a rank > 0 of several processes


if __name__ == "__main__":
    if not run_rank():  # a rank Lightning started for a run's fit (docs/distributed.md)
        guarded(main, TrainConfig)()
