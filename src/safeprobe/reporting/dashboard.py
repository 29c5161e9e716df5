"""`python -m safeprobe.reporting.dashboard <sweep_dir> [...]`: a W&B report or saved workspace for a sweep.

Built with W&B's own report/workspace API (`wandb_workspaces`, extra `dashboards`), filtered to
the sweep's runs (their W&B group, job type `train`, state `finished`) and grouped by the swept
keys (every override but `seed`), so that W&B averages each group's seeds and draws the spread:

- bar charts of the metrics after fine-tuning (harmful score, refusals, unusable answers,
  fine-tune accuracy): one bar per setting, mean over seeds, error bar = std over seeds
  (`--error-bars`);
- `train/loss` against the optimizer step, one line per setting with its band over seeds;
- the methods' own diagnostics (SAP's `sap/probe_norm`, `sap/safety_loss`,
  `sap/cos_update_unsafe`, ...), read from the jobs' CSV logs;
- a parallel-coordinates view, one line per run, over the swept config keys and the main metrics;
- what the sweep was (folders, group, swept keys, seeds, the control) and summary.md's tables.

`--dry-run OUT.json` builds everything and writes the spec W&B would store, without any network;
otherwise the report (`--kind report`) or workspace view (`--kind workspace`) is saved to
`--entity/--project` when W&B is online (logged in), and its URL printed.

The sweep folder is read with the sweep report's own code (`aggregate`), so the groups, seeds and
control are those of summary.md. Panels name metrics as the runs log them (`tracking.log_results`,
the methods' `self.log`) and config keys as W&B stores the resolved config (`pipeline.run`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from safeprobe.reporting.aggregate import Group, Summary, aggregate
from safeprobe.reporting.jobs import Job, override_key, unreadable_sweep_dirs
from safeprobe.reporting.tables import TITLES, markdown
from safeprobe.reporting.wandb_summary import sweep_group

log = logging.getLogger(__name__)

BAR_METRICS = ("harmful_score", "refusal_rate", "unusable_rate", "fine_tune_accuracy")
PARALLEL_METRICS = ("harmful_score", "refusal_rate", "fine_tune_accuracy", "refusal_margin")
STEP = "trainer/global_step"  # the x axis Lightning's WandbLogger defines for every logged metric
CURVES = ("train/loss",)
# what a method logs besides train/loss, for sweeps whose jobs left no CSV log to read the keys from
KNOWN_DIAGNOSTICS = {"sap": ("sap/probe_norm", "sap/safety_loss", "sap/cos_update_unsafe"),
                     "sap_random": ("sap/probe_norm",)}
NOT_DIAGNOSTICS = ("train", "before", "after", "val", "trainer", "epoch", "step")
# the config key that names a config group's choice, when no job's config.yaml can tell
CHOICE_KEYS = {"method": "method.name", "post": "post.name", "align": "align.method.name"}
ERROR_BARS = ("stddev", "stderr", "minmax")
KINDS = ("report", "workspace")
NOT_UPLOADED = 3  # exit status: built, but W&B is offline


class DashboardError(Exception):
    """A sweep folder or option the dashboard cannot be built from (exit status 2)."""


@dataclass
class Plan:
    """What the dashboard shows, read from the sweep folder(s); independent of wandb_workspaces."""

    sweep_dirs: list[str]
    title: str
    project: str
    entity: str | None
    groups: list[str]  # the W&B groups the sweep's runs were logged under
    swept: dict[str, list[str]]  # override key -> the W&B config key(s) that tell its values apart
    groupby: list[str]  # W&B config keys (or the run attribute "group") the runs are grouped by
    bar_metrics: list[str]
    curves: list[str]
    diagnostics: dict[str, list[str]]  # prefix (sap, booster, ...) -> logged keys
    parallel_config: list[str]
    parallel_metrics: list[str]
    error_bars: str
    description: str  # markdown: what the sweep was
    statistics: str  # markdown: summary.md
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ reading the sweep folder
def _load_yaml(path: Path) -> object:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def job_config(job: Job) -> dict:
    """The resolved config a job logged to W&B (config.yaml), else Hydra's copy."""
    for path in (job.path / "config.yaml", job.path / ".hydra" / "config.yaml"):
        data = _load_yaml(path)
        if isinstance(data, dict):
            return data
    return {}


