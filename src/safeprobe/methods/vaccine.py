"""Vaccine: perturbation-aware alignment (Huang et al., NeurIPS 2024), an alignment-stage defense.

Per alignment batch A (the stage's task stream), two passes:
  1. g_l = dCE(A)/d out_l at every decoder layer's attention output out_l (the self-attention
     block's output, before the residual add);
  2. e_l = rho * g_l / (sqrt(sum_l ||g_l||^2) + 1e-7): one norm over all layers and tokens, so
     the whole perturbation has norm rho (up to the 1e-7 guard of the authors' code);
  3. the update: one optimizer step on the gradient of CE(A) with e_l added to out_l as a
     constant (pass 2 alone; pass 1's weight gradients are never formed).

Cost: 2 forwards, 2 backwards (pass 1 differentiates w.r.t. the attention outputs only).

Choices against the authors' code (git-disl/Vaccine trainer.py, VaccineTrainer):
- they record g_l with deprecated module backward hooks on every LlamaAttention; here each
  attention output gets a zero tensor added in pass 1 and g_l = torch.autograd.grad w.r.t.
  it: the same gradient, for any architecture whose decoder blocks have `self_attn`, and one
  that flows through gradient checkpointing's recomputation;
- they set the perturbed output's `.data`; here e_l is added as a constant: the same forward
  values and the same gradients;
- pass 1 runs inside `side_rng()`, so it draws the same dropout masks as pass 2, and pass 2
  the same as SFT would (theirs draws fresh masks for each pass);
- rho = 2 (the Vaccine repository's default; Booster's scripts run Vaccine with rho = 5);
  rho = 0 skips pass 1 and is plain SFT, bit for bit.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from safeprobe import distributed
from safeprobe.config import require
from safeprobe.methods.base import FineTuneModule
from safeprobe.methods.losses import task_loss
from safeprobe.methods.registry import MethodConfig, register
from safeprobe.models.factory import decoder_layers

EPS = 1e-7  # the authors' guard in rho / (||g|| + eps)


@dataclass
class VaccineConfig(MethodConfig):
    rho: float = 2.0  # the perturbation's norm over all layers (Vaccine repository: 2; Booster's scripts: 5)

    def __post_init__(self):
        require(self.rho >= 0 and math.isfinite(self.rho), "method.rho", self.rho, "a finite number >= 0")


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every decoder block's self-attention module, in layer order."""
    layers = decoder_layers(model)
    if not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"{type(model).__name__}'s decoder blocks have no `self_attn`; Vaccine cannot perturb them")
    return [layer.self_attn for layer in layers]


@contextmanager
def added_to_attention(model: torch.nn.Module, deltas: list[torch.Tensor | None]):
    """Within the block, attention output l is out_l + deltas[l] in every forward (gradient
    checkpointing's recomputation included); the hooks are removed on the way out. A None entry
    becomes a zero tensor of out_l's shape and dtype that requires grad, made at the first
    forward and reused after: the gradient w.r.t. it is the gradient w.r.t. out_l."""

    def hook_for(layer):
        def hook(module, args, out):
            t = out[0] if isinstance(out, tuple) else out
            if deltas[layer] is None:
                deltas[layer] = torch.zeros_like(t, requires_grad=True)
            t = t + deltas[layer].to(t.dtype)
            return (t, *out[1:]) if isinstance(out, tuple) else t
        return hook

    modules = attention_modules(model)
    if len(deltas) != len(modules):
        raise ValueError(f"{len(deltas)} perturbations for {len(modules)} attention layers")
    hooks = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def attention_gradients(model: torch.nn.Module, batch: dict) -> list[torch.Tensor]:
    """g_l = dCE(batch)/d out_l for every layer l (no weight gradients are formed)."""
    probes: list[torch.Tensor | None] = [None] * len(attention_modules(model))
    with added_to_attention(model, probes):
        loss = task_loss(model, batch)
        grads = torch.autograd.grad(loss, probes, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(probes, grads)]


def perturbation(grads: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """e_l = rho * g_l / (||g|| + eps), ||g|| the norm over all layers together (computed in fp32).

    On several processes g_l holds this rank's rows of the global batch's gradient (the rank's
    loss is its contribution, world size times its share: divided back here) and ||g|| is the
    norm over every rank's rows: the perturbation of the global batch."""
    world = distributed.world_size()
    if world > 1:
        grads = [g.float() / world for g in grads]
    norm = torch.sqrt(distributed.total(sum((g.float() ** 2).sum() for g in grads)))
    scale = rho / (norm + EPS)
    return [(g.float() * scale).detach() for g in grads]


@register("vaccine", VaccineConfig)
class VaccineModule(FineTuneModule):
    stage = "alignment"
    streams = ("task",)

    def __init__(self, model: torch.nn.Module, cfg):
        super().__init__(model, cfg)
        attention_modules(model)  # fail at construction on a model without self-attention blocks
        self.perturbation: list[torch.Tensor] | None = None  # this step's e_l (kept for inspection)

    @contextmanager
    def update_context(self, batch: dict):
        """Pass 1 finds e; the update (pass 2: forward and backward) runs with e in place."""
        rho = self.method_cfg.rho
        if rho == 0:
            yield
            return
        task = batch["task"]
        with self.side_rng():
            grads = attention_gradients(self.model, task)
        self.perturbation = perturbation(grads, rho)
        squares = torch.stack([sum((e ** 2).sum() for e in self.perturbation),
                               sum((g.float() ** 2).sum() for g in grads) / distributed.world_size() ** 2])
        squares = distributed.total(squares)  # over the global batch's rows
        self.log("vaccine/perturbation_norm", torch.sqrt(squares[0]), batch_size=1)
        self.log("vaccine/gradient_norm", torch.sqrt(squares[1]), batch_size=1)
        with added_to_attention(self.model, self.perturbation):
            yield

    def on_train_end(self) -> None:
        super().on_train_end()
        self.perturbation = None
