"""Training step cost of every method and greedy-generation throughput on 7B/8B-shaped models of
the shipped families (conf/model/), with random weights: no download, no checkpoint on disk.

    bash benchmarks/gpu.sh [--out DIR]            # one H100/H200: should take about 5 minutes (budget: 8)
    TINY=1 bash benchmarks/gpu.sh                 # tiny shapes on the CPU, ~30 s (what the test runs)
    python benchmarks/gpu_bench.py --families llama2_7b_chat --methods sft,sap data.max_length=512

What it measures, per family (llama2_7b_chat, llama3_8b_instruct, mistral_7b_instruct,
qwen2_5_7b_instruct, gemma2_9b_it):
- the training step of each method (--methods, default all registered ones), run as train.py
  runs it (benchmarks/step_cost.py: Lightning Trainer, the method's module and data module)
  with the harmful-fine-tuning protocol's settings (experiment=harmful_finetuning_alpaca: bf16,
  LoRA r=32 on q/k/v, batch 10, safety pairs 8) and task rows of exactly data.max_length=256
  tokens (the SST2 protocol's limit; Alpaca's is 512, which most of its rows do not reach; pass
  data.max_length=512 for the worst case). Per method: the mean step time over --steps timed
  steps after --warmup untimed ones, task tokens/s, the CUDA allocator's peak (the weights once,
  the adapter, optimizer and activations: what a run needs), and both relative to SFT. Lisa runs
  1 alignment step first, so its timed steps are fine-tuning steps (its 1:9 alternation's usual step).
- greedy generation as evaluation runs it (safeprobe.evaluation.evaluate.generate, the LoRA
  model, eval.batch_size=32 prompts a batch): --prompts copies of a prompt of --prompt-tokens
  tokens (plus the Alpaca template), each answer exactly --new-tokens long; new tokens/s and peak.

The models and data: benchmarks/shapes.py (each family's real shape with random weights, built
in memory directly on the GPU in bf16; the stand-ins' byte-level tokenizer, whose ids are a
subset of the model's vocabulary while the logits still span all of it; local data files whose
rows fill the length limits). Nothing reaches the network.

Budget (one H100/H200; estimated from FLOP counts, not yet timed on one): about a minute a
family. Per family: building the model a few seconds; each of the 7 methods and SAP every step one
Lightning fit of 2 + 16 steps (16: SAP's default refreshes its probe every 16 steps, so its mean
counts one refresh; 1-2 s of setup; a 7B SFT step of 10 x 256 tokens ~0.2 s, SAP every step ~4x); generation of
32 x 128 new tokens ~5 s. Memory: the weights once (13.5-18.5 GB) plus activations, within one
80 GB GPU. If it runs long, lower --steps or --new-tokens, or pick --families: each family's
elapsed time goes to stderr, and --out DIR gets gpu_bench.json after every family.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

import shapes  # noqa: E402
import step_cost  # noqa: E402  (puts src/ on the path)

from safeprobe.evaluation.evaluate import generate  # noqa: E402
from safeprobe.methods import METHODS  # noqa: E402

PER_METHOD = {"lisa": ["method.align_steps=1"],  # its default 100 alignment steps come before any task step
              "sap_every_step": ["sap", "probe.refresh_every=1"]}  # the paper's SAP, next to the default (every 16)
GPU = dict(warmup=2, steps=16, rounds=1, prompt_tokens=128, new_tokens=128,
           overrides=["data.max_length=256"])
TINY = dict(warmup=1, steps=2, rounds=1, prompt_tokens=16, new_tokens=4,
            overrides=["trainer=cpu", "model.dtype=float32", "data.max_length=128", "data.safety_max_length=112",
                       "data.batch_size=2", "data.safety_batch_size=2", "eval.batch_size=2"])


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a smoke test of the script)")
    parser.add_argument("--families", default=",".join(shapes.FAMILY_SHAPES),
                        help=f"comma-separated, of {', '.join(shapes.FAMILY_SHAPES)}")
    parser.add_argument("--methods", default="all", help="comma-separated method names, or all (sft always runs)")
    parser.add_argument("--warmup", type=int, help="untimed steps per fit (GPU 2, tiny 1)")
    parser.add_argument("--steps", type=int, help="timed steps per fit (GPU 16, tiny 2)")
    parser.add_argument("--rounds", type=int, help="alternating rounds of all methods (1)")
    parser.add_argument("--prompts", type=int, help="generation prompts (default: eval.batch_size, one batch)")
    parser.add_argument("--prompt-tokens", type=int, help="tokens of each prompt before the template (GPU 128, tiny 16)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per prompt (GPU 128, tiny 4)")
    parser.add_argument("--out", type=Path, help="write the figures to OUT/gpu_bench.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. data.max_length=512")
    args = parser.parse_args()
    defaults = TINY if args.tiny else GPU
    for key, value in defaults.items():
        if key != "overrides" and getattr(args, key) is None:
            setattr(args, key, value)
    args.overrides = [*defaults["overrides"], *args.overrides]
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    names = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    args.methods = list(dict.fromkeys(["sft", *names]))
    bad = [f for f in args.families if f not in shapes.FAMILY_SHAPES] + [m for m in args.methods if m not in METHODS]
    if bad:
        parser.error(f"unknown {', '.join(bad)}; allowed families {', '.join(shapes.FAMILY_SHAPES)}, "
                     f"methods {', '.join(METHODS)} or all")
    if "sap" in args.methods:
        args.methods.append("sap_every_step")
    return args


def peak_gib(cuda: bool) -> float:
    """The CUDA allocator's peak since the last reset; on the CPU this process's peak RSS so far."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def generation(c, base, fmt, model, vocab: list[str], prompts: int, prompt_tokens: int, new_tokens: int) -> dict:
    """Greedy generation as evaluation runs it: `prompts` copies of one prompt (so no padding), each
    answer exactly new_tokens long (a random model may emit a stop token at any point)."""
    tok, cuda = base.tokenizer, next(model.parameters()).is_cuda
    ids = tok(" ".join(vocab * (prompt_tokens // len(vocab) + 1)), add_special_tokens=False)["input_ids"]
    prompt = tok.decode(ids[:prompt_tokens])
    model.eval()

    def run(n: int, k: int) -> float:
        base.model.generation_config.min_new_tokens = k  # no stop before k tokens
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        generate(model, tok, fmt, [prompt] * n, k, c.eval.batch_size)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(1, 2)  # warm-up: kernel choices, caches
    seconds = run(prompts, new_tokens)
    n_prompt = len(tok(fmt(prompt), add_special_tokens=fmt.adds_bos)["input_ids"])
    return {"prompts": prompts, "prompt_tokens": n_prompt, "new_tokens": new_tokens, "seconds": seconds,
            "tokens_per_s": prompts * new_tokens / seconds, "peak_gib": peak_gib(cuda)}


def bench_family(name: str, args, folder: Path) -> tuple[dict, dict, dict]:
    """(per-method training figures, generation figures, settings) of one family."""
    overrides = [*shapes.prepare(name, folder, tiny=args.tiny), *args.overrides]
    cfgs, *state = step_cost.setup(args.methods, overrides, PER_METHOD, random_weights=True)
    runs = step_cost.time_methods(cfgs, state, args.methods, args.warmup, args.steps, args.rounds)
    train = step_cost.summary(runs)
    c, (base, _, fmt, model) = cfgs["sft"], state
    gen = generation(c, base, fmt, model, shapes.words(), args.prompts or c.eval.batch_size, args.prompt_tokens,
                     args.new_tokens)
    d = c.data
    settings = {"parameters": sum(p.numel() for p in model.parameters()), "dtype": c.model.dtype,
                "precision": c.trainer.precision, "adapter": f"{c.adapter.kind} r={c.adapter.r}",
                "batch": f"{d.batch_size} x {d.max_length} task tokens, {d.safety_batch_size} x 2 x "
                         f"{d.safety_max_length} safety-pair tokens"}
    return train, gen, settings


def markdown(results: dict) -> str:
    lines = ["| family | method | step s | tokens/s | peak GiB | step / sft | memory / sft |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for family, r in results.items():
        for method, row in r["train"].items():
            lines.append(f"| {family} | {method} | {row['step_s']:.3f} | {row['tokens_per_s']:.0f} | "
                         f"{row['peak_mib'] / 1024:.2f} | {row['step_ratio']:.2f} | {row['memory_ratio']:.2f} |")
    lines += ["", "| family | prompts | prompt tokens | new tokens | tokens/s | peak GiB |", "|---|---:|---:|---:|---:|---:|"]
    for family, r in results.items():
        g = r["generate"]
        lines.append(f"| {family} | {g['prompts']} | {g['prompt_tokens']} | {g['new_tokens']} | "
                     f"{g['tokens_per_s']:.1f} | {g['peak_gib']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one Trainer per fit: no banners
    cuda = not args.tiny and torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    started, results = time.perf_counter(), {}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        for name in args.families:
            train, gen, settings = bench_family(name, args, Path(tmp))
            results[name] = {"settings": settings, "train": train, "generate": gen}
            gc.collect()  # this family's model, before the next one is built
            if cuda:
                torch.cuda.empty_cache()
            print(f"[{time.perf_counter() - started:.0f} s] {name}: {settings['parameters'] / 1e9:.2f}B parameters, "
                  f"{len(train)} methods, generation {gen['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "gpu_bench.json").write_text(json.dumps(
                    {"device": device, "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
                     "overrides": args.overrides, "results": results}, indent=1))

    first = next(iter(results.values()))["settings"]
    print(f"\ndevice: {device}; {first['dtype']} weights, {first['precision']}, {first['adapter']}; "
          f"batch {first['batch']}; {args.rounds} round(s) x ({args.warmup} untimed + {args.steps} timed) steps "
          f"per method; tokens/s: task tokens; lisa: {' '.join(PER_METHOD['lisa'])}; "
          f"total {time.perf_counter() - started:.0f} s\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
