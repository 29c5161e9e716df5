"""What checkpointing adds to a run's training time, side by side in one process.

    python benchmarks/checkpoint_cost.py                       # the default job (synthetic world, SAP)
    python benchmarks/checkpoint_cost.py --every 10 method=sft model=synthetic_micro

Runs the same training (train.py's pipeline, evaluation cut to a minimum) with
checkpoint_every=0 and =--every in alternating rounds, and prints the median training
seconds of each, their ratio, and the time spent in the saves themselves (the part of the
difference that is not noise).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from safeprobe import checkpoint  # noqa: E402
from safeprobe.config import CONF_DIR  # noqa: E402
from safeprobe.pipeline import run  # noqa: E402

MINIMAL_EVAL = ["eval.before=false", "eval.n_harmful=1", "eval.n_task=1", "eval.max_new_tokens=1", "logger=csv",
                "trainer.enable_progress_bar=false", "save_adapter=false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=20, help="checkpoint_every of the timed runs")
    parser.add_argument("--rounds", type=int, default=3)
    args, overrides = parser.parse_known_args()

    saves: list[float] = []
    real_save = checkpoint.save

    def timed_save(*a, **k):
        t = time.perf_counter()
        real_save(*a, **k)
        saves.append(time.perf_counter() - t)

    checkpoint.save = timed_save
    seconds: dict[int, list[float]] = {0: [], args.every: []}
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for r in range(args.rounds):
            for every in seconds:
                cfg = compose("train", overrides=[*MINIMAL_EVAL, *overrides, f"checkpoint_every={every}",
                                                  f"paths.output_dir={tmp}/{r}_{every}"])
                seconds[every].append(run(cfg)["train"]["seconds"])
    off, on = (statistics.median(v) for v in seconds.values())
    print(f"\ntraining seconds (median of {args.rounds}): checkpoint_every=0: {off:.2f}   "
          f"checkpoint_every={args.every}: {on:.2f}   ratio {on / off:.3f}")
    per_run = len(saves) / args.rounds
    print(f"saves: {per_run:.0f} per run, median {1000 * statistics.median(saves):.1f} ms each = "
          f"{100 * statistics.median(saves) * per_run / off:.2f}% of a run's training time")


if __name__ == "__main__":
    main()
