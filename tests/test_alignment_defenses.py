"""The alignment-stage defenses (Vaccine, Booster, RepNoise): each one's defining property,
checked against passes computed here independently, on a tiny randomly initialized Llama.

Vaccine: the perturbation has norm rho over all layers and the direction of the attention
outputs' gradient; the update's gradient is that of the loss with it added as a constant.
Booster: the step's gradient is g_f + lam * (g_h - g_h2), the weights back bit for bit.
RepNoise: the MMD, the mask and the loss's formula. All three: two Lightning steps change only
trainable weights and leave no hooks; their "off" settings give SFT's gradient exactly.
"""

from __future__ import annotations

import dataclasses
import math

import lightning as L
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from transformers import LlamaConfig, LlamaForCausalLM

from safeprobe.config import CONF_DIR, AdapterConfig, ConfigError, validate
from safeprobe.data.formatting import IGNORE, collate, collate_pairs
from safeprobe.methods import METHODS
from safeprobe.methods.booster import BoosterConfig
from safeprobe.methods.repnoise import RepNoiseConfig, harmful_mask, mmd
from safeprobe.methods.vaccine import VaccineConfig
from safeprobe.models.factory import apply_adapter, decoder_layers

DEFENSES = {"vaccine": VaccineConfig, "booster": BoosterConfig, "repnoise": RepNoiseConfig}
VOCAB, PAD = 40, 0
LORA = AdapterConfig(kind="lora", r=4, alpha=8, dropout=0.0,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def train_cfg(cache_dir):
    """A validated TrainConfig (the micro world's settings); tests swap in a defense's config."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["model=synthetic_micro", "paths.output_dir=unused",
                                          f"paths.cache_dir={cache_dir}", "optim.lr=1e-2", "optim.grad_clip=null"])
    return validate(cfg)


def tiny_llama(adapter: str = "lora", dtype: torch.dtype = torch.float32, seed: int = 0,
               dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         attention_dropout=0.0, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).to(dtype)
    if adapter == "lora":
        model = apply_adapter(model, dataclasses.replace(LORA, dropout=dropout))
        with torch.no_grad():  # PEFT starts lora_B at 0, which leaves lora_A without gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
    else:
        model = apply_adapter(model, AdapterConfig(kind="full"))
    return model.train()


def example(g: torch.Generator, n_prompt: int, n_answer: int) -> tuple[list[int], list[int]]:
    rand = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    return rand(n_prompt), rand(n_answer)


def encoded(prompt: list[int], answer: list[int]) -> dict:
    return {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer}


def batches(seed: int = 0, b: int = 3) -> dict:
    """One step's streams: task (prompt -> refusal), harmful (prompt -> harmful answer), safety
    (the pairs: B refusal rows, then the B harmful rows of the same prompts)."""
    g = torch.Generator().manual_seed(seed)
    task, harmful, pairs = [], [], []
    for i in range(b):
        prompt, refusal = example(g, 3 + i % 2, 5 + i)
        _, answer = example(g, 0, 4 + 2 * i)
        answer[:2] = refusal[:2]  # a shared start ("Sure"/"Sorry" diverge after it)
        task.append(encoded(prompt, refusal))
        harmful.append(encoded(*example(g, 4, 6)))
        pairs.append({"safe": encoded(prompt, refusal), "harmful": encoded(prompt, answer)})
    return {"task": collate(task, PAD), "harmful": collate(harmful, PAD), "safety": collate_pairs(pairs, PAD)}


def make_module(train_cfg, model, name: str, **settings):
    """The defense's module as the alignment stage builds it: the run's config with the stage's
    method. (build_method's registry lookup, made for method=..., refuses alignment-stage
    methods for now; the module class is the registry's all the same.)"""
    cfg = dataclasses.replace(train_cfg, method=DEFENSES[name](name=name, **settings))
    return METHODS[name].module(model, cfg)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def grads(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in trainable(model).items()}


def step_gradients(module, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The gradients the optimizer would step on: FineTuneModule.training_step without the step."""
    module.model.zero_grad(set_to_none=True)
    with module.update_context(batch):
        loss = module.loss(batch)
        loss.backward()
    module.after_backward()
    return grads(module.model), loss.detach()


def ce(model, b: dict) -> torch.Tensor:
    """Mean next-token cross-entropy on the labelled tokens, written out here."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
    labels = b["labels"][:, 1:]
    mask = labels != IGNORE
    logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(logp * mask).sum() / mask.sum()


def sft_gradients(model, batch: dict) -> dict[str, torch.Tensor]:
    from safeprobe.methods.losses import task_loss

    model.zero_grad(set_to_none=True)
    task_loss(model, batch).backward()
    return grads(model)


def close(a: dict, b: dict, rtol=1e-5, atol=1e-7) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=rtol, atol=atol) for k in a)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten().float() for t in tensors])


