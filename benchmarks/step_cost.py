"""Step cost of the fine-tuning methods on identical batches, side by side in one process.

    python benchmarks/step_cost.py                          # sft and sap, the synthetic world's default model
    python benchmarks/step_cost.py --methods all --method-overrides lisa:method.align_steps=2 model=synthetic_micro
    python benchmarks/step_cost.py --methods sft,sap,lisa --steps 30 --rounds 3 \
        model=pretrained model.name_or_path=<folder> data=... trainer=gpu

Runs the real training step (Lightning Trainer; each method's module and data module, built
as train.py builds them) for the methods of --methods (comma-separated names, or `all` for
every registered one; sft is always run, as the reference) in alternating rounds
(ABC ABC ...), all from the same starting weights and the same task batches, and prints each
method's median step time and peak memory and their ratios to SFT. The first --warmup steps
of each round are not timed.

Overrides after the options apply to every method (so the model, adapter and data are
shared; choose methods with --methods, not method=). `--method-overrides NAME:KEY=VALUE`,
repeatable, applies to method NAME only, e.g. `lisa:method.align_steps=2` (Lisa's default
runs 100 alignment steps before any task step, so a short run times only those).

Peak memory is the CUDA allocator's peak on a GPU; on the CPU it is the peak resident memory
added during training, sampled every millisecond in a fresh process per method (a coarse figure).
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

from safeprobe.config import CONF_DIR, validate  # noqa: E402
from safeprobe.methods import METHODS, build_method, method_spec  # noqa: E402
from safeprobe.models.factory import apply_adapter, formatter, load_base  # noqa: E402
from safeprobe.pipeline import build_splits, data_module, data_needed  # noqa: E402
from safeprobe.stages import alignment_stage  # noqa: E402


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


def setup(methods: list[str], overrides: list[str], per_method: dict[str, list[str]]):
    """Each method's validated config, and the base model, data sets and starting model they share."""
    cfgs = {}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for name in methods:
            cfg = compose("train", overrides=["paths.output_dir=/tmp/safeprobe-bench", "logger=none", *overrides,
                                              f"method={name}", *per_method.get(name, [])])
            cfgs[name] = validate(cfg)
            method_spec(name).module.check_config(cfgs[name])
    c = cfgs[methods[0]]
    base = load_base(c.model, c.paths.cache_dir)
    # read with the most streams: hub data reads the alignment sets only when a method's streams need them
    splits = build_splits(base, max(cfgs.values(), key=lambda m: len(data_needed(m))))
    fmt = formatter(base, c.data.prompt_format, c.data.system_prompt)
    base = alignment_stage(base, c, splits, fmt)
    start_model = apply_adapter(base.model, c.adapter)
    start_model.train()  # as a run does (HF models load in eval mode)
    return cfgs, base, splits, fmt, start_model


def fit(c, steps: int, base, splits, fmt, start_model, callbacks=()) -> None:
    """The real training loop of c.method from the same weights and the same task batches."""
    L.seed_everything(c.seed, verbose=False)  # the same random draws (dropout, probes) in every round
    module = build_method(copy.deepcopy(start_model), c)
    trainer = L.Trainer(accelerator=c.trainer.accelerator, devices=1, precision=c.trainer.precision, max_steps=steps,
                        max_epochs=-1, logger=False, callbacks=list(callbacks), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data_module(c, base, splits, fmt))


def cpu_peak_in_fresh_process(name: str, steps: int, overrides: list[str], per_method: dict, queue) -> None:
    """Glibc keeps freed memory, so RSS is only comparable between fresh processes."""
    cfgs, *state = setup([name], overrides, per_method)
    with RSSPeak() as rss:
        fit(cfgs[name], steps, *state)
    queue.put(rss.peak)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="sft,sap", help="comma-separated method names, or all (default: sft,sap)")
    parser.add_argument("--method-overrides", action="append", default=[], metavar="NAME:KEY=VALUE",
                        help="a Hydra override for method NAME only (repeatable)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every method, as for train.py")
    args = parser.parse_args()
    names = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    args.methods = list(dict.fromkeys(["sft", *names]))
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; allowed: {', '.join(METHODS)} or all")
    if any(o.lstrip("+~").split("=")[0] == "method" for o in args.overrides):
        parser.error("choose methods with --methods, not a method= override")
    args.per_method = {}
    for item in args.method_overrides:
        name, sep, override = item.partition(":")
        if not sep or name not in args.methods or "=" not in override:
            parser.error(f"--method-overrides {item!r}: allowed NAME:KEY=VALUE with NAME one of {', '.join(args.methods)}")
        args.per_method.setdefault(name, []).append(override)
    return args


def main() -> None:
    args = parse_args()
    methods, steps = args.methods, args.warmup + args.steps
    cfgs, *state = setup(methods, args.overrides, args.per_method)
    c, start_model = cfgs["sft"], state[-1]
    cuda = c.trainer.accelerator in ("gpu", "cuda") and torch.cuda.is_available()

    times: dict[str, list[float]] = {m: [] for m in methods}
    peak: dict[str, float] = {}
    for _ in range(args.rounds):
        for name in methods:
            timer = StepTimer()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            fit(cfgs[name], steps, *state, callbacks=[timer])
            times[name] += timer.times[args.warmup:]
            if cuda:
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**20)
    if not cuda:
        ctx = multiprocessing.get_context("spawn")
        for name in methods:
            queue = ctx.Queue()
            proc = ctx.Process(target=cpu_peak_in_fresh_process,
                               args=(name, steps, args.overrides, args.per_method, queue))
            proc.start()
            peak[name] = queue.get()
            proc.join()

    n_params = sum(p.numel() for p in start_model.parameters())
    n_train = sum(p.numel() for p in start_model.parameters() if p.requires_grad)
    mem = "peak CUDA MiB" if cuda else "peak RSS MiB (in fit)"
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nmodel: {c.model.kind} {c.model.name_or_path or ''} ({n_params / 1e6:.2f}M parameters, "
          f"{n_train / 1e6:.3f}M trainable, adapter {c.adapter.kind}); device: {device}")
    print(f"batch {c.data.batch_size} task + {c.data.safety_batch_size} safety pairs; probe layers {c.probe.layers}, "
          f"steps {c.probe.steps}, mode {c.probe.mode}; {args.rounds} rounds x {args.steps} timed steps per method")
    for name, overrides in args.per_method.items():
        print(f"{name} only: {' '.join(overrides)}")
    sft = statistics.median(times["sft"])
    print(f"\n{'method':<12}{'median step ms':>16}{'/ sft':>8}{mem:>24}{'/ sft':>8}")
    for name in methods:
        t = statistics.median(times[name])
        ratio_mem = peak[name] / peak["sft"] if peak["sft"] > 0 else float("nan")
        print(f"{name:<12}{t * 1e3:>16.1f}{t / sft:>8.2f}{peak[name]:>24.1f}{ratio_mem:>8.2f}")


if __name__ == "__main__":
    main()
