"""Numbers that stay honest when things break: a diverged or broken model stops the run with
one line and a non-zero status; it is never evaluated, let alone reported as safe."""

from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from safeprobe.config import RunError, validate
from safeprobe.evaluation.evaluate import check_finite
from safeprobe.models.factory import load_base
from tests import warm
from tests.conftest import FAST, run_script


@pytest.mark.parametrize("method", ["sft", "sap", "lisa"])
def test_a_diverging_run_stops_with_one_line_and_writes_no_results(tmp_path, cache_dir, micro, method):
    extra = ["method.align_steps=1", "method.finetune_steps=1"] if method == "lisa" else []
    proc = run_script("train.py", *FAST, f"method={method}", *extra, "optim.lr=1e30", "trainer.max_steps=4",
                      "optim.grad_clip=null", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'run'}",
                      cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"training diverged: the {method} loss is nan at step" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_model_with_non_finite_weights_is_not_evaluated(make_cfg, micro):
    c = validate(make_cfg())
    model = load_base(c.model, c.paths.cache_dir).model
    check_finite(model)
    with torch.no_grad():
        next(model.parameters())[0, 0] = math.nan
    with pytest.raises(RunError, match=r"the model has non-finite weights \(1 tensors, e.g. model.embed_tokens.weight\)"):
        check_finite(model)


BAD_VALUES = {
    "optim.lr=inf": "optim.lr=inf is invalid; allowed: a finite number",
    "probe.temperature=inf": "probe.temperature=inf is invalid; allowed: a finite number",
    "probe.harmful_step=inf": "probe.harmful_step=inf is invalid; allowed: a finite number",
    "probe.eps=nan": "probe.eps=nan is invalid; allowed: a number >= 0",
    "probe.layers=[2,2]": "probe.layers=[2, 2] is invalid; allowed: a non-empty list of distinct decoder-layer indices",
    "eval.n_harmful=0": "eval.n_harmful=0 is invalid; allowed: null (the whole split) or an integer >= 1",
    "eval.n_task=0": "eval.n_task=0 is invalid; allowed: null (the whole split) or an integer >= 1",
    "eval.batch_size=0": "eval.batch_size=0 is invalid; allowed: an integer >= 1",
    "optim.betas=[0.9,1.0]": "optim.betas=[0.9, 1.0] is invalid; allowed: two numbers in [0, 1)",
    "optim.grad_clip=nan": "optim.grad_clip=nan is invalid; allowed: null or a number > 0",
    "optim.grad_clip=-1": "optim.grad_clip=-1.0 is invalid; allowed: null or a number > 0",
    "method=lisa method.rho=inf": "method.rho=inf is invalid; allowed: a finite number",
    "method=ldifs method.drop_above=inf": "method.drop_above=inf is invalid; allowed: a finite number",
    "align=sft align.lr=inf": "align.lr=inf is invalid; allowed: a finite number > 0",
}


@pytest.mark.parametrize("overrides", BAD_VALUES)
def test_every_value_is_checked_before_any_work(make_cfg, overrides):
    from safeprobe.config import ConfigError

    with pytest.raises(ConfigError) as e:
        validate(make_cfg(*overrides.split()))
    assert str(e.value).startswith(BAD_VALUES[overrides]) and "\n" not in str(e.value)


