"""Step cost of the fine-tuning methods on identical batches, side by side in one process.

    python benchmarks/step_cost.py                          # sft and sap, the synthetic world's default model
    python benchmarks/step_cost.py --methods all --method-overrides lisa:method.align_steps=2 model=synthetic_micro
    python benchmarks/step_cost.py --variant sap_k4:sap:probe.refresh_every=4     # SAP with a cheaper setting
    python benchmarks/step_cost.py --methods sft,sap,lisa --steps 30 --rounds 3 \
        model=pretrained model.name_or_path=<folder> data=... trainer=gpu
    python benchmarks/step_cost.py --shape llama_100m --steps 5 --rounds 2     # a ~100M Llama on the CPU
    python benchmarks/step_cost.py --random-weights model=pretrained model.name_or_path=<folder with config.json
        and a tokenizer> ...                               # the architecture only: random weights, built in memory

Runs the real training step (Lightning Trainer; each method's module and data module, built
as train.py builds them) for the methods of --methods (comma-separated names, or `all` for
every registered one; sft is always run, as the reference) in alternating rounds
(ABC ABC ...), all from the same starting weights and the same task batches, and prints each
method's mean step time (all timed steps' time over their count, so that a cost paid every k
steps, such as probe.refresh_every=k, is counted in full: time a multiple of k steps), task tokens per second (non-padding tokens of the task batch) and
peak memory, and their ratios to SFT. The first --warmup steps of each round are not timed.
Every round starts from the same starting model: its frozen weights (all but the adapter with
LoRA) are shared, not copied, so memory holds one copy of the base model, as a run does.

Overrides after the options apply to every method (so the model, adapter and data are
shared; choose methods with --methods, not method=). `--method-overrides NAME:KEY=VALUE`,
repeatable, applies to method NAME only, e.g. `lisa:method.align_steps=2` (Lisa's default
runs 100 alignment steps before any task step, so a short run times only those).

Peak memory is the CUDA allocator's peak on a GPU (the starting model stays on the GPU); on the
CPU it is the peak resident memory added during training, sampled every millisecond in a fresh
process per method, with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_) so that freed
tensors leave resident memory at once: without it the figure follows glibc's heap growth, not
the live tensors (SAP's peak then read 1.1-1.45x SFT's from run to run; with it, 1.02).

--random-weights builds the model from the config.json of model.name_or_path with random weights,
directly on the training device (load_base's random_weights): speed does not depend on the values,
so a folder with the config and a tokenizer stands in for a 7B checkpoint (benchmarks/gpu_bench.py).
--shape NAME writes such a folder of a real shape and data files that fill the length limits
(benchmarks/shapes.py) and runs on them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import multiprocessing
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.strategies import SingleDeviceStrategy

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT), str(ROOT / "benchmarks")]  # the package, tests.standins, shapes

import shapes  # noqa: E402

from safeprobe.config import CONF_DIR, validate  # noqa: E402
from safeprobe.methods import METHODS, build_method, method_spec  # noqa: E402
from safeprobe.models.factory import apply_adapter, formatter, load_base  # noqa: E402
from safeprobe.pipeline import build_splits, data_module, data_needed  # noqa: E402
from safeprobe.stages import alignment_stage  # noqa: E402


class StepTimer(L.Callback):
    """Each step's wall time and its task tokens (non-padding tokens of the task batch)."""

    def __init__(self):
        self.times: list[float] = []
        self.tokens: list[int] = []

    def _sync(self, module):
        if module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._sync(module)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._sync(module)
        self.times.append(time.perf_counter() - self.start)
        self.tokens.append(int(batch["task"]["attention_mask"].sum()))


class KeepOnDevice(SingleDeviceStrategy):
    """Lightning moves the model to the CPU after fit; that would move the frozen weights the
    rounds share (fit) too, and copy gigabytes back for the next round. The copy is dropped instead."""

    def teardown(self) -> None:
        module, self._lightning_module = self._lightning_module, None
        super().teardown()
        self._lightning_module = module


def on_gpu(c) -> bool:
    return c.trainer.accelerator in ("gpu", "cuda") and torch.cuda.is_available()


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


def setup(methods: list[str], overrides: list[str], per_method: dict[str, list[str]], random_weights: bool = False):
    """Each method's validated config, and the base model, data sets and starting model they share.
    A name LABEL that is not a method is a variant (--variant LABEL:METHOD:KEY=VALUE)."""
    cfgs = {}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for name in methods:
            method, *extra = per_method.get(name, []) if name not in METHODS else [name, *per_method.get(name, [])]
            cfg = compose("train", overrides=["paths.output_dir=/tmp/safeprobe-bench", "logger=none", *overrides,
                                              f"method={method}", *extra])
            cfgs[name] = validate(cfg)
            method_spec(method).module.check_config(cfgs[name])
    c = cfgs[methods[0]]
    device = torch.device("cuda" if on_gpu(c) else "cpu")
    with device if random_weights else contextlib.nullcontext():  # drawn where they train: no CPU copy of 7B weights
        base = load_base(c.model, c.paths.cache_dir, random_weights=random_weights)
    # read with the most streams: hub data reads the alignment sets only when a method's streams need them
    splits = build_splits(base, max(cfgs.values(), key=lambda m: len(data_needed(m))))
    fmt = formatter(base, c.data.prompt_format, c.data.system_prompt)
    base = alignment_stage(base, c, splits, fmt)
    start_model = apply_adapter(base.model, c.adapter).to(device)
    start_model.train()  # as a run does (HF models load in eval mode)
    return cfgs, base, splits, fmt, start_model


