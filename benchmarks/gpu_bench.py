"""Training step cost of every method, the alignment stage's step of every alignment-stage defense,
the cost of the post-fine-tuning repairs, and greedy-generation throughput, on 7B/8B-shaped models of
the shipped families (conf/model/), with random weights: no download, no checkpoint on disk.

    bash benchmarks/gpu.sh [--out DIR]            # one H100/H200: should take about 8 minutes (budget: 10)
    TINY=1 bash benchmarks/gpu.sh                 # tiny shapes on the CPU, ~1 min (what the test runs)
    python benchmarks/gpu_bench.py --families llama2_7b_chat --methods sft,sap,vaccine --repairs none data.max_length=512

What it measures, per family (llama2_7b_chat, llama3_8b_instruct, mistral_7b_instruct,
qwen2_5_7b_instruct, gemma2_9b_it):
- the training step of each fine-tuning method (--methods, default all registered ones), run as
  train.py runs it (benchmarks/step_cost.py: Lightning Trainer, the method's module and data
  module) with the harmful-fine-tuning protocol's settings (experiment=harmful_finetuning_alpaca
  align=none: bf16, LoRA r=32 on q/k/v, batch 10, safety pairs 8) and task rows of exactly
  data.max_length=256 tokens (the SST2 protocol's limit; Alpaca's is 512, which most of its rows do
  not reach; pass data.max_length=512 for the worst case). Per method: the mean step time over
  --steps timed steps after --warmup untimed ones, task tokens/s, the CUDA allocator's peak (the
  weights once, the adapter, optimizer and activations: what a run needs), and both relative to
  SFT. Lisa runs 1 alignment step first, so its timed steps are fine-tuning steps (its 1:9
  alternation's usual step).
- the alignment stage's step (rows align=NAME) of each alignment-stage defense among --methods
  (vaccine, booster, repnoise: registered with stage "alignment", which method= refuses) and of
  align=sft, the plain stage they are compared with: the stage's module and data as stages.py
  builds them (stage_config: align.batch_size=10 alignment rows as the task, Booster's harmful
  batch of 10, RepNoise's 8 pairs = 16 rows of safety_max_length=256 tokens), from the same start
  (a fresh LoRA on the model), --stage-steps timed steps after --warmup; relative to fine-tuning
  SFT's step. tokens/s counts the task (alignment) batch, which RepNoise reads only for bookkeeping.
- the repairs (--repairs, default safelora,antidote), once each on a copy of the LoRA model with
  random LoRA B (an update to repair): SafeLoRA with a second random model of the family as the
  unaligned one (built on the GPU first: two full models in memory, as a run has; `setup s` is that
  build, not a load from disk), Antidote with one forward pass over the harmful rows as calibration
  examples (80 here, each of safety_max_length tokens; a run's 2,000 take ~25x as long). Wall time
  of the repair itself, the CUDA peak (from before the build), SFT's step next to it.
- greedy generation as evaluation runs it (safeprobe.evaluation.evaluate.generate, the LoRA
  model, eval.batch_size=32 prompts a batch): --prompts copies of a prompt of --prompt-tokens
  tokens (plus the Alpaca template), each answer exactly --new-tokens long; new tokens/s and peak.

The models and data: benchmarks/shapes.py (each family's real shape with random weights, built
in memory directly on the GPU in bf16; the stand-ins' byte-level tokenizer, whose ids are a
subset of the model's vocabulary while the logits still span all of it; local data files whose
rows fill the length limits). Nothing reaches the network.

Budget (one H100/H200; estimated from FLOP counts, not yet timed on one): about a minute and a
half a family. Per family: building the model a few seconds; each of the 7 fine-tuning methods
and SAP every step one Lightning fit of 2 + 16 steps (16: SAP's default refreshes its probe every
16 steps, so its mean counts one refresh; 1-2 s of setup; a 7B SFT step of 10 x 256 tokens ~0.2 s,
SAP every step ~4x); the 4 stage rows one fit of 2 + 8 steps each (Vaccine ~2x SFT, Booster ~3x,
RepNoise ~2-3x); SafeLoRA a few seconds (building the second model, then 96 small float64
products), Antidote ~1 s; generation of 32 x 128 new tokens ~5 s. Memory: the weights once
(13.5-18.5 GB) plus activations, twice the weights during SafeLoRA, within one 80 GB GPU. If it
runs long, lower --steps or --new-tokens, or pick --families or --methods: each family's elapsed
time goes to stderr, and --out DIR gets gpu_bench.json after every family.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

import shapes  # noqa: E402
import step_cost  # noqa: E402  (puts src/ on the path)
from hydra import compose, initialize_config_dir  # noqa: E402

from safeprobe.config import CONF_DIR, validate  # noqa: E402
from safeprobe.data.datamodule import SafetyDataModule  # noqa: E402
from safeprobe.evaluation.evaluate import generate  # noqa: E402
from safeprobe.methods import METHODS  # noqa: E402
from safeprobe.models.factory import load_base  # noqa: E402
from safeprobe.pipeline import build_splits, post_context  # noqa: E402
from safeprobe.post import REPAIRS, PostContext, apply_repair  # noqa: E402
from safeprobe.stages import stage_config, stage_splits, stage_task  # noqa: E402

PER_METHOD = {"lisa": ["method.align_steps=1"],  # its default 100 alignment steps come before any task step
              "sap_every_step": ["sap", "probe.refresh_every=1"],  # the paper's SAP, next to the default (every 16)
              # the same with the two-pass probe difference, which bf16 rounds to noise (docs/sap.md, "Precision"):
              # the cost of the midpoint rule's second backward, side by side
              "sap_two_pass_probe": ["sap", "probe.refresh_every=1", "probe.difference=finite"]}
STAGE_DEFENSES = [m for m, spec in METHODS.items() if spec.stage == "alignment"]  # align=NAME only
GPU = dict(warmup=2, steps=16, stage_steps=8, rounds=1, prompt_tokens=128, new_tokens=128,
           overrides=["data.max_length=256"])
TINY = dict(warmup=1, steps=2, stage_steps=2, rounds=1, prompt_tokens=16, new_tokens=4,
            overrides=["trainer=cpu", "model.dtype=float32", "data.max_length=128", "data.safety_max_length=112",
                       "data.batch_size=2", "data.safety_batch_size=2", "align.batch_size=2", "eval.batch_size=2"])


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a smoke test of the script)")
    parser.add_argument("--families", default=",".join(shapes.FAMILY_SHAPES),
                        help=f"comma-separated, of {', '.join(shapes.FAMILY_SHAPES)}")
    parser.add_argument("--methods", default="all",
                        help="comma-separated method names (fine-tuning methods, and alignment-stage defenses: timed "
                             "as the stage's step next to align=sft), or all (sft always runs)")
    parser.add_argument("--repairs", default="all", help=f"comma-separated of {', '.join(REPAIRS)}, all, or none")
    parser.add_argument("--warmup", type=int, help="untimed steps per fit (GPU 2, tiny 1)")
    parser.add_argument("--steps", type=int, help="timed steps per fine-tuning fit (GPU 16, tiny 2)")
    parser.add_argument("--stage-steps", type=int, help="timed steps per alignment-stage fit (GPU 8, tiny 2)")
    parser.add_argument("--rounds", type=int, help="alternating rounds of all methods (1)")
    parser.add_argument("--prompts", type=int, help="generation prompts (default: eval.batch_size, one batch)")
    parser.add_argument("--prompt-tokens", type=int, help="tokens of each prompt before the template (GPU 128, tiny 16)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per prompt (GPU 128, tiny 4)")
    parser.add_argument("--out", type=Path, help="write the figures to OUT/gpu_bench.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. data.max_length=512")
    args = parser.parse_args()
    defaults = TINY if args.tiny else GPU
    for key, value in defaults.items():
        if key != "overrides" and getattr(args, key, None) is None:
            setattr(args, key, value)
    args.overrides = [*defaults["overrides"], *args.overrides]
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    names = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    repairs = {"all": list(REPAIRS), "none": []}.get(args.repairs, [r.strip() for r in args.repairs.split(",") if r.strip()])
    bad = ([f for f in args.families if f not in shapes.FAMILY_SHAPES] + [m for m in names if m not in METHODS]
           + [r for r in repairs if r not in REPAIRS])
    if bad:
        parser.error(f"unknown {', '.join(bad)}; allowed families {', '.join(shapes.FAMILY_SHAPES)}, "
                     f"methods {', '.join(METHODS)} or all, repairs {', '.join(REPAIRS)}, all or none")
    args.methods = list(dict.fromkeys(["sft", *(m for m in names if m not in STAGE_DEFENSES)]))
    stages = [m for m in names if m in STAGE_DEFENSES]
    args.stages = list(dict.fromkeys(["sft", *stages])) if stages else []  # align=sft: what they are compared with
    args.repairs = list(dict.fromkeys(repairs))
    if "sap" in args.methods:
        args.methods += ["sap_every_step", "sap_two_pass_probe"]
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


def configs(overrides: list[str], stages: list[str], repairs: list[str]) -> tuple[dict, dict]:
    """The validated run configs of the stage rows (align=NAME method=sft) and the repairs (post=NAME
    method=sft), on the same model, adapter and data as the fine-tuning rows."""
    base = [o for o in overrides if o != "align=none"]
    out: tuple[dict, dict] = ({}, {})
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for group, names, into in (("align", stages, out[0]), ("post", repairs, out[1])):
            for name in names:
                extra = [f"align={name}"] if group == "align" else ["align=none", f"post={name}"]
                cfg = compose("train", overrides=["paths.output_dir=/tmp/safeprobe-bench", "logger=none", *base,
                                                  "method=sft", *extra])
                into[name] = validate(cfg)
    return out


def fit_stage(c, steps: int, base, splits, fmt, start_model, callbacks=()) -> None:
    """The alignment stage's training loop of c.align.method, as stages.py builds it (its module,
    its streams, the alignment rows as the task), from a fresh LoRA on the model."""
    s = stage_config(c)
    L.seed_everything(s.seed, verbose=False)
    frozen = {id(p): p for p in start_model.parameters() if not p.requires_grad}  # shared, as step_cost.fit
    module_cls = METHODS[s.method.name].module
    module = module_cls(copy.deepcopy(start_model, frozen), s)
    data = SafetyDataModule(s.data, stage_splits(splits), base.tokenizer, fmt, s.seed,
                            streams=module_cls.data_streams(s), task_examples=stage_task(splits))
    cuda = step_cost.on_gpu(s)
    strategy = step_cost.KeepOnDevice(torch.device("cuda", torch.cuda.current_device())) if cuda else "auto"
    trainer = L.Trainer(accelerator=s.trainer.accelerator, devices=1, strategy=strategy, precision=s.trainer.precision,
                        max_steps=steps, max_epochs=-1, logger=False, callbacks=list(callbacks),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    del module, trainer
    gc.collect()


def time_stages(cfgs: dict, base, splits, fmt, start_model, warmup: int, steps: int, cuda: bool) -> dict[str, dict]:
    """Per stage method: its timed steps' times and task tokens, and its peak memory in MiB (as
    step_cost.time_methods records them), keyed align=NAME."""
    runs = {}
    for name, c in cfgs.items():
        timer = step_cost.StepTimer()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        fit_stage(c, warmup + steps, base, splits, fmt, start_model, callbacks=[timer])
        runs[f"align={name}"] = {"times": timer.times[warmup:], "tokens": timer.tokens[warmup:],
                                 "peak_mib": peak_gib(cuda) * 1024}
    return runs


def time_repairs(cfgs: dict, base, splits, fmt, start_model, cuda: bool) -> dict[str, dict]:
    """Each repair once, on a copy of the LoRA model whose B matrices are random (an update to
    repair; fresh LoRA has B = 0): wall time, setup time (SafeLoRA: building the unaligned model),
    peak memory in MiB from before the setup, and what the repair reports."""
    frozen = {id(p): p for p in start_model.parameters() if not p.requires_grad}
    model = copy.deepcopy(start_model, frozen)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=1e-3)
    device = next(model.parameters()).device
    out = {}
    for name, c in cfgs.items():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start, unaligned = time.perf_counter(), None
        if name == "safelora":  # the family's shape with other random weights, where the pipeline puts it
            with device:
                unaligned = load_base(c.model, c.paths.cache_dir, random_weights=True).model
            context = PostContext(base_model=lambda m=unaligned: m, device=device)
        else:  # the pipeline's context: calibration batches of the harmful rows
            context = post_context(c, splits, base.tokenizer, fmt)
        if cuda:
            torch.cuda.synchronize()
        setup = time.perf_counter() - start
        report = apply_repair(model, context, c.post)
        if cuda:
            torch.cuda.synchronize()
        if name == "safelora":
            work = f"{len(report['projected'])} of {report['layers']} LoRA layers projected"
        else:
            work = f"{report['examples']} examples, {report['tokens']} tokens; {report['weights_zeroed']} weights zeroed"
        out[name] = {"seconds": report["seconds"], "setup_s": setup, "peak_mib": peak_gib(cuda) * 1024, "work": work}
        del context, unaligned
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return out


def bench_family(name: str, args, folder: Path) -> dict:
    """One family's figures: train (fine-tuning methods), stage (align=NAME rows), repairs,
    generate, settings."""
    overrides = [*shapes.prepare(name, folder, tiny=args.tiny), *args.overrides]
    cfgs, *state = step_cost.setup(args.methods, overrides, PER_METHOD, random_weights=True)
    runs = step_cost.time_methods(cfgs, state, args.methods, args.warmup, args.steps, args.rounds)
    c, (base, splits, fmt, model) = cfgs["sft"], state
    cuda = step_cost.on_gpu(c)
    stage_cfgs, repair_cfgs = configs(overrides, args.stages, args.repairs)
    if stage_cfgs or repair_cfgs:  # the alignment rows, their harmful answers and pairs (local files: quick)
        splits = build_splits(base, next(iter({**stage_cfgs, **repair_cfgs}.values())))
    runs.update(time_stages(stage_cfgs, base, splits, fmt, model, args.warmup, args.stage_steps, cuda))
    rows = step_cost.summary(runs)
    train = {k: v for k, v in rows.items() if not k.startswith("align=")}
    stage = {k: v for k, v in rows.items() if k.startswith("align=")}
    repairs = time_repairs(repair_cfgs, base, splits, fmt, model, cuda)
    sft = rows["sft"]
    for r in repairs.values():
        r["sft_step_s"] = sft["step_s"]
        r["memory_ratio"] = r["peak_mib"] / sft["peak_mib"] if sft["peak_mib"] > 0 else float("nan")
    gen = generation(c, base, fmt, model, shapes.words(), args.prompts or c.eval.batch_size, args.prompt_tokens,
                     args.new_tokens)
    d = c.data
    settings = {"parameters": sum(p.numel() for p in model.parameters()), "dtype": c.model.dtype,
                "precision": c.trainer.precision, "adapter": f"{c.adapter.kind} r={c.adapter.r}",
                "batch": f"{d.batch_size} x {d.max_length} task tokens, {d.safety_batch_size} x 2 x "
                         f"{d.safety_max_length} safety-pair tokens"}
    if stage_cfgs:
        s = stage_config(next(iter(stage_cfgs.values())))
        settings["stage_batch"] = (f"{s.data.batch_size} x {s.data.max_length} alignment tokens, harmful "
                                   f"{s.data.alignment_batch_size or s.data.batch_size} x {s.data.max_length}, pairs "
                                   f"{s.data.safety_batch_size} x 2 x {s.data.safety_max_length}")
    return {"settings": settings, "train": train, "stage": stage, "repairs": repairs, "generate": gen}


def markdown(results: dict) -> str:
    lines = ["| family | method | step s | tokens/s | peak GiB | step / sft | memory / sft |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for family, r in results.items():
        for method, row in {**r["train"], **r["stage"]}.items():
            lines.append(f"| {family} | {method} | {row['step_s']:.3f} | {row['tokens_per_s']:.0f} | "
                         f"{row['peak_mib'] / 1024:.2f} | {row['step_ratio']:.2f} | {row['memory_ratio']:.2f} |")
    if any(r["repairs"] for r in results.values()):
        lines += ["", "| family | repair | repair s | setup s | peak GiB | memory / sft | sft step s | work |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for family, r in results.items():
            for repair, row in r["repairs"].items():
                lines.append(f"| {family} | post={repair} | {row['seconds']:.3f} | {row['setup_s']:.3f} | "
                             f"{row['peak_mib'] / 1024:.2f} | {row['memory_ratio']:.2f} | {row['sft_step_s']:.3f} | "
                             f"{row['work']} |")
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
            r = results[name] = bench_family(name, args, Path(tmp))
            gc.collect()  # this family's model, before the next one is built
            if cuda:
                torch.cuda.empty_cache()
            print(f"[{time.perf_counter() - started:.0f} s] {name}: {r['settings']['parameters'] / 1e9:.2f}B "
                  f"parameters, {len(r['train'])} methods, {len(r['stage'])} stage rows, {len(r['repairs'])} repairs, "
                  f"generation {r['generate']['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "gpu_bench.json").write_text(json.dumps(
                    {"device": device, "warmup": args.warmup, "steps": args.steps, "stage_steps": args.stage_steps,
                     "rounds": args.rounds, "overrides": args.overrides, "results": results}, indent=1))

    first = next(iter(results.values()))["settings"]
    stage = (f"; align=NAME rows: the alignment stage's step ({first['stage_batch']}), {args.warmup} untimed + "
             f"{args.stage_steps} timed steps" if "stage_batch" in first else "")
    print(f"\ndevice: {device}; {first['dtype']} weights, {first['precision']}, {first['adapter']}; "
          f"batch {first['batch']}; {args.rounds} round(s) x ({args.warmup} untimed + {args.steps} timed) steps "
          f"per method; tokens/s: task tokens; lisa: {' '.join(PER_METHOD['lisa'])}{stage}; "
          f"total {time.perf_counter() - started:.0f} s\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
