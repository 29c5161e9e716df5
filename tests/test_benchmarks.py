"""The benchmark scripts run end to end on the micro world and print what they promise
(their figures are measured elsewhere: benchmarks print, tests never time)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess

from safeprobe.config import PROJECT_ROOT
from safeprobe.methods import METHODS
from safeprobe.methods.registry import fine_tuning_methods
from safeprobe.post import REPAIRS
from tests.conftest import FAST, run_script

STAGE_DEFENSES = sorted(m for m, spec in METHODS.items() if spec.stage == "alignment")
TINY = [o for o in FAST if not o.startswith(("trainer.max_steps", "cpu_kernels", "logger", "trainer.enable_progress",
                                             "trainer.log_every"))]


def test_step_cost_times_methods_and_variants_side_by_side(cache_dir, micro, tmp_path):
    proc = run_script("benchmarks/step_cost.py", "--steps", "2", "--warmup", "1", "--rounds", "1", "--methods", "sap",
                      "--variant", "sap_k2:sap:probe.refresh_every=2", "--variant", "sap_k2:sap:probe.probe_examples=2",
                      *TINY, f"paths.cache_dir={cache_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(sft|sap|sap_k2)\s+[\d.]+\s+([\d.]+)", proc.stdout, re.M)}
    assert set(rows) == {"sft", "sap", "sap_k2"} and rows["sft"] == 1.0, proc.stdout
    assert "sap_k2 only: sap probe.refresh_every=2 probe.probe_examples=2" in proc.stdout


def test_sap_profile_times_each_pass_and_projects_the_levers(cache_dir, micro, tmp_path):
    proc = run_script("benchmarks/sap_profile.py", "--repeats", "1", *TINY, f"paths.cache_dir={cache_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {m.group(1): [float(m.group(2)), float(m.group(3))]
            for m in re.finditer(r"^\| (sft step|direction|probe search|update) \| ([\d.]+) \|.*\| ([\d.]+) \|$",
                                 proc.stdout, re.M)}
    assert set(rows) == {"sft step", "direction", "probe search", "update"}, proc.stdout
    assert all(ms > 0 and saved > 0 for ms, saved in rows.values())
    assert re.search(r"^\| SAP step \(sum\) \| [\d.]+ \| 100% \|", proc.stdout, re.M), proc.stdout
    projected = re.findall(r"^\| (1|2|4|8|16) \| ([\d.]+) \| ([\d.]+) \|$", proc.stdout, re.M)
    assert [k for k, *_ in projected] == ["1", "2", "4", "8", "16"], proc.stdout
    assert float(projected[-1][1]) < float(projected[0][1])  # refreshing less often costs less


def test_checkpoint_cost_runs_with_and_without_checkpoints(cache_dir, micro, tmp_path):
    proc = run_script("benchmarks/checkpoint_cost.py", "--rounds", "1", "--every", "2", *TINY, "trainer.max_steps=4",
                      "method=sft", "cpu_kernels=native", f"paths.cache_dir={cache_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"checkpoint_every=0: [\d.]+ +checkpoint_every=2: [\d.]+ +ratio [\d.]+", proc.stdout), proc.stdout
    assert re.search(r"saves: 1 per run, median [\d.]+ ms each", proc.stdout), proc.stdout  # step 2 (not the last)


def test_kernel_paths_builds_and_compares_each_setting(tmp_path):
    proc = run_script("benchmarks/kernel_paths.py", "--settings", "native,portable-avx2", "--keep", str(tmp_path / "k"),
                      *TINY, "trainer.max_steps=2", "model.alignment.steps=20", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("| native", "| portable-avx2"))]
    assert len(lines) == 2, proc.stdout
    assert "| DEFAULT | 2 |" in lines[1]  # the portable path, whatever the variables say
    assert (tmp_path / "k" / "kernel_paths.json").is_file()


def test_gpu_benchmark_tiny_mode_prints_every_family_method_stage_defense_and_repair(tmp_path):
    # the two most different config classes (every family's step of every method: test_real_models.py)
    families = ["llama2_7b_chat", "gemma2_9b_it"]
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--families", ",".join(families), "--out", str(tmp_path)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "TINY": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    tables = {}  # header's second column -> rows of cells
    for block in proc.stdout.split("\n\n"):
        rows = [[c.strip() for c in line.split("|")[1:-1]] for line in block.splitlines() if line.startswith("| ")]
        if rows and rows[0][0] == "family":
            tables[rows[0][1]] = rows[1:]
    assert set(tables) == {"method", "repair", "prompts"}, proc.stdout
    train = {(r[0], r[1]): [float(x) for x in r[2:]] for r in tables["method"]}
    repairs = {(r[0], r[1]): [float(x) for x in r[2:7]] for r in tables["repair"]}
    generate = {r[0]: [float(x) for x in r[1:]] for r in tables["prompts"]}
    fine_tuning = [*fine_tuning_methods(), "sap_every_step", "sap_two_pass_probe"]
    stage = [f"align={m}" for m in ["sft", *STAGE_DEFENSES]]  # the stage's step, next to plain SFT alignment
    assert set(train) == {(f, m) for f in families for m in [*fine_tuning, *stage]}, proc.stdout
    assert set(repairs) == {(f, f"post={r}") for f in families for r in REPAIRS}, proc.stdout
    assert set(generate) == set(families), proc.stdout
    assert all(math.isfinite(v) and v > 0 for row in [*train.values(), *generate.values()] for v in row), proc.stdout
    assert all(math.isfinite(v) and v >= 0 for row in repairs.values() for v in row), proc.stdout
    assert all(train[f, "sft"][3:] == [1.0, 1.0] for f in families)  # ratios to itself
    assert all(re.search(r"\d+ of \d+ LoRA layers projected", r[7]) for r in tables["repair"] if r[1] == "post=safelora")
    assert all(re.search(r"[1-9]\d* examples", r[7]) for r in tables["repair"] if r[1] == "post=antidote")
    saved = json.loads((tmp_path / "gpu_bench.json").read_text())["results"]
    assert set(saved) == set(families) and set(saved["gemma2_9b_it"]["train"]) == set(fine_tuning)
    assert set(saved["gemma2_9b_it"]["stage"]) == set(stage) and set(saved["gemma2_9b_it"]["repairs"]) == set(REPAIRS)
