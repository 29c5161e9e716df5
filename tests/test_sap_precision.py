"""SAP in bf16: the probe gradient keeps its digits, the perturbation never vanishes, and no
trained weight is ever 16-bit (docs/sap.md, "Precision")."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.probe_precision import agreement, in_bf16, probe_gradient
from safeprobe.config import ConfigError, validate
from safeprobe.methods import build_method
from safeprobe.methods.losses import task_loss
from tests.test_sap import first_batch, setup

PAPER_STEP = 2e-5  # conf/probe/reference.yaml


@pytest.fixture
def sap(make_cfg):
    """A SAP module on the micro world's model (LoRA moved off its zero init), its bf16 twin, a batch."""
    c, module, dm = setup(make_cfg, "probe.layers=[0,1]")
    batch = first_batch(dm)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    module.model.train()
    twin = build_method(in_bf16(module.model), c)
    twin.model.train()
    return module, twin, batch


def with_step(module, harmful_step: float, difference: str = "finite"):
    module.probe_cfg = dataclasses.replace(module.probe_cfg, harmful_step=harmful_step, difference=difference)
    return module


@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16])
def test_bf16_probe_gradient_agrees_with_float32_at_the_papers_harmful_step(sap, lora_dtype):
    """LoRA in float32 (as PEFT keeps it), or cast to bf16 too: the perturbation must not vanish either way."""
    fp32, bf16, batch = sap
    for p in bf16.trainable_parameters():
        p.data = p.data.to(lora_dtype)
    reference, _ = probe_gradient(fp32, batch, PAPER_STEP, "finite", bf16=False)
    auto, _ = probe_gradient(bf16, batch, PAPER_STEP, "auto", bf16=True)
    cos, signs = agreement(auto, reference)
    assert cos >= 0.95 and signs >= 0.9, (cos, signs)
    # the test can fail: here two bf16 passes' difference is rounding noise
    two_passes, _ = probe_gradient(bf16, batch, PAPER_STEP, "finite", bf16=True)
    assert agreement(two_passes, reference)[0] < 0.95


def test_auto_is_the_two_pass_difference_in_float32_and_the_midpoint_rule_in_bf16(sap):
    fp32, bf16, batch = sap
    for module, bf in ((fp32, False), (bf16, True)):
        auto, _ = probe_gradient(module, batch, 0.1, "auto", bf)
        finite, _ = probe_gradient(module, batch, 0.1, "finite", bf)
        midpoint, _ = probe_gradient(module, batch, 0.1, "midpoint", bf)
        assert torch.equal(auto, midpoint if bf else finite)
        assert not torch.equal(finite, midpoint)


def test_midpoint_rule_is_the_two_pass_difference_up_to_third_order(sap):
    module, _, batch = sap
    module.model.double()  # float64: the rule's own error, not rounding
    module.direction = module.unsafe_direction(batch["safety"])
    zeros = module.probe.zeros(batch["task"]["input_ids"]).double()
    error = {}
    for h in (1e-2, 1e-3):
        finite = with_step(module, h, "finite").probe_gradient(batch["task"], zeros, module.direction)
        midpoint = with_step(module, h, "midpoint").probe_gradient(batch["task"], zeros, module.direction)
        assert torch.count_nonzero(finite) > 0
        error[h] = ((midpoint - finite).norm() / finite.norm()).item()
    # the difference is O(h), the rule's error O(h^3): relative error O(h^2), 100x smaller at h / 10
    assert error[1e-3] < 1e-3 and error[1e-2] / error[1e-3] > 30, error  # first order (t = 0) gives 10


def test_the_perturbation_survives_autocasts_weight_cache(sap):
    """Lightning's bf16-mixed runs the whole step in one autocast region, whose cache keeps the
    bf16 copy of each float32 weight made by the first pass: the perturbed pass must not use it."""
    _, module, batch = sap
    with_step(module, 0.1)
    with torch.autocast("cpu", torch.bfloat16):
        module.direction = module.unsafe_direction(batch["safety"])  # caches the unperturbed weights' bf16 copies
        with torch.no_grad():
            clean = task_loss(module.model, batch["task"])
            with module.perturbed(module.direction):
                perturbed = task_loss(module.model, batch["task"])
            again = task_loss(module.model, batch["task"])
        grad = module.probe_gradient(batch["task"], module.probe.zeros(batch["task"]["input_ids"]), module.direction)
    assert perturbed != clean and again == clean
    assert torch.count_nonzero(grad) > 0


@pytest.mark.parametrize(("overrides", "key"), [
    (["adapter=full", "model.dtype=bfloat16"], "model.dtype='bfloat16'"),
    (["adapter=full", "model.dtype=float16"], "model.dtype='float16'"),
    (["trainer.precision=bf16-true"], "trainer.precision='bf16-true'"),
])
def test_16_bit_trained_weights_are_refused_with_one_line(make_cfg, overrides, key):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(*overrides))
    assert str(e.value).startswith(key) and "master" in str(e.value) and "\n" not in str(e.value)
    validate(make_cfg("adapter=full", "model.dtype=float32", "trainer.precision=bf16-mixed"))  # fp32 masters: fine


def test_flash_attention_2_is_refused_where_the_probe_needs_a_second_derivative(make_cfg):
    from safeprobe.methods.sap import SAPModule

    c = validate(make_cfg("model.attn_implementation=flash_attention_2"))
    with pytest.raises(ConfigError, match="flash_attention_2"):
        SAPModule.check_config(c)
    SAPModule.check_config(validate(make_cfg("model.attn_implementation=flash_attention_2", "probe.difference=finite")))


def test_a_bf16_mixed_lightning_step_finds_a_nonzero_probe_by_the_midpoint_rule(make_cfg, monkeypatch):
    import lightning as L

    from safeprobe.methods.sap import SAPModule

    _, module, dm = setup(make_cfg, "probe.layers=[0,1]")
    rules = []
    original = SAPModule.midpoint_probe_gradient
    monkeypatch.setattr(SAPModule, "midpoint_probe_gradient", lambda self, *a: rules.append(1) or original(self, *a))
    trainer = L.Trainer(max_steps=1, max_epochs=-1, logger=False, enable_checkpointing=False, accelerator="cpu",
                        precision="bf16-mixed", enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert rules and float(trainer.callback_metrics["sap/probe_norm"]) > 0


def test_the_midpoint_rule_gives_the_same_probe_gradient_under_gradient_checkpointing(sap):
    """Its second backward goes through recomputed (non-reentrant) checkpoints, as 7B runs use them."""
    module, _, batch = sap
    module.direction = module.unsafe_direction(batch["safety"])
    zeros = module.probe.zeros(batch["task"]["input_ids"])
    plain = with_step(module, PAPER_STEP, "midpoint").probe_gradient(batch["task"], zeros, module.direction)
    module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = module.probe_gradient(batch["task"], zeros, module.direction)
    assert torch.count_nonzero(plain) > 0 and torch.allclose(checkpointed, plain, rtol=1e-4, atol=1e-9)