def fit(c, steps: int, base, splits, fmt, start_model, callbacks=()) -> None:
    """The real training loop of c.method from the same weights and the same task batches."""
    L.seed_everything(c.seed, verbose=False)  # the same random draws (dropout, probes) in every round
    frozen = {id(p): p for p in start_model.parameters() if not p.requires_grad}  # shared: nothing updates them
    module = build_method(copy.deepcopy(start_model, frozen), c)
    strategy = KeepOnDevice(torch.device("cuda", torch.cuda.current_device())) if on_gpu(c) else "auto"
    trainer = L.Trainer(accelerator=c.trainer.accelerator, devices=1, strategy=strategy, precision=c.trainer.precision,
                        max_steps=steps, max_epochs=-1, logger=False, callbacks=list(callbacks),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data_module(c, base, splits, fmt))
    del module, trainer
    gc.collect()  # Lightning's reference cycles would keep this round's copy in memory during the next


def time_methods(cfgs: dict, state: list, methods: list[str], warmup: int, steps: int, rounds: int) -> dict[str, dict]:
    """Alternating rounds (ABC ABC ...) of each method's training loop: per method, the timed steps'
    times (s) and task tokens, and the peak memory in MiB over its rounds: the CUDA allocator's peak
    on a GPU; on the CPU this process's peak resident memory so far (main() measures a better one)."""
    cuda = on_gpu(cfgs[methods[0]])
    runs = {m: {"times": [], "tokens": [], "peak_mib": 0.0} for m in methods}
    for _ in range(rounds):
        for name in methods:
            timer = StepTimer()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            fit(cfgs[name], warmup + steps, *state, callbacks=[timer])
            runs[name]["times"] += timer.times[warmup:]
            runs[name]["tokens"] += timer.tokens[warmup:]
            peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10)  # KiB on Linux
            runs[name]["peak_mib"] = max(runs[name]["peak_mib"], peak)
    return runs


def summary(runs: dict[str, dict]) -> dict[str, dict]:
    """Mean step time, task tokens/s, peak memory, and step time and memory relative to sft."""
    rows = {name: {"step_s": statistics.mean(r["times"]), "tokens_per_s": sum(r["tokens"]) / sum(r["times"]),
                   "peak_mib": r["peak_mib"]} for name, r in runs.items()}
    sft = rows["sft"]
    for row in rows.values():
        row["step_ratio"] = row["step_s"] / sft["step_s"]
        row["memory_ratio"] = row["peak_mib"] / sft["peak_mib"] if sft["peak_mib"] > 0 else float("nan")
    return rows


def cpu_peak_in_fresh_process(name: str, steps: int, overrides: list[str], per_method: dict, random_weights: bool,
                              queue) -> None:
    """Glibc keeps freed memory, so RSS is only comparable between fresh processes."""
    cfgs, *state = setup([name], overrides, per_method, random_weights)
    with RSSPeak() as rss:
        fit(cfgs[name], steps, *state)
    queue.put(rss.peak)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="sft,sap", help="comma-separated method names, or all (default: sft,sap)")
    parser.add_argument("--method-overrides", action="append", default=[], metavar="NAME:KEY=VALUE",
                        help="a Hydra override for method NAME only (repeatable)")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL:METHOD:KEY=VALUE",
                        help="a method with overrides, timed as LABEL (repeat a label for more overrides), e.g. "
                             "sap_k4:sap:probe.refresh_every=4")
    parser.add_argument("--steps", type=int, default=32, help="timed steps per round and method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--random-weights", action="store_true",
                        help="build the model from model.name_or_path's config.json with random weights (in memory)")
    shapes.add_option(parser)
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
    for item in args.variant:
        label, method, override = (item.split(":", 2) + ["", ""])[:3]
        if method not in METHODS or label in METHODS or "=" not in override:
            parser.error(f"--variant {item!r}: allowed LABEL:METHOD:KEY=VALUE with a new LABEL and METHOD one of "
                         f"{', '.join(METHODS)}")
        args.per_method.setdefault(label, [method]).append(override)
        args.methods = list(dict.fromkeys([*args.methods, label]))
    return args


def main() -> None:
    with shapes.applied(parse_args()) as args:
        report(args)


def report(args) -> None:
    methods, steps = args.methods, args.warmup + args.steps
    cfgs, *state = setup(methods, args.overrides, args.per_method, args.random_weights)
    c, start_model = cfgs["sft"], state[-1]
    cuda = on_gpu(c)
    runs = time_methods(cfgs, state, methods, args.warmup, args.steps, args.rounds)
    if not cuda:
        ctx = multiprocessing.get_context("spawn")
        # glibc keeps large freed blocks on its heap once its mmap threshold has risen, so resident memory
        # would follow the allocation pattern, not what is alive; a fixed threshold returns them at once
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**16))
        for name in methods:
            queue = ctx.Queue()
            proc = ctx.Process(target=cpu_peak_in_fresh_process,
                               args=(name, steps, args.overrides, args.per_method, args.random_weights, queue))
            proc.start()
            runs[name]["peak_mib"] = queue.get()
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
    print(f"\n{'method':<16}{'mean step ms':>16}{'/ sft':>8}{mem:>24}{'/ sft':>8}{'task tok/s':>12}")
    for name, row in summary(runs).items():
        print(f"{name:<16}{row['step_s'] * 1e3:>16.1f}{row['step_ratio']:>8.2f}{row['peak_mib']:>24.1f}"
              f"{row['memory_ratio']:>8.2f}{row['tokens_per_s']:>12.0f}")


if __name__ == "__main__":
    main()
