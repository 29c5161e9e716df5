"""SafeLoRA: project LoRA updates onto the alignment subspace (Hsu et al., NeurIPS 2024).

For every LoRA layer m, with W the aligned weights (the PEFT base layer's, where fine-tuning
started) and W0 the unaligned model's weights of the same layer:

    V = W - W0,   C = V V^T / ||V||_F   (the paper's cheap stand-in for the projector V (V^T V)^-1 V^T)
    dW = B A,     cos_m = <C dW, dW>_F / (||C dW||_F ||dW||_F)

and B <- C B (so dW <- C dW) for the layers whose update leaves the subspace most: the k with
the lowest cosine (mode=number, the authors' default) or those with cos <= threshold
(mode=threshold). PEFT's scaling alpha/r multiplies dW and C dW alike, so the cosine ignores it.

Choices, checked against IBM/SafeLoRA (model.py, config.py):
- The authors' code pairs base/aligned parameters and LoRA layers by position in
  named_parameters; a target name matching a bias (Qwen2's q/k/v_proj.bias) shifts that
  pairing. Here layers are paired by module name and only weights are used; LoRA biases
  (PEFT's lora_bias) are left as they are.
- mode=number: the code projects every layer whose cosine, rounded to 5 decimals, is <= the
  k-th smallest, so ties can project more than k; here exactly the k lowest (unrounded, ties
  by module order). k above the number of layers projects them all.
- V = 0 (a layer the alignment did not change): C is 0/0 and the code's cosine NaN, which
  never passes its `cos <= t` test. Here such a layer, and one whose update dW is 0, is
  skipped (reported under `skipped`, never projected, never counted among the k).
- C dW = 0 (an update orthogonal to V's columns) has cosine 0, as torch's cosine_similarity
  (the code's) gives it: the lowest, so it is projected (B becomes 0).
- C is never formed: C B = V (V^T B) / ||V||_F and the cosine comes from r x r Gram
  matrices; all in float64 on context.device, one layer at a time (memory: the unaligned
  model, wherever base_model() puts it, plus one layer's V). The new B is cast back to B's dtype.
- Full fine-tuning (no LoRA layers) is refused: the method projects LoRA updates.
- The unaligned model comes from context.base_model() (model.base_name_or_path; synthetic: its
  base variant); layers are matched by name, a missing layer or another shape is a ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safeprobe.config import ConfigError, one_of, require
from safeprobe.post import PostConfig, PostContext, lora_layers, register_repair


@dataclass
class SafeLoRAConfig(PostConfig):
    name: str | None = "safelora"
    mode: str = "number"  # number: the k lowest cosines | threshold: every cos <= threshold
    k: int = 10  # layers projected in mode=number (authors' num_proj_layers: 10)
    threshold: float = 0.5  # cosine threshold in mode=threshold (authors': 0.5)

    def __post_init__(self):
        one_of("post.mode", self.mode, ("number", "threshold"))
        require(self.k >= 1, "post.k", self.k, "an integer >= 1")
        require(0 <= self.threshold <= 1, "post.threshold", self.threshold,
                "a number in [0, 1] (C is positive semi-definite, so the cosine is too)")


def _weight_of(base: torch.nn.Module, name: str, like: torch.Tensor) -> torch.Tensor:
    try:
        w = base.get_submodule(name).weight
    except AttributeError:
        w = None
    if w is None or w.shape != like.shape:
        got = "no such layer" if w is None else f"shape {tuple(w.shape)}, not {tuple(like.shape)}"
        raise ConfigError(f"the unaligned model (model.base_name_or_path) is invalid for post.name='safelora' ({name}: "
                          f"{got}); allowed: the unaligned model of the fine-tuned model's architecture")
    return w


def projection_cosine(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[float, torch.Tensor]:
    """cos(C B A, B A) for C = V V^T / ||V||_F, and C B; float64, without forming C or B A."""
    cb = v @ (v.T @ b) / torch.linalg.matrix_norm(v)
    gram = a @ a.T  # r x r
    inner = ((cb.T @ b) * gram).sum()
    norm_c = ((cb.T @ cb) * gram).sum().clamp_min(0).sqrt()
    norm = ((b.T @ b) * gram).sum().clamp_min(0).sqrt()
    if not norm_c > 0:  # C dW = 0: the update lies wholly outside the subspace (torch's cosine with eps: 0)
        return 0.0, cb
    return (inner / (norm_c * norm)).item(), cb


@register_repair("safelora", SafeLoRAConfig)
def repair(model: torch.nn.Module, context: PostContext, cfg: SafeLoRAConfig) -> dict:
    layers = lora_layers(model, "safelora")
    require(bool(layers), "post.name", "safelora", "a LoRA fine-tuned model (adapter=lora; SafeLoRA projects "
            "LoRA updates, and this model has no LoRA layers)")
    if context.base_model is None:
        raise ConfigError("post.name='safelora' needs the unaligned model; allowed: a run that provides it "
                          "(model.base_name_or_path, or the synthetic model's base variant)")
    base = context.base_model()
    dev, f64 = torch.device(context.device), torch.float64
    cosines, projected_b, skipped = {}, {}, {}
    for name, layer, adapter in layers:
        aligned = layer.get_base_layer().weight
        v = aligned.detach().to(dev, f64) - _weight_of(base, name, aligned).detach().to(dev, f64)
        a = layer.lora_A[adapter].weight.detach().to(dev, f64)
        b = layer.lora_B[adapter].weight.detach().to(dev, f64)
        if not torch.linalg.matrix_norm(v) > 0:
            skipped[name] = "V = 0: the alignment did not change this layer"
            continue
        if not ((b.T @ b) * (a @ a.T)).sum() > 0:  # ||B A||_F^2 without forming B A
            skipped[name] = "dW = B A = 0: fine-tuning did not change this layer"
            continue
        cosines[name], cb = projection_cosine(v, a, b)
        projected_b[name] = cb.cpu()  # r columns: small
        del v, a, b, cb
    del base
    if cfg.mode == "number":
        chosen = sorted(cosines, key=cosines.get)[: cfg.k]  # stable: ties by module order
    else:
        chosen = [n for n, c in cosines.items() if c <= cfg.threshold]
    modules = {name: (layer, adapter) for name, layer, adapter in layers}
    for name in chosen:
        layer, adapter = modules[name]
        weight = layer.lora_B[adapter].weight
        weight.data.copy_(projected_b[name].to(weight.device, weight.dtype))
    chosen = [n for n in cosines if n in set(chosen)]  # module order
    return {"mode": cfg.mode, "layers": len(layers), "projected": chosen, "cosines": cosines, "skipped": skipped}
