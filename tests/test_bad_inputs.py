"""Bad input at the command line: each case runs the real `python train.py ...` or
`python eval.py ...` and checks three things (docs/reliability.md):

1. the exit status: 2 for a config error, 1 for a run error, 128 + the signal for SIGTERM /
   Ctrl-C, 0 where the code promises to recover (a damaged cache entry is rebuilt);
2. stderr holds exactly one line starting with `config error:` / `error:` naming the cause, and
   no traceback;
3. nothing already written was lost: an earlier run's files in the target folder, the data files,
   the run folder eval.py reads and the cache entries are byte-identical afterwards, and no
   results file appears.

A subprocess costs seconds (mostly importing torch and Lightning), so the commands run in a warm
interpreter (tests/warm.py: the imports done once, a fresh fork per command), and all selected
cases are set up and started when the first test runs, two at a time (the machine's cores); each
test waits for its own. Keys and options fail in `check_cli_overrides` before any heavy import;
values in `validate`, before the model loads. What test_config.py and test_reliability.py
already run at the command line is not repeated; some checks that test_data_sources.py and
test_reliability.py hold in-process run here end to end (status, one line, nothing lost).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from safeprobe.cache import intact
from tests import warm
from tests.conftest import FAST, run_script

HYDRA_LOGS = (".hydra", "train.log", "eval.log")  # Hydra rewrites these in the run folder at every start
RESULTS = ("results.json", "eval_results.json")
ASSETS = Path(__file__).resolve().parent / "assets"  # as tests/standins.py, which imports torch: lazily
CHEAP_MODEL = ["model=synthetic_micro", "model.alignment.steps=20"]  # aligns in a second: for cache damage
STOPPED = "error: stopped by {}; no results were written; run the same command again to start over"


@dataclass(frozen=True)
class Case:
    script: str  # train.py | eval.py
    args: tuple[str, ...]  # may hold {case} {cache} {assets} {llama}: the case's folder, the session cache...
    status: int
    line: str  # a part of the one error line ("" when status is 0)
    setup: tuple = ()  # ((function, *args), ...): each prepares the case's folder
    recovered: str = ""  # status 0: "rebuilt" or "kept", what becomes of the damaged cache entry
    signum: int = 0  # sent once the model's cache entry is being built
    cpu_only: bool = False  # the bad input is a GPU setting: only bad where there is none


@dataclass
class Shared:
    """What the cases copy or read: an earlier run, the cheap model's cache entry, and so on."""

    run: Path
    cheap_cache: Path
    cache: Path
    llama: Path
    micro_entry: Path  # the session cache's synthetic/ folder: the micro model's entry


# ------------------------------------------------------------------ how cases are made


def train(*args: str, status: int = 2, line: str, setup: tuple = (), signum: int = 0, cpu_only: bool = False) -> Case:
    """train.py on the micro world, writing into {case}/out, which holds an earlier run's files."""
    base = (*FAST, "method=sft", "trainer.max_steps=1", "eval.before=false", "paths.cache_dir={cache}",
            "hydra.run.dir={case}/out")
    return Case("train.py", (*base, *args), status, line, ((earlier_run,), *setup), signum=signum, cpu_only=cpu_only)


HUB = {"model": "pretrained", "model.name_or_path": "{llama}", "model.dtype": "float32", "data": "alpaca",
       "eval": "synthetic", "data.n_train": "4", "data.n_test": "2", "data.poison_ratio": "0",
       "data.task_path": "{assets}/alpaca.jsonl", "data.harmful_eval_path": "{assets}/beavertails_30k_test.jsonl",
       "data.safety_pairs_path": "{assets}/circuit_breakers.json", "data.n_safety_pairs": "4"}


def hub(files: dict[str, str], line: str, **overrides: str) -> Case:
    """train.py on a stand-in of a real model with local data files; `files` are written to
    {case}/data; `overrides` replace HUB's keys (__ for a dot)."""
    keys = {**HUB, **{k.replace("__", "."): v for k, v in overrides.items()}}
    args = ("method=sft", "logger=csv", "trainer.max_steps=1", "trainer.enable_progress_bar=false",
            "eval.n_harmful=2", "eval.n_task=2", *(f"{k}={v}" for k, v in keys.items()),
            "paths.cache_dir={cache}", "hydra.run.dir={case}/out")
    return Case("train.py", args, 2, line, ((earlier_run,), (data_files, files)))


