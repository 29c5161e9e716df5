"""Shared step plumbing for every fine-tuning method.

Manual optimization: exactly one `manual_backward` and one optimizer step per batch, so
`global_step` counts real steps. Every update minimizes the task loss; a method changes
what is in place while it is computed and differentiated (`update_context`: SAP's probe)
and may act on the gradients before the step (`after_backward`); nothing else.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext

import lightning as L
import torch

from safeprobe.config import OptimConfig
from safeprobe.methods.losses import task_loss


class FineTuneModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, optim: OptimConfig):
        super().__init__()
        self.model = model
        self.optim_cfg = optim
        self.automatic_optimization = False

    # -------------------------------------------------------------- to override
    def update_context(self, batch: dict) -> AbstractContextManager:
        """What surrounds the update's forward *and* backward pass (SFT: nothing). Backward
        is inside too, so gradient checkpointing recomputes layers as they ran forward."""
        return nullcontext()

    def after_backward(self) -> None:
        """Called with the update's gradients in place, before the optimizer step."""

    # -------------------------------------------------------------- shared
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        c = self.optim_cfg
        return torch.optim.AdamW(self.trainable_parameters(), lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        with self.update_context(batch):
            loss = task_loss(self.model, batch["task"])
            self.manual_backward(loss)
        self.after_backward()
        if self.optim_cfg.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.optim_cfg.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch["task"]["input_ids"].shape[0])
        return loss.detach()

    @contextmanager
    def side_rng(self):
        """Run auxiliary passes (SAP's probe search) without consuming the random stream of
        the update pass, so dropout masks in the update match plain SFT for the same seed."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            yield
