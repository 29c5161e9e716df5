"""Several processes (DDP on CPU, gloo): a 2-process run equals a 1-process run at the same
global batch, for every method, and one process evaluates and writes (docs/distributed.md).

Equality: tests/ddp_worker.py trains each method for 3 steps on the micro world, once as one
process with batch B and once as two processes with batch B/2 each (Lightning's ddp strategy).
Every step's gradient (after DDP's averaging and each method's pooling) must agree to
TOLERANCE relative (L2 norm of the difference over the norm), and so must the loss; the
weights' update after 3 AdamW steps to UPDATE_TOLERANCE. The two runs see the same global
batches (each rank its slice) and compute the same sums in another order and other shapes (each
rank pads its slice to its own length): float32 rounding, measured 2e-7 to 6e-6 on gradients
(Vaccine's, normalized by a norm over all rows, the largest). AdamW divides by the root of its
second moment, and its first moment cancels where a weight's gradients change sign: the update
differs more, measured 3e-7 to 3e-5. What pooling prevents is far larger: a statistic left per
rank (the code before pooling) gives 1e-2 (per-rank token means with unequal counts) to 1.2
(Vaccine's per-rank norm; SAP's per-rank direction 0.5). So TOLERANCE = 1e-4 (15x the largest
rounding, 100x below the smallest real difference) and UPDATE_TOLERANCE = 1e-3 (30x, 10x).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from safeprobe.config import PROJECT_ROOT
from tests.conftest import FAST

TOLERANCE = 1e-4
UPDATE_TOLERANCE = 1e-3
STEPS = 3
GLOBAL = {"data.batch_size": 8, "data.safety_batch_size": 4, "align.batch_size": 8}  # one process's batches
BASE = ["model=synthetic_micro", "cpu_kernels=native", f"trainer.max_steps={STEPS}", "data.n_train=32",
        "trainer.log_every_n_steps=1", "logger=none"]
CASES = {
    "sft": ["method=sft"],
    "sft uneven": ["method=sft", "data.n_train=19"],  # the 3rd global batch: 3 rows, 2 on rank 0 and 1 on rank 1
    "sap": ["method=sap", "probe.refresh_every=1"],  # a new direction and probe every step
    # the probe reads the global batch's first 6 rows: 4 on rank 0, 2 on rank 1
    "sap probe_examples": ["method=sap", "probe.refresh_every=1", "probe.probe_examples=6"],
    "sap faithful": ["method=sap", "probe.mode=faithful"],
    "sap_random": ["method=sap_random"],
    "lisa": ["method=lisa", "method.align_steps=1", "method.finetune_steps=1"],  # both states
    "ldifs": ["method=ldifs", "method.rho=1.0"],  # a penalty that weighs
    "csft": ["method=csft"],
    # half the rows refusals, shorter than task answers: the ranks hold different token counts
    "safeinstr": ["method=safeinstr", "method.share=0.5"],
    "safeinstr joint": ["method=safeinstr", "method.mode=joint"],
    # the alignment-stage defenses, trained as the stage trains them
    "vaccine": ["align=vaccine", f"align.steps={STEPS}"],
    "booster": ["align=booster", f"align.steps={STEPS}"],
    "repnoise": ["align=repnoise", f"align.steps={STEPS}", "align.method.beta=1.0"],  # the MMD term weighs
}


DDP_RUN = [*FAST, "data.batch_size=4", "data.safety_batch_size=2"]  # per process: the global batch of FAST
WRITTEN = {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "adapter/README.md",
           "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.yaml", "csv/metrics.csv",
           "environment.json", "generations.jsonl", "results.json", "train.log"}


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


RUN = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "method=sap", *DDP_RUN]  # the documented command


@pytest.fixture(scope="module")
def launched(cache_dir, tmp_path_factory):
    """Started before the equality runs, waited for by the tests that read them: a DDP run, a
    DDP sweep of two jobs, and the same DDP run stopped by SIGTERM once its first checkpoint
    is saved, then resumed (one after the other, in a thread)."""
    root = tmp_path_factory.mktemp("launched")

    def start(name, *args, session=False):  # output to files: a full pipe would stall the run until read
        with open(root / f"{name}.out", "w") as out, open(root / f"{name}.err", "w") as err:
            return subprocess.Popen([sys.executable, str(PROJECT_ROOT / "train.py"), *args], cwd=PROJECT_ROOT,
                                    env=os.environ.copy(), stdout=out, stderr=err, start_new_session=session)

    def stop_and_resume():
        folder = root / "resumed"
        stopped = start("stopped", *RUN, "checkpoint_every=1", f"hydra.run.dir={folder}", session=True)
        while stopped.poll() is None and not (folder / "checkpoint.pt").exists():
            time.sleep(0.05)
        if stopped.poll() is None:
            os.killpg(stopped.pid, signal.SIGTERM)  # rank 0 and the rank it started, as Ctrl-C or SLURM would
        stopped.wait(timeout=600)
        resumed = start("resumed", *RUN, "checkpoint_every=1", f"hydra.run.dir={folder}", "resume=true")
        resumed.wait(timeout=600)
        return stopped, resumed

    procs = {"run": start("run", *RUN, f"hydra.run.dir={root / 'run'}"),
             "sweep": start("sweep", "-m", "trainer=ddp_cpu", "seed=0,1", "method=sft", *DDP_RUN, "eval.before=false",
                            f"paths.root_dir={root / 'sweep'}", "hydra.callbacks.sweep_report.wandb=false")}
    pool = ThreadPoolExecutor(1)
    yield root, procs, pool.submit(stop_and_resume)
    pool.shutdown()


def finished(launched, which: str) -> tuple[Path, subprocess.Popen, str, str]:
    root, procs, _ = launched
    procs[which].wait(timeout=600)
    return root, procs[which], (root / f"{which}.out").read_text(), (root / f"{which}.err").read_text()


def case_args(devices: int) -> list[str]:
    def per_device(overrides):
        return [f"{k}={v // devices}" for k, v in GLOBAL.items() if not k.startswith("align.")
                or any(o.startswith("align=") for o in overrides)]

    return [f"{name.replace(' ', '_')}=" + ",".join([*BASE, *per_device(o), *o]) for name, o in CASES.items()]


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def runs(cache_dir, tmp_path_factory, launched):
    """Every case as one process (here) and as two (one launch of the worker for all)."""
    from tests import ddp_worker

    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    start = time.perf_counter()
    worker = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "tests" / "ddp_worker.py"), str(two), "2",
                               *case_args(2)], cwd=PROJECT_ROOT, env=os.environ.copy(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    ddp_worker.main([str(one), "1", *case_args(1)])
    log, _ = worker.communicate(timeout=600)
    assert worker.returncode == 0, log[-3000:]
    print(f"\n{len(CASES)} methods, one and two processes: {time.perf_counter() - start:.0f} s")
    return one, two


def test_every_fine_tuning_method_is_covered():
    from safeprobe.methods import METHODS

    covered = {o.split("=")[1] for overrides in CASES.values() for o in overrides if o.startswith(("method=", "align="))}
    assert covered == set(METHODS)


@pytest.mark.parametrize("case", CASES)
def test_two_processes_equal_one_at_the_same_global_batch(runs, case):
    import torch

    one, two = (torch.load(folder / f"{case.replace(' ', '_')}.pt") for folder in runs)
    assert torch.equal(one["start"], two["start"]) and len(one["grads"]) == len(two["grads"]) == STEPS
    grads = max(relative(b, a) for a, b in zip(one["grads"], two["grads"]))
    update = relative(two["end"] - two["start"], one["end"] - one["start"])
    losses = max(abs(a - b) / abs(a) for a, b in zip(one["losses"], two["losses"]))
    print(f"{case:<22} gradient {grads:.1e}  update {update:.1e}  loss {losses:.1e}")
    assert grads < TOLERANCE and losses < TOLERANCE and update < UPDATE_TOLERANCE


# ------------------------------------------------------------- one process evaluates and writes
def test_a_ddp_run_is_evaluated_and_written_once(launched):
    root, proc, out, err = finished(launched, "run")
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and out.count("sap (seed 0)") == 1  # one results table
    assert files(root / "run") == WRITTEN  # no job_error.txt, no rank 1 log file
    results = json.loads((root / "run" / "results.json").read_text())
    assert results["train"]["steps"] == 2 and results["before"] is not None
    assert json.loads((root / "run" / "environment.json").read_text())["argv"][1] == "trainer=ddp"


def test_a_ddp_sweep_runs_each_job_once_in_its_own_folder(launched):
    root, proc, out, err = finished(launched, "sweep")
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and out.count("sft (seed ") == 2
    sweeps = list((root / "sweep" / "multirun").glob("*/*"))
    assert len(sweeps) == 1  # no second sweep folder from a rank > 0
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [j.name[:2] for j in jobs] == ["0_", "1_"]
    for job in jobs:
        assert files(job) == WRITTEN
        assert json.loads((job / "results.json").read_text())["run_dir"] == str(job)


def test_a_ddp_run_stopped_by_sigterm_resumes_to_the_uninterrupted_result(launched):
    root, proc, _, _ = finished(launched, "run")
    stopped, resumed = launched[2].result(timeout=900)
    lines = [line for line in (root / "stopped.err").read_text().splitlines() if line.startswith("error:")]
    assert stopped.returncode == 128 + signal.SIGTERM and len(lines) == 1, (root / "stopped.err").read_text()[-3000:]
    assert "checkpoint saved at step " in lines[0] and "resume=true" in lines[0]
    assert resumed.returncode == 0, (root / "resumed.err").read_text()[-3000:]

    def results(run):
        r = json.loads((root / run / "results.json").read_text())
        del r["run_dir"], r["train"]["seconds"], r["train"]["resumed_from_step"]
        return r

    assert json.loads((root / "resumed" / "results.json").read_text())["train"]["resumed_from_step"] >= 1
    assert results("resumed") == results("run") and files(root / "resumed") == WRITTEN
    weights = "adapter/adapter_model.safetensors"
    assert (root / "resumed" / weights).read_bytes() == (root / "run" / weights).read_bytes()


def test_a_rank_above_0_joins_the_fit_and_writes_nothing(make_cfg, micro, tmp_path, monkeypatch):
    """What a rank Lightning starts does: the same starting model and data, its fit, nothing else."""
    import lightning as L

    from safeprobe import pipeline
    from safeprobe.methods.sap import SAPModule

    fits = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(pipeline, "evaluate", lambda *a, **k: pytest.fail("a rank > 0 evaluated"))
    monkeypatch.setattr(L.Trainer, "fit", lambda self, module, datamodule: fits.append((module, datamodule)))
    assert pipeline.run(make_cfg("trainer=ddp_cpu", "method=sap", out=tmp_path / "run")) is None
    assert not (tmp_path / "run").exists()
    [(module, data)] = fits
    assert isinstance(module, SAPModule) and data.streams == ("task", "safety")


# --------------------------------------------------------------------------- trainer settings


def test_trainer_settings_compose_and_are_checked(make_cfg, micro, tmp_path):
    import lightning as L

    from safeprobe.config import ConfigError, validate
    from safeprobe.distributed import trainer_kwargs
    from safeprobe.models.factory import load_base

    for name in ("ddp", "ddp_cpu", "fsdp"):
        validate(make_cfg(f"trainer={name}"))
    args = trainer_kwargs(validate(make_cfg("trainer=ddp_cpu", "trainer.timeout_minutes=5")).trainer)
    assert args["strategy"]._timeout.total_seconds() == 300 and not args["use_distributed_sampler"]
    node = "trainer.strategy={_target_:lightning.pytorch.strategies.DDPStrategy,find_unused_parameters:true}"
    args = trainer_kwargs(validate(make_cfg("trainer=ddp_cpu", node, "trainer.timeout_minutes=5")).trainer)
    assert args["strategy"]._ddp_kwargs == {"find_unused_parameters": True} and args["strategy"]._timeout.seconds == 300
    L.Trainer(**args)  # Lightning takes it
    bad = {"trainer.accumulate_grad_batches=4": "trainer.accumulate_grad_batches=4 is invalid; allowed: 1 (every method",
           "trainer.timeout_minutes=5": "trainer.timeout_minutes=5.0 is invalid; allowed: null with this strategy",
           "trainer.strategy={_target_:torch.nn.Linear}": "trainer.strategy._target_='torch.nn.Linear' is invalid"}
    for override, line in bad.items():
        with pytest.raises(ConfigError, match=re.escape(line)):
            validate(make_cfg("trainer=cpu" if "timeout" in override else "trainer=ddp_cpu", override))
    # FSDP: every decoder layer its own unit, checkpointed; a GPU to run (here: one line before any work)
    c = validate(make_cfg("trainer=fsdp", "adapter=full", "method=sft"))
    strategy = trainer_kwargs(c.trainer, load_base(c.model, c.paths.cache_dir).model)["strategy"]
    layer = {m.__name__ for m in strategy.kwargs["auto_wrap_policy"]._module_classes}
    assert layer == {"LlamaDecoderLayer"} and strategy._state_dict_type == "full"
    assert strategy._activation_checkpointing_kwargs
    from safeprobe.pipeline import run

    with pytest.raises(ConfigError, match="method=sap is invalid with a sharded trainer.strategy"):
        run(make_cfg("trainer=fsdp", "adapter=full", "method=sap", out=tmp_path / "sap"))
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="lightning rejected the trainer settings"):
            run(make_cfg("trainer=fsdp", "trainer.accelerator=cpu", "adapter=full", "method=sft", out=tmp_path / "f"))
        assert not (tmp_path / "f" / "config.yaml").exists()
