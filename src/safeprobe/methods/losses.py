"""Losses shared by every method, the alignment stage and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safeprobe import distributed
from safeprobe.data.formatting import IGNORE


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy per position (0 where unlabelled) and the label mask, both
    of shape (batch, length - 1)."""
    labels = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                          reduction="none").view(labels.shape)
    return nll, labels != IGNORE


def mean_nll(nll: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over labelled tokens, each optionally weighted. Weights of exactly 1 give exactly
    the unweighted mean (so a method whose weights are all 1 reproduces SFT bit for bit).

    On several processes this rank's contribution to the mean over the global batch's tokens:
    its sum over the mean token count per rank, so that DDP's average over the ranks is the
    mean over all tokens, however they are spread (distributed.py)."""
    total = nll if weights is None else weights * nll
    return total.sum() / distributed.count_mean(mask.sum())


def task_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens (labels != IGNORE)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return mean_nll(*token_nll(logits, batch["labels"]))


def sequence_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of teacher-forced log-probs of the labelled (response) tokens, one per row."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
    mask = labels != IGNORE
    tok = torch.gather(F.log_softmax(logits, -1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def contrastive_safety_loss(model, pairs: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """-mean log sigmoid((log p(safe|x) - log p(harmful|x)) / T); rows: B safe then B harmful.

    Its gradient points towards "less safe"; SAP uses it as the unsafe direction."""
    logp = sequence_logprobs(model, pairs)
    safe, harm = logp.chunk(2)
    return -F.logsigmoid((safe - harm) / temperature).mean()
