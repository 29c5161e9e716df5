"""SAP ablation: a probe of SAP's size in a random direction, with no safety pass.

With probe.norm=linf each probe vector is eps * (random signs), the norm of SAP's
eps * sign(grad); with l2 it is eps * (a random unit vector). Same layers, same hooks, same
update as SAP: if this matches SAP, SAP's effect is noise injection, not its direction.
The random vectors come from the module's own generator (seeded by `seed`), so the update
pass draws the same dropout masks as SFT's.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from safeprobe.methods.registry import register
from safeprobe.methods.sap import SAPModule


@register("sap_random")
class RandomProbeModule(SAPModule):
    streams = ("task",)

    def __init__(self, model: torch.nn.Module, cfg):
        super().__init__(model, cfg)
        self.generator = torch.Generator().manual_seed(cfg.seed + 7919)

    def random_probe(self, like: torch.Tensor) -> torch.Tensor:
        c = self.probe_cfg
        shape = self.probe.zeros(like).shape
        if c.norm == "linf":
            signs = torch.randint(0, 2, shape, generator=self.generator).float() * 2 - 1
            return (c.eps * signs).to(like.device)
        gauss = torch.randn(shape, generator=self.generator)
        return (c.eps * gauss / gauss.norm(dim=-1, keepdim=True)).to(like.device)

    @contextmanager
    def update_context(self, batch: dict):
        vectors = self.random_probe(batch["task"]["input_ids"])
        self.log("sap/probe_norm", vectors.norm(dim=-1).mean(), batch_size=1)
        with self.probe.attached(vectors):
            yield

    def after_backward(self) -> None:
        pass

    def resume_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_resume_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
