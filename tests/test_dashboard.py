"""W&B dashboards (reporting/dashboard.py) built offline for fabricated sweep folders: the panels,
the metrics they plot, the grouping (swept keys minus seed), the run filter (the sweep's W&B
group), the command line; nothing may reach the network, and nothing is saved."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml

from safeprobe.reporting import dashboard
from safeprobe.reporting.wandb_summary import sweep_group
from tests.test_reporting import HS, write_job

wr = pytest.importorskip("wandb_workspaces.reports.v2")
ws = pytest.importorskip("wandb_workspaces.workspaces")

SAP_KEYS = ["sap/probe_norm", "sap/safety_loss", "sap/cos_update_unsafe"]
AFTER = ["after/harmful_score", "after/refusal_rate", "after/unusable_rate", "after/fine_tune_accuracy"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Offline, no key, and any connection attempt fails the test."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(wr.Report, "save", lambda self, *a, **k: refuse("Report.save"))
    monkeypatch.setattr(ws.Workspace, "save", lambda self, *a, **k: refuse("Workspace.save"))


def results(method: str, seed: int, hs: float) -> dict:
    after = {"harmful_score": hs, "refusal_rate": 100 - hs, "unusable_rate": 1.0, "refusal_margin": -hs / 10,
             "fine_tune_accuracy": 100 - hs / 2, "test_loss": hs / 100}
    return {"method": method, "seed": seed, "run_dir": "x", "before": dict(after, harmful_score=2.0), "after": after,
            "train": {"seconds": 1.5, "steps": 2, "final_loss": 0.3, "dropped_examples": 0}}


def job(sweep: Path, num: int, overrides: list[str], config: dict, csv_keys: list[str] | None = None,
        hydra: dict | None = None, hs: float = 10.0) -> Path:
    """A job folder with its resolved config.yaml (what W&B logged), CSV log header and hydra.yaml."""
    method = config["method"]["name"]
    seed = next(int(o.split("=")[1]) for o in overrides if o.startswith("seed="))
    path = write_job(sweep, num, overrides, results(method, seed, hs))
    (path / "config.yaml").write_text(yaml.safe_dump({**config, "seed": seed}))
    if csv_keys is not None:
        (path / "csv").mkdir()
        (path / "csv" / "metrics.csv").write_text(",".join(["epoch", "step", "train/loss", *csv_keys]) + "\n")
    if hydra is not None:
        (path / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": hydra}))
    return path


def base_config(method: str, **extra) -> dict:
    return {"method": {"name": method, "lr": 1e-3}, "probe": {"eps": 0.2, "layers": [2, 3]},
            "data": {"task": "instruct", "n_train": 32}, "align": {"method": None}, "post": {"name": None},
            "logger": {"wandb": {"enabled": True, "project": "proj-x", "entity": None}}, **extra}


@pytest.fixture
def sweep(tmp_path) -> Path:
    """method=sft,sap x seed=0,1,2 as Hydra leaves it: default (interpolated) sweep.dir, SAP's CSV keys."""
    d = tmp_path / "multirun" / "2025-01-01" / "12-00-00-000000"
    num = 0
    for seed in range(3):
        for method in ("sft", "sap"):
            out = d / f"{num}_x"  # hydra.yaml's output_dir: the resolved path the job ran in
            job(d, num, [f"method={method}", f"seed={seed}", "data.n_train=32"], base_config(method),
                csv_keys=[*AFTER, *(SAP_KEYS if method == "sap" else [])],
                hydra={"mode": "MULTIRUN", "sweep": {"dir": "${paths.root_dir}/multirun/${now:%Y-%m-%d}"},
                       "runtime": {"output_dir": str(out)}}, hs=HS[method, seed])
            num += 1
    return d


def test_plan_reads_groups_keys_and_diagnostics(sweep):
    p = dashboard.plan([sweep])
    assert p.groups == [sweep_group(sweep)]  # the folder above the jobs' output_dir, as the jobs saw it
    assert p.swept == {"method": ["method.name"]}  # a config group's choice -> its name leaf
    assert p.groupby == ["config.method.name"]  # swept keys minus seed
    assert p.project == "proj-x" and p.entity is None  # the jobs' logger.wandb
    assert p.bar_metrics == AFTER
    assert p.curves == ["train/loss"]
    assert p.diagnostics == {"sap": SAP_KEYS}
    assert p.parallel_config == ["method.name"]
    assert "after/harmful_score" in p.parallel_metrics and "after/fine_tune_accuracy" in p.parallel_metrics
    assert str(sweep) in p.description and "`method=sft`" in p.description  # the control
    assert "seeds 0, 1, 2" in p.description and "3 seed(s)" in p.description
    assert "| method=sap |" in p.statistics.replace("`", "")  # summary.md's table


