"""Where SAP's step goes: each pass's time and memory next to SFT's step (docs/performance.md).

    python benchmarks/sap_profile.py                                  # the synthetic default
    python benchmarks/sap_profile.py --repeats 10 model=synthetic_micro
    python benchmarks/sap_profile.py --shape llama_100m --repeats 5         # a ~100M Llama on the CPU

Calls the passes of one SAP step (clean mode; src/safeprobe/methods/sap.py) one by one on the
same batch, from the same weights, outside Lightning, and SFT's step next to them:

- direction: the contrastive safety loss on the safety pairs, backward over the trainable weights;
- probe search: the two probe passes per `probe.steps` (forward, backward to the probe only; the
  first with the weights perturbed, copy and restore included);
- update: the task loss with the probe in place, backward, AdamW step — SFT's step plus a hook.

Prints each pass's median time (alternating repeats), its share of SAP's step, the tensors it
keeps for backward (activation memory: the part of a pass's memory that grows with batch and
length; deduplicated by storage) and, on a GPU, the allocator's peak during the pass. Then the
step-time ratio to SFT that the levers would give (probe.refresh_every = k amortizes direction
and probe over k steps; probe.probe_examples = n runs the probe passes on n examples), as
projected from these times — step_cost.py measures them in the real loop.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import shapes  # noqa: E402
from step_cost import on_gpu, setup  # noqa: E402  (puts src/ on the path)

from safeprobe.methods import build_method  # noqa: E402
from safeprobe.methods.sap import first  # noqa: E402
from safeprobe.pipeline import data_module  # noqa: E402


class Meter:
    """Time, bytes saved for backward, and (CUDA) peak allocation of the code inside `measure`."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.times: dict[str, list[float]] = {}
        self.saved: dict[str, int] = {}
        self.peak: dict[str, float] = {}
        self.count_saved = True  # the hook costs time: on in the untimed repeats only

    @contextmanager
    def measure(self, name: str):
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        if self.count_saved:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                yield
            self.saved[name] = sum(storages.values())
        else:
            yield
        if self.cuda:
            torch.cuda.synchronize()
            self.peak[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        self.times.setdefault(name, []).append(time.perf_counter() - start)


def batches(c, base, splits, fmt):
    """The first batch of each stream, as a run draws it."""
    loader = data_module(c, base, splits, fmt).train_dataloader()
    batch, *_ = next(iter(loader))
    return batch


def update(module, opt, batch, vectors=None) -> None:
    """The update pass (FineTuneModule.training_step without Lightning's bookkeeping)."""
    opt.zero_grad(set_to_none=True)
    if vectors is None:
        module.loss(batch).backward()
    else:
        with module.probe.attached(vectors):
            module.loss(batch).backward()
    opt.step()


def sap_step(module, opt, batch, meter: Meter) -> None:
    """SAP's step (clean mode), pass by pass, as SAPModule.update_context runs it."""
    with meter.measure("direction"), module.side_rng():
        module.direction = module.unsafe_direction(batch["safety"])
    with meter.measure("probe search"), module.side_rng():
        vectors = module.find_probe(batch["task"])
    with meter.measure("update"):
        update(module, opt, batch, vectors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats (after 2 untimed)")
    parser.add_argument("--random-weights", action="store_true",
                        help="build the model from model.name_or_path's config.json with random weights")
    shapes.add_option(parser)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    with shapes.applied(parser.parse_args()) as args:
        profile(args)


def profile(args) -> None:
    warnings.filterwarnings("ignore", message=".*self.log.*")  # the module runs outside a Trainer here
    cfgs, base, splits, fmt, start_model = setup(["sft", "sap"], args.overrides, {}, args.random_weights)
    c = cfgs["sap"]
    cuda = on_gpu(c)
    meter = Meter(cuda)
    batch = batches(c, base, splits, fmt)
    if cuda:
        batch = {k: {n: t.cuda() for n, t in v.items()} for k, v in batch.items()}
    frozen = {id(p): p for p in start_model.parameters() if not p.requires_grad}
    sft = build_method(copy.deepcopy(start_model, frozen), cfgs["sft"])
    sap = build_method(copy.deepcopy(start_model, frozen), c)
    opts = {m: torch.optim.AdamW(m.trainable_parameters(), lr=c.optim.lr) for m in (sft, sap)}
    n_task = batch["task"]["input_ids"].shape[0]
    half = max(1, n_task // 2)
    # the Trainer's mixed precision, which these passes run without
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda and "bf16-mixed" in c.trainer.precision else nullcontext()
    with autocast:
        for i in range(args.repeats + 2):
            if i == 2:
                meter.times.clear()
                meter.count_saved = False
            with meter.measure("sft step"):
                update(sft, opts[sft], batch)
            sap_step(sap, opts[sap], batch, meter)
            with meter.measure("probe search, half batch"), sap.side_rng():
                sap.find_probe(first(batch["task"], half))

    t = {k: statistics.median(v) for k, v in meter.times.items()}
    probe = t["probe search"]
    step = t["direction"] + probe + t["update"]
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    n_params = sum(p.numel() for p in start_model.parameters())
    print(f"model: {c.model.kind} {c.model.name_or_path or ''} ({n_params / 1e6:.1f}M parameters, adapter "
          f"{c.adapter.kind}); {device}; batch {n_task} task x {batch['task']['input_ids'].shape[1]} tokens, "
          f"{batch['safety']['input_ids'].shape[0] // 2} safety pairs; probe layers {c.probe.layers}, "
          f"steps {c.probe.steps}; median of {args.repeats}")
    peak = "| peak MiB (CUDA) " if cuda else ""
    print(f"\n| pass | ms | share of SAP step | / SFT step | saved for backward MiB {peak}|")
    print("|---|---|---|---|---|" + ("---|" if cuda else ""))
    for name in ("sft step", "direction", "probe search", "update"):
        share = "" if name == "sft step" else f"{t[name] / step:.0%}"
        cells = [name, f"{t[name] * 1e3:.1f}", share, f"{t[name] / t['sft step']:.2f}",
                 f"{meter.saved[name] / 2**20:.1f}"] + ([f"{meter.peak[name]:.1f}"] if cuda else [])
        print("| " + " | ".join(cells) + " |")
    print(f"| SAP step (sum) | {step * 1e3:.1f} | 100% | {step / t['sft step']:.2f} | "
          f"{max(meter.saved[n] for n in ('direction', 'probe search', 'update')) / 2**20:.1f} (max) |"
          + (f" {max(meter.peak[n] for n in ('direction', 'probe search', 'update')):.1f} (max) |"
             if cuda else ""))

    print("\nprojected SAP / SFT step time with the levers (from the pass times above):")
    print("| probe.refresh_every | whole batch | probe_examples = half |")
    print("|---|---|---|")
    half_probe = t["probe search, half batch"]
    for k in (1, 2, 4, 8, 16):
        whole = (t["update"] + (t["direction"] + probe) / k) / t["sft step"]
        halved = (t["update"] + (t["direction"] + half_probe) / k) / t["sft step"]
        print(f"| {k} | {whole:.2f} | {halved:.2f} |")


if __name__ == "__main__":
    main()
