"""SAP's probe gradient in bf16 against float32, per harmful_step and probe.difference (docs/sap.md, "Precision").

    python benchmarks/probe_precision.py                        # Llama-2-7b-chat's config at the stand-ins' size
    python benchmarks/probe_precision.py --shape llama_100m     # a ~100M Llama (slower: bf16 on a CPU)
    python benchmarks/probe_precision.py --steps 2e-5 1e-3 0.1 probe.layers=[3,9]

From one starting point (random weights of the shape; a LoRA moved off its zero init by a few
SFT steps in float32), the same batch goes through SAP's direction and probe-gradient passes
twice: in float32 (the reference: two passes, the paper's formula), and as a bf16 run computes
them (frozen weights in bf16, LoRA weights in float32 as PEFT keeps them, the passes under bf16
autocast as Lightning's bf16-mixed runs them). For each harmful_step it prints the bf16 probe
gradient's cosine to the reference and the share of coordinates whose sign agrees (the L-inf
probe is eps * sign: the share that gets the reference's probe), for probe.difference = finite
and midpoint, and midpoint in float32 (the midpoint rule's own error against the two passes).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import shapes  # noqa: E402
from step_cost import setup  # noqa: E402  (puts src/ on the path)

from safeprobe.methods import build_method  # noqa: E402
from safeprobe.pipeline import data_module  # noqa: E402


def warm_up(model, batch, steps: int, lr: float) -> None:
    """A few float32 SFT steps, so LoRA's B (zero at init) and the probe's view of it are not trivial."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def in_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """The model as a bf16 run holds it: frozen weights in bf16, trainable (LoRA) weights in float32."""
    half = copy.deepcopy(model)
    for p in half.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    return half


def probe_gradient(module, batch, harmful_step: float, difference: str, bf16: bool) -> tuple[torch.Tensor, float]:
    """The probe gradient at V = 0 (direction pass included) and its time in seconds, as one step computes them."""
    module.probe_cfg = dataclasses.replace(module.probe_cfg, harmful_step=harmful_step, difference=difference)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16), module.side_rng():
        start = time.perf_counter()
        direction = module.unsafe_direction(batch["safety"])
        zeros = module.probe.zeros(batch["task"]["input_ids"])
        grad = module.probe_gradient(batch["task"], zeros, direction)
        return grad, time.perf_counter() - start


def agreement(grad: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Cosine and the share of the reference's non-zero coordinates with the same sign."""
    cos = torch.nn.functional.cosine_similarity(grad.flatten().double(), reference.flatten().double(), dim=0).item()
    nonzero = reference != 0
    return cos, (grad.sign() == reference.sign())[nonzero].float().mean().item()


def compare(c, start_model, batch, steps: list[float]) -> list[dict]:
    """Per harmful_step: (cosine, sign agreement) to the float32 two-pass gradient of each variant."""
    frozen = {id(p): p for p in start_model.parameters() if not p.requires_grad}
    fp32 = build_method(copy.deepcopy(start_model, frozen), c)
    bf16 = build_method(in_bf16(start_model), c)
    for m in (fp32, bf16):
        m.model.train()
    rows = []
    for h in steps:
        reference, t_fp32 = probe_gradient(fp32, batch, h, "finite", False)
        row = {"harmful_step": h, "reference |g|": reference.norm().item(), "seconds fp32 finite": t_fp32}
        for name, module, difference, bf in (("fp32 midpoint", fp32, "midpoint", False), ("bf16 finite", bf16, "finite", True),
                                             ("bf16 midpoint", bf16, "midpoint", True), ("bf16 auto", bf16, "auto", True)):
            grad, seconds = probe_gradient(module, batch, h, difference, bf)
            row[name], row[f"seconds {name}"] = agreement(grad, reference), seconds
        rows.append(row)
    return rows


def main() -> None:
    warnings.filterwarnings("ignore", message=".*self.log.*")  # the module runs outside a Trainer here
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=float, nargs="+", default=[2e-5, 1e-3, 0.1], help="harmful_step values")
    parser.add_argument("--warmup", type=int, default=10, help="float32 SFT steps before the comparison")
    parser.add_argument("--shape", choices=list(shapes.SHAPES), default=None,
                        help="a real shape (default: llama2_7b_chat's config at the stand-ins' size, 10 layers)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="probe-precision-") as folder:
        name = args.shape or "llama2_7b_chat"
        overrides = [*shapes.prepare(name, Path(folder), tiny=args.shape is None), *shapes.CPU, "probe=reference",
                     "data.batch_size=4", *args.overrides]
        torch.manual_seed(0)  # the random weights: the same figures on every run
        cfgs, base, splits, fmt, start_model = setup(["sap"], overrides, {}, random_weights=True)
        c = cfgs["sap"]
        batch, *_ = next(iter(data_module(c, base, splits, fmt).train_dataloader()))
        torch.manual_seed(c.seed)
        warm_up(start_model, batch["task"], args.warmup, c.optim.lr)
        rows = compare(c, start_model, batch, args.steps)
    n_params = sum(p.numel() for p in start_model.parameters())
    print(f"model: {name} shape{' (stand-in size)' if args.shape is None else ''}, {n_params / 1e6:.1f}M parameters, "
          f"LoRA on {c.adapter.target_modules}; batch {batch['task']['input_ids'].shape[0]} x "
          f"{batch['task']['input_ids'].shape[1]} tokens; probe layers {c.probe.layers}; CPU, bf16 autocast")
    print("\ncosine to the float32 two-pass probe gradient (share of coordinates whose sign agrees)\n")
    variants = ("fp32 midpoint", "bf16 finite", "bf16 midpoint", "bf16 auto")
    print("| harmful_step | " + " | ".join(variants) + " |\n|---|" + "---|" * len(variants))
    for r in rows:
        print(f"| {r['harmful_step']:g} | " + " | ".join(f"{r[v][0]:.4f} ({r[v][1]:.1%})" for v in variants) + " |")
    print("\nseconds per direction + probe-gradient pass (one run each; CPU bf16 matmuls are slow)\n")
    timed = ("fp32 finite", *variants)
    print("| harmful_step | " + " | ".join(timed) + " |\n|---|" + "---|" * len(timed))
    for r in rows:
        print(f"| {r['harmful_step']:g} | " + " | ".join(f"{r[f'seconds {v}']:.3f}" for v in timed) + " |")


if __name__ == "__main__":
    main()
