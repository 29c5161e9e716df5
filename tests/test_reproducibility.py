"""cpu_kernels=portable: the same numbers whatever SIMD level and MKL path the CPU offers.

One machine imitates another by lowering ATEN_CPU_CAPABILITY and MKL_CBWR; on the native path
that changes the aligned model's last bits and every number after it (the control), on the
portable path nothing (docs/reproducibility.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safeprobe import kernels
from safeprobe.config import PROJECT_ROOT, RunError
from tests.conftest import FAST

ANOTHER_CPU = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}  # what an AVX2-only machine would run


def train(tmp_path: Path, name: str, env: dict, *overrides: str) -> tuple[dict, dict]:
    """A run with its own cache (the aligned model is built on this path too)."""
    run_dir = tmp_path / name
    fast = [o for o in FAST if not o.startswith("cpu_kernels=")]
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "train.py"), *fast, "method=sap", "trainer.max_steps=4",
                           "model.alignment.steps=40", f"paths.cache_dir={tmp_path / name / 'cache'}",
                           f"hydra.run.dir={run_dir}", *overrides],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    del results["run_dir"], results["train"]["seconds"]
    return results, json.loads((run_dir / "environment.json").read_text())


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX2"),
                    reason="needs an x86-64 CPU with AVX2 to imitate another SIMD level")
def test_the_portable_path_gives_identical_results_under_another_simd_level(tmp_path):
    here, here_env = train(tmp_path, "auto", {})  # cpu_kernels=auto: portable for the synthetic world
    there, there_env = train(tmp_path, "portable_avx2", ANOTHER_CPU, "cpu_kernels=portable")
    assert here_env["cpu_kernels"] == there_env["cpu_kernels"] == "portable"
    assert here_env["machine"]["cpu_capability"] == there_env["machine"]["cpu_capability"] == "DEFAULT"
    assert here_env["machine"]["threads"] == there_env["machine"]["threads"] == kernels.THREADS
    assert here_env["start_weights_sha256"] == there_env["start_weights_sha256"]
    assert here == there  # every metric, bit for bit


def test_the_portable_path_needs_a_fresh_process(monkeypatch):

    torch.ones(3).add_(1)  # this process already runs the native kernels
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU has no SIMD path beyond the baseline")
    for key in kernels.PORTABLE:  # pin() sets them: put them back afterwards
        monkeypatch.setenv(key, os.environ.get(key, ""))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    with pytest.raises(RunError, match="cpu_kernels=portable needs a fresh process: this one already runs PyTorch's"):
        kernels.pin("portable", "synthetic", "cpu")
    assert kernels.pin("auto", "synthetic", "cpu") == "native"  # auto stays where the process is
    assert kernels.pin("portable", "synthetic", "gpu") == "native"  # GPU runs are not affected
    assert kernels.pin("native", "synthetic", "cpu") == "native"


def test_reports_name_another_cpu_only_where_it_decides_the_bits():
    from safeprobe.reporting.environments import environment_differences

    def env(cpu: str, path: str) -> dict:
        return {"cpu_kernels": path, "machine": {"cpu": cpu, "cpu_capability": "DEFAULT", "threads": 2}}

    assert environment_differences({"a": env("AMD EPYC", "portable"), "b": env("Intel Xeon", "portable")}) == []
    native = environment_differences({"a": env("AMD EPYC", "native"), "b": env("Intel Xeon", "native")})
    assert native == ['CPU: "AMD EPYC" (a), "Intel Xeon" (b)']


def test_jobs_whose_conf_or_code_was_edited_while_the_sweep_ran_are_flagged(tmp_path):
    """Hydra composes each sweep job from the files on disk when the job starts: an edit of conf/
    during a sweep reaches the later jobs, and the report must say so."""
    import subprocess

    from safeprobe.reporting.environments import environment_differences
    from safeprobe.tracking import git_commit

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "probe.yaml").write_text("eps: 0.2\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "start")
    clean = git_commit(tmp_path)
    (tmp_path / "probe.yaml").write_text("eps: 0.3\n")
    first = git_commit(tmp_path)
    (tmp_path / "probe.yaml").write_text("eps: 0.4\n")
    second = git_commit(tmp_path)
    assert clean["diff_sha256"] is None and not clean["dirty"] and first["dirty"] and second["dirty"]
    assert environment_differences({"job0": {"git": first}, "job1": {"git": first}}) == []
    lines = environment_differences({"job0": {"git": first}, "job1": {"git": second}})
    assert len(lines) == 1 and lines[0].startswith("uncommitted changes (sha256 of git diff): ")