def _panels(grid: dict) -> list[dict]:
    return grid["metadata"]["panelBankSectionConfig"]["panels"]


def test_report_spec_panels_grouping_and_filter(sweep):
    p = dashboard.plan([sweep])
    report = dashboard.build(p, "report")
    assert isinstance(report, wr.Report)
    out = dashboard.spec(report)
    assert out["displayName"] == f"safeprobe sweep {sweep.name}" and out["project"]["name"] == "proj-x"
    blocks = out["spec"]["blocks"]
    grids = [b for b in blocks if b["type"] == "panel-grid"]
    markdown = [b["content"] for b in blocks if b["type"] == "markdown-block"]
    assert str(sweep) in markdown[0] and "summary.md" in markdown[0]
    assert "Paired differences vs SFT" in markdown[-1]

    kinds = {}
    for grid in grids:
        (runset,) = grid["metadata"]["runSets"]
        filters = {(f["key"]["name"], f["op"], json.dumps(f["value"])) for f in runset["filters"]["filters"]}
        assert filters == {("group", "=", json.dumps(sweep_group(sweep))), ("jobType", "=", '"train"'),
                           ("state", "=", '"finished"')}
        for panel in _panels(grid):
            kinds.setdefault(panel["viewType"], []).append((panel["config"], runset["grouping"]))

    bars = kinds["Bar Chart"]
    assert [c["metrics"] for c, _ in bars] == [[m] for m in AFTER]
    for config, grouping in bars:  # mean over seeds, error bar = std, grouped by the swept keys
        assert (config["groupAgg"], config["groupArea"], config["aggregate"]) == ("mean", "stddev", True)
        assert grouping == [{"section": "config", "name": "method.value.name"}]
    lines = {tuple(c["metrics"]): (c, g) for c, g in kinds["Run History Line Plot"]}
    assert set(lines) == {("train/loss",), *((k,) for k in SAP_KEYS)}
    for config, grouping in lines.values():
        assert config["xAxis"] == "trainer/global_step" and config["groupArea"] == "stddev"
        assert grouping == [{"section": "config", "name": "method.value.name"}]
    ((parallel, grouping),) = kinds["Parallel Coordinates Plot"]
    assert grouping == []  # one line per run
    accessors = [c["accessor"] for c in parallel["columns"]]
    assert accessors[0] == "config:method.value.name"
    assert "summary:after/harmful_score" in accessors and "summary:after/fine_tune_accuracy" in accessors
    headings = [b["children"][0]["text"] for b in blocks if b["type"] == "heading"]
    assert "SAP diagnostics" in headings and "Training curves" in headings


def test_workspace_spec(sweep):
    p = dashboard.plan([sweep], project="other", entity="team", error_bars="minmax")
    view = dashboard.build(p, "workspace")
    assert isinstance(view, ws.Workspace)
    out = dashboard.spec(view)
    assert (out["entity"], out["project"]) == ("team", "other")
    (runset,) = out["spec"]["section"]["runSets"]
    assert runset["grouping"] == [{"section": "config", "name": "method.value.name"}]
    assert {f["key"]["name"]: f["value"] for f in runset["filters"]["filters"]}["group"] == sweep_group(sweep)
    sections = {s["name"]: s["panels"] for s in out["spec"]["section"]["panelBankConfig"]["sections"]}
    assert [pl["viewType"] for pl in sections["What this sweep was"]] == ["Markdown Panel"]
    assert {pl["config"]["groupArea"] for pl in sections["Metrics after fine-tuning (mean and spread over seeds)"]} \
        == {"minmax"}
    assert [pl["config"]["metrics"] for pl in sections["SAP diagnostics"]] == [[k] for k in SAP_KEYS]