# ---------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_each_defense_is_an_alignment_method_whose_yaml_holds_its_defaults(name, train_cfg):
    spec = METHODS[name]
    assert spec.config is DEFENSES[name] and spec.module.stage == "alignment"
    node = yaml.safe_load((CONF_DIR / "align" / f"{name}.yaml").read_text())
    assert set(node["method"]) == {f.name for f in dataclasses.fields(spec.config)}
    assert spec.config(**node["method"]) == spec.config(name=name)  # the YAML's values are the defaults
    assert node["lora"] == ("single" if name == "booster" else "double")
    sft = yaml.safe_load((CONF_DIR / "align" / "sft.yaml").read_text())
    assert {k: node[k] for k in ("steps", "lr", "batch_size", "seed")} == {k: sft[k] for k in ("steps", "lr", "batch_size", "seed")}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["model=synthetic_micro", "paths.output_dir=unused", f"align={name}"])
    assert validate(cfg).align.method == spec.config(name=name)


@pytest.mark.parametrize(("name", "settings"), [
    ("vaccine", {"rho": -1.0}), ("booster", {"lam": -1.0}), ("booster", {"alpha": -0.1}),
    ("repnoise", {"alpha": -1.0}), ("repnoise", {"beta": -1.0}), ("repnoise", {"log_offset": -1.0}),
    ("repnoise", {"masking": "tokens"}),
])
def test_bad_settings_are_refused_in_one_line(name, settings):
    with pytest.raises(ConfigError) as e:
        DEFENSES[name](name=name, **settings)
    key = next(iter(settings))
    assert f"method.{key}" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------- Vaccine


def attention_gradients_here(model, batch: dict) -> list[torch.Tensor]:
    """dCE/d out_l at every attention output, through retain_grad (independent of vaccine.py)."""
    outs = []

    def keep(module, args, out):
        out[0].retain_grad()
        outs.append(out[0])

    hooks = [layer.self_attn.register_forward_hook(keep) for layer in decoder_layers(model)]
    model.zero_grad(set_to_none=True)
    ce(model, batch).backward()
    for h in hooks:
        h.remove()
    return [o.grad.detach().clone() for o in outs]