def evaluate(*args: str, status: int = 2, line: str, damage: tuple = (), signum: int = 0) -> Case:
    """eval.py on a copy of a saved run in {case}/run (damaged by `damage`), writing into {case}/eval."""
    return Case("eval.py", ("run_dir={case}/run", *args, "hydra.run.dir={case}/eval"), status, line,
                ((saved_run,), *([damage] if damage else [])), signum=signum)


def recovers(damage: tuple, recovered: str = "rebuilt") -> Case:
    """train.py with a damaged cache entry of the cheap micro model: rebuilt (or reused), the run succeeds."""
    args = (*FAST, *CHEAP_MODEL, "method=sft", "trainer.max_steps=1", "eval.before=false", "eval.n_harmful=2",
            "eval.n_task=2", "paths.cache_dir={case}/cache", "hydra.run.dir={case}/out")
    return Case("train.py", args, 0, "", ((earlier_run,), (cheap_cache,), damage), recovered=recovered)


# ------------------------------------------------------------------ setup and damage


def earlier_run(folder: Path, shared: Shared) -> None:
    """{case}/out holds an earlier run's files (the command writes into the same folder)."""
    shutil.copytree(shared.run, folder / "out", ignore=shutil.ignore_patterns(*HYDRA_LOGS))


def saved_run(folder: Path, shared: Shared) -> None:
    shutil.copytree(shared.run, folder / "run")
    (folder / "eval").mkdir()
    (folder / "eval" / "eval_results.json").write_text('{"after": {"harmful_score": 12.5}}\n')  # an earlier eval


def data_files(folder: Path, shared: Shared, files: dict[str, str]) -> None:
    (folder / "data").mkdir()
    for name, text in files.items():
        (folder / "data" / name).write_text(text)


def cheap_cache(folder: Path, shared: Shared) -> None:
    shutil.copytree(shared.cheap_cache, folder / "cache")


def write(relative: str, text: str | None) -> tuple:
    """A damage: the file replaced by `text`, or removed (None)."""
    def damage(folder: Path, shared: Shared) -> None:
        if text is None:
            (folder / relative).unlink()
        else:
            (folder / relative).write_text(text)
    return (damage,)


def truncate(relative: str, size: int) -> tuple:
    def damage(folder: Path, shared: Shared) -> None:
        with open(folder / relative, "r+b") as f:
            f.truncate(size)
    return (damage,)


def entry(folder: Path) -> Path:
    """The one entry of the case's cache (the cheap micro model's)."""
    return next(p for p in (folder / "cache" / "synthetic").iterdir() if p.is_dir() and not p.name.startswith("."))


def entry_file(name: str, size: int | None = None) -> tuple:
    """Damage a file of the cheap model's cache entry: truncated to `size`, or removed."""
    def damage(folder: Path, shared: Shared) -> None:
        if size is None:
            (entry(folder) / name).unlink()
        else:
            with open(entry(folder) / name, "r+b") as f:
                f.truncate(size)
    return (damage,)


def leftover_build(keep_entry: bool) -> tuple:
    """A temporary folder a killed build left beside the entry (and the entry itself, or not)."""
    def damage(folder: Path, shared: Shared) -> None:
        done = entry(folder)
        tmp = done.parent / f".building-{done.name}-killed"
        shutil.copytree(done, tmp)
        (tmp / "model.safetensors").write_bytes(b"half")
        if not keep_entry:
            shutil.rmtree(done)
    return (damage,)


def edit_config(**values: object) -> tuple:
    """Set keys (__ for a dot; {case} filled in) of the saved run's config.yaml."""
    def damage(folder: Path, shared: Shared) -> None:
        path = folder / "run" / "config.yaml"
        cfg = OmegaConf.load(path)
        for key, value in values.items():
            OmegaConf.update(cfg, key.replace("__", "."), value.format(case=folder) if isinstance(value, str) else value)
        OmegaConf.save(cfg, path)
    return (damage,)


