"""Constrained SFT: a token-wise constraint to the initial model, strongest on the first
answer tokens, where refusals are decided (Qi et al., "Safety alignment should be made
more than just a few tokens deep", ICLR 2025).

Per response token t (t = 1 is the first answer token), with delta_t = log p_theta(y_t) -
log p_theta0(y_t) and theta0 the model before fine-tuning (LoRA: the adapter switched off):

    beta_t = beta * first_token_factor   (t = 1)
           = beta * bias_factor          (t = 2 .. bias_length)
           = beta                        (t > bias_length)
    w_t    = stopgrad(max(2 * (1 - sigmoid(beta_t * delta_t)), min_weight))
    loss   = -mean_t w_t * log p_theta(y_t)

This has the gradient of sum_t -(2 / beta_t) log sigmoid(beta_t * delta_t); beta = 0 gives
w_t = 1, plain SFT. Defaults are the authors' (beta 0.1, factors 5 and 20 over 5 tokens:
beta_t = 0.5, 2.0, 0.1). The reference pass costs one extra forward without gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safeprobe.config import require
from safeprobe.methods.base import FineTuneModule
from safeprobe.methods.losses import mean_nll, token_nll
from safeprobe.methods.registry import MethodConfig, register


@dataclass
class CSFTConfig(MethodConfig):
    beta: float = 0.1
    first_token_factor: float = 5.0
    bias_factor: float = 20.0
    bias_length: int = 5
    min_weight: float = 1e-3

    def __post_init__(self):
        for key in ("beta", "first_token_factor", "bias_factor", "min_weight"):
            require(getattr(self, key) >= 0, f"method.{key}", getattr(self, key), "a number >= 0")
        require(self.bias_length >= 1, "method.bias_length", self.bias_length, "an integer >= 1")


def token_betas(mask: torch.Tensor, c: CSFTConfig) -> torch.Tensor:
    """beta_t for every labelled position, t counted from the first answer token."""
    t = mask.long().cumsum(-1)
    late = torch.full(t.shape, c.beta, device=mask.device)
    early = torch.where(t <= c.bias_length, c.beta * c.bias_factor, late)
    return torch.where(t == 1, c.beta * c.first_token_factor, early)


def constraint_weights(delta: torch.Tensor, mask: torch.Tensor, c: CSFTConfig) -> torch.Tensor:
    return (2 * (1 - torch.sigmoid(token_betas(mask, c) * delta))).clamp(min=c.min_weight) * mask


@register("csft", CSFTConfig)
class ConstrainedSFTModule(FineTuneModule):
    reads_initial_model = True

    def loss(self, batch: dict) -> torch.Tensor:
        task = batch["task"]
        logits = self.model(input_ids=task["input_ids"], attention_mask=task["attention_mask"]).logits
        nll, mask = token_nll(logits, task["labels"])
        with self.side_rng(), self.initial_model() as start:
            ref_nll, _ = token_nll(start(input_ids=task["input_ids"], attention_mask=task["attention_mask"]).logits,
                                   task["labels"])
        delta = (ref_nll - nll).detach()  # log p_theta - log p_theta0
        weights = constraint_weights(delta, mask, self.method_cfg)
        self.log("csft/mean_weight", weights.sum() / mask.sum(), batch_size=1)
        return mean_nll(nll, mask, weights)