_MISSING = object()


def _get(cfg: object, dotted: str) -> object:
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return _MISSING
        cfg = cfg[part]
    return cfg


def _leaves(value: object, prefix: str) -> dict[str, object]:
    """dotted path -> value of every non-dict under `value` (lists are leaves, as W&B keeps them)."""
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    out = {}
    for k, v in value.items():
        out.update(_leaves(v, f"{prefix}.{k}"))
    return out


def _choice(job: Job, key: str) -> str | None:
    return next((s.split("=", 1)[1] for s in job.settings if override_key(s) == key and "=" in s), None)


def _separating(leaves: list[dict[str, object]], target: int, skip: list[str]) -> list[str]:
    """The fewest leaf paths, `name` leaves first, then the shallowest, that split `leaves` into
    `target` parts (the paths under a separately swept key in `skip` left out)."""
    def parts(chosen: list[str]) -> int:
        return len({tuple(json.dumps(lv.get(p), sort_keys=True, default=str) for p in chosen) for lv in leaves})

    paths = sorted({p for lv in leaves for p in lv if not any(p == k or p.startswith(k + ".") for k in skip)},
                   key=lambda p: (p.rsplit(".", 1)[-1] != "name", p.count("."), p))
    chosen: list[str] = []
    for path in paths:
        if parts(chosen) >= target:
            break
        if parts([*chosen, path]) > parts(chosen):
            chosen.append(path)
    return chosen


def config_keys(summary: Summary) -> dict[str, list[str]]:
    """Each swept override key -> the W&B config key(s) that tell its values apart.

    A plain value (`probe.eps=0.1`) is its own key. A config group's choice (`method=sap`,
    `data=sst2`, `align=sft`) is a whole sub-config in what the run logged: it is told apart by
    the fewest of its leaves that split the jobs as the choice does, `name` leaves first
    (`method.name`, `align.method.name`), then the shallowest."""
    jobs = [j for j in summary.jobs if j.used]
    configs = {id(j): job_config(j) for j in jobs}
    out: dict[str, list[str]] = {}
    for key in summary.varying:
        found = [(j, v) for j in jobs if (v := _get(configs[id(j)], key)) is not _MISSING]
        if not found:
            out[key] = [CHOICE_KEYS.get(key, key)]
        elif not any(isinstance(v, dict) for _, v in found):
            out[key] = [key]
        else:
            others = [k for k in summary.varying if k != key and k.startswith(key + ".")]  # swept on their own
            chosen = _separating([_leaves(v, key) for _, v in found], len({_choice(j, key) for j, _ in found}), others)
            out[key] = chosen or [CHOICE_KEYS.get(key, key)]
    return out


def logged_groups(summary: Summary) -> list[str]:
    """The W&B groups the jobs' runs used (`pipeline._hydra_job`): Hydra's sweep.dir as the job
    saw it, with `/` replaced by `_`. Read from each job's .hydra/hydra.yaml: a literal sweep.dir
    as written (it may be relative), an interpolated one (the default) as resolved, i.e. the
    folder above the job's output_dir. Jobs without it: the sweep folder's absolute path."""
    groups, single = [], []
    for job in summary.jobs:
        hydra = _load_yaml(job.path / ".hydra" / "hydra.yaml")
        hydra = hydra.get("hydra") if isinstance(hydra, dict) else None
        if _get(hydra, "mode") == "RUN":  # a single run (train.py without -m) has no W&B group
            single.append(job.path.name)
            continue
        sweep_dir = _get(hydra, "sweep.dir")
        output_dir = _get(hydra, "runtime.output_dir")
        if isinstance(sweep_dir, str) and "${" not in sweep_dir:
            group = sweep_group(sweep_dir)
        elif isinstance(output_dir, str):
            group = sweep_group(Path(output_dir).parent)
        else:
            owner = next((d for d in summary.sweep_dirs if job.path.absolute().is_relative_to(d.absolute())),
                         summary.sweep_dirs[0])
            group = sweep_group(owner.absolute())
        if group not in groups:
            groups.append(group)
    if single and not groups:
        raise DashboardError("the jobs ran outside a multirun (train.py without -m): their W&B runs have no group "
                             "to find them by; filter them in the W&B app instead")
    if single:
        log.warning("not shown (single runs, without a W&B group): %s", ", ".join(single))
    return groups