def gradients_with_added(model, batch: dict, added: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    def add(e):
        return lambda module, args, out: (out[0] + e.to(out[0].dtype), *out[1:])

    hooks = [layer.self_attn.register_forward_hook(add(e)) for layer, e in zip(decoder_layers(model), added)]
    model.zero_grad(set_to_none=True)
    ce(model, batch).backward()
    for h in hooks:
        h.remove()
    return grads(model)


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_vaccine_perturbation_has_norm_rho_along_the_attention_gradient(train_cfg, adapter):
    model, batch = tiny_llama(adapter), batches()
    g = attention_gradients_here(model, batch["task"])
    module = make_module(train_cfg, model, "vaccine", rho=2.0)
    update, _ = step_gradients(module, batch)
    e = module.perturbation
    assert len(e) == 2 and [t.shape for t in e] == [t.shape for t in g]
    assert torch.isclose(flat(e).norm(), torch.tensor(2.0), rtol=1e-5)  # one norm over all layers and tokens
    assert torch.nn.functional.cosine_similarity(flat(e), flat(g), dim=0) > 1 - 1e-5
    scale = 2.0 / flat(g).norm()
    assert all(torch.allclose(a, b * scale, rtol=1e-4, atol=1e-7) for a, b in zip(e, g))  # not per-layer norms
    # the update: the gradient of the loss with e added as a constant, from an explicit pass
    expected = gradients_with_added(model, batch["task"], [t.clone() for t in e])
    assert close(update, expected)
    assert not close(update, sft_gradients(model, batch["task"]))  # and the perturbation matters
    assert all(not m._forward_hooks for m in model.modules())


def test_vaccine_with_rho_0_is_sft_bit_for_bit(train_cfg):
    model, batch = tiny_llama(), batches()
    update, loss = step_gradients(make_module(train_cfg, model, "vaccine", rho=0.0), batch)
    sft = sft_gradients(model, batch["task"])
    assert all(torch.equal(update[k], sft[k]) for k in sft)


# ---------------------------------------------------------------------- Booster


def booster_gradient_here(model, batch: dict, lam: float, alpha: float):
    """g_f + lam * (g_h - g_h2) from explicit passes: the test shifts .data, recomputes, restores."""
    params = trainable(model)
    model.zero_grad(set_to_none=True)
    h = ce(model, batch["harmful"])
    h.backward()
    g_h = grads(model)
    s = math.sqrt(sum(float((g.double() ** 2).sum()) for g in g_h.values())) + 1e-7
    saved = {n: p.data.clone() for n, p in params.items()}
    for n, p in params.items():
        p.data -= alpha * g_h[n] / s
    model.zero_grad(set_to_none=True)
    h2 = ce(model, batch["harmful"])
    h2.backward()
    g_h2 = grads(model)
    for n, p in params.items():
        p.data = saved[n]
    model.zero_grad(set_to_none=True)
    f = ce(model, batch["task"])
    f.backward()
    g_f = grads(model)
    combined = {n: g_f[n] + lam * (g_h[n] - g_h2[n]) for n in g_f}
    return combined, {n: lam * (g_h[n] - g_h2[n]) for n in g_f}, (f + lam * (h - h2)).detach()


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_booster_gradient_is_g_f_plus_lam_times_the_harmful_difference(train_cfg, adapter):
    model, batch = tiny_llama(adapter), batches()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    module = make_module(train_cfg, model, "booster", lam=5.0, alpha=0.1)
    update, loss = step_gradients(module, batch)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # restored bit for bit
    expected, booster_term, objective = booster_gradient_here(model, batch, 5.0, 0.1)
    assert flat(booster_term.values()).norm() > 0.05 * flat(expected.values()).norm()  # the term is not negligible
    assert close(update, expected, rtol=1e-4, atol=1e-6)
    assert torch.isclose(loss, objective, rtol=1e-5)  # the checked loss is the objective's value


def test_booster_with_lam_0_is_sft_bit_for_bit(train_cfg):
    model, batch = tiny_llama(), batches()
    update, _ = step_gradients(make_module(train_cfg, model, "booster", lam=0.0), batch)
    sft = sft_gradients(model, batch["task"])
    assert all(torch.equal(update[k], sft[k]) for k in sft)


def test_a_non_finite_harmful_loss_reaches_the_checked_loss(train_cfg, monkeypatch):
    import safeprobe.methods.booster as booster

    model, batch = tiny_llama(), batches()
    real = booster.task_loss
    monkeypatch.setattr(booster, "task_loss",
                        lambda m, b: real(m, b) * (float("nan") if b is batch["harmful"] else 1.0))
    module = make_module(train_cfg, model, "booster")
    with module.update_context(batch):
        loss = module.loss(batch)
    assert not torch.isfinite(loss)  # FineTuneModule.training_step stops on it


@pytest.mark.parametrize(("name", "settings"), [("vaccine", {"rho": 1e-9}), ("booster", {"lam": 5.0, "alpha": 0.0})])
def test_auxiliary_passes_leave_the_update_sfts_dropout_masks(train_cfg, name, settings):
    # with LoRA dropout on, a vanishing perturbation (vaccine) or a zero shift (booster: its two
    # harmful passes draw the same masks, so g_h - g_h2 = 0) gives SFT's gradient for the same
    # seed only if the auxiliary passes consume none of the update's random numbers
    model, batch = tiny_llama(dropout=0.5), batches()
    torch.manual_seed(11)
    update, _ = step_gradients(make_module(train_cfg, model, name, **settings), batch)
    torch.manual_seed(11)
    sft = sft_gradients(model, batch["task"])
    assert close(update, sft, rtol=1e-5, atol=1e-7)
    torch.manual_seed(12)
    assert not close(sft_gradients(model, batch["task"]), sft)  # the masks do change the gradient


# ---------------------------------------------------------------------- RepNoise


def test_mmd_is_small_for_one_distribution_and_grows_as_they_differ():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 6, generator=g), torch.randn(256, 6, generator=g)
    assert abs(mmd(x, x)) < 1e-6
    values = [float(mmd(x, y + shift)) for shift in (0.0, 0.5, 1.0, 2.0)]  # at most 10 (5 kernels, 2 x 1)
    assert values[0] < 0.05 and values == sorted(values) and values[-1] > 40 * values[0]
    assert float(mmd(x, 3 * y)) > 10 * values[0]  # a different spread too


