"""Booster: attenuating harmful perturbation (Huang et al., ICLR 2025), an alignment-stage defense.

    min_theta  f(theta) + lam * [h(theta) - h(theta - alpha * grad h(theta) / ||grad h(theta)||)]

f: CE on the alignment batch (the stage's task stream); h: CE on a harmful batch (harmful
prompt -> harmful answer, the harmful stream). The bracket is how much one normalized harmful
step of size alpha lowers the harmful loss; Booster makes that drop small. First order, as the
authors: with g_h = grad h(theta), s = ||g_h|| + 1e-7 and g_h2 = grad h at theta - alpha*g_h/s
(g_h held constant), the step's gradient is

    g_f + lam * (g_h - g_h2).

On several processes both harmful gradients are averaged over the ranks (each rank's loss being
its contribution to the global batch's), so g_h, its norm and the shift are the global batch's,
the same on every rank; the difference added after DDP's averaged backward is then the same too.

Per step: h's two passes (the trainable weights shifted in place for the second one and then
put back from a copy, bit for bit), then the update pass on f; the difference is added to the
gradients before the optimizer step. Cost: 3 forwards, 3 backwards. Only trainable weights
(requires_grad) are shifted, and ||g_h|| is their global norm.

The step's loss (what the framework checks for NaN and logs) is the objective's value,
f + lam * (h(theta) - h(theta')), its bracket a constant: its gradient is exactly g_f.
lam = 0 skips the harmful passes and is plain SFT, bit for bit.

Choices against the authors' code (git-disl/Booster trainer.py, BoosterAlignmentTrainer):
- the harmful passes run inside `side_rng()` (each from the same random state), so they draw
  the same dropout masks as each other and the update pass the same as SFT (theirs draws
  fresh masks for each of the three passes);
- their harmful batch size is fixed at 10 (their alignment batch size too); here it is the
  harmful stream's, data.alignment_batch_size or the stage's batch size;
- their optional `perturb_aware` mode (a Vaccine pass on f) is not reproduced.
Defaults: lam = 5, alpha = 0.1 (script/alignment/smooth_align.sh).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from safeprobe import distributed
from safeprobe.config import require
from safeprobe.methods.base import FineTuneModule
from safeprobe.methods.losses import task_loss
from safeprobe.methods.registry import MethodConfig, register

EPS = 1e-7  # the authors' guard in alpha / (||g_h|| + eps)


@dataclass
class BoosterConfig(MethodConfig):
    lam: float = 5.0  # lambda: weight of the harmful-loss drop (authors: 5)
    alpha: float = 0.1  # the normalized harmful step's size (authors: 0.1)

    def __post_init__(self):
        require(self.lam >= 0 and math.isfinite(self.lam), "method.lam", self.lam, "a finite number >= 0")
        require(self.alpha >= 0 and math.isfinite(self.alpha), "method.alpha", self.alpha, "a finite number >= 0")


def gradients(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t.detach().float() ** 2).sum() for t in tensors))


@register("booster", BoosterConfig)
class BoosterModule(FineTuneModule):
    stage = "alignment"
    streams = ("task", "harmful")

    def __init__(self, model: torch.nn.Module, cfg):
        super().__init__(model, cfg)
        self.harmful_difference: list[torch.Tensor] | None = None  # g_h - g_h2 of the current step

    def harmful_passes(self, harmful: dict) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """h(theta), h(theta - alpha g_h / s) and g_h - g_h2; the weights are as before on return."""
        params = self.trainable_parameters()
        with self.side_rng():
            h = task_loss(self.model, harmful)
            diff = distributed.mean_(gradients(h, params))  # g_h (of the global batch), turned into g_h - g_h2 below
        norm = global_norm(diff)
        scale = self.method_cfg.alpha / (norm + EPS)
        backup = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, g in zip(params, diff):
                    p.sub_((g.float() * scale).to(p.dtype))
            with self.side_rng():
                h_shifted = task_loss(self.model, harmful)
                for d, g2 in zip(diff, distributed.mean_(gradients(h_shifted, params))):
                    d.sub_(g2)
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)
        self.log("booster/harmful_grad_norm", norm, batch_size=1)
        return h.detach(), h_shifted.detach(), diff

    def loss(self, batch: dict) -> torch.Tensor:
        lam = self.method_cfg.lam
        if lam == 0:
            return task_loss(self.model, batch["task"])
        h, h_shifted, self.harmful_difference = self.harmful_passes(batch["harmful"])
        gap = h - h_shifted
        self.log("booster/harmful_loss", h, batch_size=1)
        self.log("booster/harmful_gap", gap, batch_size=1)
        f = task_loss(self.model, batch["task"])
        self.log("booster/alignment_loss", f.detach(), batch_size=1)
        return f + lam * gap  # the gap is a constant here: the gradient is g_f; after_backward adds the rest

    def after_backward(self) -> None:
        if self.harmful_difference is None:
            return
        lam = self.method_cfg.lam
        for p, d in zip(self.trainable_parameters(), self.harmful_difference, strict=True):
            if p.grad is None:
                p.grad = (lam * d).to(p.dtype)
            else:
                p.grad.add_(d.to(p.grad.dtype), alpha=lam)
        self.harmful_difference = None

    def on_train_end(self) -> None:
        super().on_train_end()
        self.harmful_difference = None
