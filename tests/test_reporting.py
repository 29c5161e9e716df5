"""Sweep reports on synthetic results: grouping, statistics, paired differences, failed jobs,
output files, the command line, W&B offline, and the Hydra callback in a real (toy) multirun."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from safeprobe.config import CONF_DIR
from safeprobe.reporting import aggregate, write_report
from safeprobe.reporting.__main__ import main as cli
from safeprobe.reporting.callback import SweepReport
from safeprobe.reporting.stats import summarize, t975

# harmful score after fine-tuning per (method, seed); everything else derives from it
HS = {("sft", 0): 40.0, ("sft", 1): 50.0, ("sft", 2): 60.0,
      ("sap", 0): 10.0, ("sap", 1): 30.0, ("sap", 2): 20.0}


def metrics(hs: float) -> dict:
    return {"harmful_score": hs, "harmful_score/exact": hs, "refusal_margin": -hs / 10,
            "fine_tune_accuracy": 100 - hs / 2, "test_loss": hs / 100}


def write_job(sweep: Path, num: int, overrides: list[str], results: dict | None) -> Path:
    """A job folder as `train.py -m` leaves it (results None: the job died before writing them)."""
    job = sweep / f"{num}_{','.join(o for o in overrides if not o.startswith('paths.'))}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if results is not None:
        (job / "results.json").write_text(json.dumps(results))
    return job


def results(method: str, seed: int, hs: float) -> dict:
    return {"method": method, "seed": seed, "run_dir": "x", "before": metrics(2.0), "after": metrics(hs),
            "train": {"seconds": 1.5, "steps": 2, "final_loss": 0.3, "dropped_examples": 0}}


@pytest.fixture
def sweep(tmp_path) -> Path:
    """method=sft,sap x seed=0,1,2, plus a job of seed 3 that failed (no results.json)."""
    d = tmp_path / "multirun" / "2025-01-01" / "12-00-00-000000"
    num = 0
    for seed in range(3):
        for method in ("sft", "sap"):
            # paths.* differs per job (merged machines) and must not split groups
            write_job(d, num, [f"method={method}", f"seed={seed}", "data.n_train=32", f"paths.root_dir=/m{seed}"],
                      results(method, seed, HS[method, seed]))
            num += 1
    write_job(d, num, ["method=sap", "seed=3", "data.n_train=32"], None)
    return d


def by_label(summary) -> dict:
    return {g.label: g for g in summary.groups}


def test_t_quantile_matches_published_values():
    # two-sided 95% critical values of Student's t (standard tables), and the normal limit
    for df, q in [(1, 12.706205), (2, 4.302653), (4, 2.776445), (10, 2.228139), (30, 2.042272)]:
        assert t975(df) == pytest.approx(q, abs=1e-6)
    assert t975(10**9) == pytest.approx(1.959964, abs=1e-6)
    with pytest.raises(ValueError, match="degree of freedom"):
        t975(0)


def test_statistics_match_hand_computed():
    st = summarize([10, 20, 30])
    half = 4.302653 * 10 / math.sqrt(3)  # t(0.975, 2) * std / sqrt(n) = 24.8414
    assert (st.n, st.mean, st.std) == (3, 20.0, pytest.approx(10.0))
    assert (st.low, st.high) == (pytest.approx(20 - half, abs=1e-5), pytest.approx(20 + half, abs=1e-5))
    assert (st.low, st.high) == (pytest.approx(-4.8414, abs=1e-4), pytest.approx(44.8414, abs=1e-4))
    one = summarize([5.0])
    assert one.n == 1 and one.mean == 5.0 and math.isnan(one.std) and math.isnan(one.low)
    assert summarize([]).n == 0


def test_groups_by_settings_without_seed_and_paths(sweep):
    s = aggregate([sweep])
    groups = by_label(s)
    assert set(groups) == {"method=sft", "method=sap"}
    assert s.common == ("data.n_train=32",) and s.varying == ("method",)
    assert groups["method=sft"].seeds == [0, 1, 2] and groups["method=sap"].seeds == [0, 1, 2]
    after = groups["method=sap"].stats["after", "harmful_score"]
    assert (after.n, after.mean, after.std) == (3, 20.0, pytest.approx(10.0))
    assert after.high - after.mean == pytest.approx(4.302653 * 10 / math.sqrt(3), abs=1e-4)
    assert groups["method=sap"].stats["before", "harmful_score"].std == 0.0
    assert groups["method=sft"].stats["after", "fine_tune_accuracy"].mean == pytest.approx(75.0)


def test_paired_differences_vs_sft(sweep):
    g = by_label(aggregate([sweep]))
    sap, sft = g["method=sap"], g["method=sft"]
    assert sap.reference is sft and sft.reference is None and not sft.diffs
    d = sap.diffs["after", "harmful_score"]  # per seed: -30, -20, -40
    assert (d.n, d.mean, d.std) == (3, pytest.approx(-30.0), pytest.approx(10.0))
    assert d.high == pytest.approx(-30 + 4.302653 * 10 / math.sqrt(3), abs=1e-4)
    assert sap.diffs["before", "harmful_score"].mean == 0.0


def test_failed_and_duplicate_jobs_are_listed(sweep, tmp_path):
    (sweep / "6_method=sap,seed=3,data.n_train=32" / "job_error.txt").write_text("Traceback\nRuntimeError: boom\n")
    other = tmp_path / "machine2"  # the same seed again, from another machine
    write_job(other, 0, ["seed=0", "method=sft", "data.n_train=32"], results("sft", 0, 99.0))
    s = aggregate([sweep, other])
    listed = {j.path.name: (j.status, j.problem) for j in s.problems}
    assert listed["6_method=sap,seed=3,data.n_train=32"] == ("failed", "failed: RuntimeError: boom")
    assert listed["0_seed=0,method=sft,data.n_train=32"][0] == "duplicate"
    assert by_label(s)["method=sft"].stats["after", "harmful_score"].mean == 50.0  # duplicate not counted


def test_files_written(sweep):
    summary, written = write_report([sweep])
    assert {p.name for p in written} == {"summary.csv", "jobs.csv", "summary.md", "summary.png"}
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    sap = next(r for r in rows if r["method"] == "sap" and r["stage"] == "after" and r["metric"] == "harmful_score")
    assert (sap["n"], float(sap["mean"]), float(sap["std"]), sap["seeds"]) == ("3", 20.0, 10.0, "0 1 2")
    assert float(sap["diff_vs_sft_mean"]) == -30.0
    assert {r["stage"] for r in rows} == {"before", "after", "train"}
    jobs = list(csv.DictReader((sweep / "jobs.csv").open()))
    assert len(jobs) == 7 and [j["status"] for j in jobs].count("missing") == 1
    md = (sweep / "summary.md").read_text()
    assert "| method=sap | after | 3 | 20.0 ± 10.0 [-4.8, 44.8] |" in md
    assert "-30.0 [-54.8, -5.2]" in md
    assert "6_method=sap,seed=3,data.n_train=32" in md and "no results.json" in md
    assert (sweep / "summary.png").stat().st_size > 1000


def test_cli_prints_table_and_exits_0(sweep, capsys):
    assert cli([str(sweep), "--no-wandb"]) == 0
    out = capsys.readouterr().out
    assert "# Sweep summary" in out and "method=sft" in out and "no results.json" in out
    assert not (sweep / "wandb").exists()


def test_cli_merges_folders_and_rejects_empty_ones(sweep, tmp_path):
    other = tmp_path / "machine2"
    write_job(other, 0, ["method=sft", "seed=5", "data.n_train=32"], results("sft", 5, 70.0))
    out = tmp_path / "merged"
    assert cli([str(sweep), str(other), "--out", str(out), "--no-wandb"]) == 0
    assert "| method=sft | after | 4 |" in (out / "summary.md").read_text()
    (tmp_path / "empty").mkdir()
    assert cli([str(tmp_path / "empty"), "--no-wandb"]) == 1
    assert cli([str(tmp_path / "nowhere"), "--no-wandb"]) == 2


def test_wandb_offline_summary_run(sweep):
    assert cli([str(sweep), "--group", "test_sweep"]) == 0
    runs = list((sweep / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_callback_is_registered():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=unused"], return_hydra_config=True)
    assert isinstance(instantiate(cfg.hydra.callbacks.sweep_report), SweepReport)


TOY_APP = """
import json
from pathlib import Path
import hydra
from hydra.core.hydra_config import HydraConfig

