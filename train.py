"""Fine-tune with SAP or a baseline: `python train.py [-m] [overrides]` (see README)."""

import hydra
from omegaconf import DictConfig

from safeprobe.cli import guarded, one_line_errors
from safeprobe.config import TrainConfig


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    # returns the sweep objective (lower is better) for Hydra sweepers such as Optuna
    from safeprobe.pipeline import run  # heavy imports after the command line is checked

    with one_line_errors():
        return run(cfg)["after"]["harmful_score"]


if __name__ == "__main__":
    guarded(main, TrainConfig)()