def test_config_group_choices_literal_sweep_dir_and_one_setting(tmp_path):
    # data=... (no name leaf: told apart by data.task), align=none/sft (align.method.name), probe.eps;
    # a literal, relative hydra.sweep.dir is the group as written (with characters the filter
    # parser of wandb_workspaces would otherwise rewrite)
    d = tmp_path / "sweep"
    hydra = {"mode": "MULTIRUN", "sweep": {"dir": "multirun/stages/eps=0.1<'x'>"}}
    num = 0
    for data, task in (("a", "instruct"), ("b", "classify")):
        for align in ("none", "sft"):
            for seed in (0, 1):
                cfg = base_config("sft", data={"task": task, "n_train": 32, "batch_size": 16},
                                  align={"method": None} if align == "none" else {"method": {"name": "sft"}, "steps": 5})
                job(d, num, [f"data={data}", f"align={align}", "probe.eps=0.1", f"seed={seed}"], cfg, hydra=hydra)
                num += 1
    p = dashboard.plan([d])
    assert p.groups == ["multirun_stages_eps=0.1<'x'>"]
    grid = next(b for b in dashboard.spec(dashboard.build(p, "report"))["spec"]["blocks"] if b["type"] == "panel-grid")
    assert grid["metadata"]["runSets"][0]["filters"]["filters"][0] == {
        "key": {"section": "run", "name": "group"}, "op": "=", "value": "multirun_stages_eps=0.1<'x'>", "disabled": False}
    assert p.swept == {"align": ["align.method.name"], "data": ["data.task"]}
    assert p.groupby == ["config.align.method.name", "config.data.task"]
    assert p.diagnostics == {}  # no CSV log and no SAP job

    one = tmp_path / "one"  # one setting, seeds only: grouped by the run's W&B group
    for seed in (0, 1):
        job(one, seed, ["method=sft", f"seed={seed}"], base_config("sft"))
    p = dashboard.plan([one], groups=["g1", "g2"])
    assert p.swept == {} and p.groupby == ["group"] and p.groups == ["g1", "g2"]
    out = dashboard.spec(dashboard.build(p, "workspace"))
    assert out["spec"]["section"]["runSets"][0]["grouping"] == [{"section": "run", "name": "group"}]
    assert out["spec"]["section"]["runSets"][0]["filters"]["filters"][0]["value"] == ["g1", "g2"]  # merged sweeps
    report = dashboard.spec(dashboard.build(p, "report"))
    grid = next(b for b in report["spec"]["blocks"] if b["type"] == "panel-grid")
    assert grid["metadata"]["runSets"][0]["grouping"] == [{"section": "run", "name": "group"}]


def test_cli_dry_run_offline_and_errors(sweep, tmp_path, capsys):
    out = tmp_path / "dash.json"
    assert dashboard.main([str(sweep), "--dry-run", str(out), "--kind", "workspace"]) == 0
    written = json.loads(out.read_text())
    assert written["kind"] == "workspace" and written["plan"]["groupby"] == ["config.method.name"]
    assert written["spec"]["spec"]["section"]["runSets"][0]["grouping"][0]["name"] == "method.value.name"

    # no --dry-run while W&B is offline: nothing saved, the spec is left in the sweep folder
    assert dashboard.main([str(sweep)]) == dashboard.NOT_UPLOADED
    assert json.loads((sweep / "dashboard_report.json").read_text())["kind"] == "report"
    assert "not uploaded" in capsys.readouterr().err

    assert dashboard.main([str(tmp_path / "absent")]) == 2
    (tmp_path / "empty").mkdir()
    assert dashboard.main([str(tmp_path / "empty")]) == 1
    assert dashboard.main([str(sweep), "--reference", "method=nope", "--dry-run", str(out)]) == 2


def test_publish_binds_runsets_and_saves(sweep, monkeypatch, capsys):
    saved = []
    monkeypatch.setattr(wr.Report, "save", lambda self, *a, **k: saved.append(self) or self)
    monkeypatch.setattr(wr.Report, "url", property(lambda self: "https://wandb.example/report"))
    monkeypatch.setattr(dashboard, "online", lambda: True)
    assert dashboard.main([str(sweep), "--entity", "team"]) == 0
    (report,) = saved
    assert report.entity == "team" and report.project == "proj-x"
    runsets = [rs for b in report.blocks for rs in getattr(b, "runsets", [])]
    assert runsets and all((rs.entity, rs.project) == ("team", "proj-x") for rs in runsets)
    assert "https://wandb.example/report" in capsys.readouterr().out


def test_single_runs_have_no_group(tmp_path):
    d = tmp_path / "outputs"
    job(d, 0, ["method=sft", "seed=0"], base_config("sft"), hydra={"mode": "RUN", "sweep": {"dir": "x"}})
    with pytest.raises(dashboard.DashboardError, match="outside a multirun"):
        dashboard.plan([d])
    assert dashboard.main([str(d), "--dry-run", str(tmp_path / "o.json")]) == 2