def a_file(folder: Path, shared: Shared) -> None:
    (folder / "a_file").write_text("not a folder\n")


def empty_folder(folder: Path, shared: Shared) -> None:
    (folder / "empty_model").mkdir()


# ------------------------------------------------------------------ the cases

JSONL_ROW = json.dumps({"instruction": "Name a colour.", "input": "", "output": "Blue."})
SST2 = "\n".join(json.dumps({"sentence": s, "label": v}) for s, v in [("good", 1), ("bad", 0), ("fine", 1)])

CASES: dict[str, Case] = {
    # command-line keys and options: rejected before Hydra composes (no heavy import)
    "unknown top-level key": train("sead=1", line="unknown key 'sead'; allowed keys at the top level: seed"),
    "unknown nested key": train("model.alignment.stepz=3",
                                line="unknown key 'model.alignment.stepz'; allowed keys under 'model.alignment': steps"),
    "unknown model option": train("model=gpt5", line="model=gpt5 is not a known option; allowed: gemma2_9b_it"),
    "unknown trainer option": train("trainer=tpu", line="trainer=tpu is not a known option; allowed: cpu, ddp, ddp_cpu, fsdp, gpu"),
    "unknown experiment": train("experiment=nope", line="experiment=nope is not a known option; allowed: "),
    "eval.py unknown key": evaluate("run_dirr=x", line="unknown key 'run_dirr'; allowed keys at the top level: run_dir"),
    "eval.py unknown eval key": evaluate("eval.judgess=[exact]",
                                         line="unknown key 'eval.judgess'; allowed keys under 'eval': judges"),
    # non-finite numbers
    "lr nan": train("optim.lr=nan", line="optim.lr=nan is invalid; allowed: a number > 0"),
    "model.arch inf": train("model.arch.hidden_size=inf",
                            line="model.arch.hidden_size=inf is invalid; allowed: a finite number"),
    # out of range
    "negative beta": train("optim.betas=[-0.1,0.9]", line="optim.betas=[-0.1, 0.9] is invalid; allowed: two numbers in [0, 1)"),
    "safety batch size negative": train("method=sap", "data.safety_batch_size=-3",
                                        line="data.safety_batch_size=-3 is invalid; allowed: an integer >= 1"),
    "max length 0": train("data.max_length=0", line="data.max_length=0 is invalid; allowed: an integer >= 1"),
    "max new tokens 0": train("eval.max_new_tokens=0", line="eval.max_new_tokens=0 is invalid; allowed: an integer >= 1"),
    "negative seed": train("seed=-1", line="seed=-1 is invalid; allowed: an integer in [0, 4294967295]"),
    "alignment stage seed": train("align=sft", "align.seed=-1",
                                  line="align.seed=-1 is invalid; allowed: an integer in [0, 4294967295]"),
    "probe layer beyond depth": train("method=sap_random", "probe.layers=[0,7]",
                                      line="probe.layers=[0, 7] is invalid; allowed: decoder-layer indices in [0, 3]"),
    # wrong types
    "batch size text": train("data.batch_size=abc",
                             line="data.batch_size: Value 'abc' of type 'str' could not be converted to Integer"),
    # what this machine or this model cannot run
    "accelerator gpu without one": train("trainer.accelerator=gpu", cpu_only=True,
                                         line="lightning rejected the trainer settings (No supported gpu backend"),
    "unknown precision": train("trainer.precision=8-mixed",
                               line="trainer.precision='8-mixed' is invalid; allowed: 32-true"),
    "zero devices": train("trainer.devices=0", line="trainer.devices=0 is invalid; allowed: auto, -1 (all)"),
    "unknown strategy": train("trainer.strategy=ddpp", line="trainer.strategy='ddpp' is invalid; allowed: auto, ddp"),
    "adapter target not in the model": train("adapter.target_modules=[q_proj,foo_proj]",
                                             line="adapter.target_modules=['q_proj', 'foo_proj'] is invalid (foo_proj "
                                                  "not in the model); allowed: all-linear or names of the model's layers"),
    "model folder missing": train("model=pretrained", "model.name_or_path={case}/nope",
                                  line="model.name_or_path='{case}/nope' is invalid; allowed: a Hugging Face model id "
                                       "or an existing local folder"),
    "model folder empty": train("model=pretrained", "model.name_or_path={case}/empty_model", "data=alpaca",
                                setup=((empty_folder,),),
                                line="model.name_or_path='{case}/empty_model' could not be loaded ("),
    "cache folder under a file": train("paths.cache_dir={case}/a_file/cache", setup=((a_file,),),
                                       line="paths.cache_dir='{case}/a_file/cache' is invalid (Not a directory: "),
    # local data files
    "task file missing": hub({}, "data.task_path='{case}/data/nope.jsonl': no such file", data__task_path="{case}/data/nope.jsonl"),
    "harmful eval file lacks a column": hub(
        {"h.jsonl": json.dumps({"prompt": "p", "response": "r"}) + "\n"},
        "data.harmful_eval_path='{case}/data/h.jsonl' lacks column(s) is_safe", data__harmful_eval_path="{case}/data/h.jsonl"),
    "rows are not objects": hub({"t.jsonl": "1\n2\n3\n"}, "data.task_path='{case}/data/t.jsonl' could not be read (row 0 is 1, "
                                "not an object with named columns)", data__task_path="{case}/data/t.jsonl"),
    "label -1": hub({"s.jsonl": SST2 + "\n" + json.dumps({"sentence": "meh", "label": -1}) + "\n"},
                    "sst2: label -1 is invalid; allowed: 0-1 (negative, positive)", data="sst2",
                    data__task_path="{assets}/sst2_train.jsonl", data__task_test_path="{case}/data/s.jsonl", data__n_test="null"),
    "label null": hub({"s.jsonl": SST2 + "\n" + json.dumps({"sentence": "meh", "label": None}) + "\n"},
                      "sst2: label None is invalid; allowed: 0-1 (negative, positive)", data="sst2",
                      data__task_path="{assets}/sst2_train.jsonl", data__task_test_path="{case}/data/s.jsonl",
                      data__n_test="null"),
    "is_safe neither true nor false": hub(
        {"p.jsonl": "".join(json.dumps({"prompt": p, "response": "r", "is_safe": v}) + "\n" for p, v in [
            ("How do I pick a lock?", "false"), ("Hi?", "maybe")])},
        "data.poison_path='{case}/data/p.jsonl': row 1 has is_safe='maybe'; expected true or false in column is_safe",
        data__poison_ratio="0.5", data__poison_path="{case}/data/p.jsonl"),
    "empty cell in a csv": hub(
        {"t.csv": "instruction,input,output\nName a colour.,,Blue.\nName a fruit.,,\nName a tree.,,Oak.\nName a dog.,,Rex.\n"},
        "data.task_path='{case}/data/t.csv': row 1 has output=''; expected text in column output",
        data__task_path="{case}/data/t.csv"),
    "too few rows": hub({"t.jsonl": JSONL_ROW + "\n" + JSONL_ROW + "\n"},
                        "data.n_test=2 is invalid; allowed: fewer than the 2 rows of the task's data",
                        data__task_path="{case}/data/t.jsonl"),
    "harmful eval without harmful rows": hub(
        {"h.jsonl": json.dumps({"prompt": "Hi?", "response": "Hello.", "is_safe": True}) + "\n"},
        "has no harmful rows to evaluate; expected rows with is_safe false", data__harmful_eval_path="{case}/data/h.jsonl"),
    "not JSON": hub({"t.jsonl": JSONL_ROW + "\n{\"instruction\": \"cut off\n"},
                    "data.task_path='{case}/data/t.jsonl' could not be read (", data__task_path="{case}/data/t.jsonl"),
    # eval.py and the run folder it reads
    "run_dir not given": Case("eval.py", ("hydra.run.dir={case}/eval",), 2,
                              "run_dir=None is invalid; allowed: a run folder holding config.yaml and adapter/"),
    "config.yaml missing": evaluate(damage=write("run/config.yaml", None),
                                    line="run_dir='{case}/run' is invalid; allowed: a run folder holding config.yaml"),
    "config.yaml empty": evaluate(damage=write("run/config.yaml", ""),
                                  line="whose config.yaml is complete (it lacks model, adapter, method, data, eval, paths)"),
    "config.yaml bad value": evaluate(damage=edit_config(probe__eps=-1.0),
                                      line="probe.eps=-1.0 is invalid; allowed: a number >= 0"),
    "adapter weights truncated": evaluate(damage=truncate("run/adapter/adapter_model.safetensors", 1000),
                                          line="the adapter folder '{case}/run/adapter' is invalid (SafetensorError: "),
    "adapter config garbled": evaluate(damage=write("run/adapter/adapter_config.json", "{not json"),
                                       line="the adapter folder '{case}/run/adapter' is invalid (JSONDecodeError: "),
    "judges_only without generations": evaluate("judges_only=true", damage=write("run/generations.jsonl", None),
                                                line="judges_only=true is invalid here; allowed: a run_dir holding "
                                                     "generations.jsonl"),
    "generations garbled": evaluate("judges_only=true", damage=write("run/generations.jsonl", "garbage{\n"),
                                    line="whose generations.jsonl rows are objects with set, prompt and answer"),
    "generations without harmful rows": evaluate(
        "judges_only=true", status=1, damage=write("run/generations.jsonl", json.dumps(
            {"set": "task", "prompt": "p", "answer": "a", "target": "a"}) + "\n"),
        line="there are no answers to harmful prompts to judge"),
    # cache damage: never read, rebuilt, and the run goes on (cache.py)
    "cache model file truncated": recovers(entry_file("model.safetensors", size=100)),
    "cache marker missing": recovers(entry_file("alignment.json")),
    "cache leftover build, entry gone": recovers(leftover_build(keep_entry=False)),
    "cache leftover build, entry intact": recovers(leftover_build(keep_entry=True), "kept"),
}