def test_the_mask_is_exactly_the_differing_harmful_answer_tokens():
    prompt = [5, 6, 7]
    refusal, answer = [10, 11, 12, 13, 14, 15], [10, 11, 20, 13, 21]  # differ at answer positions 2 and 4 only
    other_refusal, other_answer = [30, 31], [30, 31, 32, 33]
    pairs = collate_pairs([{"safe": encoded(prompt, refusal), "harmful": encoded(prompt, answer)},
                           {"safe": encoded(prompt[:2], other_refusal), "harmful": encoded(prompt[:2], other_answer)}],
                          PAD)
    expected = torch.zeros(2, 9, dtype=torch.bool)
    expected[0, [3 + 2, 3 + 4]] = True  # answer tokens 20 and 21
    expected[1, [2 + 2, 2 + 3]] = True  # 32 and 33, where the refusal has padding
    assert torch.equal(harmful_mask(pairs), expected)
    # the authors' masking: every position where the ids differ, the harmful row's padding included
    code = expected.clone()
    code[0, 3 + 5] = True  # refusal token 15 against the harmful row's padding
    assert torch.equal(harmful_mask(pairs, "code"), code)


def mmd_here(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The authors' estimator written out: pairwise differences, 5 kernels at b/4 .. 4b."""
    z = torch.cat([x, y])
    d2 = ((z[None] - z[:, None]) ** 2).sum(-1)
    k = z.shape[0]
    base = d2.detach().sum() / (k * k - k) / 4
    kernel = sum(torch.exp(-d2 / (base * 2 ** i)) for i in range(5))
    n = x.shape[0]
    return (kernel[:n, :n] + kernel[n:, n:] - kernel[:n, n:] - kernel[n:, :n]).mean()


def repnoise_here(model, pairs: dict, alpha: float, beta: float, offset: float, seed: int) -> torch.Tensor:
    """The loss's formula on separate forwards of the refusal and the harmful rows."""
    n = pairs["input_ids"].shape[0] // 2
    safe = {k: v[:n] for k, v in pairs.items()}
    harm = {k: v[n:] for k, v in pairs.items()}
    mask = harmful_mask(pairs)
    mlps, inputs = [], []
    hooks = [layer.mlp.register_forward_hook(lambda m, a, out: mlps.append(out)) for layer in decoder_layers(model)]
    hooks += [layer.register_forward_pre_hook(lambda m, a, kw: inputs.append(a[0] if a else kw["hidden_states"]),
                                              with_kwargs=True) for layer in decoder_layers(model)]
    logits = model(input_ids=harm["input_ids"], attention_mask=harm["attention_mask"]).logits
    for h in hooks:
        h.remove()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    readouts = [logits] + [base.lm_head(base.model.norm(h)) for h in inputs]
    labels = harm["input_ids"][:, 1:]
    target = mask[:, 1:]

    def masked_ce(out):
        logp = out[:, :-1].float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return -(logp * target).sum() / target.sum()

    ce_h = sum(masked_ce(r) for r in readouts) / len(readouts)
    torch.manual_seed(seed)
    m = mask.unsqueeze(-1).float()
    noise = sum(mmd_here((f * m).flatten(1), (torch.randn(f.shape) * m).flatten(1)) for f in mlps) / len(mlps)
    return ce(model, safe) + beta * noise - alpha * torch.log(ce_h + offset)


@pytest.mark.parametrize(("alpha", "beta", "offset"), [(1.0, 0.001, 0.0), (0.1, 0.5, 1.0)])
def test_repnoise_loss_equals_its_formula(train_cfg, alpha, beta, offset):
    model, batch = tiny_llama(), batches()
    module = make_module(train_cfg, model, "repnoise", alpha=alpha, beta=beta, log_offset=offset)
    torch.manual_seed(7)
    update, loss = step_gradients(module, batch)
    model.zero_grad(set_to_none=True)
    expected = repnoise_here(model, batch["safety"], alpha, beta, offset, seed=7)
    expected.backward()
    assert torch.isclose(loss, expected.detach(), rtol=1e-5)
    assert close(update, grads(model), rtol=1e-4, atol=1e-6)
    assert not close(update, sft_gradients(model, {k: v[:3] for k, v in batch["safety"].items()}))


def test_repnoise_with_alpha_and_beta_0_is_the_refusal_cross_entropy(train_cfg):
    model, batch = tiny_llama(), batches()
    update, loss = step_gradients(make_module(train_cfg, model, "repnoise", alpha=0.0, beta=0.0), batch)
    refusals = {k: v[:3] for k, v in batch["safety"].items()}
    assert torch.isclose(loss, ce(model, refusals).detach(), rtol=1e-6)
    assert close(update, sft_gradients(model, refusals), rtol=1e-4, atol=1e-7)


def test_repnoise_code_masking_gives_the_first_differing_token_a_constant_loss(train_cfg):
    # one differing token per pair: its logits are zeroed (the position before it is shared), so
    # every readout's CE is log V and the ascent term has no gradient
    prompt, refusal = [5, 6, 7], [10, 11, 12, 13]
    answer = [10, 11, 20, 13]
    pairs = collate_pairs([{"safe": encoded(prompt, refusal), "harmful": encoded(prompt, answer)}], PAD)
    batch = {"task": collate([encoded(prompt, refusal)], PAD), "safety": pairs}
    model = tiny_llama()
    module = make_module(train_cfg, model, "repnoise", alpha=1.0, beta=0.0, masking="code")
    from safeprobe.methods.repnoise import repnoise_loss

    loss, parts = repnoise_loss(model, pairs, 1.0, 0.0, 0.0, "code")
    assert torch.isclose(parts["ce_harmful"], torch.tensor(math.log(VOCAB)))
    assert torch.isclose(parts["ce_refusal"], torch.tensor(math.log(VOCAB)))
    update, _ = step_gradients(module, batch)
    assert all(torch.count_nonzero(g) == 0 for g in update.values())
    _, answer_parts = repnoise_loss(model, pairs, 1.0, 0.0, 0.0, "answer")
    assert not torch.isclose(answer_parts["ce_harmful"], torch.tensor(math.log(VOCAB)))


# ---------------------------------------------------------------------- in a Lightning run


@pytest.mark.parametrize(("adapter", "dtype"), [("lora", torch.float32), ("full", torch.bfloat16)])
@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_two_lightning_steps_change_only_trainable_weights_and_leave_no_hooks(train_cfg, name, adapter, dtype):
    model = tiny_llama(adapter, dtype)
    module = make_module(train_cfg, model, name)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in trainable(model).items()}
    data = torch.utils.data.DataLoader([batches(0), batches(1)], batch_size=None)
    trainer = L.Trainer(max_steps=2, max_epochs=-1, logger=False, enable_checkpointing=False, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=data)
    assert trainer.global_step == 2
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(not torch.equal(p, start[n]) for n, p in trainable(model).items())  # every trainable weight moved
    assert (adapter == "lora") == bool(frozen) and all("lora_" in n for n in start) == (adapter == "lora")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    key = {"vaccine": "vaccine/perturbation_norm", "booster": "booster/harmful_gap", "repnoise": "repnoise/noise"}[name]
    assert math.isfinite(logged[key]) and math.isfinite(logged["train/loss"])
    if name == "vaccine":
        assert logged[key] == pytest.approx(2.0, rel=1e-3)
    if name == "repnoise":
        assert logged["repnoise/ce_harmful"] > 0


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_gradient_checkpointing_gives_the_same_update(train_cfg, name):
    batch = batches()
    plain = tiny_llama("full")
    torch.manual_seed(3)
    expected, _ = step_gradients(make_module(train_cfg, plain, name), batch)
    checkpointed = tiny_llama("full")
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(3)
    update, _ = step_gradients(make_module(train_cfg, checkpointed, name), batch)
    assert close(update, expected, rtol=1e-4, atol=1e-6)
