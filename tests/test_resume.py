"""A killed run resumes from its checkpoint and ends exactly where the uninterrupted run ends:
same results.json metrics, same fine-tuned weights bit for bit, for every method."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from safeprobe import checkpoint
from safeprobe.cli import Interrupted
from safeprobe.config import ConfigError, RunError
from safeprobe.methods import fine_tuning_methods
from tests import warm
from tests.conftest import FAST, run_script

STEPS = ["trainer.max_steps=6"]
SETTINGS = {name: [f"method={name}"] for name in fine_tuning_methods()}
SETTINGS["lisa"] += ["method.align_steps=2", "method.finetune_steps=2"]  # the stop falls inside a state
SETTINGS["sap faithful"] = ["method=sap", "probe.mode=faithful"]
SETTINGS["sap refresh"] = ["method=sap", "probe.refresh_every=2"]  # the probe kept across the stop
SETTINGS["csft full"] = ["method=csft", "adapter=full"]  # full fine-tuning's copy of the start


def same_run(a: Path, b: Path) -> None:
    def results(run):
        r = json.loads((run / "results.json").read_text())
        del r["run_dir"], r["train"]["seconds"], r["train"]["resumed_from_step"]
        return r

    assert results(a) == results(b)
    weights = sorted(p.relative_to(a) for p in (a / "adapter").rglob("*.safetensors"))
    assert weights and all((a / w).read_bytes() == (b / w).read_bytes() for w in weights)


def stop_at(monkeypatch, step: int, signum=signal.SIGTERM) -> None:
    """As if the signal arrived during training step `step` (it is held until the step ends)."""
    calls = iter(range(1, 10**6))
    monkeypatch.setattr(checkpoint, "pending_stop", lambda: signum if next(calls) == step else None)


@pytest.mark.parametrize("setting", SETTINGS)
def test_a_stopped_run_resumes_to_the_uninterrupted_result(make_cfg, micro, tmp_path, monkeypatch, setting):
    from safeprobe.pipeline import run

    overrides = [*STEPS, *SETTINGS[setting]]
    run(make_cfg(*overrides, out=tmp_path / "whole"))
    with monkeypatch.context() as m:
        stop_at(m, 3)
        with pytest.raises(Interrupted) as stopped:
            run(make_cfg(*overrides, out=tmp_path / "resumed"))
    assert "checkpoint saved at step 3; to continue, run the same command with hydra.run.dir=" in stopped.value.resume
    assert (tmp_path / "resumed" / checkpoint.CHECKPOINT).exists() and not (tmp_path / "resumed" / "results.json").exists()
    resumed = run(make_cfg(*overrides, "resume=true", out=tmp_path / "resumed"))
    assert resumed["train"]["resumed_from_step"] == 3 and resumed["train"]["steps"] == 6
    assert not (tmp_path / "resumed" / checkpoint.CHECKPOINT).exists()  # a finished run keeps none
    same_run(tmp_path / "whole", tmp_path / "resumed")


def test_a_crashed_run_resumes_from_its_last_periodic_checkpoint(make_cfg, micro, tmp_path, monkeypatch):
    from safeprobe.pipeline import run

    overrides = [*STEPS, "method=sap", "checkpoint_every=2"]
    run(make_cfg(*overrides, out=tmp_path / "whole"))
    original = checkpoint.Checkpoints.on_train_batch_end

    def crash_at_5(self, trainer, *args):  # a kill -9 in step 5: nothing is saved at the stop
        original(self, trainer, *args)
        if trainer.global_step == 5:
            raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(checkpoint.Checkpoints, "on_train_batch_end", crash_at_5)
        with pytest.raises(RuntimeError, match="killed"):
            run(make_cfg(*overrides, out=tmp_path / "resumed"))
    metrics = (tmp_path / "resumed" / "csv" / "metrics.csv").read_text()
    resumed = run(make_cfg(*overrides, "resume=true", out=tmp_path / "resumed"))
    assert resumed["train"]["resumed_from_step"] == 4
    same_run(tmp_path / "whole", tmp_path / "resumed")
    logged = (tmp_path / "resumed" / "csv" / "metrics.csv").read_text()
    assert metrics and logged.count("\n") == (tmp_path / "whole" / "csv" / "metrics.csv").read_text().count("\n")


def test_resuming_checks_the_settings_and_the_checkpoint(make_cfg, micro, tmp_path, monkeypatch):
    from safeprobe.pipeline import run

    overrides = [*STEPS, "method=sft"]
    with monkeypatch.context() as m:
        stop_at(m, 2)
        with pytest.raises(Interrupted):
            run(make_cfg(*overrides, out=tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"resume=true is invalid with optim.lr=0.01; allowed: the settings the run "
                                          r"in .* started with \(optim.lr=0.001\)"):
        run(make_cfg(*overrides, "optim.lr=0.01", "resume=true", out=tmp_path / "run"))
    ck = tmp_path / "run" / checkpoint.CHECKPOINT
    ck.write_bytes(ck.read_bytes()[:100])
    with pytest.raises(RunError, match=r"the checkpoint .*checkpoint.pt cannot be read \(.*\); delete it to start"):
        run(make_cfg(*overrides, "resume=true", out=tmp_path / "run"))
    assert ck.stat().st_size == 100  # reported, not deleted: the user decides
    ck.unlink()
    started = run(make_cfg(*overrides, "resume=true", out=tmp_path / "run"))  # no checkpoint: from the start
    assert started["train"]["resumed_from_step"] is None and started["train"]["steps"] == 6
    again = run(make_cfg(*overrides, "resume=true", out=tmp_path / "run"))  # finished: nothing is run
    assert again == started


def test_sigterm_saves_a_checkpoint_and_the_printed_command_resumes(tmp_path, cache_dir, micro, make_cfg):
    from safeprobe.pipeline import run

    run_dir = tmp_path / "run"
    overrides = [*FAST, "trainer.max_steps=400", "method=sft", f"paths.cache_dir={cache_dir}"]
    proc = warm.start("train.py", *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    deadline = time.time() + 120
    while not (run_dir / "csv" / "metrics.csv").exists() and time.time() < deadline:  # training has begun
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    done = proc.finish(120)
    err = done.stderr
    assert done.returncode == 143, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: stopped by SIGTERM while fine-tuning (after "), err[-2000:]
    assert "Traceback" not in err and not (run_dir / "results.json").exists()
    step = int(errors[0].split("checkpoint saved at step ")[1].split(";")[0])
    assert 0 < step < 400 and errors[0].endswith(f"run the same command with hydra.run.dir={run_dir} resume=true")
    resume = run_script("train.py", *overrides, f"hydra.run.dir={run_dir}", "resume=true", cwd=tmp_path)
    assert resume.returncode == 0, resume.stderr[-2000:]
    assert json.loads((run_dir / "results.json").read_text())["train"]["resumed_from_step"] == step
    run(make_cfg(*overrides[len(FAST):], out=tmp_path / "whole"))
    same_run(tmp_path / "whole", run_dir)


def test_rerunning_a_sweep_with_resume_skips_finished_jobs_and_runs_the_others(tmp_path, cache_dir, micro):
    sweep = tmp_path / "sweep"
    command = ["train.py", "-m", "seed=0,1", *FAST, "method=sft", f"paths.cache_dir={cache_dir}",
               f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={sweep}", "hydra.callbacks.sweep_report.wandb=false"]
    first = run_script(*command, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    jobs = sorted(d for d in sweep.iterdir() if d.is_dir())
    finished = (jobs[0] / "results.json").read_text()
    killed = json.loads((jobs[1] / "results.json").read_text())
    (jobs[1] / "results.json").unlink()  # as if job 1 had been killed before its first checkpoint
    again = run_script(*command, "resume=true", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(d for d in sweep.iterdir() if d.is_dir()) == jobs  # the same job folders
    assert f"{jobs[0]}: this run has finished (results.json); nothing to resume" in again.stdout
    assert (jobs[0] / "results.json").read_text() == finished
    rerun = json.loads((jobs[1] / "results.json").read_text())
    assert rerun["after"] == killed["after"] and rerun["train"]["steps"] == killed["train"]["steps"]
    summary = (sweep / "summary.md").read_text()
    assert "Jobs: 2 found, 2 counted" in summary and "resume" not in summary  # one setting, both seeds
    assert [j.name.split(",")[0] for j in jobs] == ["0_seed=0", "1_seed=1"]  # the swept key first
