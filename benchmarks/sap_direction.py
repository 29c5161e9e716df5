"""Does fine-tuning move the weights along SAP's unsafe direction? A check of SAP's premise.

    python benchmarks/sap_direction.py [--temperature T] multirun/evidence/main/*synthetic_instruct*

For each finished job folder (LoRA runs in the synthetic world): rebuild the adapter's
initial weights theta_0 exactly as the run did (same seed), read its final weights theta_1,
and compute at theta_0 the unsafe direction g_hat of SAP (unit gradient of the contrastive
safety loss over the trainable weights, all safety pairs). Prints per job:
  cos(theta_1 - theta_0, g_hat)   > 0: the run moved towards "less safe" as SAP measures it;
  cos(g_hat on half the pairs, g_hat on the other half)   how well 48 pairs pin it down;
  1/sqrt(d)                        the size of a random cosine, for scale.
Then, for the first job, that split-half cosine at several probe.temperature values: on a
well-aligned model the pair weights sigmoid(-margin / T) are dominated by the one pair with
the smallest margin unless T is large, and g_hat is then one pair's gradient.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from safeprobe.config import validate
from safeprobe.data.formatting import collate_pairs, encode_pairs
from safeprobe.methods.sap import SAPModule, global_norm
from safeprobe.models.factory import apply_adapter, formatter, load_base
from safeprobe.pipeline import build_splits


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b, strict=True)) / (global_norm(a) * global_norm(b)))


def setup(job: Path):
    """The run's config, data, and the adapter at its initial weights (as pipeline.run built it)."""
    c = validate(OmegaConf.load(job / "config.yaml"))
    base = load_base(c.model, c.paths.cache_dir)
    splits = build_splits(base, c)
    fmt = formatter(base, c.data.prompt_format, c.data.system_prompt)
    L.seed_everything(c.seed, workers=True)  # as pipeline.run does before apply_adapter
    model = apply_adapter(base.model, c.adapter)
    rows = encode_pairs(base.tokenizer, fmt, splits.safety_pairs, c.data.max_length)
    return c, model, rows, base.tokenizer.pad_token_id


def split_half(c, model, rows, pad, temperature: float) -> float:
    sap = SAPModule(model, c.optim, dataclasses.replace(c.probe, temperature=temperature))
    half = len(rows) // 2
    return cosine(sap.unsafe_direction(collate_pairs(rows[:half], pad)), sap.unsafe_direction(collate_pairs(rows[half:], pad)))


def job_figures(job: Path, temperature: float | None = None) -> dict:
    c, model, rows, pad = setup(job)
    if temperature is not None:
        c.probe = dataclasses.replace(c.probe, temperature=temperature)
    sap = SAPModule(model, c.optim, c.probe)
    params = sap.trainable_parameters()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    theta_0 = [p.detach().clone() for p in params]
    g_all = sap.unsafe_direction(collate_pairs(rows, pad))
    final = load_file(job / "adapter" / "adapter_model.safetensors")
    theta_1 = [final[n.replace(".default", "")].to(t.dtype) for n, t in zip(names, theta_0, strict=True)]
    delta = [t1 - t0 for t1, t0 in zip(theta_1, theta_0, strict=True)]
    d = sum(p.numel() for p in params)
    return {"cos(step, g_hat)": cosine(delta, g_all), "cos(g_hat halves)": split_half(c, model, rows, pad, c.probe.temperature),
            "1/sqrt(d)": 1 / math.sqrt(d), "|delta|/|theta_0|": float(global_norm(delta) / global_norm(theta_0))}


def main(jobs: list[str], temperature: float | None = None) -> None:
    torch.set_num_threads(1)
    print("| job | cos(theta_1 - theta_0, g_hat) | cos(g_hat halves) | 1/sqrt(d) | ‖Δ‖/‖θ_0‖ |\n|---|---|---|---|---|")
    done = [job for job in map(Path, jobs) if (job / "results.json").exists() and (job / "adapter").exists()]
    for job in done:
        f = job_figures(job, temperature)
        print(f"| {job.name} | {f['cos(step, g_hat)']:+.4f} | {f['cos(g_hat halves)']:+.3f} | {f['1/sqrt(d)']:.4f} | {f['|delta|/|theta_0|']:.3f} |")
    if done:
        setting = setup(done[0])
        print("\n| probe.temperature | split-half cosine of g_hat at theta_0 |\n|---|---|")
        for t in (1, 3, 10, 30, 100):
            print(f"| {t} | {split_half(*setting, t):+.3f} |")


if __name__ == "__main__":
    args = sys.argv[1:]
    t = None
    if args[:1] == ["--temperature"]:  # g_hat at another temperature than the runs used
        t, args = float(args[1]), args[2:]
    if not args:
        sys.exit(__doc__)
    main(args, t)
