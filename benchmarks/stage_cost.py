"""Cost of each alignment stage next to plain SFT alignment (align=sft): its steps, seconds,
seconds per step and peak memory added while it trains, each stage built from scratch in a
fresh process (a throw-away cache), by the code a run uses (stages.py).

    python benchmarks/stage_cost.py                                  # the synthetic world: base model, 200 steps
    python benchmarks/stage_cost.py --aligns sft,vaccine align.steps=50 model=synthetic_micro
    python benchmarks/stage_cost.py --repeat 2                       # each stage twice, alternating

The default starts from the world's base model (model.variant=base), as the alignment-stage
defenses' papers align a base model; overrides after the options apply to every stage. Peak
memory is the resident memory added during the stage (sampled every millisecond, glibc's mmap
threshold fixed as in step_cost.py), or the CUDA allocator's peak on a GPU.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

STAGES = ("sft", "vaccine", "booster", "repnoise")


def one_stage(align: str, overrides: list[str], queue) -> None:
    import torch
    from hydra import compose, initialize_config_dir
    from step_cost import RSSPeak

    from safeprobe import kernels
    from safeprobe.config import CONF_DIR, validate
    from safeprobe.models.factory import formatter, load_base
    from safeprobe.pipeline import build_splits
    from safeprobe.stages import _train_stage

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=/tmp/safeprobe-bench", "logger=none", "model.variant=base",
                                          *overrides, f"align={align}"])
    c = validate(cfg)
    kernels.pin(c.cpu_kernels, c.model.kind, c.trainer.accelerator)
    base = load_base(c.model, c.paths.cache_dir)  # the shared cache: the base model is not what is timed
    splits = build_splits(base, c)
    fmt = formatter(base, c.data.prompt_format, c.data.system_prompt)
    cuda = torch.cuda.is_available() and c.trainer.accelerator in ("gpu", "cuda", "auto")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp, RSSPeak() as rss:
        start = time.perf_counter()
        summary = _train_stage(base, c, splits, fmt, Path(tmp))
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss.peak
    queue.put({"steps": summary["steps"], "seconds": seconds, "peak_mib": peak})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--aligns", default=",".join(STAGES), help=f"comma-separated align options (default {','.join(STAGES)})")
    p.add_argument("--repeat", type=int, default=1, help="rounds, alternating the stages")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    aligns = list(dict.fromkeys(["sft", *[s.strip() for s in a.aligns.split(",") if s.strip()]]))
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**16))
    ctx = multiprocessing.get_context("spawn")
    runs: dict[str, list[dict]] = {s: [] for s in aligns}
    for _ in range(a.repeat):
        for align in aligns:
            queue = ctx.Queue()
            proc = ctx.Process(target=one_stage, args=(align, a.overrides, queue))
            proc.start()
            runs[align].append(queue.get())
            proc.join()
            if proc.exitcode:
                sys.exit(f"the {align} stage failed (exit {proc.exitcode})")
    sft = {k: min(r[k] for r in runs["sft"]) for k in ("seconds", "peak_mib")}
    print(f"\n{'align':<12}{'steps':>7}{'seconds':>10}{'ms/step':>10}{'/ sft':>8}{'peak MiB added':>17}{'/ sft':>8}")
    for align, rs in runs.items():
        seconds, peak = min(r["seconds"] for r in rs), min(r["peak_mib"] for r in rs)
        steps = rs[0]["steps"]
        print(f"{align:<12}{steps:>7}{seconds:>10.1f}{seconds / steps * 1e3:>10.1f}{seconds / sft['seconds']:>8.2f}"
              f"{peak:>17.1f}{peak / sft['peak_mib'] if sft['peak_mib'] > 0 else float('nan'):>8.2f}")


if __name__ == "__main__":
    main()
