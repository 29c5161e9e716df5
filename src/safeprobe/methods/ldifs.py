"""LDIFS: fine-tuning with a feature-distance penalty to the initial model (Mukhoti et al.,
ICLR 2024; the variant in the Booster repository, which penalizes MLP outputs).

    loss = CE(theta) + sum_l rho/2 * ||mlp_out_l(theta) - mlp_out_l(theta0)||^2

over every decoder layer's MLP output, summed over the batch's real (non-padding) tokens;
theta0 is the model before fine-tuning (LoRA: the adapter switched off). The authors' code
also sums padding positions and adds a layer's term only when it is below 0.1 (a guard
against overflow that drops every large term); `drop_above: 0.1` reproduces the guard.
Cost: one extra forward without gradients. On several processes the penalty is the global
batch's sum (each rank contributes world size x its rows' part) and `drop_above` judges each
layer's whole term.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from safeprobe import distributed
from safeprobe.config import require
from safeprobe.methods.base import FineTuneModule
from safeprobe.methods.losses import mean_nll, token_nll
from safeprobe.methods.registry import MethodConfig, register
from safeprobe.models.factory import decoder_layers


@dataclass
class LDIFSConfig(MethodConfig):
    rho: float = 1e-4
    drop_above: float | None = None  # the authors' code: 0.1 (a layer's term above it is left out)

    def __post_init__(self):
        require(self.rho >= 0, "method.rho", self.rho, "a number >= 0")
        require(self.drop_above is None or self.drop_above > 0, "method.drop_above", self.drop_above, "null or a number > 0")


@contextmanager
def mlp_outputs(model: torch.nn.Module):
    """Within the block, the list yielded fills with every decoder layer's MLP output."""
    outputs: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for layer in decoder_layers(model)]
    try:
        yield outputs
    finally:
        for h in hooks:
            h.remove()


@register("ldifs", LDIFSConfig)
class LDIFSModule(FineTuneModule):
    reads_initial_model = True

    def loss(self, batch: dict) -> torch.Tensor:
        task = batch["task"]
        inputs = {"input_ids": task["input_ids"], "attention_mask": task["attention_mask"]}
        with mlp_outputs(self.model) as features:
            logits = self.model(**inputs).logits
        loss = mean_nll(*token_nll(logits, task["labels"]))
        c = self.method_cfg
        if c.rho == 0:
            return loss
        with self.side_rng(), self.initial_model() as start, mlp_outputs(start) as reference:
            start(**inputs)
        real = task["attention_mask"].unsqueeze(-1).to(logits.dtype)
        terms = [c.rho / 2 * (((f - r) * real) ** 2).sum() for f, r in zip(features, reference, strict=True)]
        world = distributed.world_size()
        if world > 1:  # a sum over the global batch's rows: every rank's decision on the whole term,
            whole = distributed.total(torch.stack(terms).detach())  # its contribution world x its part
            kept = [world * t for t, w in zip(terms, whole) if c.drop_above is None or w.item() < c.drop_above]
        else:
            kept = [t for t in terms if c.drop_above is None or t.item() < c.drop_above]
        distance = sum(kept) if kept else loss.new_zeros(())
        self.log("ldifs/penalty", distributed.mean(distance.detach()), batch_size=1)
        return loss + distance
