"""Every real experiment (conf/experiment/, all but the synthetic ones) composes and runs one
training step and a 2-prompt evaluation, offline, with its model replaced by a tiny random
model of the same family and its data by the fixture files (tests/standins.py)."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from safeprobe.config import CONF_DIR, check_cli_overrides, validate
from safeprobe.pipeline import evaluate_run, run
from tests.standins import fixture_overrides, standin

REAL = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if not p.stem.startswith("synthetic"))
ADAPTERS = {"sap_paper": (8, 8, 0.1, ["q_proj", "v_proj"])}  # r, alpha, dropout, targets
HARMFUL_FINETUNING = (32, 4, 0.0, ["q_proj", "k_proj", "v_proj"])


def test_the_real_experiments_are_there():
    assert REAL == ["harmful_finetuning_agnews", "harmful_finetuning_alpaca", "harmful_finetuning_gsm8k",
                    "harmful_finetuning_sst2", "sap_paper"]


def overrides_for(experiment: str, make_cfg) -> list[str]:
    task = validate(make_cfg(f"experiment={experiment}", fast=False)).data.task
    return [f"experiment={experiment}", *fixture_overrides(task, standin("llama", layers=10), standin("beaverdam"))]


@pytest.mark.parametrize("experiment", REAL)
def test_real_experiment_runs_a_sap_step_and_records_its_protocol(make_cfg, tmp_path, experiment):
    c = validate(make_cfg(f"experiment={experiment}", fast=False))
    assert c.model.name_or_path == "meta-llama/Llama-2-7b-chat-hf" and c.model.dtype == "bfloat16"
    assert c.trainer.accelerator == "gpu" and c.trainer.max_epochs >= 1 and c.trainer.max_steps == -1

    results = run(make_cfg(*overrides_for(experiment, make_cfg), fast=False))

    assert results["method"] == "sap" and results["train"]["steps"] == 1
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