def diagnostics(summary: Summary) -> dict[str, list[str]]:
    """The keys the methods logged besides the train loss and metrics: read from the jobs' CSV
    logs (csv/metrics.csv: the same keys as W&B), else what the sweep's methods are known to log."""
    keys: list[str] = []
    for job in summary.jobs:
        if not job.used:
            continue
        try:
            with (job.path / "csv" / "metrics.csv").open() as f:
                header = f.readline().strip().split(",")
        except OSError:
            header = list(KNOWN_DIAGNOSTICS.get(job.method or "", ()))
        keys += [k for k in header if "/" in k and k.split("/", 1)[0] not in NOT_DIAGNOSTICS and k not in keys]
    out: dict[str, list[str]] = {}
    for k in keys:
        out.setdefault(k.split("/", 1)[0], []).append(k)
    return out


def _controls(summary: Summary) -> list[Group]:
    seen: dict[int, Group] = {}
    for g in summary.groups:
        if g.reference is not None:
            seen.setdefault(id(g.reference), g.reference)
    return list(seen.values())


def _logger_setting(summary: Summary, name: str) -> str | None:
    """logger.wandb.<name> when every job that says agrees."""
    values = {v for j in summary.jobs if j.used and (v := _get(job_config(j), f"logger.wandb.{name}")) is not _MISSING}
    return values.pop() if len(values) == 1 and isinstance(next(iter(values)), str) else None


def _describe(summary: Summary, groups: list[str], swept: dict[str, list[str]], groupby: list[str],
              error_bars: str, warnings: list[str]) -> str:
    counted = sum(j.used for j in summary.jobs)
    seeds = sorted({len(g.seeds) for g in summary.groups})
    controls = _controls(summary)
    spread = {"stddev": "the standard deviation over seeds", "stderr": "the standard error of the mean over seeds",
              "minmax": "the lowest and highest seed"}[error_bars]
    lines = ["**Sweep folder(s):** " + ", ".join(f"`{d}`" for d in summary.sweep_dirs),
             "", "**W&B group(s) of its runs:** " + ", ".join(f"`{g}`" for g in groups),
             "", f"**Jobs:** {len(summary.jobs)} found, {counted} counted, {len(summary.problems)} failed, "
             "missing or not counted (listed in summary.md).",
             "", "**Swept keys** (W&B config key): " + (", ".join(
                 f"`{k}` ({', '.join(f'`{p}`' for p in v)})" for k, v in swept.items()) or "none (one setting)"),
             "", "**Shared settings:** " + (", ".join(f"`{s}`" for s in summary.common) or "none"),
             "", f"**Groups:** {len(summary.groups)}, each with " + "/".join(map(str, seeds)) + " seed(s): "
             + "; ".join(f"`{g.label}` (seeds {', '.join(map(str, g.seeds)) or '-'})" for g in summary.groups),
             "", "**Control:** " + ("; ".join(f"`{g.label}`" for g in controls) + " (plain SFT fine-tuning; the "
                                    "paired differences in summary.md are against it)" if controls else "none in this sweep"),
             "", f"**How to read the panels:** runs are grouped by {', '.join(f'`{k}`' for k in groupby)}; a bar is "
             f"the mean of a group's seeds after fine-tuning and its error bar {spread}; a line is the mean of the "
             "group's runs at each step, its band the same spread. The 95% intervals and paired differences against "
             "the control are in the sweep's `summary.md` (copied into this dashboard) and in the `summary` run "
             "of the same W&B group (tables `summary/table`, `summary/jobs`)."]
    if warnings:
        lines += ["", "**Warnings:**", "", *(f"- {w}" for w in warnings)]
    return "\n".join(lines)


