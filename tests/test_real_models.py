"""Real model families on tiny random stand-ins: configs, SAP's probe hooks, a step of every method on
each family, gradient checkpointing with LoRA, and prompt formatting with chat templates."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch

from safeprobe.config import CONF_DIR, AdapterConfig, ConfigError, ModelConfig, validate
from safeprobe.data.datamodule import SafetyDataModule
from safeprobe.data.formatting import (
    ALPACA_INPUT_TEMPLATE,
    ALPACA_TEMPLATE,
    IGNORE,
    PromptFormatter,
    encode,
    with_input,
)
from safeprobe.methods import build_method, fine_tuning_methods, method_spec
from safeprobe.methods.losses import task_loss
from safeprobe.methods.probe import Probe
from safeprobe.models.factory import apply_adapter, decoder_layers, formatter, load_base
from safeprobe.pipeline import build_splits, data_module
from tests.standins import FAMILIES, build_tokenizer, fixture_overrides, standin

REAL_MODELS = {"llama2_7b_chat": "meta-llama/Llama-2-7b-chat-hf", "llama3_8b_instruct": "meta-llama/Llama-3.1-8B-Instruct",
               "qwen2_5_7b_instruct": "Qwen/Qwen2.5-7B-Instruct", "gemma2_9b_it": "google/gemma-2-9b-it",
               "mistral_7b_instruct": "mistralai/Mistral-7B-Instruct-v0.3", "pretrained": "Qwen/Qwen2.5-0.5B-Instruct"}


@pytest.mark.parametrize("option", sorted(REAL_MODELS))
def test_real_model_configs(make_cfg, option):
    m = validate(make_cfg(f"model={option}", fast=False)).model
    assert (m.kind, m.name_or_path, m.dtype, m.trust_remote_code) == ("pretrained", REAL_MODELS[option], "bfloat16", False)
    assert m.attn_implementation == ("eager" if option == "gemma2_9b_it" else None)
    assert sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml") if p.stem in REAL_MODELS) == sorted(REAL_MODELS)


def family_cfg(make_cfg, family: str, *extra: str):
    """alpaca fixtures on a 2-layer stand-in of `family`, probing both layers."""
    overrides = fixture_overrides("alpaca", standin(family), standin("beaverdam"))
    return validate(make_cfg("model=pretrained", "data=alpaca", "eval=moderation", *overrides, "probe.layers=[0,1]",
                             "data.max_length=96", *extra, fast=False))


def lm_batch(tokenizer, texts=("Give three tips for staying healthy.", "Name two primary colors.")) -> dict:
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, IGNORE)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_probe_hooks_add_the_vector_to_each_probed_mlp(make_cfg, family):
    c = family_cfg(make_cfg, family)
    base = load_base(c.model, c.paths.cache_dir)
    model = apply_adapter(base.model, c.adapter)
    blocks = decoder_layers(model)
    assert len(blocks) == 2 and type(blocks[0]).__name__ == FAMILIES[family].__name__.replace("Config", "DecoderLayer")
    probe = Probe(model, [0, 1])
    assert probe.mlps == [blocks[0].mlp, blocks[1].mlp]
    batch = lm_batch(base.tokenizer)
    raw, post = {}, {}
    handles = [m.register_forward_hook(lambda mod, a, out, k=k: raw.__setitem__(k, out.detach())) for k, m in enumerate(probe.mlps)]
    vectors = torch.randn(2, model.config.hidden_size)
    with torch.no_grad():
        plain = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        with probe.attached(vectors):  # hooks registered inside run after the probe's
            handles += [m.register_forward_hook(lambda mod, a, out, k=k: post.__setitem__(k, out.detach()))
                        for k, m in enumerate(probe.mlps)]
            probed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for h in handles:
            h.remove()
        with probe.attached(torch.zeros(2, model.config.hidden_size)):
            zero = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    for k in (0, 1):
        assert torch.allclose(post[k] - raw[k], vectors[k].expand_as(raw[k]), atol=1e-5)
    assert not torch.allclose(probed, plain) and torch.equal(zero, plain)
    assert all(not m._forward_hooks for m in model.modules())


# every registered method, with settings that make it read its other streams on 4 training
# examples: SafeInstr mixes 2 alignment examples in (the default 3% of 4 rounds to none), or
# reads the alignment stream (joint); Lisa's one step is an alignment step (align_steps > 0)
METHOD_CASES = {**{m: [f"method={m}"] for m in fine_tuning_methods()},
                "safeinstr": ["method=safeinstr", "method.share=0.5"],
                "safeinstr_joint": ["method=safeinstr", "method.mode=joint"]}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("case", sorted(METHOD_CASES))
def test_a_step_of_each_method_on_each_family(make_cfg, case, family):
    c = family_cfg(make_cfg, family, *METHOD_CASES[case])
    spec = method_spec(c.method.name)
    spec.module.check_config(c)
    base = load_base(c.model, c.paths.cache_dir)
    splits = build_splits(base, c)
    fmt = formatter(base, c.data.prompt_format, c.data.system_prompt)
    data = data_module(c, base, splits, fmt)  # the method's streams and fine-tuning set, as a run builds them
    assert set(data.rows) == {"task", *spec.module.data_streams(c)}  # each with rows (an empty one raises)
    if case == "safeinstr":  # 2 alignment examples among the 6 (rows longer than data.max_length are dropped)
        assert sum(e in set(splits.alignment) for e in spec.module.task_examples(c, splits)) == 2
        assert len(data.train_rows) + data.dropped == 4 + 2
    model = apply_adapter(base.model, c.adapter)
    model.train()
    module = build_method(model, c)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 1
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert all(not m._forward_hooks for m in model.modules())


def with_lora(model, adapter: AdapterConfig):
    """LoRA with random B (it starts at 0, which would leave A without gradient), in train mode."""
    torch.manual_seed(0)
    model = apply_adapter(model, adapter)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model.train()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradient_checkpointing_gives_lora_the_same_gradients(family):
    grads, recomputed = {}, {}
    for checkpointing in (False, True):
        base = load_base(ModelConfig(kind="pretrained", name_or_path=str(standin(family)), dtype="float32",
                                     gradient_checkpointing=checkpointing), "unused")
        model = with_lora(base.model, AdapterConfig(r=4, alpha=8))
        calls = []
        decoder_layers(model)[0].self_attn.q_proj.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        task_loss(model, lm_batch(base.tokenizer)).backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        recomputed[checkpointing] = len(calls)
    assert recomputed == {False: 1, True: 2}  # checkpointing on: the layer runs again in backward
    assert grads[True] and all("lora_" in n and g is not None and g.abs().sum() > 0 for n, g in grads[True].items())
    assert all(torch.allclose(grads[True][n], grads[False][n], atol=1e-6) for n in grads[True])


# Gemma-2 normalizes the MLP output (post_feedforward_layernorm) after the probe is added, so
# with checkpointing its backward must recompute that norm with the probe in place: the
# probe stays attached through the update's backward (FineTuneModule.update_context).
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "gemma2"])
def test_sap_update_gradient_is_unchanged_by_checkpointing(make_cfg, family):
    grads = {}
    for checkpointing in (False, True):
        c = family_cfg(make_cfg, family, f"model.gradient_checkpointing={str(checkpointing).lower()}",
                       "probe.eps=0.5")
        base = load_base(c.model, c.paths.cache_dir)
        module = build_method(with_lora(base.model, c.adapter), c)
        dm = SafetyDataModule(c.data, build_splits(base, c), base.tokenizer, formatter(base, "alpaca", None), 0)
        batch = next(iter(dm.train_dataloader()))
        batch = batch[0] if isinstance(batch, tuple) else batch
        with module.update_context(batch):
            task_loss(module.model, batch["task"]).backward()
        grads[checkpointing] = [p.grad.clone() for p in module.trainable_parameters()]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[True], grads[False], strict=True))


def test_attention_implementation_is_selectable():
    for impl in ("eager", "sdpa"):
        base = load_base(ModelConfig(kind="pretrained", name_or_path=str(standin("llama")), dtype="float32",
                                     attn_implementation=impl), "unused")
        assert base.model.config._attn_implementation == impl


# ---------------------------------------------------------------- prompt formatting


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_chat_template_with_a_system_prompt(tok):
    fmt = PromptFormatter(tok, "chat", "You are a helpful assistant.")
    assert fmt("Hi there") == "<s><|system|>You are a helpful assistant.<|end|><|user|>Hi there<|end|><|assistant|>"
    assert fmt(with_input("Translate.", "Le chat dort.")) == (
        "<s><|system|>You are a helpful assistant.<|end|><|user|>Translate.\n\nLe chat dort.<|end|><|assistant|>")
    assert PromptFormatter(tok, "chat")("Hi") == "<s><|user|>Hi<|end|><|assistant|>"


def test_alpaca_templates(tok):
    fmt = PromptFormatter(tok, "alpaca")
    assert fmt("Name a color.") == ALPACA_TEMPLATE.format(prompt="Name a color.")
    assert fmt(with_input("Add the numbers.", "2 and 3")) == ALPACA_INPUT_TEMPLATE.format(
        instruction="Add the numbers.", input="2 and 3")
    assert fmt(with_input("Add the numbers.", "2 and 3")).startswith(
        "Below is an instruction that describes a task, paired with an input that provides further context.")


def test_answers_end_with_the_templates_end_of_turn_token(tok):
    end = tok.convert_tokens_to_ids("<|end|>")
    chat, alpaca = PromptFormatter(tok, "chat", "Be brief."), PromptFormatter(tok, "alpaca")
    assert chat.stop_token_id == end != tok.eos_token_id and chat.stop_token_ids == sorted({end, tok.eos_token_id})
    assert alpaca.stop_token_id == tok.eos_token_id and alpaca.stop_token_ids == [tok.eos_token_id]


@pytest.mark.parametrize("style", ["chat", "alpaca"])
def test_labels_cover_exactly_the_response_and_its_end_token(tok, style):
    fmt = PromptFormatter(tok, style, "Be brief." if style == "chat" else None)
    prompt, response = "Name two primary colors.", "Red and blue."
    row = encode(tok, fmt, prompt, response, max_length=512)
    p = tok(fmt(prompt), add_special_tokens=style == "alpaca")["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == p + r + [fmt.stop_token_id]
    assert row["labels"] == [IGNORE] * len(p) + r + [fmt.stop_token_id]
    assert row["input_ids"].count(tok.bos_token_id) == 1 and row["input_ids"][0] == tok.bos_token_id
    answer = [t for t in row["labels"] if t != IGNORE]
    assert tok.decode(answer) == response + ("<|end|>" if style == "chat" else "</s>")


def test_truncation_cuts_the_response_or_drops_the_row(tok):
    fmt = PromptFormatter(tok, "chat")
    n_prompt = len(tok(fmt("Name two primary colors."), add_special_tokens=False)["input_ids"])
    cut = encode(tok, fmt, "Name two primary colors.", "Red and blue, and also yellow.", max_length=n_prompt + 2)
    assert len(cut["input_ids"]) == n_prompt + 2 and sum(t != IGNORE for t in cut["labels"]) == 2
    assert encode(tok, fmt, "Name two primary colors.", "Red.", max_length=n_prompt) is None


def test_rows_whose_response_is_cut_away_are_dropped_and_counted(make_cfg, caplog):
    c = family_cfg(make_cfg, "llama", "data.n_train=7", "data.n_test=3", "data.prompt_format=chat",
                   "data.max_length=24")
    base = load_base(c.model, c.paths.cache_dir)
    splits = build_splits(base, c)
    fmt = formatter(base, "chat", None)
    too_long = sum(len(base.tokenizer(fmt(e.prompt), add_special_tokens=False)["input_ids"]) >= 24 for e in splits.task_train)
    assert 0 < too_long < len(splits.task_train)  # the fixture has both kinds at 24 tokens
    with caplog.at_level(logging.WARNING):
        dm = SafetyDataModule(c.data, splits, base.tokenizer, fmt, 0)
    assert dm.dropped == too_long and len(dm.train_rows) == 7 - too_long
    assert f"dropped {too_long} of 7 examples whose response did not fit data.max_length=24" in caplog.text


def test_chat_template_problems_are_one_line_config_errors(tok):
    no_system = build_tokenizer(chat_template=(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"))
    with pytest.raises(ConfigError, match=r"data.system_prompt='Be nice.' is invalid for this model; allowed: null "
                                          r"\(its chat template rejects a system prompt: System role not supported\)"):
        PromptFormatter(no_system, "chat", "Be nice.")("Hi")
    assert PromptFormatter(no_system, "chat")("Hi") == "Hi"
    with pytest.raises(ConfigError, match="data.prompt_format=chat is invalid for this model; allowed: alpaca or plain"):
        PromptFormatter(build_tokenizer(chat_template=None), "chat")("Hi")
