"""Antidote: prune the weights most important for harmful answers (Huang et al., ICML 2025).

One forward pass (no backward) of the fine-tuned model over n harmful calibration examples
(harmful prompt -> harmful answer, whole sequences) gathers, for each pruned Linear layer,
the mean squared input per input feature over all real (non-padding) tokens. Each weight's
Wanda score is |W_ij| * sqrt(mean_t x_tj^2); in every output row the top `share` of the
scores are set to zero: those weights matter most for producing harmful text.

Choices, checked against git-disl/Antidote (utils.py: prune_wanda_outlier, find_layers,
WrappedGPT; trainer.py: AntidoteTrainer; train.py; script/finetune/antidote_*.sh):
- LoRA: the pruned weights are the fine-tuning LoRA's own A and B (never the merged or base
  weights), each scored with its own input: A with the layer's input, B with A's output
  (before PEFT's alpha/r scaling, which is applied after B). Full fine-tuning: the whole
  weights of the layers named in full_modules (the code's full_finetuning mode: q/k/v_proj),
  with full_share (its script: 1e-5, about one weight per row) instead of share.
- Per row, `cols - int(cols * (1 - share))` weights are zeroed (the code's rounding: about
  ceil(share * cols); with r = 8 and share 0.1 that is 1 of every row of B's 8), taken from a
  stable ascending sort of the scores (ties: the later column goes first).
- The code runs one example per batch (no padding) and averages the summed squares over
  examples, not tokens; that differs from a per-token mean by one factor per layer, so the
  ranking within a row, and the mask, are the same. Here padding is masked out, so the batch
  size only bounds memory; after a batch's last real token its all-padding columns are cut.
- n_calibration = 0 scores by |W| alone (the code's sample_num = 0 path).
- The code's layer-by-layer pass feeds each layer the unpruned previous layer's output, which
  is one forward pass of the unpruned model; pruning happens after all scores are taken.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from safeprobe.config import ConfigError, RunError, require
from safeprobe.post import PostConfig, PostContext, lora_layers, model_root, register_repair


@dataclass
class AntidoteConfig(PostConfig):
    name: str | None = "antidote"
    share: float = 0.1  # LoRA: share of each row's weights zeroed (authors' dense_ratio: 0.1)
    n_calibration: int = 2000  # harmful calibration examples (authors' bad_sample_num: 2000); 0: |W| only
    batch_size: int = 8  # examples per forward pass (memory only: padding never counts)
    full_share: float = 1e-5  # full fine-tuning: share of each row zeroed (authors' full script: 1e-5)
    full_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])  # full fine-tuning

    def __post_init__(self):
        require(0 <= self.share <= 1, "post.share", self.share, "a number in [0, 1]")
        require(0 <= self.full_share <= 1, "post.full_share", self.full_share, "a number in [0, 1]")
        require(self.n_calibration >= 0, "post.n_calibration", self.n_calibration,
                "an integer >= 0 (0: score by weight magnitude alone)")
        require(self.batch_size >= 1, "post.batch_size", self.batch_size, "an integer >= 1")
        require(len(self.full_modules) >= 1 and all(isinstance(m, str) and m for m in self.full_modules),
                "post.full_modules", list(self.full_modules), "a non-empty list of layer names, e.g. [q_proj, v_proj]")


def targets(model: torch.nn.Module, cfg: AntidoteConfig) -> tuple[str, dict[str, torch.nn.Linear]]:
    """('lora' | 'full', {name: Linear layer whose weight is pruned})."""
    layers = lora_layers(model, "antidote")
    if layers:
        out = {}
        for name, layer, adapter in layers:
            out[f"{name}.lora_A"] = layer.lora_A[adapter]
            out[f"{name}.lora_B"] = layer.lora_B[adapter]
        return "lora", out
    out = {n: m for n, m in model_root(model).named_modules()
           if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in cfg.full_modules}
    if not out:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model_root(model).named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"post.full_modules={list(cfg.full_modules)!r} is invalid (no such Linear layer in the "
                          f"model); allowed: names of its Linear layers, e.g. {', '.join(linear)}")
    return "full", out


def input_statistics(model: torch.nn.Module, modules: dict[str, torch.nn.Module], batches: list[dict],
                     batch_size: int) -> tuple[dict[str, torch.Tensor], int, int]:
    """Per module: the mean over real tokens of its squared input, per input feature (float64);
    and the number of examples and real tokens read."""
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device) for n, m in modules.items()}
    counts = dict.fromkeys(modules, 0)
    state: dict = {}

    def hook(name):
        def record(_module, args, _output):
            x, keep = args[0], state["mask"]
            if x.shape[:-1] != keep.shape:
                raise RunError(f"antidote: {name} got an input of shape {tuple(x.shape)}, not (batch, tokens, features) "
                               f"matching the attention mask {tuple(keep.shape)}")
            x = x[keep.to(x.device)].to(torch.float64)
            sums[name] += x.square().sum(0)
            counts[name] += x.shape[0]
        return record

    root = model_root(model)
    device = root.get_input_embeddings().weight.device
    kwargs = {"use_cache": False}
    head = root.get_output_embeddings()
    if "logits_to_keep" in inspect.signature(root.forward).parameters and not any(
            m is head or (head is not None and m in head.modules()) for m in modules.values()):
        kwargs["logits_to_keep"] = 1  # the logits are not needed: skip the vocabulary projection
    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    training = model.training
    model.eval()
    examples = tokens = 0
    try:
        for batch in batches:
            for i in range(0, batch["input_ids"].shape[0], batch_size):
                ids, mask = batch["input_ids"][i:i + batch_size], batch["attention_mask"][i:i + batch_size].bool()
                real = mask.any(0).nonzero()
                if not len(real):
                    continue
                width = int(real.max()) + 1  # later columns are padding in every row: cut (causal model)
                ids, mask = ids[:, :width].to(device), mask[:, :width].to(device)
                state["mask"] = mask
                model(input_ids=ids, attention_mask=mask.long(), **kwargs)
                examples += int(mask.any(1).sum())
                tokens += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    silent = [n for n, c in counts.items() if c == 0]
    if silent:
        raise RunError(f"antidote: {len(silent)} pruned layers (e.g. {silent[0]}) saw no calibration token")
    return {n: sums[n] / counts[n] for n in modules}, examples, tokens


def prune_rows(weight: torch.Tensor, score: torch.Tensor, share: float) -> int:
    """Zero, in every row of `weight`, the weights with the top `share` of `score` (the authors'
    rounding and tie order); the rest stay bit for bit. Returns how many were zeroed."""
    cols = weight.shape[1]
    keep = int(cols * (1 - share))
    drop = torch.sort(score, dim=1, stable=True).indices[:, keep:]
    mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    mask.scatter_(1, drop.to(weight.device), True)
    weight.data.masked_fill_(mask, 0)
    return drop.numel()


@register_repair("antidote", AntidoteConfig, data_needed=("harmful",))
def repair(model: torch.nn.Module, context: PostContext, cfg: AntidoteConfig) -> dict:
    mode, modules = targets(model, cfg)
    share = cfg.share if mode == "lora" else cfg.full_share
    examples = tokens = 0
    if cfg.n_calibration > 0:
        if context.calibration_batches is None:
            raise ConfigError(f"post.n_calibration={cfg.n_calibration} needs harmful calibration examples; allowed: "
                              "0 (magnitude only), or a run with harmful examples (data.alignment_set with harmful answers)")
        stats, examples, tokens = input_statistics(model, modules, context.calibration_batches(cfg.n_calibration),
                                                   cfg.batch_size)
    zeroed = total = 0
    for name, m in modules.items():
        score = m.weight.detach().abs().to(torch.float64)
        if cfg.n_calibration > 0:
            score = score * stats[name].to(score.device).sqrt()[None, :]
        zeroed += prune_rows(m.weight, score, share)
        total += m.weight.numel()
    return {"mode": mode, "share": share, "layers": len(modules), "weights_zeroed": zeroed, "weights_total": total,
            "share_zeroed": zeroed / max(total, 1), "examples": examples, "tokens": tokens}