def plan(sweep_dirs: list[Path | str], project: str | None = None, entity: str | None = None,
         groups: list[str] | None = None, reference: str | None = None, error_bars: str = "stddev",
         title: str | None = None) -> Plan:
    """Read the sweep folder(s) and decide every panel (no W&B call)."""
    if error_bars not in ERROR_BARS:
        raise DashboardError(f"error_bars={error_bars!r}; allowed: {', '.join(ERROR_BARS)}")
    dirs = [Path(d) for d in sweep_dirs]
    try:
        summary = aggregate(dirs, reference)
    except ValueError as e:
        raise DashboardError(str(e)) from e
    if not summary.groups:
        raise DashboardError("no job with results under " + ", ".join(map(str, dirs)))
    swept = config_keys(summary)
    groupby = [f"config.{p}" for paths in swept.values() for p in paths]
    # one setting: group by the sweep's W&B group, so the seeds still average into one bar
    groupby = list(dict.fromkeys(groupby)) or ["group"]
    groups = groups or logged_groups(summary)
    found = {m for g in summary.groups for (stage, m) in g.stats if stage == "after"}
    warnings = []
    if all(_get(job_config(j), "logger.wandb.enabled") is False for j in summary.jobs if j.used):
        warnings.append("the jobs ran with W&B off (logger=csv or logger=none): they have no W&B runs to show")
    missing = [f"`{g.label}` ({len(g.seeds)})" for g in summary.groups if len(g.seeds) < 2]
    if missing:
        warnings.append("groups with fewer than two seeds have no error bar: " + ", ".join(missing))
    name = " + ".join(d.name for d in dirs)
    return Plan(
        sweep_dirs=[str(d) for d in dirs],
        title=(title or f"safeprobe sweep {name}")[:128],
        project=project or _logger_setting(summary, "project") or "safeprobe",
        entity=entity or _logger_setting(summary, "entity"),
        groups=groups, swept=swept, groupby=groupby,
        bar_metrics=[f"after/{m}" for m in BAR_METRICS if m in found],
        curves=list(CURVES),
        diagnostics=diagnostics(summary),
        parallel_config=[g[len("config."):] for g in groupby if g.startswith("config.")],
        parallel_metrics=[f"after/{m}" for m in PARALLEL_METRICS if m in found],
        error_bars=error_bars,
        description=_describe(summary, groups, swept, groupby, error_bars, warnings),
        statistics=markdown(summary).removeprefix("# Sweep summary\n").strip(),
        warnings=warnings,
    )


# ------------------------------------------------------------------ building with wandb_workspaces
def _api():
    """wandb_workspaces' report and workspace modules and its filter expressions."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
        from wandb_workspaces import expr
    except ImportError as e:
        raise DashboardError("W&B dashboards need the wandb-workspaces package: pip install -e '.[dashboards]'") from e
    return wr, ws, expr


def _literal(value: str) -> str:
    """A Python string literal for wandb_workspaces' filter parser, with `=`, `<`, `>`, quotes and
    backslashes escaped: the parser rewrites `=` to `==` (and `<` to `<=`) even inside quoted
    values, and quotes values unescaped, so a group such as `multirun_eps=0.1` would be mangled."""
    return "'" + "".join(f"\\x{ord(c):02x}" if c in "=<>'\"\\" else c for c in value) + "'"


def run_filters(p: Plan) -> str:
    """The sweep's runs: its W&B group(s), training jobs (not the summary run), finished."""
    group = (f"Metric('Group') == {_literal(p.groups[0])}" if len(p.groups) == 1
             else f"Metric('Group') in [{', '.join(map(_literal, p.groups))}]")
    return f"{group} and Metric('JobType') == 'train' and Metric('State') == 'finished'"