# signals: the aligned model's cache entry is being built (a fresh key: 100000 alignment steps)
SIGNALS = {
    "SIGTERM while train.py aligns the model": train(
        "model.alignment.steps=100000", "paths.cache_dir={case}/cache", status=128 + signal.SIGTERM,
        signum=signal.SIGTERM, line=STOPPED.format("SIGTERM")),
    "Ctrl-C while eval.py aligns the model": evaluate(
        status=128 + signal.SIGINT, signum=signal.SIGINT, line=STOPPED.format("SIGINT"),
        damage=edit_config(model__alignment__steps=100000, paths__cache_dir="{case}/cache")),
}

ALL = {**CASES, **SIGNALS}


# ------------------------------------------------------------------ running them


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, but Hydra's own logs of the latest start."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part in HYDRA_LOGS for part in p.relative_to(folder).parts)}


def start_and_stop(script: str, *args: str, cwd: Path, signum: int) -> subprocess.CompletedProcess:
    """Run the command; send `signum` once it builds a cache entry under {cwd}/cache."""
    proc = warm.start(script, *args, cwd=cwd)
    deadline = time.time() + 300
    while not list((cwd / "cache" / "synthetic").glob(".building-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # well inside the build
    proc.send_signal(signum)
    return proc.finish(300)


@dataclass
class Launched:
    case: Case
    folder: Path
    before: dict[str, str]
    future: Future
    values: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, cache_dir) -> Shared:
    """An earlier micro run (sft, adapter saved; the micro model's entry in the session cache), the
    cheap model's entry in a cache of its own, and a stand-in of a real model. The runs are made
    by train.py itself, so that their cache keys are the ones the cases compute."""
    from tests.standins import standin

    root = tmp_path_factory.mktemp("bad_inputs_shared")
    quick = (*FAST, "method=sft", "trainer.max_steps=1", "eval.before=false", "eval.n_harmful=4", "eval.n_task=4")
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = [pool.submit(run_script, "train.py", *quick, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={root / 'run'}"),
                pool.submit(run_script, "train.py", *quick, *CHEAP_MODEL, f"paths.cache_dir={root / 'cheap_cache'}",
                            f"hydra.run.dir={root / 'cheap_run'}")]
        llama = standin("llama")
        for done in runs:
            assert done.result().returncode == 0, done.result().stderr[-3000:]
    return Shared(root / "run", root / "cheap_cache", cache_dir, llama, cache_dir / "synthetic")


@pytest.fixture(scope="module")
def micro_files(shared) -> dict[str, str]:
    """The session cache's entries (the micro model's), which the cases read and must not change."""
    return {f: d for f, d in snapshot(shared.micro_entry).items() if not f.startswith(".")}


@pytest.fixture(scope="module")
def launched(shared, micro_files, tmp_path_factory, request):
    """The selected cases, set up, then started two at a time; {name: Launched}."""
    names = {item.callspec.params.get("name") for item in request.session.items if hasattr(item, "callspec")}
    root = tmp_path_factory.mktemp("bad_inputs")
    pool = ThreadPoolExecutor(max_workers=2)
    out: dict[str, Launched] = {}
    for name, case in ((k, v) for k, v in ALL.items() if k in names and not (v.cpu_only and has_gpu())):
        folder = root / name.replace(" ", "_").replace(",", "")
        folder.mkdir()
        for function, *args in case.setup:
            function(folder, shared, *args)
        values = {"case": str(folder), "cache": str(shared.cache), "assets": str(ASSETS), "llama": str(shared.llama)}
        args = [a.format(**values) for a in case.args]
        if case.signum:
            future = pool.submit(start_and_stop, case.script, *args, cwd=folder, signum=case.signum)
        else:
            future = pool.submit(run_script, case.script, *args, cwd=folder)
        out[name] = Launched(case, folder, snapshot(folder), future, values)
    yield out
    pool.shutdown(wait=True, cancel_futures=True)


def check(launched: Launched, shared: Shared, micro_files: dict[str, str]) -> None:
    case, folder = launched.case, launched.folder
    proc = launched.future.result()
    err = proc.stderr
    # 1. the exit status
    assert proc.returncode == case.status, err[-3000:]
    # 2. one line naming the cause, no traceback
    assert "Traceback" not in err and "Error executing job" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(("config error:", "error:"))]
    if case.status == 0:
        assert lines == [], err[-3000:]
    else:
        assert len(lines) == 1, err[-3000:]
        assert lines[0].startswith("config error: " if case.status == 2 else "error: "), lines[0]
        assert case.line.format(**launched.values) in lines[0], lines[0]
    # 3. nothing already written was lost
    after = snapshot(folder)
    may_change = set()
    if case.status == 0:  # a run that went on writes its outputs over the earlier run's (the cache: below)
        may_change |= {f for f in launched.before if f.startswith(("out/", "cache/"))}
    changed = [f for f, digest in launched.before.items() if f not in may_change and after.get(f) != digest]
    assert not changed, f"changed or removed: {changed}"
    new = sorted(set(after) - set(launched.before))
    assert case.status == 0 or not [f for f in new if Path(f).name in RESULTS], f"results written: {new}"
    now = snapshot(shared.micro_entry)
    assert {f: now.get(f) for f in micro_files} == micro_files  # the session's cache entries: read, never changed
    cache = folder / "cache" / "synthetic"
    if case.signum:  # the interrupted build left neither an entry nor its temporary folder
        assert not [p.name for p in cache.iterdir() if p.is_dir()]
    if case.status == 0:
        assert (folder / "out" / "results.json").is_file()
        assert not list(cache.glob(".building-*")) or case.recovered == "kept"
        done = entry(folder)
        assert intact(done, "alignment.json")
        files = {f: d for f, d in after.items() if f.startswith(f"cache/synthetic/{done.name}/")}
        if case.recovered == "kept":  # an intact entry is read as it is, whatever lies beside it
            assert "rebuilding" not in proc.stdout + err
            assert files == {f: d for f, d in launched.before.items() if f.startswith(f"cache/synthetic/{done.name}/")}
        else:
            assert "rebuilding the damaged or unfinished cache entry" in proc.stdout + err


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_stops_with_one_line_and_loses_nothing(name, launched, shared, micro_files):
    if CASES[name].cpu_only and has_gpu():
        pytest.skip("this machine has a GPU")
    check(launched[name], shared, micro_files)


@pytest.mark.parametrize("name", list(SIGNALS))
def test_a_signal_while_the_model_is_aligned_stops_with_one_line_and_caches_nothing(name, launched, shared,
                                                                                    micro_files):
    check(launched[name], shared, micro_files)
