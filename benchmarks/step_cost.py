"""SFT vs SAP step cost on identical batches, side by side in one process.

    python benchmarks/step_cost.py                          # the synthetic world's default model
    python benchmarks/step_cost.py model=synthetic_micro probe.steps=3
    python benchmarks/step_cost.py --steps 30 --rounds 3 model=pretrained model.name_or_path=<folder> \
        data=... trainer=gpu

Runs the real training step (Lightning Trainer, the method modules) for SFT and SAP in
alternating rounds (ABAB...), both from the same starting weights and the same batches,
and prints the median step time, peak memory and the SAP/SFT ratios. Peak memory is the
CUDA allocator's peak on a GPU; on the CPU it is the peak resident memory added during
training, sampled every millisecond in a fresh process per method (a coarse figure).
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from safeprobe.config import CONF_DIR, check_probe_layers, validate  # noqa: E402
from safeprobe.data.datamodule import SafetyDataModule  # noqa: E402
from safeprobe.methods import build_method  # noqa: E402
from safeprobe.models.factory import apply_adapter, formatter, load_base, model_depth  # noqa: E402
from safeprobe.pipeline import build_splits  # noqa: E402


class StepTimer(L.Callback):
    def __init__(self):
        self.times: list[float] = []

    def _sync(self, module):
        if module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._sync(module)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._sync(module)
        self.times.append(time.perf_counter() - self.start)


class RSSPeak:
    """Samples this process's resident memory in a thread; `peak` is MiB above the start."""

    def __enter__(self):
        self.base = self.peak_abs = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = (self.peak_abs - self.base) / 2**20

    def _sample(self):
        while self.running:
            self.peak_abs = max(self.peak_abs, self._rss())
            time.sleep(0.001)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def setup(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=/tmp/safeprobe-bench", "logger=none", *overrides])
    c = validate(cfg)
    check_probe_layers(c.probe.layers, model_depth(c.model))
    base = load_base(c.model, c.paths.cache_dir)
    splits = build_splits(base, c)
    fmt = formatter(base, c.data.prompt_format, c.data.system_prompt)
    L.seed_everything(c.seed)
    return c, base, splits, fmt, apply_adapter(base.model, c.adapter)


def fit(method: str, steps: int, c, base, splits, fmt, start_model, callbacks=()) -> None:
    """The real training loop from the same weights and the same batches, whatever the method."""
    c.method.name = method
    module = build_method(copy.deepcopy(start_model), c)
    data = SafetyDataModule(c.data, splits, base.tokenizer, fmt, c.seed)
    trainer = L.Trainer(accelerator=c.trainer.accelerator, devices=1, precision=c.trainer.precision, max_steps=steps,
                        max_epochs=-1, logger=False, callbacks=list(callbacks), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)


def cpu_peak_in_fresh_process(method: str, steps: int, overrides: list[str], queue) -> None:
    """Glibc keeps freed memory, so RSS is only comparable between fresh processes."""
    state = setup(overrides)
    with RSSPeak() as rss:
        fit(method, steps, *state)
    queue.put(rss.peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    args = parser.parse_args()
    state = setup(args.overrides)
    c, start_model = state[0], state[-1]
    cuda = c.trainer.accelerator in ("gpu", "cuda") and torch.cuda.is_available()

    times: dict[str, list[float]] = {"sft": [], "sap": []}
    peak: dict[str, float] = {}
    for _ in range(args.rounds):
        for name in ("sft", "sap"):
            timer = StepTimer()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            fit(name, args.warmup + args.steps, *state, callbacks=[timer])
            times[name] += timer.times[args.warmup:]
            if cuda:
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**20)
    if not cuda:
        ctx = multiprocessing.get_context("spawn")
        for name in ("sft", "sap"):
            queue = ctx.Queue()
            proc = ctx.Process(target=cpu_peak_in_fresh_process, args=(name, args.warmup + args.steps, args.overrides, queue))
            proc.start()
            peak[name] = queue.get()
            proc.join()

    n_params = sum(p.numel() for p in start_model.parameters())
    n_train = sum(p.numel() for p in start_model.parameters() if p.requires_grad)
    sft, sap = statistics.median(times["sft"]), statistics.median(times["sap"])
    mem = "peak CUDA MiB" if cuda else "peak RSS MiB (in fit)"
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nmodel: {c.model.kind} {c.model.name_or_path or ''} ({n_params / 1e6:.2f}M parameters, "
          f"{n_train / 1e6:.3f}M trainable, adapter {c.adapter.kind}); device: {device}")
    print(f"batch {c.data.batch_size} task + {c.data.safety_batch_size} safety pairs; probe layers {c.probe.layers}, "
          f"steps {c.probe.steps}, mode {c.probe.mode}; {args.rounds} rounds x {args.steps} timed steps per method\n")
    print(f"{'method':<8}{'median step ms':>16}{mem:>24}")
    print(f"{'sft':<8}{sft * 1e3:>16.1f}{peak['sft']:>24.1f}")
    print(f"{'sap':<8}{sap * 1e3:>16.1f}{peak['sap']:>24.1f}")
    ratio_mem = peak["sap"] / peak["sft"] if peak["sft"] > 0 else float("nan")
    print(f"{'sap/sft':<8}{sap / sft:>16.2f}{ratio_mem:>24.2f}")


if __name__ == "__main__":
    main()
