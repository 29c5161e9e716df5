"""Re-evaluate a saved run: `python eval.py run_dir=outputs/<date>/<time>`."""

import hydra
from omegaconf import DictConfig

from safeprobe.cli import guarded, one_line_errors
from safeprobe.config import EvalRunConfig


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from safeprobe.pipeline import evaluate_run  # heavy imports after the command line is checked

    with one_line_errors():
        return evaluate_run(cfg)["after"]["harmful_score"]


if __name__ == "__main__":
    guarded(main, EvalRunConfig)()
