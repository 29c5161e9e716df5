"""SAP: Safety-Aware Probing (arXiv 2505.16737), one training step. See docs/sap.md.

Per batch (task batch B, safety pairs S):
  1. unsafe direction  g_hat = grad_theta L_c / ||grad_theta L_c||, L_c the contrastive
     safety loss; +g_hat points towards "less safe";
  2. harmful perturbation  delta = harmful_step * ||theta|| * g_hat;
  3. probe  V* = argmax_{||v_l|| <= eps}  L(theta + delta, V) - L(theta, V), by projected
     ascent from V = 0 with gradients w.r.t. V only (theta is restored bit for bit);
  4. update  one optimizer step on L(theta, V*), the probe held fixed (FineTuneModule's
     step, run inside `update_context`).

Steps 1-3 run every `probe.refresh_every` steps (default 16); in between, the update uses the
last probe (one vector per probed layer, whatever the batch). The paper refreshes every step
(refresh_every=1) at 3.3-4.7x SFT's step time; every 16 steps costs 1.1-1.2x with the same
measured effect in the synthetic world (docs/performance.md).

On several processes (DDP) the direction and the probe are those of the global batch: the
ranks' weighted gradient sums are brought to one scale and summed before the normalization, the
probe gradient is averaged over the ranks before its sign step, and probe.probe_examples counts
the global batch's first rows (distributed.py, docs/distributed.md).

In bf16/fp16 (mixed precision or 16-bit weights) the two passes of step 3 differ by less than
their rounding at the paper's harmful_step (2e-5): their difference is noise. There the same
difference is taken as the integral of its derivative along delta (midpoint rule: one pass and a
second backward), which subtracts nothing (probe.difference, docs/sap.md "Precision").

`probe.mode=faithful` reproduces the reference code instead: V is an AdamW-optimized
tensor (lr = eps) whose moments persist across steps, zeroed and re-stepped after each
update, so the probe used at step t was found on batch t-1, and the L(theta, V) half of
its gradient comes from the update pass itself.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from safeprobe import distributed
from safeprobe.config import ConfigError, check_probe_layers
from safeprobe.data.formatting import IGNORE, up_to_first_difference
from safeprobe.methods.base import FineTuneModule
from safeprobe.methods.losses import sequence_logprobs, task_loss
from safeprobe.methods.probe import Probe, ascend
from safeprobe.methods.registry import register
from safeprobe.models.factory import model_depth


def first(batch: dict, n: int | None) -> dict:
    """The batch's first n examples (all when n is None). On several processes: this rank's rows
    among the global batch's first n (when it holds none, its first row with no labelled token,
    which adds nothing to the loss or its gradient)."""
    if n is None:
        return batch
    rows = batch["input_ids"].shape[0]
    keep = min(max(n - distributed.rows_before(rows), 0), rows)
    if keep == 0:
        return {**{k: v[:1] for k, v in batch.items()}, "labels": torch.full_like(batch["labels"][:1], IGNORE)}
    return {k: v[:keep] for k, v in batch.items()}


def pair_rows(pairs: dict, start: int, stop: int) -> dict:
    """Pairs start..stop-1 of a pair batch (B safe rows, then B harmful rows), in the same layout."""
    n = pairs["input_ids"].shape[0] // 2
    if (start, stop) == (0, n):
        return pairs
    return {k: torch.cat([v[start:stop], v[n + start:n + stop]]) for k, v in pairs.items()}


def global_norm(tensors) -> torch.Tensor:
    return torch.sqrt(sum((t.detach().float() ** 2).sum() for t in tensors))


HALF = (torch.bfloat16, torch.float16)


def computes_in_16_bit(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether the model's passes run in bf16/fp16 here: autocast on (Lightning's *-mixed precision),
    or 16-bit weights."""
    if torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) in HALF:
        return True
    return any(p.dtype in HALF for p in model.parameters())