@hydra.main(config_path="conf", config_name="toy", version_base="1.3")
def main(cfg):
    if cfg.seed == 2 and cfg.method == "sap":
        raise RuntimeError("toy failure")
    hs = {"sft": 50.0, "sap": 20.0}[cfg.method] + cfg.seed
    m = {"harmful_score": hs, "refusal_margin": -hs, "fine_tune_accuracy": 90.0, "test_loss": 0.5}
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "results.json").write_text(json.dumps({"method": cfg.method, "seed": cfg.seed, "before": m, "after": m}))
    return hs

main()
"""
TOY_CONF = """
method: sft
seed: 0
logger: {wandb: {enabled: false}}
hydra:
  sweep: {dir: SWEEP, subdir: "${hydra.job.num}"}
  callbacks:
    sweep_report: {_target_: safeprobe.reporting.callback.SweepReport}
"""


def run_toy_sweep(tmp_path: Path, seeds: str) -> tuple[subprocess.CompletedProcess, Path]:
    sweep = tmp_path / "sweep"
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "toy.yaml").write_text(TOY_CONF.replace("SWEEP", str(sweep)))
    (tmp_path / "toy.py").write_text(textwrap.dedent(TOY_APP))
    proc = subprocess.run([sys.executable, str(tmp_path / "toy.py"), "-m", "method=sft,sap", f"seed={seeds}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    return proc, sweep


def test_callback_reports_a_finished_multirun(tmp_path):
    proc, sweep = run_toy_sweep(tmp_path, "0,1")
    assert proc.returncode == 0, proc.stderr
    assert "| method=sap | after | 2 | 20.5 ± 0.7" in (sweep / "summary.md").read_text()
    assert "# Sweep summary" in proc.stdout
    assert (sweep / "summary.png").exists() and not (sweep / "wandb").exists()


def test_callback_reports_a_failed_multirun_and_keeps_its_exit_status(tmp_path):
    proc, sweep = run_toy_sweep(tmp_path, "0,1,2")
    assert proc.returncode != 0 and "toy failure" in proc.stderr
    md = (sweep / "summary.md").read_text()
    assert "| method=sap | after | 2 |" in md and "| method=sft | after | 3 |" in md
    assert "(failed): failed: RuntimeError: toy failure" in md
    assert "toy failure" in (sweep / "5" / "job_error.txt").read_text()


def test_validation_scores_get_their_own_table_only_when_present(sweep, tmp_path):
    write_report([sweep])
    assert "Validation split" not in (sweep / "summary.md").read_text()
    merged = tmp_path / "with_val"
    for job in sorted(sweep.glob("*/results.json")):  # the same jobs, now also scored on val
        r = json.loads(job.read_text())
        r["after"]["val/harmful_score"] = r["after"]["harmful_score"] + 1
        r["after"]["val/refusal_margin"] = r["after"]["refusal_margin"]
        overrides = yaml.safe_load((job.parent / ".hydra" / "overrides.yaml").read_text())
        write_job(merged, len(list(merged.glob("*"))) if merged.exists() else 0, overrides, r)
    write_report([merged])
    val = (merged / "summary.md").read_text().split("## Validation split")[1]
    assert "| method=sap | 3 | 21.0 ± 10.0 [-3.8, 45.8] |" in val and "-30.0 [-54.8, -5.2]" in val


def test_a_named_reference_pairs_ablations_swept_apart_from_their_sft_runs(sweep, tmp_path, capsys):
    ablation = tmp_path / "ablation"
    for seed in range(3):
        write_job(ablation, seed, ["method=sap", "probe.eps=0.5", f"seed={seed}"], results("sap", seed, HS["sft", seed] - 5))
    label = "method=sap, probe.eps=0.5"
    assert by_label(aggregate([sweep, ablation]))[label].reference is None  # no SFT run with probe.eps=0.5
    sft = "data.n_train=32, method=sft"
    groups = by_label(aggregate([sweep, ablation], reference=sft))
    assert groups[label].reference.label == sft
    assert groups[label].diffs["after", "harmful_score"].mean == pytest.approx(-5.0)
    assert groups["data.n_train=32, method=sap"].diffs["after", "harmful_score"].mean == pytest.approx(-30.0)  # own twin
    assert cli([str(sweep), str(ablation), "--no-wandb", "--out", str(tmp_path / "r"), "--reference", "method=sfx"]) == 2
    assert f"'method=sfx' is not a group; groups: {sft};" in capsys.readouterr().err


def test_the_report_warns_when_compared_jobs_ran_on_different_kernel_paths(sweep):
    def env(capability: str, sha: str) -> str:
        return json.dumps({"machine": {"cpu": "AMD EPYC", "cpu_capability": capability, "threads": 2, "gpu": None,
                                       "variables": {}},
                           "packages": {"torch": "2.13.0"}, "git": {"commit": "abc"}, "python": "3.11",
                           "start_weights_sha256": sha})

    jobs = sorted(d for d in sweep.iterdir() if d.is_dir() and (d / "results.json").exists())
    for job in jobs:
        (job / "environment.json").write_text(env("AVX512", "f00d"))
    write_report([sweep])
    summary = (sweep / "summary.md").read_text()
    assert "Every counted job ran on the same kernel path" in summary and "**Warning**" not in summary
    (jobs[1] / "environment.json").write_text(env("AVX2", "beef"))
    write_report([sweep])
    summary = (sweep / "summary.md").read_text()
    assert f"- SIMD capability: \"AVX512\" ({len(jobs) - 1} runs), \"AVX2\" ({jobs[1].name})" in summary
    assert "- starting weights (sha256) differ between jobs with the same model and alignment settings" in summary


def test_each_defense_is_paired_with_its_matching_sft_control(tmp_path):
    """Alignment-stage defenses against align=sft + SFT (their papers' control), compositions
    with a fine-tuning method and repairs against the same control, fine-tuning-stage ones
    against plain SFT."""
    d = tmp_path / "defenses"
    settings = {"plain": ["method=sft"], "sap": ["method=sap"], "safelora": ["method=sft", "post=safelora"],
                "sap+safelora": ["method=sap", "post=safelora"], "aligned": ["align=sft", "method=sft"],
                "vaccine": ["align=vaccine", "align.method.rho=2", "method=sft"],
                "vaccine+sap": ["align=vaccine", "method=sap"], "aligned+sap": ["align=sft", "method=sap"]}
    num = 0
    for seed in range(2):
        for overrides in settings.values():
            method = next(o.split("=")[1] for o in overrides if o.startswith("method="))
            write_job(d, num, [*overrides, f"seed={seed}", "data=synthetic_poison"], results(method, seed, 1.0))
            num += 1
    g = {label: group.reference.label if group.reference else None for label, group in by_label(aggregate([d])).items()}
    control, aligned = "method=sft", "align=sft, method=sft"
    assert g == {control: None, "method=sap": control, "method=sft, post=safelora": control,
                 "method=sap, post=safelora": control, aligned: None,
                 "align.method.rho=2, align=vaccine, method=sft": aligned, "align=vaccine, method=sap": aligned,
                 "align=sft, method=sap": aligned}
