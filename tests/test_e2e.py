"""End to end: a run leaves everything it promises; same seed, same numbers; sweeps; eval.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from safeprobe.pipeline import METRICS, run
from tests.conftest import FAST, run_script


def test_a_run_writes_results_config_environment_adapter_and_logs(make_cfg, micro, tmp_path):
    results = run(make_cfg("logger=default"))
    out = tmp_path / "run"
    saved = json.loads((out / "results.json").read_text())
    assert saved["method"] == "sap" and saved["seed"] == 0
    for stage in ("before", "after"):
        assert set(METRICS) <= set(saved[stage]) and saved[stage] == results[stage]
        assert 0 <= saved[stage]["harmful_score"] <= 100 and 0 <= saved[stage]["fine_tune_accuracy"] <= 100
    assert saved["train"]["steps"] == 2
    assert yaml.safe_load((out / "config.yaml").read_text())["probe"]["eps"] == 0.2
    env = json.loads((out / "environment.json").read_text())
    assert env["packages"]["torch"] and env["packages"]["lightning"] and len(env["git"]["commit"]) == 40
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    metrics_csv = (out / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics_csv and "after/harmful_score" in metrics_csv and "before/refusal_margin" in metrics_csv
    sets = [json.loads(line)["set"] for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [sets.count(s) for s in ("harmful", "harmful_val", "task")] == [8, 8, 8]  # test, val, task prompts
    assert saved["after"]["val/harmful_score"] is not None and "refusal_margin/sequence" in saved["after"]
    assert list((out / "wandb").glob("offline-run-*")), "W&B should log offline when not logged in"


def test_same_seed_gives_identical_metrics(make_cfg, micro, tmp_path):
    a = run(make_cfg("trainer.max_steps=4", out=tmp_path / "a"))
    b = run(make_cfg("trainer.max_steps=4", out=tmp_path / "b"))
    assert a["before"] == b["before"] and a["after"] == b["after"]
    assert a["train"]["final_loss"] == b["train"]["final_loss"]


def test_a_failed_job_marks_its_wandb_run_failed(make_cfg, micro, monkeypatch):
    import wandb.sdk.wandb_run

    codes = []
    real_finish = wandb.sdk.wandb_run.Run.finish
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "finish",
                        lambda self, exit_code=None, **kw: (codes.append(exit_code), real_finish(self, exit_code=exit_code, **kw))[1])
    monkeypatch.setattr("safeprobe.pipeline.evaluate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("judge crashed")))
    with pytest.raises(RuntimeError, match="judge crashed"):
        run(make_cfg("logger=default"))
    assert codes and codes[0] == 1


def test_eval_py_re_evaluates_a_saved_run(make_cfg, micro, tmp_path):
    results = run(make_cfg(out=tmp_path / "run"))
    proc = run_script("eval.py", f"run_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    for k in METRICS:
        assert again["after"][k] == pytest.approx(results["after"][k], rel=1e-5, abs=1e-6)
    bad = run_script("eval.py", f"run_dir={tmp_path / 'nothing'}", f"hydra.run.dir={tmp_path / 'eval2'}", cwd=tmp_path)
    assert bad.returncode == 2 and "config error: run_dir=" in bad.stderr
    assert again["environment_warnings"] == []  # same machine, packages, code and starting weights


def test_eval_py_warns_when_the_machine_or_the_starting_weights_differ_from_the_run(make_cfg, micro, tmp_path):
    from safeprobe.pipeline import compare_environment

    run(make_cfg("method=sft", out=tmp_path / "run"))
    env_file = tmp_path / "run" / "environment.json"
    env = json.loads(env_file.read_text())
    assert compare_environment(tmp_path / "run", env["start_weights_sha256"]) == []
    env["machine"]["cpu_capability"] = "AVX2" if env["machine"]["cpu_capability"] != "AVX2" else "DEFAULT"
    env_file.write_text(json.dumps(env))
    lines = compare_environment(tmp_path / "run", "0" * 64)
    assert lines[0].startswith(f'SIMD capability: "{env["machine"]["cpu_capability"]}" (the run), ')
    assert lines[-1] == f"starting weights (sha256): {env['start_weights_sha256']} (the run), {'0' * 64} (this evaluation)"


def test_two_sweeps_started_together_write_separate_job_folders(micro, tmp_path):
    """`python train.py -m probe.eps=0.01,0.05` twice at once: 2 sweeps x 2 jobs, no collision."""
    from tests import warm

    args = ["-m", "probe.eps=0.01,0.05", *FAST, "logger=default", "trainer.max_steps=1", "eval.n_harmful=2",
            "eval.n_task=2", f"paths.root_dir={tmp_path}"]
    procs = [warm.start("train.py", *args, cwd=tmp_path) for _ in range(2)]
    for p in procs:
        done = p.finish(600)
        assert done.returncode == 0, done.stderr[-3000:]
    sweeps = sorted(Path(tmp_path, "multirun").glob("*/*"))
    assert len(sweeps) == 2
    for sweep in sweeps:
        jobs = sorted(d for d in sweep.iterdir() if (d / ".hydra").is_dir())
        assert [j.name.split("_")[0] for j in jobs] == ["0", "1"]
        for job in jobs:
            assert (job / ".hydra" / "config.yaml").exists() and (job / "csv" / "metrics.csv").exists()
            assert json.loads((job / "results.json").read_text())["after"]["harmful_score"] >= 0
            assert list((job / "wandb").glob("offline-run-*"))
        eps = sorted(yaml.safe_load((j / "config.yaml").read_text())["probe"]["eps"] for j in jobs)
        assert eps == [0.01, 0.05]
