"""Lisa: lazy safety alignment by bi-state optimization (Huang et al., NeurIPS 2024).

Training alternates between an alignment state (K_a steps on alignment batches) and a
fine-tuning state (K_f steps on the user's batches), starting with alignment. Each state's
loss carries a proximal term pulling the weights towards the last iterate of the *other*
state:

    alignment -> fine-tuning after K_a steps:  anchor_align = theta
    fine-tuning -> alignment after K_f steps:  anchor_ft = theta
    loss = CE(theta; batch) + rho/2 * ||theta - anchor_of_other_state||^2

Both anchors start at the initial weights. As in the authors' code, the user batch of an
alignment step is skipped (not replayed later) and one optimizer state serves both states.
Their code also switches the proximal term off for the first 10% of training steps
(`proximal_warmup: 0.1`); the paper does not, and neither does the default here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safeprobe.config import require
from safeprobe.methods.base import FineTuneModule
from safeprobe.methods.losses import task_loss
from safeprobe.methods.registry import MethodConfig, register


@dataclass
class LisaConfig(MethodConfig):
    align_steps: int = 100  # K_a
    finetune_steps: int = 900  # K_f
    rho: float = 1.0  # proximal strength (Lisa's repository: 1; Booster's SST2 scripts: 0.01)
    proximal_warmup: float = 0.0  # share of the training steps without the proximal term (authors' code: 0.1)

    def __post_init__(self):
        require(self.align_steps >= 0, "method.align_steps", self.align_steps, "an integer >= 0")
        require(self.finetune_steps >= 1, "method.finetune_steps", self.finetune_steps, "an integer >= 1")
        require(self.rho >= 0, "method.rho", self.rho, "a number >= 0")
        require(0 <= self.proximal_warmup <= 1, "method.proximal_warmup", self.proximal_warmup, "a number in [0, 1]")


@register("lisa", LisaConfig)
class LisaModule(FineTuneModule):
    streams = ("task", "alignment")

    def on_train_start(self) -> None:
        start = [p.detach().clone() for p in self.trainable_parameters()]
        self.anchors = {"alignment": start, "finetune": [t.clone() for t in start]}  # the last iterate of each state
        self.state = "alignment" if self.method_cfg.align_steps > 0 else "finetune"
        self.clock = 0  # steps taken in the current state
        self.warmup_steps = self.method_cfg.proximal_warmup * self.trainer.estimated_stepping_batches

    def _switch_if_due(self) -> None:
        c = self.method_cfg
        length = c.align_steps if self.state == "alignment" else c.finetune_steps
        if self.clock == length and c.align_steps > 0:
            self.anchors[self.state] = [p.detach().clone() for p in self.trainable_parameters()]
            self.state = "finetune" if self.state == "alignment" else "alignment"
            self.clock = 0

    def loss(self, batch: dict) -> torch.Tensor:
        self._switch_if_due()
        self.clock += 1
        aligning = self.state == "alignment"
        loss = task_loss(self.model, batch["alignment" if aligning else "task"])
        self.log("lisa/alignment_state", float(aligning), batch_size=1)
        rho = self.method_cfg.rho
        if rho > 0 and self.global_step >= self.warmup_steps:
            anchor = self.anchors["finetune" if aligning else "alignment"]
            drift = sum(((p - a) ** 2).sum() for p, a in zip(self.trainable_parameters(), anchor, strict=True))
            self.log("lisa/drift", drift.detach(), batch_size=1)
            loss = loss + rho / 2 * drift
        return loss

    def resume_state(self) -> dict:
        return {"anchors": {k: [t.cpu() for t in v] for k, v in self.anchors.items()}, "state": self.state,
                "clock": self.clock}

    def load_resume_state(self, state: dict) -> None:
        self.anchors = {k: [t.to(self.device) for t in v] for k, v in state["anchors"].items()}
        self.state, self.clock = state["state"], state["clock"]

    def on_train_end(self) -> None:
        super().on_train_end()
        self.anchors = {}
