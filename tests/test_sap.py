"""SAP's training step: the probe, the perturbation, the update, the bookkeeping."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from safeprobe.config import validate
from safeprobe.data.datamodule import SafetyDataModule, synthetic_splits
from safeprobe.methods import build_method
from safeprobe.methods.losses import task_loss
from safeprobe.models.factory import apply_adapter, formatter, load_base


def setup(make_cfg, *overrides):
    c = validate(make_cfg(*overrides))
    base = load_base(c.model, c.paths.cache_dir)
    splits = synthetic_splits(base.world, c.data, "val")
    L.seed_everything(c.seed)
    module = build_method(apply_adapter(base.model, c.adapter), c)
    dm = SafetyDataModule(c.data, splits, base.tokenizer, formatter(base, "plain", None), c.seed)
    return c, module, dm


def first_batch(dm) -> dict:
    loader = dm.train_dataloader()
    out = next(iter(loader))
    return out[0] if isinstance(out, tuple) else out


def fit(module, dm, steps: int) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    return trainer


def trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


def safe_useful_loss(module, task, vectors) -> float:
    with torch.no_grad():
        with module.perturbed(module.direction), module.probe.attached(vectors):
            plus = task_loss(module.model, task)
        with module.probe.attached(vectors):
            zero = task_loss(module.model, task)
    return (plus - zero).item()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_probe_has_configured_size_and_ascends_the_safe_useful_loss(make_cfg, norm):
    eps = 0.05
    c, module, dm = setup(make_cfg, f"probe.eps={eps}", f"probe.norm={norm}", "probe.harmful_step=0.5")
    batch = first_batch(dm)
    module.model.train()
    module.direction = module.unsafe_direction(batch["safety"])
    zeros = module.probe.zeros(batch["task"]["input_ids"])
    grad = module.probe_gradient(batch["task"], zeros, module.direction)
    v = module.find_probe(batch["task"])
    assert v.shape == (len(c.probe.layers), module.model.config.hidden_size)
    assert grad.abs().sum() > 0
    if norm == "linf":  # one sign step from 0, projected: exactly eps * sign(grad)
        assert torch.equal(v, eps * grad.sign())
    else:  # the L2 step along the gradient, on the sphere of radius eps
        assert torch.allclose(v.norm(dim=-1), torch.full((len(c.probe.layers),), eps), rtol=1e-5)
        assert torch.allclose(v, eps * grad / grad.norm(dim=-1, keepdim=True), atol=1e-7)
    # the probe points where the perturbed loss rises faster than the clean one
    assert safe_useful_loss(module, batch["task"], v) > safe_useful_loss(module, batch["task"], zeros)


def test_perturbation_is_restored_bit_for_bit(make_cfg):
    c, module, dm = setup(make_cfg)
    batch = first_batch(dm)
    before = trainable(module)
    module.direction = module.unsafe_direction(batch["safety"])
    with module.perturbed(module.direction):
        inside = trainable(module)
        assert any(not torch.equal(inside[n], before[n]) for n in before)
    assert all(torch.equal(p, before[n]) for n, p in trainable(module).items())
    module.find_probe(batch["task"])
    assert all(torch.equal(p, before[n]) for n, p in trainable(module).items())
    with pytest.raises(RuntimeError), module.perturbed(module.direction):
        raise RuntimeError("a failing pass inside the perturbation")
    assert all(torch.equal(p, before[n]) for n, p in trainable(module).items())


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_eps_zero_gives_exactly_the_sft_update(make_cfg, adapter):
    # dropout on: the probe passes must not shift the random stream of the update pass
    extra = ["adapter.dropout=0.1"] if adapter == "lora" else []
    result = {}
    for name, overrides in {"sft": ["method=sft"], "sap0": ["probe.eps=0"], "sap": ["probe.eps=0.2"]}.items():
        _, module, dm = setup(make_cfg, f"adapter={adapter}", *extra, *overrides)
        fit(module, dm, 3)
        result[name] = trainable(module)
    assert all(torch.equal(result["sap0"][n], p) for n, p in result["sft"].items())
    assert any(not torch.equal(result["sap"][n], p) for n, p in result["sft"].items())  # the test can fail


@pytest.mark.parametrize("mode", ["clean", "faithful"])
def test_only_trainable_weights_change_and_the_probe_leaves_no_trace(make_cfg, mode):
    c, module, dm = setup(make_cfg, f"probe.mode={mode}")
    frozen = {n: p.detach().clone() for n, p in module.model.named_parameters() if not p.requires_grad}
    start = trainable(module)
    backward_calls = []
    original = module.manual_backward
    module.manual_backward = lambda *a, **k: (backward_calls.append(1), original(*a, **k))[1]
    trainer = fit(module, dm, 3)
    assert trainer.global_step == 3 and len(backward_calls) == 3  # one backward, one step per batch
    assert all(torch.equal(p, frozen[n]) for n, p in module.model.named_parameters() if not p.requires_grad)
    end = trainable(module)
    assert all(not torch.equal(end[n], start[n]) for n in start)
    assert all(not m._forward_hooks for m in module.model.modules())
    assert not any("probe" in k for k in module.state_dict())
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in module.trainable_parameters()}
    assert module.faithful_v is None and module.direction is None


def test_faithful_mode_uses_a_stale_adam_probe(make_cfg):
    eps = 0.05
    _, sft, dm = setup(make_cfg, "method=sft")
    fit(sft, dm, 1)
    _, sap, dm = setup(make_cfg, "probe.mode=faithful", f"probe.eps={eps}")
    seen = []
    original = sap._faithful_probe_step
    sap._faithful_probe_step = lambda: (original(), seen.append(sap.faithful_v.detach().clone()))
    fit(sap, dm, 1)
    # step 1 trains with the stale (zero) probe: the same update as SFT
    assert all(torch.equal(p, trainable(sft)[n]) for n, p in trainable(sap).items())
    # the probe for step 2 is AdamW's first step from zero with lr = eps: about eps * sign
    v = seen[0]
    assert v.abs().max() <= eps * (1 + 1e-5)
    assert (v.abs() > 0.9 * eps).float().mean() > 0.9


def test_unsafe_direction_is_the_unit_gradient_of_the_contrastive_loss(make_cfg):
    # a high temperature keeps the sigmoid unsaturated, so the plain gradient is well defined
    from safeprobe.methods.losses import contrastive_safety_loss
    from safeprobe.methods.sap import global_norm

    _, module, dm = setup(make_cfg, "probe.temperature=50")
    pairs = first_batch(dm)["safety"]
    params = module.trainable_parameters()
    plain = torch.autograd.grad(contrastive_safety_loss(module.model, pairs, 50.0), params)
    expected = [g / global_norm(plain) for g in plain]
    got = module.unsafe_direction(pairs)
    assert torch.allclose(global_norm(got), torch.tensor(1.0), atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, expected))
    # at T=1 the aligned model's margins saturate the sigmoid; the direction is still a unit vector
    module.probe_cfg.temperature = 1.0
    assert torch.allclose(global_norm(module.unsafe_direction(pairs)), torch.tensor(1.0), atol=1e-5)


def test_decision_contrast_keeps_each_pair_up_to_its_first_differing_answer_token(make_cfg):
    from safeprobe.data.formatting import IGNORE, up_to_first_difference
    from safeprobe.methods.losses import sequence_logprobs

    _, module, dm = setup(make_cfg, "probe.contrast=decision")
    pairs = first_batch(dm)["safety"]
    cut = up_to_first_difference(pairs)
    safe_ids, harm_ids = pairs["input_ids"].chunk(2)
    for i in range(safe_ids.shape[0]):
        k = int((safe_ids[i] != harm_ids[i]).nonzero()[0])  # "sorry" vs "sure": the first answer token
        for row in (i, i + safe_ids.shape[0]):
            kept = (cut["labels"][row] != IGNORE).nonzero().flatten().tolist()
            assert kept == [k]
    # the margin is then the log-odds of that one token, and the direction is still a unit vector
    logp = sequence_logprobs(module.model, cut)
    logits = module.model(input_ids=pairs["input_ids"], attention_mask=pairs["attention_mask"]).logits.log_softmax(-1)
    k0 = int((safe_ids[0] != harm_ids[0]).nonzero()[0])
    assert torch.allclose(logp[0], logits[0, k0 - 1, safe_ids[0, k0]], atol=1e-5)
    from safeprobe.methods.sap import global_norm
    assert torch.allclose(global_norm(module.unsafe_direction(pairs)), torch.tensor(1.0), atol=1e-5)


def test_refresh_every_k_finds_a_new_probe_every_k_steps_and_keeps_it_in_between(make_cfg, monkeypatch):
    c, module, dm = setup(make_cfg, "probe.refresh_every=3")
    found, in_use = [], []
    real_find, real_after = module.find_probe, module.after_backward
    monkeypatch.setattr(module, "find_probe", lambda task: found.append(module.global_step) or real_find(task))
    monkeypatch.setattr(module, "after_backward", lambda: in_use.append(module.vectors.clone()) or real_after())
    fit(module, dm, 7)
    assert found == [0, 3, 6]  # the steps that search; the others reuse
    assert all(torch.equal(in_use[i], in_use[i - i % 3]) for i in range(7))
    assert not (torch.equal(in_use[0], in_use[3]) and torch.equal(in_use[3], in_use[6]))


def test_probe_examples_finds_the_probe_on_the_batch_s_first_examples(make_cfg):
    from safeprobe.methods.sap import first

    c, module, dm = setup(make_cfg, "probe.probe_examples=3", "probe.harmful_step=0.5")
    batch = first_batch(dm)
    module.model.train()
    module.direction = module.unsafe_direction(batch["safety"])
    head = first(batch["task"], 3)
    assert head["input_ids"].shape[0] == 3 and torch.equal(head["input_ids"], batch["task"]["input_ids"][:3])
    with torch.random.fork_rng():
        on_head = module.find_probe(head)
    with torch.random.fork_rng():
        on_all = module.find_probe(batch["task"])
    assert not torch.equal(on_head, on_all)  # the sub-batch decides
    with torch.random.fork_rng():
        stepped = None
        with module.update_context(batch):
            stepped = module.vectors
    assert torch.equal(stepped, on_head)


@pytest.mark.parametrize("chunk", [1, 3])
def test_the_direction_in_chunks_of_pairs_equals_the_direction_in_one_pass(make_cfg, chunk):
    c, module, dm = setup(make_cfg, "probe.temperature=0.1")  # sharp weights: the rescaling between chunks matters
    pairs = first_batch(dm)["safety"]
    module.model.eval()  # no dropout: both computations see the same model
    whole = module.unsafe_direction(pairs)
    assert module.safety_chunk(pairs["input_ids"].shape[0] // 2) == pairs["input_ids"].shape[0] // 2  # one chunk here
    module.probe_cfg.safety_chunk = chunk
    chunked = module.unsafe_direction(pairs)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, chunked))


def test_by_default_the_direction_pass_holds_no_more_sequences_than_the_task_batch(make_cfg):
    c, module, dm = setup(make_cfg, "data.batch_size=4", "data.safety_batch_size=8")
    assert module.safety_chunk(8) == 2  # 4 sequences a backward, as the update's
    assert module.safety_chunk(2) == 2  # 4 sequences: one pass
