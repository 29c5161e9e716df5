"""RepNoise: representation noising (Rosati et al., NeurIPS 2024), an alignment-stage defense.

On paired batches (the safety stream: B prompts, each with its refusal and its harmful
answer, padded to one length), with mask = the harmful answer's tokens that differ from the
refusal's token at the same position:

    loss = CE(refusal rows) + beta * noise - alpha * log(ce_h + log_offset)

- noise = mean over decoder layers l of MMD(mlp_out_l(harmful rows) * mask, N(0, I) * mask):
  each harmful row's masked MLP output, flattened, is one sample, against as many masked
  standard-normal samples; the MMD is the biased (V-statistic) estimate with a sum of 5
  Gaussian kernels exp(-d^2/bw) at bw = b/4, b/2, b, 2b, 4b, b the mean squared distance
  between the 2B samples (off the diagonal, held constant), computed in fp32;
- ce_h = mean of the masked CE on the harmful answer over L + 1 readouts: the final logits,
  and the logit lens (final norm, then the output head) of every decoder layer's input (the
  embeddings' output and the outputs of layers 1..L-1), i.e. every depth once;
- CE(refusal rows) is SFT's loss on the refusal answers.

Gradient ascent through -log(ce_h) is unbounded below as ce_h grows, but the log makes its
gradient -grad ce_h / ce_h shrink as ce_h grows; the authors add no other guard, nor does this.
A non-finite term (e.g. ce_h + log_offset = 0, or a NaN in the model) makes the step's loss
non-finite, which the framework's check stops on. A batch without any differing harmful
answer token has no noise or ascent term (both 0). Cost: one forward and backward of the 2B
rows (the lens only at the masked positions).

Against the authors' code (domenicrosati/representation-noising loss.py, the git-disl/Booster
port loss_func/repnoise_loss.py):
- they subtract alpha * log(ce_h + 1); `log_offset: 1` reproduces it (default 0: log(ce_h));
- `masking: code` reproduces their token handling: the mask is every position where the
  paired ids differ (the padding after one answer included), the refusal CE is taken only on
  those positions of the refusal rows, the logits predicting the first token of each differing
  run are zeroed (that token's CE is the constant log V, without gradient) and token id 0 is
  never a target; `masking: answer` (default) is the method as described: the harmful answer's
  differing tokens, and SFT's CE on the whole refusal;
- their ce_h adds the final logits to the lens of every hidden state HF returns (whose last
  is already normalized, so the final readout enters twice, once normalized twice) and divides
  the sum by the number of hidden states; here each depth enters once and the mean is a mean;
- they run the harmful and refusal rows as two forwards; here they are one of 2B rows;
- the git-disl port pairs the alignment batch with an unrelated harmful batch (so nearly every
  token "differs") and uses alpha = 0.1; here the pairs are true pairs of one prompt.
On several processes every term is the global batch's: CE means over all ranks' tokens, ce_h
pooled before its log, the MMD over all ranks' rows (gathered), the noise drawn alike by every
rank for the global batch (distributed.py).
Defaults: alpha = 1, beta = 0.001 (the original repository; its README: "extensive grid search
... is always required").
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from safeprobe import distributed
from safeprobe.config import one_of, require
from safeprobe.data.formatting import IGNORE
from safeprobe.methods.base import FineTuneModule
from safeprobe.methods.losses import mean_nll, token_nll
from safeprobe.methods.registry import MethodConfig, register
from safeprobe.models.factory import decoder_layers

KERNEL_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)  # bandwidths relative to the mean squared distance (authors: 5 kernels, x2)
MASKINGS = ("answer", "code")


@dataclass
class RepNoiseConfig(MethodConfig):
    alpha: float = 1.0  # weight of -log(ce_h) (original repository: 1; git-disl port: 0.1)
    beta: float = 0.001  # weight of the noise MMD (both repositories: 0.001)
    log_offset: float = 0.0  # -alpha * log(ce_h + log_offset); authors' code: 1
    masking: str = "answer"  # answer: the differing harmful-answer tokens | code: the authors' token handling

    def __post_init__(self):
        require(self.alpha >= 0 and math.isfinite(self.alpha), "method.alpha", self.alpha, "a finite number >= 0")
        require(self.beta >= 0 and math.isfinite(self.beta), "method.beta", self.beta, "a finite number >= 0")
        require(self.log_offset >= 0 and math.isfinite(self.log_offset), "method.log_offset", self.log_offset,
                "a finite number >= 0")
        one_of("method.masking", self.masking, MASKINGS)


# ------------------------------------------------------------------------------ the pieces


def harmful_mask(pairs: dict, masking: str = "answer") -> torch.Tensor:
    """(B, T) bool: the positions of the harmful rows that RepNoise acts on.

    answer: harmful-answer tokens (labelled) whose id differs from the refusal's at that position;
    code: every position where the two rows' ids differ (padding of one side included)."""
    safe_ids, harm_ids = pairs["input_ids"].chunk(2)
    differs = harm_ids != safe_ids
    if masking == "code":
        return differs
    return differs & (pairs["labels"].chunk(2)[1] != IGNORE)


def mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased MMD^2 between samples x (n, d) and y (m, d) with a sum of Gaussian kernels whose
    bandwidths scale the mean off-diagonal squared distance of the pooled samples (a constant)."""
    z = torch.cat([x, y]).float()
    sq = (z * z).sum(-1)
    d2 = (sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp_min(0)
    k = z.shape[0]
    d2 = d2 * (1 - torch.eye(k, dtype=d2.dtype, device=d2.device))  # exactly 0 on the diagonal
    base = (d2.detach().sum() / (k * k - k)).clamp_min(torch.finfo(d2.dtype).tiny)
    kernel = sum(torch.exp(-d2 / (base * s)) for s in KERNEL_SCALES)
    n = x.shape[0]
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - kernel[:n, n:].mean() - kernel[n:, :n].mean()


def noise_loss(features: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of MMD(features_l * mask, N(0, I) * mask), one sample per row. The
    noise is drawn from the global generator, one (B, T, D) fp32 tensor per layer in order.

    On several processes the MMD is the global batch's: the ranks' rows (padded to the longest
    rank's length) are gathered, every rank draws the global batch's noise alike and computes
    the same MMD, and each takes back the gradient of its own rows (distributed.gather_rows)."""
    m = mask.unsqueeze(-1).float()
    if distributed.world_size() > 1:
        length = int(distributed.maximum(torch.tensor(mask.shape[1], device=mask.device)))
        m = distributed.gather_rows(distributed.pad_to(m, 1, length))
        features = [distributed.gather_rows(distributed.pad_to(f, 1, length)) for f in features]
    terms = []
    for f in features:
        noise = torch.randn(f.shape, device=f.device, dtype=torch.float32)
        terms.append(mmd((f.float() * m).flatten(1), (noise * m).flatten(1)))
    return sum(terms) / len(terms)