@register("sap")
class SAPModule(FineTuneModule):
    """SAP's settings are the `probe` group (probe.*), not method.*: `-m probe.eps=...` sweeps."""

    streams = ("task", "safety")

    @classmethod
    def check_config(cls, cfg) -> None:
        check_probe_layers(cfg.probe.layers, model_depth(cfg.model))
        if cfg.model.attn_implementation == "flash_attention_2" and cfg.probe.difference != "finite":
            raise ConfigError("model.attn_implementation='flash_attention_2' is invalid with SAP in 16-bit; allowed: "
                              "sdpa or eager (the probe's midpoint difference takes a second derivative, which "
                              "FlashAttention-2 lacks), or probe.difference=finite (rounding noise at small harmful_step)")

    def __init__(self, model: torch.nn.Module, cfg):
        super().__init__(model, cfg)
        self.probe_cfg = cfg.probe
        self.probe = Probe(model, cfg.probe.layers)
        self.direction: list[torch.Tensor] | None = None
        self.vectors: torch.Tensor | None = None  # the last probe found
        self.faithful_v: torch.Tensor | None = None  # faithful mode's persistent probe (never a parameter)

    # ------------------------------------------------------------ the SAP step
    @contextmanager
    def update_context(self, batch: dict):
        """Steps 1-3 find the probe; step 4 (the update) runs inside, with the probe in place."""
        task, pairs = batch["task"], batch["safety"]
        if self.probe_cfg.mode == "faithful":
            vectors = self._faithful_probe(task, pairs)
        elif self.vectors is None or self.global_step % self.probe_cfg.refresh_every == 0:
            with self.side_rng():
                self.direction = self.unsafe_direction(pairs)
                vectors = self.vectors = self.find_probe(first(task, self.probe_cfg.probe_examples))
        else:  # probe.refresh_every > 1: the probe (one vector per layer, whatever the batch) is kept
            vectors = self.vectors
        self.log("sap/probe_norm", vectors.detach().norm(dim=-1).mean(), batch_size=1)
        with self.probe.attached(vectors):
            yield

    def unsafe_direction(self, pairs: dict) -> list[torch.Tensor]:
        """g_hat: the unit gradient of the contrastive safety loss over trainable weights.

        grad L_c = -mean_i sigmoid(-m_i) grad m_i / T, with m_i the pair's log-prob margin.
        A well-aligned model has large margins, so sigmoid(-m_i) underflows and grad L_c
        vanishes in floating point. g_hat does not depend on a positive rescaling of those
        weights, so they are divided by their largest value first: the same unit vector,
        computed without underflow.

        The pairs go through in chunks of `safety_chunk()` pairs, so that this pass never holds
        more activations than the update pass; each chunk's sum is rescaled to the largest
        weight seen so far, which gives the one-chunk result up to float rounding. On several
        processes each rank's sum is rescaled to the largest weight of all ranks, and the sums
        are added: the direction of the global batch's pairs."""
        params = self.trainable_parameters()
        if self.probe_cfg.contrast == "decision":
            pairs = up_to_first_difference(pairs)
        n = pairs["input_ids"].shape[0] // 2
        size = self.safety_chunk(n)
        total, top, losses = None, None, []
        for start in range(0, n, size):
            safe, harm = sequence_logprobs(self.model, pair_rows(pairs, start, min(start + size, n))).chunk(2)
            margin = (safe - harm) / self.probe_cfg.temperature
            log_w = F.logsigmoid(-margin).detach()
            losses.append(-F.logsigmoid(margin.detach()))
            high = log_w.max()
            grads = torch.autograd.grad(-((log_w - high).exp() * margin).sum(), params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            if total is None:
                total, top = grads, high
            elif high > top:  # this chunk holds the largest weight: rescale the sum so far to it
                total, top = [t * (top - high).exp() + g for t, g in zip(total, grads)], high
            else:
                total = [t + g * (high - top).exp() for t, g in zip(total, grads)]
        if distributed.world_size() > 1:  # every rank's sum at the scale of the largest weight anywhere
            high = distributed.maximum(top)
            total = distributed.mean_([t * (top - high).exp() for t in total])  # the mean: the sum's direction
        norm = global_norm(total)
        self.log("sap/safety_loss", distributed.mean(torch.cat(losses).mean()), batch_size=1)
        return [g / norm if norm > 0 else g for g in total]

    def safety_chunk(self, n_pairs: int) -> int:
        """Pairs per chunk of the direction pass: probe.safety_chunk, or (null) as many as keep the
        chunk's 2 sequences per pair within the task batch's count."""
        if self.probe_cfg.safety_chunk is not None:
            return self.probe_cfg.safety_chunk
        batch = self.cfg.data.batch_size
        return n_pairs if 2 * n_pairs <= batch else max(1, batch // 2)

    def harmful_scale(self) -> float:
        """||delta|| = harmful_step * ||theta||, over the trainable weights."""
        return float(self.probe_cfg.harmful_step * global_norm(self.trainable_parameters()))

    @contextmanager
    def perturbed(self, direction: list[torch.Tensor], size: float | None = None):
        """theta <- theta + size * g_hat inside the block (size: harmful_scale() unless given); restored
        exactly (from a copy, not by subtraction) on the way out. Autocast keeps the 16-bit copy
        of each fp32 weight it made earlier in the step (Lightning's mixed precision wraps the
        whole step): that cache is dropped on entry and exit, or every pass would see the
        unperturbed weights and the probe gradient would be exactly 0."""
        params = self.trainable_parameters()
        scale = self.harmful_scale() if size is None else size
        backup = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.add_(d.to(p.dtype), alpha=scale)
            torch.clear_autocast_cache()
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)
            torch.clear_autocast_cache()

    def midpoint_difference(self) -> bool:
        """probe.difference resolved for this step (auto: midpoint when it computes in 16-bit)."""
        how = self.probe_cfg.difference
        return how == "midpoint" or (how == "auto" and computes_in_16_bit(self.model, self.device))

    def probe_gradient(self, task: dict, vectors: torch.Tensor, direction) -> torch.Tensor:
        """grad_V [L(theta + delta, V) - L(theta, V)], with no weight gradients."""
        v = vectors.detach().requires_grad_(True)
        if self.midpoint_difference():
            return distributed.mean(self.midpoint_probe_gradient(task, v, direction))
        # both passes draw the same dropout masks (the RNG is rewound after the first), so their
        # difference is delta's effect alone, not dropout noise; delta = 0 gives exactly 0
        with self.side_rng(), self.perturbed(direction), self.probe.attached(v):
            (g_plus,) = torch.autograd.grad(task_loss(self.model, task), v)
        with self.probe.attached(v):
            (g_zero,) = torch.autograd.grad(task_loss(self.model, task), v)
        return distributed.mean(g_plus - g_zero)  # several processes: the global batch's gradient

    def midpoint_probe_gradient(self, task: dict, v: torch.Tensor, direction) -> torch.Tensor:
        """The same difference as the integral of its derivative along the step,
        int_0^1 grad_V (grad_theta L(theta + t delta, V) . delta) dt, by the midpoint rule (t = 1/2):
        one pass and a second backward, exact to second order in delta, and no difference of two
        nearly equal passes, so a 16-bit pass keeps its digits (docs/sap.md, "Precision").
        Second derivatives through attention need PyTorch's math kernel (the fused SDPA kernels
        have no double backward)."""
        params = self.trainable_parameters()
        scale = self.harmful_scale()  # of the unperturbed weights, as the two-pass difference's delta
        with self.perturbed(direction, scale / 2), self.probe.attached(v), sdpa_kernel(SDPBackend.MATH):
            grads = torch.autograd.grad(task_loss(self.model, task), params, create_graph=True, allow_unused=True)
            along = sum((g.float() * d.float()).sum() for g, d in zip(grads, direction) if g is not None)
            if not torch.is_tensor(along) or not along.requires_grad:  # no weight's gradient depends on V
                return torch.zeros_like(v)
            (grad,) = torch.autograd.grad(along * scale, v, allow_unused=True)
        return torch.zeros_like(v) if grad is None else grad.detach()

    def find_probe(self, task: dict) -> torch.Tensor:
        c = self.probe_cfg
        step_size = c.step_size or 2.5 * c.eps / c.steps
        vectors = self.probe.zeros(task["input_ids"])
        for _ in range(c.steps):
            grad = self.probe_gradient(task, vectors, self.direction)
            vectors = ascend(vectors, grad, step_size, c.eps, c.norm)
        return vectors.detach()

    def after_backward(self) -> None:
        # cosine between the update's gradient and the unsafe direction: > 0 means the
        # descent step moves theta towards safety
        params = self.trainable_parameters()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        dot = sum((g.float() * d.float()).sum() for g, d in zip(grads, self.direction))
        self.log("sap/cos_update_unsafe", dot / global_norm(grads).clamp_min(1e-12), batch_size=1)
        if self.probe_cfg.mode == "faithful":
            self._faithful_probe_step()

    # ------------------------------------------------------- faithful (reference) mode
    def _faithful_probe(self, task: dict, pairs: dict) -> torch.Tensor:
        """The probe found on the previous batch; also takes this batch's grad_V L(theta+delta, V)."""
        if self.faithful_v is None:
            self.faithful_v = self.probe.zeros(task["input_ids"]).requires_grad_(True)
            self.faithful_opt = torch.optim.AdamW([self.faithful_v], lr=self.probe_cfg.eps)
        v = self.faithful_v
        with self.side_rng():
            with self.probe.attached(v.detach()):  # the reference's bias sits in every pass
                self.direction = self.unsafe_direction(pairs)
            with self.perturbed(self.direction), self.probe.attached(v):
                (self._g_plus,) = torch.autograd.grad(task_loss(self.model, task), v)
        return v  # the update's backward leaves grad_V L(theta, V) in v.grad

    def _faithful_probe_step(self) -> None:
        v = self.faithful_v
        v.grad = distributed.mean(v.grad - self._g_plus)  # = -grad_V L_su: AdamW descends it, so V ascends L_su
        with torch.no_grad():
            v.zero_()
        self.faithful_opt.step()
        self.faithful_opt.zero_grad(set_to_none=True)

    def resume_state(self) -> dict:
        if self.faithful_v is not None:
            return {"faithful_v": self.faithful_v.detach().cpu(), "faithful_opt": self.faithful_opt.state_dict()}
        if self.vectors is not None and self.probe_cfg.refresh_every > 1:  # kept across steps
            return {"vectors": self.vectors.cpu(), "direction": [d.cpu() for d in self.direction]}
        return {}  # found anew every step

    def load_resume_state(self, state: dict) -> None:
        if "faithful_v" in state:
            self.faithful_v = state["faithful_v"].to(self.device).requires_grad_(True)
            self.faithful_opt = torch.optim.AdamW([self.faithful_v], lr=self.probe_cfg.eps)
            self.faithful_opt.load_state_dict(state["faithful_opt"])
        if "vectors" in state:
            self.vectors = state["vectors"].to(self.device)
            self.direction = [d.to(self.device) for d in state["direction"]]

    def on_train_end(self) -> None:
        super().on_train_end()
        self.faithful_v = self.direction = self.vectors = None
