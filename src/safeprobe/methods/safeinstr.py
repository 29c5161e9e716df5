"""SafeInstr: safety data in the fine-tuning mix (Bianchi et al., "Safety-Tuned LLaMAs", ICLR 2024).

No change to the optimizer, only to what it sees:

- mode=mix: round(share * n) alignment examples (harmful prompt -> refusal) join the n
  fine-tuning examples (Bianchi et al. add 100-2,000 to 20k Alpaca rows; 3% is their
  headline), or replace as many benign ones (replace_benign=true: the total stays n, the
  git-disl code's variant);
- mode=joint: every step minimizes CE(task batch) + lam * CE(alignment batch), the
  alignment batch drawn from its own stream (the git-disl code: lam 0.1, batch 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safeprobe.config import one_of, require
from safeprobe.data.datamodule import mix_training_set
from safeprobe.methods.base import FineTuneModule
from safeprobe.methods.losses import task_loss
from safeprobe.methods.registry import MethodConfig, register


@dataclass
class SafeInstrConfig(MethodConfig):
    mode: str = "mix"  # mix | joint
    share: float = 0.03  # mix: safety examples per fine-tuning example
    replace_benign: bool = False  # mix: they take the place of benign examples (total stays n)
    lam: float = 0.1  # joint: weight of the alignment batch's loss

    def __post_init__(self):
        one_of("method.mode", self.mode, ("mix", "joint"))
        require(0 <= self.share <= 1, "method.share", self.share, "a number in [0, 1]")
        require(self.lam >= 0, "method.lam", self.lam, "a number >= 0")


@register("safeinstr", SafeInstrConfig)
class SafeInstrModule(FineTuneModule):
    @classmethod
    def data_streams(cls, cfg) -> tuple[str, ...]:
        return ("task", "alignment") if cfg.method.mode == "joint" else ("task",)

    @classmethod
    def data_needed(cls, cfg) -> tuple[str, ...]:
        return ("task", "alignment")  # mix: the alignment set feeds the fine-tuning set, not a stream

    @classmethod
    def task_examples(cls, cfg, splits) -> list:
        m, d = cfg.method, cfg.data
        n_safety = round(m.share * d.n_train) if m.mode == "mix" else 0
        return mix_training_set(splits, d.n_train, d.poison_ratio, cfg.seed, n_safety, m.replace_benign)

    def loss(self, batch: dict) -> torch.Tensor:
        loss = task_loss(self.model, batch["task"])
        if self.method_cfg.mode == "joint":
            with self.side_rng():  # the task pass drew SFT's dropout masks; this one must not shift them
                safety = task_loss(self.model, batch["alignment"])
            self.log("safeinstr/alignment_loss", safety.detach(), batch_size=1)
            loss = loss + self.method_cfg.lam * safety
        return loss