def readout_ce(states: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor, readout=None,
               keep_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token CE of the target tokens: position t's token (targets[:, t]) predicted
    from readout(states[:, t - 1]) (states: logits when readout is None). The readout runs only
    at those positions. keep_logits (code masking): logits at positions where it is False are
    zeroed first. On several processes: this rank's contribution to the global batch's mean."""
    tgt = targets[:, 1:]
    src = states[:, :-1][tgt]
    logits = (src if readout is None else readout(src)).float()
    if keep_logits is not None:
        logits = logits * keep_logits[:, :-1][tgt].unsqueeze(-1).to(logits.dtype)
    if distributed.world_size() == 1:
        return F.cross_entropy(logits, ids[:, 1:][tgt])
    return F.cross_entropy(logits, ids[:, 1:][tgt], reduction="sum") / distributed.count_mean(tgt.sum())


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm applied after the last decoder layer (the module holding the layers has it)."""
    layers = decoder_layers(model)
    for module in model.modules():
        if getattr(module, "layers", None) is layers and isinstance(getattr(module, "norm", None), torch.nn.Module):
            return module.norm
    raise ValueError(f"{type(model).__name__} has no final `norm` next to its decoder layers; RepNoise's logit lens "
                     "cannot be read")


@contextmanager
def recorded(model: torch.nn.Module, mlp: bool, layer_inputs: bool):
    """Within the block, the two lists yielded fill with every decoder layer's MLP output and
    input hidden state (in layer order); the hooks are removed on the way out."""
    mlps: list[torch.Tensor] = []
    inputs: list[torch.Tensor] = []

    def on_mlp(module, args, out):
        mlps.append(out[0] if isinstance(out, tuple) else out)

    def on_layer(module, args, kwargs):
        inputs.append(args[0] if args else kwargs["hidden_states"])

    hooks = []
    for layer in decoder_layers(model):
        if mlp:
            hooks.append(layer.mlp.register_forward_hook(on_mlp))
        if layer_inputs:
            hooks.append(layer.register_forward_pre_hook(on_layer, with_kwargs=True))
    try:
        yield mlps, inputs
    finally:
        for h in hooks:
            h.remove()


def repnoise_loss(model: torch.nn.Module, pairs: dict, alpha: float, beta: float, log_offset: float = 0.0,
                  masking: str = "answer") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The RepNoise loss of a pair batch (B refusal rows, then the B harmful rows) and its parts."""
    n = pairs["input_ids"].shape[0] // 2
    ids = pairs["input_ids"]
    mask = harmful_mask(pairs, masking)
    code = masking == "code"
    # code masking: token id 0 is never a target (their labels * mask turns unmasked positions into 0, then drops 0)
    targets = mask & (ids[n:] != 0) if code else mask
    n_targets = distributed.total(targets[:, 1:].sum())  # of the global batch, on several processes
    active = bool(n_targets > 0)  # a batch whose answers agree token for token has nothing to push away
    need_noise, need_lens = beta > 0 and active, alpha > 0 and active
    with recorded(model, mlp=need_noise, layer_inputs=need_lens) as (mlps, inputs):
        logits = model(input_ids=ids, attention_mask=pairs["attention_mask"]).logits
    if code:
        safe_targets = mask & (ids[:n] != 0)
        ce_safe = (readout_ce(logits[:n], ids[:n], safe_targets, keep_logits=mask)
                   if distributed.total(safe_targets[:, 1:].sum()) > 0 else logits.new_zeros((), dtype=torch.float32))
    else:
        ce_safe = mean_nll(*token_nll(logits[:n], pairs["labels"][:n]))
    parts = {"ce_refusal": distributed.mean(ce_safe.detach()), "harmful_tokens": n_targets.float()}
    loss = ce_safe
    if need_noise:
        noise = noise_loss([f[n:] for f in mlps], mask)
        parts["noise"] = noise.detach()
        loss = loss + beta * noise
    if need_lens:
        keep = mask if code else None
        head, norm = model.get_output_embeddings(), final_norm(model)
        ces = [readout_ce(logits[n:], ids[n:], targets, keep_logits=keep)]
        ces += [readout_ce(h[n:], ids[n:], targets, lambda s: head(norm(s)), keep) for h in inputs]
        ce_h = distributed.pooled(sum(ces) / len(ces))  # the global batch's value, this rank's gradient
        parts["ce_harmful"] = ce_h.detach()
        loss = loss - alpha * torch.log(ce_h + log_offset)
    return loss, parts


@register("repnoise", RepNoiseConfig)
class RepNoiseModule(FineTuneModule):
    stage = "alignment"
    streams = ("task", "safety")  # task: the framework's step bookkeeping; the loss reads the pairs

    def __init__(self, model: torch.nn.Module, cfg):
        super().__init__(model, cfg)
        if cfg.method.alpha > 0:
            final_norm(model)  # fail at construction on a model whose logit lens cannot be read

    def loss(self, batch: dict) -> torch.Tensor:
        c = self.method_cfg
        loss, parts = repnoise_loss(self.model, batch["safety"], c.alpha, c.beta, c.log_offset, c.masking)
        for key, value in parts.items():
            self.log(f"repnoise/{key}", value, batch_size=1)
        return loss