def _title(metric: str) -> str:
    stage, name = metric.split("/", 1)
    return f"{TITLES.get(name, name)} {'after fine-tuning' if stage == 'after' else stage}"


def _layout(panels: list, width: int, height: int) -> list:
    """Left to right on W&B's 24-column grid."""
    wr, _, _ = _api()
    per_row = max(1, 24 // width)
    for i, panel in enumerate(panels):
        panel.layout = wr.Layout(x=(i % per_row) * width, y=(i // per_row) * height, w=width, h=height)
    return panels


def panels(p: Plan) -> dict[str, list]:
    """Section title -> its panels (shared by the report and the workspace)."""
    wr, _, _ = _api()
    agg = {"groupby_aggfunc": "mean", "groupby_rangefunc": p.error_bars, "aggregate": True}
    out = {"Metrics after fine-tuning (mean and spread over seeds)": _layout(
        [wr.BarPlot(title=_title(m), metrics=[m], title_x=TITLES.get(m.split("/", 1)[1]), **agg) for m in p.bar_metrics],
        8, 8)}
    out["Training curves"] = _layout(
        [wr.LinePlot(title=f"{c} (mean and spread over seeds)", x=STEP, y=[c], title_x="optimizer step", **agg)
         for c in p.curves], 24, 8)
    for prefix, keys in p.diagnostics.items():
        name = "SAP" if prefix == "sap" else prefix
        out[f"{name} diagnostics"] = _layout([wr.LinePlot(title=k, x=STEP, y=[k], title_x="optimizer step", **agg)
                                              for k in keys], 12, 8)
    columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k), display_name=k) for k in p.parallel_config]
    columns += [wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(m), display_name=m) for m in p.parallel_metrics]
    out["Swept settings against the metrics"] = _layout(
        [wr.ParallelCoordinatesPlot(title="swept keys and metrics after fine-tuning", columns=columns)], 24, 10)
    return {k: v for k, v in out.items() if v}


def build_report(p: Plan):
    """A wandb_workspaces Report (not saved). Each panel grid's run set is the sweep's runs,
    grouped by the swept keys, except the parallel coordinates' (one line per run)."""
    wr, _, _ = _api()
    filters = run_filters(p)
    blocks = [wr.H1("What this sweep was"), wr.MarkdownBlock(text=p.description)]
    for section, items in panels(p).items():
        per_run = isinstance(items[0], wr.ParallelCoordinatesPlot)
        runset = wr.Runset(name="runs" if per_run else "groups", filters=filters,
                           groupby=[] if per_run else list(p.groupby))
        blocks += [wr.H2(section), wr.PanelGrid(runsets=[runset], panels=items)]
    blocks += [wr.H1("Statistics over seeds (summary.md)"), wr.MarkdownBlock(text=p.statistics)]
    return wr.Report(project=p.project, entity=p.entity or "", title=p.title,
                     description="Sweep " + ", ".join(p.sweep_dirs) + ": metrics, curves and diagnostics over seeds",
                     blocks=blocks, width="fluid")


def _groupby_metric(key: str):
    _, _, expr = _api()
    return expr.Config(key[len("config."):]) if key.startswith("config.") else expr.Metric(key.capitalize())


def build_workspace(p: Plan):
    """A wandb_workspaces saved Workspace view (not saved): the same panels in sections, one
    run set for all (grouped by the swept keys), and the sweep's description as a markdown panel."""
    wr, ws, _ = _api()
    sections = [ws.Section(name="What this sweep was", is_open=True, pinned=True,
                           panels=_layout([wr.MarkdownPanel(markdown=p.description + "\n\n" + p.statistics)], 24, 14))]
    sections += [ws.Section(name=name, panels=items, is_open=True) for name, items in panels(p).items()]
    return ws.Workspace(entity=p.entity or "", project=p.project, name=p.title, sections=sections,
                        settings=ws.WorkspaceSettings(x_axis=STEP),
                        runset_settings=ws.RunsetSettings(filters=run_filters(p),
                                                          groupby=[_groupby_metric(k) for k in p.groupby]))