def test_json_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from safeprobe.tracking import write_json

    target = tmp_path / "results.json"
    write_json(target, {"after": 1})
    real_write = Path.write_text

    def disk_full(self, text, *a, **k):  # writes half, then fails as a full disk does
        real_write(self, text[: len(text) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_json(target, {"after": 2})
    assert target.read_text() == '{\n  "after": 1\n}\n' and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_stop_a_run_with_one_line_and_a_non_zero_status(tmp_path, cache_dir, micro, signum):
    run_dir = tmp_path / "run"
    proc = warm.start("train.py", *FAST, "trainer.max_steps=100000", "method=sft", f"paths.cache_dir={cache_dir}",
                      f"hydra.run.dir={run_dir}", cwd=tmp_path)
    deadline = time.time() + 120
    while not (run_dir / "csv").exists() and time.time() < deadline:  # the loggers exist: past every check
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signum)
    done = proc.finish(120)
    err = done.stderr
    assert done.returncode == 128 + signum, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    name = signal.Signals(signum).name
    assert len(errors) == 1 and errors[0].startswith(f"error: stopped by {name} while "), err[-2000:]
    assert "; checkpoint saved at step " in errors[0]  # held to the end of the step (tests/test_resume.py)
    assert errors[0].endswith(f"; to continue, run the same command with hydra.run.dir={run_dir} resume=true")
    assert "Traceback" not in err and not (run_dir / "results.json").exists() and (run_dir / "config.yaml").exists()
    assert (run_dir / "checkpoint.pt").exists()


def test_a_bad_value_in_one_sweep_job_fails_that_job_and_the_others_run(tmp_path, cache_dir, micro):
    sweep = tmp_path / "sweep"
    proc = run_script("train.py", "-m", "probe.eps=0.1,-1,0.2", *FAST, "trainer.max_steps=1", "eval.n_harmful=2",
                      "eval.n_task=2", f"paths.cache_dir={cache_dir}", f"paths.root_dir={tmp_path}",
                      f"hydra.sweep.dir={sweep}", "hydra.callbacks.sweep_report.wandb=false", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the sweep's status says a job failed
    assert proc.stderr.count("config error: probe.eps=-1.0 is invalid; allowed: a number >= 0") == 1
    jobs = sorted(d for d in sweep.iterdir() if d.is_dir())
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1", "2"] and all("probe.eps=" in j.name for j in jobs)
    assert [(j / "results.json").exists() for j in jobs] == [True, False, True]
    assert (jobs[1] / "job_error.txt").read_text() == "config error: probe.eps=-1.0 is invalid; allowed: a number >= 0\n"
    summary = (sweep / "summary.md").read_text()
    assert "failed: config error: probe.eps=-1.0 is invalid" in summary


def test_job_folder_names_stay_unique_and_keep_the_swept_keys(monkeypatch):
    from safeprobe.config import as_dirname

    long = "data.n_train=16,eval.n_task=2,logger=csv,paths.cache_dir=/very/long/" + "x" * 150 + ",probe.eps={}"
    a, b = as_dirname(long.format(0.1)), as_dirname(long.format(0.2))
    assert a != b and len(a) == len(b) == 160 and "probe.eps=0.1" in a and "/" not in a
    assert as_dirname("probe.eps=0.1,seed=0") == "probe.eps=0.1,seed=0" and as_dirname("") == "default"
    many = ",".join(f"data.key_{i}={i}" for i in range(30)) + ",seed={},zeta=1"
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "seed=0,1", "data.key_0=0", "zeta=1"])
    assert as_dirname(many.format(0)).startswith("seed=0,data.key_0=0,")  # the swept key first, never cut
    assert as_dirname(many.format(0)) != as_dirname(many.format(1))


def test_eval_py_says_what_a_run_folder_lacks(make_cfg, micro, tmp_path):
    from safeprobe.pipeline import run

    run(make_cfg("method=sft", "save_adapter=false", out=tmp_path / "run"))
    no_adapter = run_script("eval.py", f"run_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'e1'}", cwd=tmp_path)
    assert no_adapter.returncode == 2 and "allowed: a run folder holding adapter/" in no_adapter.stderr
    config = tmp_path / "run" / "config.yaml"
    text = config.read_text()
    config.write_text(text[: text.index("\nadapter:")])  # cut short at a line: what was there reads
    cut = run_script("eval.py", f"run_dir={tmp_path / 'run'}", "judges_only=true", f"hydra.run.dir={tmp_path / 'e2'}",
                     cwd=tmp_path)
    assert cut.returncode == 2 and "whose config.yaml is complete (it lacks adapter" in cut.stderr, cut.stderr[-2000:]
    config.write_text(text[:201] + ": [")  # cut mid-line: not YAML
    garbled = run_script("eval.py", f"run_dir={tmp_path / 'run'}", "judges_only=true",
                         f"hydra.run.dir={tmp_path / 'e3'}", cwd=tmp_path)
    assert garbled.returncode == 2 and "whose config.yaml can be read" in garbled.stderr, garbled.stderr[-2000:]
    assert "Traceback" not in no_adapter.stderr + cut.stderr + garbled.stderr
    assert not list(tmp_path.rglob(".cache"))  # nothing was aligned into the working directory


def test_lightnings_sigterm_handling_never_ends_a_stopped_run_as_a_success(make_cfg, tmp_path):
    """Lightning installs its own SIGTERM handler at the start of fit, which raises SIGTERMException
    (a SystemExit with status 0) at the end of a step: a run stopped in that window ended with status
    0, no line and no checkpoint. Our handler replaces it for the training steps, and the exception,
    should it come anyway, becomes the stop it stands for."""
    import lightning as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from safeprobe import checkpoint, cli
    from tests.test_sap import setup

    with pytest.raises(cli.Interrupted) as stopped, cli.stop_between_steps():
        raise SIGTERMException
    assert stopped.value.signum == signal.SIGTERM
    with pytest.raises(SystemExit) as other, cli.stop_between_steps():
        sys.exit(3)  # any other exit passes through
    assert other.value.code == 3

    handlers = []

    class Watch(L.Callback):
        def on_train_batch_start(self, *args):
            handlers.append(signal.getsignal(signal.SIGTERM))

    _, module, dm = setup(make_cfg, "method=sft")
    trainer = L.Trainer(max_steps=2, max_epochs=-1, logger=False, enable_checkpointing=False, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[checkpoint.Checkpoints(tmp_path / "checkpoint.pt", 0, {}), Watch()])
    with cli.stop_between_steps():
        trainer.fit(module, datamodule=dm)
    assert handlers == [cli._stop, cli._stop]
