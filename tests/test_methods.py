"""The contract every registered fine-tuning method keeps, and each method's own properties.

The contract tests are parametrized over the registry (`safeprobe.methods.METHODS`), so a new
method inherits them: its YAML matches its config, it runs on the micro world with one
backward and one optimizer step per batch, it changes only trainable weights and leaves no
trace in the model, its declared "off" setting (OFF below, required for every method but
SFT) reproduces SFT's update bit for bit, and it sees the same task batches as SFT.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import lightning as L
import pytest
import torch
import yaml

from safeprobe.config import CONF_DIR, validate
from safeprobe.data.datamodule import SafetyDataModule
from safeprobe.data.formatting import IGNORE
from safeprobe.methods import METHODS, build_method, fine_tuning_methods, method_spec
from safeprobe.methods.csft import CSFTConfig, constraint_weights, token_betas
from safeprobe.methods.losses import task_loss
from safeprobe.models.factory import apply_adapter, formatter, load_base
from safeprobe.pipeline import build_splits, data_module

NAMES = fine_tuning_methods()

# Settings under which the contract runs: Lisa alternates every step, so both states occur.
CONTRACT = {"lisa": ["method.align_steps=1", "method.finetune_steps=1"]}

# Each method's "off" setting: the settings that make it plain SFT, bit for bit. A new method
# must declare its own here (test_every_method_declares_its_off_setting).
OFF = {
    "sap": {
        "eps=0": ["probe.eps=0"],
        # delta = harmful_step * ||theta|| * g_hat = 0: the probe objective L(theta + delta, V) -
        # L(theta, V) is identically zero, its gradient is exactly zero, the sign step (and the
        # L2 step) from V = 0 stays at 0, so the update runs with a zero probe: SAP == SFT.
        "harmful_step=0": ["probe.harmful_step=0"],
    },
    "sap_random": {"eps=0": ["probe.eps=0"]},
    "safeinstr": {"mix, share=0": ["method.share=0"], "joint, lam=0": ["method.mode=joint", "method.lam=0"]},
    "lisa": {"no alignment state, rho=0": ["method.align_steps=0", "method.rho=0"]},
    "csft": {"beta=0": ["method.beta=0"]},
    "ldifs": {"rho=0": ["method.rho=0"]},
}
OFF_CASES = [(name, label) for name, cases in OFF.items() for label in cases]

# The settings that must NOT reproduce SFT: each method's defaults (and SafeInstr's joint mode).
# None is expected to match SFT over 3 steps. CSFT and LDIFS do match it on the first step
# (the weights still equal the initial ones, so delta = 0 gives w = 1 and the feature distance
# is 0), but not on the next two.
ON_CASES = [(name, "defaults", []) for name in NAMES if name != "sft"] + [("safeinstr", "joint", ["method.mode=joint"])]

LORA_DROPOUT = ["adapter=lora", "adapter.dropout=0.1"]  # dropout on: auxiliary passes must not shift its masks


# ------------------------------------------------------------------------------ helpers


def build(make_cfg, *overrides: str):
    """As pipeline.run builds a run: seed, data module (the method's streams and fine-tuning
    set), adapter, model in train mode, method module."""
    c = validate(make_cfg(*overrides))
    base = load_base(c.model, c.paths.cache_dir)
    splits = build_splits(base, c)
    L.seed_everything(c.seed)
    dm = data_module(c, base, splits, formatter(base, c.data.prompt_format, c.data.system_prompt))
    model = apply_adapter(base.model, c.adapter)
    model.train()
    return c, build_method(model, c), dm


class Count(L.Callback):
    """Batches seen and optimizer steps taken."""

    def __init__(self):
        self.batches = self.steps = 0

    def on_train_start(self, trainer, pl_module):
        trainer.optimizers[0].register_step_post_hook(lambda *a: setattr(self, "steps", self.steps + 1))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1


def fit(module, dm, steps: int, *callbacks) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(module, datamodule=dm)
    return trainer


def trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


def first_batch(dm) -> dict:
    out = next(iter(dm.train_dataloader()))
    return out[0] if isinstance(out, tuple) else out


def token_logprobs(model, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label) at every labelled position and the label mask, computed here from the logits."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
    labels = b["labels"][:, 1:]
    mask = labels != IGNORE
    logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


def cross_entropy(model, b: dict) -> torch.Tensor:
    logp, mask = token_logprobs(model, b)
    return -logp.sum() / mask.sum()


def spy_loss(module, record):
    """Wrap module.loss; record(batch, loss) runs after each call."""
    original = module.loss

    def loss(batch):
        value = original(batch)
        record(batch, value)
        return value

    module.loss = loss


_SFT: dict[str, dict[str, torch.Tensor]] = {}


def sft_after_3_steps(make_cfg) -> dict[str, torch.Tensor]:
    if "lora" not in _SFT:
        _, module, dm = build(make_cfg, "method=sft", *LORA_DROPOUT)
        fit(module, dm, 3)
        _SFT["lora"] = trainable(module)
    return _SFT["lora"]


# ---------------------------------------------------------------------- the contract


@pytest.mark.parametrize("name", NAMES)
def test_every_method_has_a_yaml_matching_its_config(name):
    path = CONF_DIR / "method" / f"{name}.yaml"
    assert path.is_file(), f"method {name} has no {path}"
    keys = set(yaml.safe_load(path.read_text()))
    assert keys == {f.name for f in dataclasses.fields(METHODS[name].config)}
    assert yaml.safe_load(path.read_text())["name"] == name
    # and the YAML's values are the config's defaults (the two cannot drift apart)
    assert method_spec(name).config(**yaml.safe_load(path.read_text())) == METHODS[name].config(name=name)


def test_every_method_yaml_names_a_registered_method():
    files = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
    assert files == NAMES
    assert all(yaml.safe_load((CONF_DIR / "method" / f"{n}.yaml").read_text())["name"] == n for n in files)


def test_every_method_declares_its_off_setting():
    assert set(OFF) == set(NAMES) - {"sft"}, "declare the setting that makes the new method plain SFT in OFF"


@pytest.mark.parametrize("adapter", ["lora", "full"])
@pytest.mark.parametrize("name", NAMES)
def test_every_method_keeps_the_step_contract(make_cfg, name, adapter):
    extra = ["adapter.dropout=0.1"] if adapter == "lora" else []
    c, module, dm = build(make_cfg, f"method={name}", f"adapter={adapter}", *extra, *CONTRACT.get(name, []))
    model = module.model
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = trainable(module)
    backward = []
    original = module.manual_backward
    module.manual_backward = lambda *a, **k: (backward.append(1), original(*a, **k))[1]
    states = []
    spy_loss(module, lambda batch, loss: states.append(getattr(module, "state", None)))
    count = Count()

    trainer = fit(module, dm, 3, count)

    assert trainer.global_step == count.batches == count.steps == len(backward) == 3
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(p, start[n]) for n, p in trainable(module).items())
    if adapter == "lora":
        assert frozen and all("lora_" in n for n in start)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert set(module.state_dict()) == {f"model.{k}" for k in model.state_dict()}
    opt_params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert len(opt_params) == len({id(p) for p in opt_params})
    assert {id(p) for p in opt_params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert not module._frozen_start  # full fine-tuning's reference copy is released
    if name == "lisa":
        assert states == ["alignment", "finetune", "alignment"]


@pytest.mark.parametrize(("name", "label"), OFF_CASES)
def test_the_off_setting_gives_exactly_the_sft_update(make_cfg, name, label):
    expected = sft_after_3_steps(make_cfg)
    _, module, dm = build(make_cfg, f"method={name}", *LORA_DROPOUT, *OFF[name][label])
    fit(module, dm, 3)
    got = trainable(module)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], p) for n, p in expected.items())


@pytest.mark.parametrize(("name", "label", "overrides"), ON_CASES)
def test_the_default_setting_differs_from_sft(make_cfg, name, label, overrides):
    expected = sft_after_3_steps(make_cfg)
    _, module, dm = build(make_cfg, f"method={name}", *LORA_DROPOUT, *overrides)
    fit(module, dm, 3)
    got = trainable(module)
    assert any(not torch.equal(got[n], p) for n, p in expected.items())


def task_batches(make_cfg, *overrides: str, n: int = 3) -> list[dict]:
    c = validate(make_cfg(*overrides))
    base = load_base(c.model, c.paths.cache_dir)
    splits = build_splits(base, c)
    module = method_spec(c.method.name).module
    dm = SafetyDataModule(c.data, splits, base.tokenizer, formatter(base, c.data.prompt_format, None), c.seed,
                          streams=module.data_streams(c), task_examples=module.task_examples(c, splits))
    out = []
    for batch in dm.train_dataloader():
        batch = batch[0] if isinstance(batch, tuple) else batch
        assert set(batch) == set(module.data_streams(c))
        out.append(batch["task"])
        if len(out) == n:
            return out
    raise AssertionError("fewer task batches than asked for")


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True))


TASK_STREAM_CASES = [(name, [f"method={name}"]) for name in NAMES] + [
    ("safeinstr joint", ["method=safeinstr", "method.mode=joint"]),
    ("lisa alternating", ["method=lisa", *CONTRACT["lisa"]])]


@pytest.mark.parametrize(("label", "overrides"), TASK_STREAM_CASES, ids=[c[0] for c in TASK_STREAM_CASES])
def test_every_method_sees_the_same_task_batches(make_cfg, label, overrides):
    sft = task_batches(make_cfg, "method=sft", "data.poison_ratio=0.25")
    got = task_batches(make_cfg, *overrides, "data.poison_ratio=0.25")
    if label == "safeinstr":  # mix mode (the default) changes the fine-tuning set by design
        assert not same_batches(got, sft)
    else:
        assert same_batches(got, sft)


# ------------------------------------------------------------------------ SafeInstr


def test_safeinstr_mix_adds_or_replaces_exactly_share_times_n_safety_examples(make_cfg):
    n, poison_ratio, share = 32, 0.25, 0.2
    c = validate(make_cfg("method=safeinstr", f"data.n_train={n}", f"data.poison_ratio={poison_ratio}",
                          f"method.share={share}"))
    base = load_base(c.model, c.paths.cache_dir)
    splits = build_splits(base, c)
    safety, poison, benign = set(splits.alignment), set(splits.poison), set(splits.task_train)
    assert not (safety & benign) and not (safety & poison) and not (poison & benign)

    def kinds(rows):
        assert all((r in safety) + (r in poison) + (r in benign) == 1 for r in rows)
        return sum(r in safety for r in rows), sum(r in poison for r in rows), sum(r in benign for r in rows)

    spec = method_spec("safeinstr").module
    sft_rows = method_spec("sft").module.task_examples(c, splits)
    n_safety, n_poison = round(share * n), round(poison_ratio * n)
    assert n_safety == 6 and kinds(sft_rows) == (0, n_poison, n - n_poison)

    added = spec.task_examples(c, splits)
    assert kinds(added) == (n_safety, n_poison, n - n_poison) and len(added) == n + n_safety
    assert Counter(added) - Counter(r for r in added if r in safety) == Counter(sft_rows)  # SFT's set, all of it

    c.method.replace_benign = True
    replaced = spec.task_examples(c, splits)
    assert len(replaced) == n and kinds(replaced) == (n_safety, n_poison, n - n_poison - n_safety)


@pytest.mark.filterwarnings("ignore")
def test_safeinstr_joint_loss_is_task_ce_plus_lam_alignment_ce(make_cfg):
    lam = 0.3
    c, module, dm = build(make_cfg, "method=safeinstr", "method.mode=joint", f"method.lam={lam}")
    assert module.data_streams(c) == ("task", "alignment")
    batch = first_batch(dm)
    with torch.no_grad():
        loss = module.loss(batch)
        expected = cross_entropy(module.model, batch["task"]) + lam * cross_entropy(module.model, batch["alignment"])
        alignment_ce = cross_entropy(module.model, batch["alignment"])
    assert torch.allclose(loss, expected, rtol=1e-6, atol=1e-6)
    assert lam * alignment_ce > 1e-3  # the alignment term is there, not lost in rounding


# ------------------------------------------------------------------------------ Lisa


def lisa_run(make_cfg, monkeypatch, steps: int, *overrides: str):
    """Train Lisa `steps` steps; per step: the stream its CE was taken on, its state, the loss,
    the CE (computed here), the weights before the step and the anchors after the switch."""
    import safeprobe.methods.lisa as lisa

    c, module, dm = build(make_cfg, "method=lisa", *overrides)
    used = []
    original_task_loss = lisa.task_loss

    def spying_task_loss(model, b):
        used.append(b)
        return original_task_loss(model, b)

    monkeypatch.setattr(lisa, "task_loss", spying_task_loss)
    records = []
    original = module.loss

    def loss(batch):
        before = [p.detach().clone() for p in module.trainable_parameters()]
        value = original(batch)
        stream = [k for k, v in batch.items() if v is used[-1]]
        with torch.no_grad():
            ce = cross_entropy(module.model, used[-1])
        records.append(dict(stream=stream[0], state=module.state, loss=value.detach(), ce=ce, weights=before,
                            step=module.global_step,
                            anchors={k: [a.clone() for a in v] for k, v in module.anchors.items()}))
        return value

    module.loss = loss
    fit(module, dm, steps)
    assert len(used) == len(records) == steps  # one CE per step, on one stream
    return c, module, records


def sq_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum(((x.double() - y.double()) ** 2).sum() for x, y in zip(a, b, strict=True))


def test_lisa_alternates_states_and_pulls_towards_the_other_states_last_weights(make_cfg, monkeypatch):
    rho = 2.0
    c, module, records = lisa_run(make_cfg, monkeypatch, 10, "method.align_steps=2", "method.finetune_steps=3",
                                  f"method.rho={rho}")
    assert "".join("A" if r["state"] == "alignment" else "F" for r in records) == "AAFFFAAFFF"
    # alignment steps train on the alignment batch, fine-tuning steps on the task batch
    assert [r["stream"] for r in records] == [{"alignment": "alignment", "finetune": "task"}[r["state"]]
                                              for r in records]
    runs = [0, 0, 2, 2, 2, 5, 5, 7, 7, 7]  # the first step of each state's run
    for i, r in enumerate(records):
        # the anchor is the other state's last iterate: the weights when the current state began
        # (both anchors start at the initial weights, the first alignment run's anchor)
        anchor = records[runs[i]]["weights"]
        if i == runs[i] and i > 0:  # just switched: the state left has its anchor set to these weights
            left = "alignment" if r["state"] == "finetune" else "finetune"
            assert all(torch.equal(a, w) for a, w in zip(r["anchors"][left], r["weights"], strict=True))
        proximal = rho / 2 * sq_distance(r["weights"], anchor)
        assert torch.allclose(r["loss"].double() - r["ce"].double(), proximal, rtol=1e-4, atol=1e-6), i
        if i != runs[i]:
            assert proximal > 1e-4  # the weights have moved away from the anchor: the term is seen
        else:
            assert proximal == 0


def test_lisa_proximal_warmup_has_no_proximal_term_before_its_step_count(make_cfg, monkeypatch):
    rho = 2.0  # warmup: 0.5 * 6 steps = the first 3 steps (global_step 0, 1, 2)
    c, module, records = lisa_run(make_cfg, monkeypatch, 6, "method.align_steps=2", "method.finetune_steps=3",
                                  f"method.rho={rho}", "method.proximal_warmup=0.5")
    assert [r["step"] for r in records] == list(range(6))
    for r in records[:3]:
        assert torch.allclose(r["loss"], r["ce"], rtol=0, atol=1e-6)
    # step 1 (alignment) would have had a term: its weights left the initial anchor after step 0
    assert rho / 2 * sq_distance(records[1]["weights"], records[0]["weights"]) > 1e-4
    # from step 3 on the term is back: step 3 (fine-tuning) is pulled towards the weights of step 2
    proximal = rho / 2 * sq_distance(records[3]["weights"], records[2]["weights"])
    assert proximal > 1e-4
    assert torch.allclose(records[3]["loss"].double() - records[3]["ce"].double(), proximal, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ CSFT


def test_csft_weights_follow_the_closed_form_on_a_hand_made_case():
    c = CSFTConfig(name="csft")  # beta 0.1, factors 5 and 20 over 5 tokens, min weight 1e-3
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0],
                         [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    delta = torch.tensor([[9.0, -2.0, 0.3, -0.7, 1.5, 60.0, -3.0, 0.0, 2.5, -8.0, 4.0],
                          [1.0, -1.0, 0.0, 0.8, -0.2, 0.4, 5.0, -5.0, 7.0, 7.0, 7.0]])
    # beta_t: 0.5 on the first answer token, 2.0 on tokens 2..5, 0.1 after
    betas = torch.zeros(mask.shape)
    for i, row in enumerate(mask.tolist()):
        t = 0
        for j, labelled in enumerate(row):
            if labelled:
                t += 1
                betas[i, j] = 0.5 if t == 1 else 2.0 if t <= 5 else 0.1
    assert torch.allclose(token_betas(mask, c)[mask], betas[mask])
    assert betas[0, 2:10].tolist() == pytest.approx([0.5, 2.0, 2.0, 2.0, 2.0, 0.1, 0.1, 0.1])
    w = constraint_weights(delta, mask, c)
    expected = torch.zeros(mask.shape)
    for i, j in mask.nonzero().tolist():
        expected[i, j] = max(2 * (1 - 1 / (1 + torch.exp(-betas[i, j] * delta[i, j]).item())), 1e-3)
    assert torch.allclose(w, expected, rtol=1e-6, atol=1e-7)
    assert w[0, 5] == pytest.approx(1e-3)  # 2 * (1 - sigmoid(120)) = 0 is clamped to min_weight
    assert w[0, 9] == pytest.approx(2 * (1 - torch.sigmoid(torch.tensor(-0.8)).item()))
    assert w[1, 2] == 1.0  # delta = 0 (the initial model): weight 1, plain SFT
    assert torch.equal(w[~mask], torch.zeros((~mask).sum().item()))
    assert torch.equal(constraint_weights(delta, mask, CSFTConfig(beta=0.0)), mask.float())  # beta = 0: SFT


def test_csft_step_loss_matches_an_explicit_computation_with_the_initial_model(make_cfg):
    c, module, dm = build(make_cfg, "method=csft")
    model, checked = module.model, []
    original = module.loss

    def loss(batch):
        task = batch["task"]
        with torch.no_grad():
            logp, mask = token_logprobs(model, task)
            model.eval()
            with model.disable_adapter():
                ref_logp, _ = token_logprobs(model, task)
            model.train()
        delta = logp - ref_logp  # log p_theta - log p_theta0
        betas = torch.zeros(mask.shape)
        t = torch.zeros(mask.shape[0], dtype=torch.long)
        for j in range(mask.shape[1]):
            t = t + mask[:, j]
            betas[:, j] = torch.where(t == 1, 0.5, torch.where(t <= 5, 2.0, 0.1))
        w = (2 * (1 - torch.sigmoid(betas * delta))).clamp(min=1e-3) * mask
        expected = (w * -logp).sum() / mask.sum()
        value = original(batch)
        checked.append((value.detach(), expected, (w[mask] - 1).abs().max()))
        return value

    module.loss = loss
    fit(module, dm, 3)
    assert len(checked) == 3
    for value, expected, _ in checked:
        assert torch.allclose(value, expected, rtol=1e-5, atol=1e-6)
    assert checked[0][2] == 0  # step 1: the weights are the initial ones, every w_t = 1
    assert checked[2][2] > 1e-3  # later the constraint weights differ from 1: the check is not SFT's loss


# ----------------------------------------------------------------------------- LDIFS


def mlp_outputs_by_hand(model, b: dict) -> list[torch.Tensor]:
    mlps = [m for m in model.modules() if type(m).__name__.endswith("MLP")]
    out: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda mod, a, o: out.append(o)) for m in mlps]
    try:
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    assert len(out) == len(mlps) == model.config.num_hidden_layers
    return out


def ldifs_terms(model, task: dict, rho: float) -> list[torch.Tensor]:
    """rho/2 * ||(mlp_out - mlp_out_ref) * attention_mask||^2, one per layer."""
    with torch.no_grad():
        now = mlp_outputs_by_hand(model, task)
        model.eval()
        with model.disable_adapter():
            ref = mlp_outputs_by_hand(model, task)
        model.train()
    real = task["attention_mask"].unsqueeze(-1).float()
    return [rho / 2 * (((f - r) * real) ** 2).sum() for f, r in zip(now, ref, strict=True)]


@pytest.mark.filterwarnings("ignore")
def test_ldifs_penalty_is_the_masked_mlp_feature_distance(make_cfg):
    rho = 0.05
    c, module, dm = build(make_cfg, "method=ldifs", f"method.rho={rho}")
    model = module.model
    torch.manual_seed(1)
    with torch.no_grad():  # move the adapter off its start (B = 0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    task = first_batch(dm)["task"]
    assert (task["attention_mask"] == 0).any()  # padding present: the mask matters
    terms = ldifs_terms(model, task, rho)
    unmasked = ldifs_terms(model, {**task, "attention_mask": torch.ones_like(task["attention_mask"])}, rho)
    assert sum(unmasked) > sum(terms) > 1e-4  # padding positions would add to it
    with torch.no_grad():
        ce = cross_entropy(model, task)
        penalty = module.loss({"task": task}) - ce
    assert torch.allclose(penalty, sum(terms), rtol=1e-4, atol=1e-7)

    # drop_above: a layer's term at or above the threshold is left out
    ordered = sorted(t.item() for t in terms)
    assert ordered[0] < ordered[-1]
    module.method_cfg.drop_above = (ordered[0] + ordered[-1]) / 2
    kept = sum(t for t in terms if t.item() < module.method_cfg.drop_above)
    assert 0 < kept < sum(terms)
    with torch.no_grad():
        penalty = module.loss({"task": task}) - ce
    assert torch.allclose(penalty, kept, rtol=1e-4, atol=1e-7)


@pytest.mark.filterwarnings("ignore")
def test_ldifs_penalty_is_exactly_zero_at_the_initial_weights(make_cfg):
    c, module, dm = build(make_cfg, "method=ldifs", "method.rho=1.0")  # LoRA B = 0: the initial model
    task = first_batch(dm)["task"]
    assert all(t == 0 for t in ldifs_terms(module.model, task, 1.0))
    with torch.no_grad():
        assert torch.equal(module.loss({"task": task}), task_loss(module.model, task))


# ------------------------------------------------------------------------ SAP random


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_sap_random_probe_has_saps_size_a_fresh_direction_each_step_and_a_seed(make_cfg, norm):
    eps = 0.07

    def probes(seed: int) -> list[torch.Tensor]:
        c, module, dm = build(make_cfg, "method=sap_random", f"probe.eps={eps}", f"probe.norm={norm}", f"seed={seed}")
        assert module.data_streams(c) == ("task",) and set(first_batch(dm)) == {"task"}

        def no_safety_pass(*a, **k):
            raise AssertionError("sap_random ran a safety pass")

        module.unsafe_direction = no_safety_pass
        seen = []
        original = module.random_probe
        module.random_probe = lambda like: seen.append(original(like)) or seen[-1]
        fit(module, dm, 3)
        assert len(seen) == 3
        return seen

    first, again, other = probes(0), probes(0), probes(1)
    for v in first:
        assert v.shape == (2, 32)  # probe.layers [2, 3], the micro model's hidden size
        if norm == "linf":  # every entry is +-eps: eps * sign(grad)'s norm, SAP's
            assert torch.equal(v.abs(), torch.full_like(v, eps))
        else:  # each layer's vector on the sphere of radius eps
            assert torch.allclose(v.norm(dim=-1), torch.full((2,), eps), rtol=1e-6)
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_sap_random_never_reads_the_safety_stream(make_cfg):
    c, module, dm = build(make_cfg, "method=sap_random")
    read = []

    class Recording(dict):
        def __getitem__(self, key):
            read.append(key)
            return super().__getitem__(key)

    task = first_batch(dm)["task"]
    with module.update_context(Recording(task=task, safety={})):
        task_loss(module.model, task)
    assert "task" in read and "safety" not in read