def build(p: Plan, kind: str):
    if kind not in KINDS:
        raise DashboardError(f"kind={kind!r}; allowed: {', '.join(KINDS)}")
    return build_report(p) if kind == "report" else build_workspace(p)


def spec(obj) -> dict:
    """What W&B would store for the report or view (its JSON), built offline. The report's run
    sets carry no project here (looking its id up needs the server); `publish` binds them."""
    return json.loads(obj._to_model().model_dump_json(by_alias=True, exclude_none=True))


def dry_run(p: Plan, kind: str, path: Path) -> dict:
    """Build the report or workspace and write {kind, plan, spec} to `path` as JSON."""
    out = {"kind": kind, "plan": asdict(p), "spec": spec(build(p, kind))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out


def online() -> bool:
    from safeprobe.tracking import wandb_mode

    return wandb_mode(None) == "online"


def publish(obj, p: Plan) -> str:
    """Save the report or view to W&B and return its URL (needs a login)."""
    wr, _, _ = _api()
    entity = p.entity
    if not entity:
        import wandb

        entity = wandb.Api().default_entity
    obj.entity = entity
    if isinstance(obj, wr.Report):
        for block in obj.blocks:
            for runset in getattr(block, "runsets", []):
                runset.entity, runset.project = entity, p.project
    obj.save()
    return obj.url


# ------------------------------------------------------------------ command line
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    a = argparse.ArgumentParser(prog="python -m safeprobe.reporting.dashboard", description=__doc__.split("\n")[0])
    a.add_argument("sweep_dirs", nargs="+", type=Path, help="multirun folder(s), e.g. multirun/2025-01-01/12-00-00-000000")
    a.add_argument("--kind", choices=KINDS, default="report", help="a W&B report (default) or a saved workspace view")
    a.add_argument("--project", default=None, help="W&B project (default: the jobs' logger.wandb.project, else safeprobe)")
    a.add_argument("--entity", default=None, help="W&B entity (default: the jobs' logger.wandb.entity, else your default)")
    a.add_argument("--group", action="append", default=None,
                   help="W&B group of the runs (repeatable; default: read from the jobs' .hydra/hydra.yaml)")
    a.add_argument("--reference", default=None, help="label of the control group, as for python -m safeprobe.reporting")
    a.add_argument("--error-bars", choices=ERROR_BARS, default="stddev", help="spread over seeds (default: stddev)")
    a.add_argument("--title", default=None, help="title (default: safeprobe sweep <folder name>)")
    a.add_argument("--dry-run", type=Path, default=None, metavar="OUT.json",
                   help="build it without any network and write its spec here instead of saving it")
    return a.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if status := unreadable_sweep_dirs(args.sweep_dirs):
        return status
    try:
        p = plan(args.sweep_dirs, args.project, args.entity, args.group, args.reference, args.error_bars, args.title)
        for w in p.warnings:
            log.warning("%s", w)
        if args.dry_run is not None:
            dry_run(p, args.kind, args.dry_run)
            print(f"{args.kind} built, not uploaded (dry run): {args.dry_run}")
            return 0
        obj = build(p, args.kind)
        if not online():
            out = Path(args.sweep_dirs[0]) / f"dashboard_{args.kind}.json"
            dry_run(p, args.kind, out)
            print(f"not uploaded: W&B is offline (no login, or WANDB_MODE); the {args.kind} spec is in {out}. "
                  "Run `wandb login`, then this command again.", file=sys.stderr)
            return NOT_UPLOADED
        print(f"{args.kind} saved: {publish(obj, p)}")
    except DashboardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
