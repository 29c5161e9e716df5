"""Shared step plumbing for every fine-tuning method.

Manual optimization: exactly one `manual_backward` and one optimizer step per batch, so
`global_step` counts real steps. A method overrides some of:

- `streams`: the data streams it reads (task, safety, alignment, harmful; data/datamodule.py);
- `loss(batch)`: what the update minimizes (SFT: the task loss);
- `update_context(batch)`: what is in place while that loss is computed and differentiated
  (SAP's probe);
- `after_backward()`: acts on the gradients before the optimizer step;
- `task_examples(cfg, splits)`: the fine-tuning set (SafeInstr mixes safety data into it).

On several processes (DDP) each rank runs the step on its slice of the global batch and its
loss is a contribution whose mean over the ranks is the global batch's loss; statistics a
method computes from the whole batch (SAP's unsafe direction, Booster's harmful gradient,
Vaccine's perturbation norm, ...) are pooled over the ranks (safeprobe.distributed), so the
run equals a single-process run at the same global batch (tests/test_ddp.py).

Auxiliary passes run inside `side_rng()`, so the update pass draws the same random numbers
(dropout masks) as SFT's; `initial_model()` gives the model as it was before fine-tuning
(the adapter switched off, or a frozen copy under full fine-tuning) for reference passes.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import ClassVar

import lightning as L
import torch

from safeprobe.config import RunError
from safeprobe.methods.losses import task_loss


class FineTuneModule(L.LightningModule):
    stage: ClassVar[str] = "fine-tuning"  # "alignment": an alignment-stage defense (align=<name> only)
    streams: ClassVar[tuple[str, ...]] = ("task",)
    reads_initial_model: ClassVar[bool] = False  # True when loss() calls initial_model()

    def __init__(self, model: torch.nn.Module, cfg):
        super().__init__()
        self.model = model
        self.cfg = cfg  # the whole validated TrainConfig
        self.optim_cfg = cfg.optim
        self.method_cfg = cfg.method  # this method's typed config (method.*)
        self.automatic_optimization = False
        self._frozen_start: list[torch.nn.Module] = []  # full fine-tuning's reference copy, made on demand
        self.replay = None  # a resumed run's batches before its checkpoint (checkpoint.Replay)
        from safeprobe.checkpoint import rng_state

        self._rng_at_start = rng_state()  # what the random generators hold when fit begins (see setup)

    # -------------------------------------------------------------- to override
    @classmethod
    def data_streams(cls, cfg) -> tuple[str, ...]:
        """The streams this method reads with this config (default: `streams`)."""
        return cls.streams

    @classmethod
    def data_needed(cls, cfg) -> tuple[str, ...]:
        """Every set this method reads, as a stream or otherwise (default: its streams)."""
        return cls.data_streams(cfg)

    @classmethod
    def check_config(cls, cfg) -> None:
        """Checks of this method's settings against the model, before any work (raise ConfigError)."""

    @classmethod
    def task_examples(cls, cfg, splits) -> list:
        """The fine-tuning set: n examples with the configured poison share."""
        from safeprobe.data.datamodule import mix_training_set

        return mix_training_set(splits, cfg.data.n_train, cfg.data.poison_ratio, cfg.seed)

    def loss(self, batch: dict) -> torch.Tensor:
        """What the update minimizes (SFT: mean cross-entropy on the task batch's responses)."""
        return task_loss(self.model, batch["task"])

    def update_context(self, batch: dict) -> AbstractContextManager:
        """What surrounds the update's forward *and* backward pass (SFT: nothing). Backward
        is inside too, so gradient checkpointing recomputes layers as they ran forward."""
        return nullcontext()

    def after_backward(self) -> None:
        """Called with the update's gradients in place, before the optimizer step."""

    def resume_state(self) -> dict:
        """The method's own state that later steps depend on, beyond the weights and the
        optimizer (saved in checkpoints; tests/test_resume.py fails for a method that misses some)."""
        return {}

    def load_resume_state(self, state: dict) -> None:
        """Put back what `resume_state` returned."""

    # -------------------------------------------------------------- shared
    def setup(self, stage: str) -> None:
        """Lightning's multi-process strategies re-seed every generator when the process group
        starts; a single process does not. Put back the state fit began with, so that random
        draws in training (RepNoise's noise, dropout) start where a single process's do."""
        from safeprobe import distributed
        from safeprobe.checkpoint import set_rng_state

        if distributed.world_size() > 1:
            set_rng_state(self._rng_at_start)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        c = self.optim_cfg
        return torch.optim.AdamW(self.trainable_parameters(), lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        if self.replay is not None:  # a resumed run passes over the batches before its checkpoint
            return self.replay.skip(self)
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        with self.update_context(batch):
            loss = self.loss(batch)
            if not torch.isfinite(loss):  # a NaN model must stop here, not be evaluated as "safe"
                raise RunError(f"training diverged: the {self.method_cfg.name} loss is {loss.item()} at step "
                               f"{self.global_step + 1}; lower optim.lr or check the data and settings")
            self.manual_backward(loss)
        self.after_backward()
        if self.optim_cfg.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.optim_cfg.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        # several processes: each rank's loss is its contribution, their mean the global batch's loss
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch["task"]["input_ids"].shape[0],
                 sync_dist=True)
        return loss.detach()

    @contextmanager
    def side_rng(self):
        """Run auxiliary passes (SAP's probe search) without consuming the random stream of
        the update pass, so dropout masks in the update match plain SFT for the same seed."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            yield

    @contextmanager
    def initial_model(self):
        """The model before fine-tuning, in eval mode, for reference passes without gradients:
        LoRA's adapter switched off, or (full fine-tuning, or a LoRA continued from the alignment
        stage: align.lora=single) a frozen copy taken at the first call."""
        continued = self.cfg.align.method is not None and self.cfg.align.lora == "single"
        if hasattr(self.model, "disable_adapter") and not continued:
            was_training = self.model.training
            self.model.eval()
            try:
                with self.model.disable_adapter(), torch.no_grad():
                    yield self.model
            finally:
                self.model.train(was_training)
            return
        if not self._frozen_start:
            if self.global_step > 0:  # the copy must be of the weights before the first update
                raise RuntimeError("initial_model() with a frozen copy must first be called before the first update")
            self._frozen_start.append(copy.deepcopy(self.model).eval().requires_grad_(False))
        with torch.no_grad():
            yield self._frozen_start[0]

    def on_train_end(self) -> None:
        self._frozen_start.clear()
