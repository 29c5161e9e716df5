"""SAP's probe: one vector per chosen decoder layer, added to that layer's MLP output.

The probe is a transient tensor. It enters the model only through forward hooks that
live inside `Probe.attached(...)`, so it is never a parameter, never seen by an
optimizer or a checkpoint, and the model is untouched outside that context.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from safeprobe.models.factory import decoder_layers


def _add_vector(vector: torch.Tensor):
    def hook(module, args, output):
        if isinstance(output, tuple):  # some MLPs (e.g. mixtures of experts) return extras
            return (output[0] + vector.to(output[0].dtype), *output[1:])
        return output + vector.to(output.dtype)

    return hook


class Probe:
    def __init__(self, model: torch.nn.Module, layers: list[int]):
        blocks = decoder_layers(model)
        self.layers = list(layers)
        self.mlps = [blocks[i].mlp for i in self.layers]
        self.hidden_size = model.config.hidden_size

    def zeros(self, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(self.layers), self.hidden_size, device=like.device, dtype=torch.float32)

    @contextmanager
    def attached(self, vectors: torch.Tensor):
        """Within the block, layer k's MLP output gains vectors[k] (broadcast over batch and positions)."""
        handles = [mlp.register_forward_hook(_add_vector(v)) for mlp, v in zip(self.mlps, vectors)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def ascend(vectors: torch.Tensor, grad: torch.Tensor, step_size: float, eps: float, norm: str) -> torch.Tensor:
    """One projected ascent step per layer: sign step in the L-inf ball, or normalized
    gradient step in the L2 ball, each of radius eps."""
    if norm == "linf":
        return (vectors + step_size * grad.sign()).clamp(-eps, eps)
    unit = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    stepped = vectors + step_size * unit
    radius = stepped.norm(dim=-1, keepdim=True)
    return stepped * (eps / radius.clamp_min(1e-12)).clamp(max=1.0)
