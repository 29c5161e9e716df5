"""Launchers and sweepers (docs/reporting.md, "Launchers", "Hyperparameter search"): the sweep
report is written once, by the launching process, after every job, with joblib's and submitit's
worker processes too; the SLURM config asks for what Lightning expects; the Optuna search
returns validation-split objectives and resumes its stored study."""

from __future__ import annotations

import atexit
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from safeprobe.config import CONF_DIR, PROJECT_ROOT, ConfigError, RunError
from safeprobe.reporting.callback import SweepReport
from safeprobe.reporting.search import objective_values, sqlite_file, sweep_objective
from tests.conftest import FAST
from tests.test_reporting import TOY_APP

TOY_CONF = """
method: sft
seed: 0
logger: {wandb: {enabled: WANDB, project: toy, mode: offline}}
hydra:
  sweep: {dir: SWEEP, subdir: "${hydra.job.num}"}
  callbacks:
    sweep_report: {_target_: safeprobe.reporting.callback.SweepReport}
"""


def run_toy_sweep(tmp_path: Path, launcher: str, seed: int) -> tuple[subprocess.CompletedProcess, Path, str]:
    """method=sft,sap at one seed (seed 2: the sap job raises, and the sweep logs to W&B offline);
    returns the process, the sweep folder and everything every process printed (the launcher's
    output and the submitit workers' logs; joblib's workers print to the launcher's)."""
    sweep = tmp_path / "sweep"
    launchers = tmp_path / "conf" / "hydra" / "launcher"
    launchers.mkdir(parents=True)
    for f in (CONF_DIR / "hydra" / "launcher").glob("*.yaml"):  # the project's launcher configs
        (launchers / f.name).write_text(f.read_text())
    wandb = "true" if seed == 2 else "false"  # the W&B summary run where it once failed: at exit (~10 s)
    (tmp_path / "conf" / "toy.yaml").write_text(TOY_CONF.replace("SWEEP", str(sweep)).replace("WANDB", wandb))
    (tmp_path / "toy.py").write_text(textwrap.dedent(TOY_APP))
    proc = subprocess.run([sys.executable, str(tmp_path / "toy.py"), "-m", "method=sft,sap", f"seed={seed}",
                           f"hydra/launcher={launcher}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    logs = [p.read_text(errors="replace") for p in sorted(sweep.glob(".submitit/*/*_log.*"))]
    return proc, sweep, "\n".join([proc.stdout, proc.stderr, *logs])


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["parallel", "submitit"])
@pytest.mark.parametrize("seed", [0, 2], ids=["all_ok", "one_fails"])
def test_one_report_by_the_launching_process(tmp_path, launcher, seed):
    proc, sweep, printed = run_toy_sweep(tmp_path, launcher, seed)
    assert (proc.returncode == 0) == (seed == 0), proc.stderr[-3000:]
    assert printed.count("# Sweep summary") == 1 and "# Sweep summary" in proc.stdout  # printed by the launcher
    assert len(list(sweep.rglob("offline-run-*"))) == (seed == 2)  # one W&B summary run, in sweep/wandb/
    assert "ended early" not in printed
    md = (sweep / "summary.md").read_text()
    if seed == 0:
        assert "Jobs: 2 found, 2 counted" in md and "| method=sap | after | 1 |" in md and "raised" not in printed
    else:
        assert "Jobs: 2 found, 1 counted, 1 listed below." in md and "| all jobs | after | 1 |" in md
        assert "toy failure" in (sweep / "1" / "job_error.txt").read_text()
        assert "(failed): failed: RuntimeError: toy failure" in md
        assert "1 job(s) raised, so Hydra skipped its end-of-sweep callback" in printed


def test_a_worker_copy_of_the_callback_never_reports(tmp_path):
    report = SweepReport(wandb=False)
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    report.on_multirun_start(cfg)
    assert report._launching()
    worker = pickle.loads(pickle.dumps(report))  # what joblib and submitit send to a worker
    assert worker._pending is None and not worker._launching() and worker._report() == 0
    report._launcher = ("elsewhere", 1)  # a forked or remote process with the pending report
    assert not report._launching() and report._report() == 0
    assert not list(tmp_path.iterdir())
    atexit.unregister(report._report_unfinished)


def compose_hydra(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=unused", *overrides], return_hydra_config=True)
    OmegaConf.set_struct(cfg, False)
    cfg.hydra.job.name = "train"
    cfg.hydra.runtime.output_dir = "unused"
    return cfg


@pytest.mark.parametrize("launcher,target", [("parallel", "JoblibLauncher"), ("submitit", "LocalLauncher"),
                                             ("slurm", "SlurmLauncher")])
def test_launcher_configs_compose(launcher, target):
    cfg = compose_hydra(f"hydra/launcher={launcher}")
    node = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert node["_target_"].endswith(target)
    if launcher == "parallel":
        assert node["n_jobs"] == 2
    else:
        assert node["submitit_folder"].endswith("/.submitit/%j") and node["timeout_min"] == 1440


def sbatch_script(tmp_path, monkeypatch, *overrides: str) -> str:
    """The sbatch file hydra/launcher=slurm submits (submitit only looks for srun on the PATH)."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    (tmp_path / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    cfg = compose_hydra("hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}/sweep", *overrides)
    params = instantiate(cfg.hydra.launcher).params  # as SlurmLauncher.launch passes them on
    executor = submitit.AutoExecutor(folder=params["submitit_folder"], cluster="slurm",
                                     slurm_max_num_timeout=params["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    return executor._executor._make_submission_file_text("CMD", "uid")


def test_slurm_asks_one_task_per_gpu_as_lightning_expects(tmp_path, monkeypatch):
    one = sbatch_script(tmp_path, monkeypatch, "hydra.launcher.partition=gpu")
    assert "#SBATCH --gpus-per-node=1" in one and "#SBATCH --ntasks-per-node=1" in one  # trainer=gpu: devices=1
    assert "#SBATCH --partition=gpu" in one and "#SBATCH --time=1440" in one and "#SBATCH --mem=64GB" in one
    assert "#SBATCH --signal=TERM@120" in one  # a run saves a checkpoint at SIGTERM (not submitit's USR2)
    ddp = sbatch_script(tmp_path, monkeypatch, "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2")
    assert "#SBATCH --gpus-per-node=4" in ddp and "#SBATCH --ntasks-per-node=4" in ddp and "#SBATCH --nodes=2" in ddp
    cpu = sbatch_script(tmp_path, monkeypatch, "hydra.launcher.gpus_per_node=null", "hydra.launcher.tasks_per_node=1")
    assert "gpus" not in cpu and "#SBATCH --ntasks-per-node=1" in cpu


def test_objective_values_and_their_one_line_errors(monkeypatch):
    results = {"after": {"harmful_score": 12.5, "val/harmful_score": 10.0, "fine_tune_accuracy": 90.0,
                         "refusal_margin": None}}
    assert objective_values(results, ["harmful_score"]) == 12.5  # one metric: a float (train.py's old return)
    assert objective_values(results, ["val/harmful_score", "fine_tune_accuracy"]) == [10.0, 90.0]
    with pytest.raises(RunError, match="objective metric 'refusal_margin': this run has no value for it"):
        objective_values(results, ["refusal_margin"])
    with pytest.raises(RunError, match="'val/test_loss'.*it has: harmful_score, val/harmful_score, fine_tune_acc"):
        objective_values(results, ["val/test_loss"])
    assert sweep_objective(OmegaConf.create({"seed": 0})) == ["harmful_score"]  # the default, outside a sweep
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = OmegaConf.create({"hydra": {"sweeper": {"direction": ["minimize", "maximize"]}}})
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hydra_cfg.hydra))
    assert sweep_objective(OmegaConf.create({"objective": ["val/harmful_score", "fine_tune_accuracy"]})) == [
        "val/harmful_score", "fine_tune_accuracy"]
    with pytest.raises(ConfigError, match=r"names 1 metric\(s\) but hydra.sweeper.direction=\['minimize', 'maximize'\]"):
        sweep_objective(OmegaConf.create({"objective": ["val/harmful_score"]}))
    assert sqlite_file("sqlite:////abs/study.db") == Path("/abs/study.db") and sqlite_file("mysql://x") is None


def train(tmp_path: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "train.py"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout, env=os.environ.copy())


@pytest.mark.slow
def test_train_sweep_with_parallel_jobs(cache_dir, tmp_path):
    proc = train(tmp_path, "-m", "hydra/launcher=parallel", "method=sft,sap", *FAST, f"paths.root_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    jobs = sorted(d for d in sweep.iterdir() if (d / ".hydra").is_dir())
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1"]
    assert {json.loads((j / "results.json").read_text())["method"] for j in jobs} == {"sft", "sap"}
    assert proc.stdout.count("# Sweep summary") == 1 and "ended early" not in proc.stdout + proc.stderr
    md = (sweep / "summary.md").read_text()
    assert "| method=sft | after | 1 |" in md and "| method=sap | after | 1 |" in md


@pytest.mark.slow
def test_optuna_search_on_validation_resumes_its_study(cache_dir, tmp_path):
    import optuna

    args = ["-m", "hparams_search=sap_optuna", "hydra.sweeper.sampler.seed=0", *FAST,  # fixed trials: none diverges
            f"paths.root_dir={tmp_path}"]
    db = tmp_path / "multirun" / "optuna" / "sap_optuna.db"
    for n_trials, trials in [(2, 2), (1, 3)]:  # then the same command (here with 1 trial) adds to the study
        proc = train(tmp_path, *args, f"hydra.sweeper.n_trials={n_trials}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        study = optuna.load_study(study_name="sap_optuna", storage=f"sqlite:///{db}")
        assert len(study.trials) == trials and all(t.state.name == "COMPLETE" for t in study.trials)
        assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    sweeps = sorted((tmp_path / "multirun").glob("*-*-*/*"))
    assert len(sweeps) == 2 and all((s / "summary.md").exists() and (s / "optimization_results.yaml").exists()
                                    for s in sweeps)
    for trial, job in zip(study.trials, [sweeps[0] / "0", sweeps[0] / "1", sweeps[1] / "0"]):
        after = json.loads((job / "results.json").read_text())["after"]
        assert trial.values == [after["val/harmful_score"], after["fine_tune_accuracy"]]  # validation, not test
        config = OmegaConf.load(job / "config.yaml")
        assert config.method.name == "sap" and config.probe.eps == pytest.approx(trial.params["probe.eps"])


def test_a_val_objective_without_a_validation_split_stops_with_one_line(cache_dir, tmp_path):
    proc = train(tmp_path, "data=sst2", "objective=[val/harmful_score,fine_tune_accuracy]", f"paths.root_dir={tmp_path}",
                 timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: objective 'val/harmful_score' needs the validation "
                                                   "split scored next to the test split, and this run scores none "
                                                   "(data.source=hub: the real harmful sets have no validation split)")
