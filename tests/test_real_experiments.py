"""Every real experiment (conf/experiment/, all but the synthetic ones) composes with every
defense and runs one training step and a 2-prompt evaluation, offline, with its model replaced
by a tiny random model of the same family and its data by the fixture files (tests/standins.py).

The two protocols: harmful_finetuning_* (git-disl's: Llama-2-7B aligned in a cached alignment
stage, align=sft by default, then fine-tuned on 10% poison) and sap_paper (Llama-2-7b-chat, no
stage). Every alignment-stage defense (align=...), fine-tuning method (method=...) and repair
(post=...) composes with both; a step of each stage defense and each repair runs on stand-ins."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from hydra import compose, initialize_config_dir

from safeprobe.config import CONF_DIR, ConfigError, check_cli_overrides, group_options, validate
from safeprobe.methods import METHODS
from safeprobe.methods.registry import fine_tuning_methods
from safeprobe.pipeline import check_post, data_needed, evaluate_run, run
from tests.standins import fixture_overrides, standin

REAL = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if not p.stem.startswith("synthetic"))
GIT_DISL = [e for e in REAL if e.startswith("harmful_finetuning_")]
ADAPTERS = {"sap_paper": (8, 8, 0.1, ["q_proj", "v_proj"])}  # r, alpha, dropout, targets
HARMFUL_FINETUNING = (32, 4, 0.0, ["q_proj", "k_proj", "v_proj"])
ALIGN, METHOD, POST = group_options("align"), group_options("method"), group_options("post")
STAGE_DEFENSES = sorted(m for m, spec in METHODS.items() if spec.stage == "alignment")


def test_the_real_experiments_and_the_defenses_are_there():
    assert REAL == ["harmful_finetuning_agnews", "harmful_finetuning_alpaca", "harmful_finetuning_gsm8k",
                    "harmful_finetuning_sst2", "sap_paper"]
    assert STAGE_DEFENSES == ["booster", "repnoise", "vaccine"]
    assert ALIGN == sorted(["none", "sft", *STAGE_DEFENSES]) and METHOD == fine_tuning_methods()
    assert POST == ["antidote", "none", "safelora"]


def overrides_for(experiment: str, make_cfg, base_seed: int | None = None) -> list[str]:
    """The experiment on the llama stand-in (10 layers: the reference probe's [3, 9] exist) and the
    fixture files; base_seed: model.base_name_or_path is a second stand-in of that seed."""
    task = validate(make_cfg(f"experiment={experiment}", fast=False)).data.task
    base = [f"model.base_name_or_path={standin('llama', layers=10, seed=base_seed)}"] if base_seed is not None else []
    return [f"experiment={experiment}", *fixture_overrides(task, standin("llama", layers=10), standin("beaverdam")),
            *base]


@pytest.mark.parametrize("experiment", REAL)
def test_real_experiment_runs_a_sap_step_and_records_its_protocol(make_cfg, tmp_path, experiment):
    c = validate(make_cfg(f"experiment={experiment}", fast=False))
    assert c.model.dtype == "bfloat16" and c.trainer.accelerator == "gpu"
    assert c.trainer.max_epochs >= 1 and c.trainer.max_steps == -1
    if experiment in GIT_DISL:  # the pretrained model, SFT-aligned in the stage, then fine-tuned
        assert c.model.name_or_path == "meta-llama/Llama-2-7b-hf" and c.model.base_name_or_path is None
        assert c.align.method.name == "sft" and c.align.lora == "double"
        assert (c.align.steps, c.align.batch_size, c.align.lr) == (10000, 10, 5e-4)  # 20 epochs x 5,000 / 10
        assert (c.data.alignment_set, c.data.n_alignment) == ("beavertails_refusals", 5000)
        assert (c.data.n_train, c.data.poison_ratio, c.data.batch_size, c.optim.lr) == (1000, 0.1, 10, 1e-5)
    else:  # the chat model as it is; its unaligned base for SafeLoRA
        assert c.model.name_or_path == "meta-llama/Llama-2-7b-chat-hf"
        assert c.model.base_name_or_path == "meta-llama/Llama-2-7b-hf"
        assert c.align.method is None and c.data.alignment_set == "safety_pairs"
        assert (c.optim.lr, c.optim.weight_decay, c.optim.grad_clip) == (1e-4, 0.01, None)  # the experiment's optim
        assert (c.align.steps, c.align.batch_size, c.align.lr) == (120, 8, 1e-4)  # only with align=...

    results = run(make_cfg(*overrides_for(experiment, make_cfg), fast=False))

    assert results["method"] == "sap" and results["train"]["steps"] == 1
    if experiment in GIT_DISL:
        (stage,) = results["stages"]
        assert {k: stage[k] for k in ("stage", "method", "lora", "steps")} == {
            "stage": "alignment", "method": "sft", "lora": "double", "steps": 2}
    else:
        assert results["stages"] == []
    r, alpha, dropout, targets = ADAPTERS.get(experiment, HARMFUL_FINETUNING)
    assert results["adapter"] == {"kind": "lora", "r": r, "alpha": alpha, "dropout": dropout, "target_modules": targets}
    ev = results["eval"]
    assert ev["judges"] == ["beaverdam", "keyword"] and ev["n_harmful"] == 2 and ev["n_task"] == 2
    assert ev["max_new_tokens"] == 4 and ev["harmful_set"].startswith("beavertails (")
    assert ev["judge_options"]["beaverdam"]["name_or_path"] == str(standin("beaverdam"))
    after = results["after"]
    assert set(after) >= {"harmful_score", "harmful_score/beaverdam", "harmful_score/keyword", "test_loss"}
    assert after["harmful_score"] == after["harmful_score/beaverdam"]
    assert after["refusal_margin"] is None  # the harmful set has no refusals unless data.refusal is set
    assert (after["fine_tune_accuracy"] is None) == (c.data.task == "alpaca")  # alpaca: free text, no accuracy
    out = tmp_path / "run"
    assert json.loads((out / "results.json").read_text())["eval"] == ev
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["set"] for r in rows] == ["harmful", "harmful", "task", "task"]
    assert (out / "adapter" / "adapter_config.json").exists()


def test_sft_runs_too_and_a_fixed_refusal_gives_a_margin(make_cfg):
    results = run(make_cfg(*overrides_for("harmful_finetuning_sst2", make_cfg), "method=sft",
                           "data.refusal=I cannot help with that.", "model.gradient_checkpointing=true", fast=False))
    assert results["method"] == "sft" and results["train"]["steps"] == 1
    assert isinstance(results["after"]["refusal_margin"], float)
    assert 0 <= results["after"]["fine_tune_accuracy"] <= 100


def test_eval_py_scores_saved_generations_with_other_judges(make_cfg, tmp_path):
    run(make_cfg(*overrides_for("sap_paper", make_cfg), "eval.judges=[keyword]", fast=False))
    args = [f"run_dir={tmp_path / 'run'}", "judges_only=true", "eval.judges=[keyword,beaverdam]",
            f"eval.judge_options={{beaverdam: {{name_or_path: '{standin('beaverdam')}'}}}}"]
    check_cli_overrides(args, __import__("safeprobe.config").config.EvalRunConfig)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=[*args, f"paths.output_dir={tmp_path / 'eval'}"])
    results = evaluate_run(cfg)
    assert set(results["after"]) == {"harmful_score", "harmful_score/keyword", "harmful_score/beaverdam", "refusal_rate",
                                     "unusable_rate"}
    assert results["eval"]["judges_only"] and results["eval"]["n_harmful"] == 2
    saved = json.loads((tmp_path / "run" / "results.json").read_text())["after"]
    assert results["after"]["harmful_score/keyword"] == saved["harmful_score/keyword"]  # same answers, same judge
    assert json.loads((tmp_path / "eval" / "eval_results.json").read_text())["after"] == results["after"]


# ------------------------------------------------------------------ every defense on every experiment


def refused(experiment: str, align: str, post: str) -> str | None:
    """The combinations that stop before any work, with what their one line says: SafeLoRA needs a
    fine-tuning LoRA of its own (Booster's stage continues its LoRA: align.lora=single) and an
    unaligned model (the git-disl protocol without a stage has no alignment to keep)."""
    if post != "safelora":
        return None
    if align == "booster":
        return "post=safelora is invalid with align.lora=single"
    if align == "none" and experiment in GIT_DISL:
        return "model.base_name_or_path=null is invalid with post=safelora"
    return None


def combinations(experiment: str):
    """(align, method, post) -> the config `train.py experiment=E align=A method=M post=P` composes.
    The align, method and post groups each set only their own node (none has a defaults list or a
    package), so each node is composed once and the product is spliced together; the test checks
    the splicing against whole compositions."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        def make(*overrides):
            return compose("train", overrides=[f"experiment={experiment}", "paths.output_dir=unused", *overrides])

        nodes = {"align": {a: make(f"align={a}").align for a in ALIGN},
                 "method": {m: make(f"method={m}").method for m in METHOD},
                 "post": {p: make(f"post={p}").post for p in POST}}
        whole = {(a, m, p): make(f"align={a}", f"method={m}", f"post={p}")
                 for a, m, p in [("vaccine", "lisa", "antidote"), ("booster", "sap", "safelora"), ("none", "sft", "none")]}
        base = make()
    out = {}
    for a, m, p in itertools.product(ALIGN, METHOD, POST):
        cfg = base.copy()
        cfg.align, cfg.method, cfg.post = nodes["align"][a], nodes["method"][m], nodes["post"][p]
        out[a, m, p] = cfg
    for key, cfg in whole.items():
        assert cfg == out[key], key
    return out


def test_the_four_harmful_finetuning_experiments_differ_only_in_their_task():
    """So one of them stands for all four below (and alpaca stays consistent with the other three)."""
    import yaml

    def body(experiment: str) -> dict:
        text = (CONF_DIR / "experiment" / f"{experiment}.yaml").read_text()
        task = experiment.removeprefix("harmful_finetuning_")
        return yaml.safe_load(text.replace(f"override /data: {task}", "override /data: TASK"))

    first = body(GIT_DISL[0])
    assert all(body(e) == first for e in GIT_DISL[1:])
    headers = {e: [line.replace(e.removeprefix("harmful_finetuning_"), "TASK") for line in
                   (CONF_DIR / "experiment" / f"{e}.yaml").read_text().splitlines()
                   if line.startswith("#") and ("python train.py" in line or "align" in line)] for e in GIT_DISL}
    assert all(h == headers[GIT_DISL[0]] for h in headers.values())  # the same commands and stage notes


@pytest.mark.parametrize("experiment", ["harmful_finetuning_sst2", "sap_paper"])  # one per protocol (test above)
def test_every_defense_composes_with_every_real_experiment(experiment):
    """All align x method x post combinations validate and pass the pipeline's checks before any
    work (check_post, the data each stage reads), except the documented refusals."""
    refusals = set()
    for (a, m, p), cfg in combinations(experiment).items():
        c = validate(cfg)
        assert c.method.name == m and (c.post.name if c.post else "none") == p
        assert (c.align.method.name if c.align.method else "none") == a
        if a != "none":  # every stage defense runs on the experiment's alignment schedule
            git = (10000, 10, 5e-4) if experiment in GIT_DISL else (120, 8, 1e-4)
            assert (c.align.steps, c.align.batch_size, c.align.lr) == git
            assert c.align.lora == ("single" if a == "booster" else "double")
            assert "alignment" in data_needed(c)
        if p == "antidote":
            assert "harmful" in data_needed(c)  # its calibration examples
        expected = refused(experiment, a, p)
        if expected is None:
            check_post(c)
        else:
            with pytest.raises(ConfigError, match=re.escape(expected)):
                check_post(c)
            refusals.add((a, p))
    assert refusals == ({("booster", "safelora"), ("none", "safelora")} if experiment in GIT_DISL
                        else {("booster", "safelora")})
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):  # the refusal's remedy
        check_post(validate(compose("train", overrides=[f"experiment={experiment}", "paths.output_dir=unused",
                                                        "align=booster", "align.lora=double", "post=safelora"])))


@pytest.mark.parametrize("experiment", REAL)
def test_the_commands_in_each_experiments_header_are_valid(experiment):
    lines = (CONF_DIR / "experiment" / f"{experiment}.yaml").read_text().splitlines()
    commands = [line.split("python train.py", 1)[1].split("#")[0].split() for line in lines
                if line.startswith("#") and "python train.py" in line]
    assert len(commands) >= 3
    for args in commands:
        assert f"experiment={experiment}" in args
        check_cli_overrides([a for a in args if a != "-m"])  # every key and group option exists
    swept: dict[str, set[str]] = {}  # every defense has a command
    for key, values in (a.split("=", 1) for args in commands for a in args if "=" in a):
        swept.setdefault(key, set()).update(values.split(","))
    assert swept["align"] >= {"sft", *STAGE_DEFENSES} and swept["post"] >= {"safelora", "antidote"}
    assert swept["method"] >= set(fine_tuning_methods()) - {"sap"}  # sap: the default


# ---------------------------------------------------- a step of each stage defense and each repair

STAGE_RUNS = {  # experiment, align, post (spread over the experiments)
    "vaccine on sst2, then antidote": ("harmful_finetuning_sst2", "vaccine", "antidote"),
    "booster on agnews": ("harmful_finetuning_agnews", "booster", "none"),
    "repnoise on gsm8k": ("harmful_finetuning_gsm8k", "repnoise", "none"),
    "sft stage on alpaca, then safelora": ("harmful_finetuning_alpaca", "sft", "safelora"),
    "sap_paper, safelora": ("sap_paper", "none", "safelora"),
    "vaccine on sap_paper's pairs, then antidote": ("sap_paper", "vaccine", "antidote"),
}


@pytest.mark.parametrize("case", list(STAGE_RUNS))
def test_each_stage_defense_and_repair_runs_a_step_on_stand_ins(make_cfg, tmp_path, case):
    experiment, align, post = STAGE_RUNS[case]
    results = run(make_cfg(*overrides_for(experiment, make_cfg, base_seed=1), f"align={align}", f"post={post}",
                           "method=sft", fast=False))
    assert results["train"]["steps"] == 1
    stages = results["stages"]
    if align != "none":
        stage = stages.pop(0)
        lora = "single" if align == "booster" else "double"
        assert {k: stage[k] for k in ("stage", "method", "lora", "steps")} == {
            "stage": "alignment", "method": align, "lora": lora, "steps": 2}
        assert stage["final_loss"] == stage["final_loss"]  # finite: not NaN
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    if post == "none":
        assert stages == [] and "before_repair" not in saved
        return
    (repair,) = stages
    assert repair["stage"] == "post-fine-tuning" and repair["name"] == post and repair["seconds"] >= 0
    assert saved["stages"][-1] == repair
    for when in ("before_repair", "after"):  # the fine-tuned model, then the repaired one
        assert {"harmful_score", "harmful_score/beaverdam", "test_loss"} <= set(saved[when])
    assert (tmp_path / "run" / "generations_before_repair.jsonl").is_file()
    targets = ADAPTERS.get(experiment, HARMFUL_FINETUNING)[3]
    if post == "safelora":
        # every layer has an alignment direction: W_chat - W_base (sap_paper: the base stand-in), or
        # the stage's merged update (alpaca: the unaligned model is the one before the stage)
        assert repair["layers"] == 10 * len(targets) and repair["skipped"] == {}
        assert len(repair["projected"]) == 10 and len(repair["cosines"]) == repair["layers"]
    else:
        assert repair["mode"] == "lora" and repair["layers"] == 2 * 10 * len(targets)  # A and B of each
        assert repair["examples"] == 4 and repair["weights_zeroed"] > 0  # the fixture's 4 harmful answers
