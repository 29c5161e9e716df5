"""The `logger` config group (W&B + CSV) and what every run records about itself."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import netrc
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from safeprobe.config import LoggerConfig

PACKAGES = ("safeprobe", "torch", "lightning", "transformers", "peft", "hydra-core", "omegaconf", "datasets",
            "wandb", "safetensors", "tokenizers", "numpy")


def git_commit(root: Path) -> dict:
    """git's answer in a checkout; in a Docker image, which holds no .git, the commit it was built
    from (--build-arg GIT_COMMIT, which the image sets as SAFEPROBE_GIT_COMMIT; dirty unknown)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        if commit := git("rev-parse", "HEAD"):
            # the uncommitted edits of tracked files, by hash: a sweep whose conf/ or code was edited
            # while it ran has jobs that differ here (reporting/environments.py flags them)
            diff = git("diff", "HEAD")
            return {"commit": commit, "dirty": bool(diff),
                    "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": os.environ.get("SAFEPROBE_GIT_COMMIT") or None, "dirty": None}


# variables that change which kernels run, and so the last bits of every number on a CPU
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE",
                    "OPENBLAS_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG", "CUDA_VISIBLE_DEVICES")


def machine() -> dict:
    """What decides the floating-point path on this machine: CPU model, the SIMD kernels torch
    picked, threads, and the variables that override them."""
    import torch

    model = None
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), None)
    except OSError:
        pass
    return {"cpu": model or platform.processor() or None, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "variables": {k: os.environ[k] for k in KERNEL_VARIABLES if k in os.environ}}


def weights_checksum(model, max_parameters: int = 500_000_000) -> str | None:
    """sha256 of the model's parameters and buffers, in name order (None above max_parameters:
    hashing a 7B model at every start would cost half a minute)."""
    import torch

    state = model.state_dict()
    if sum(t.numel() for t in state.values()) > max_parameters:
        return None
    digest = hashlib.sha256()
    with torch.no_grad():
        for name in sorted(state):
            digest.update(name.encode())
            digest.update(state[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def environment(root: Path) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"time": datetime.now(timezone.utc).isoformat(), "argv": sys.argv, "python": sys.version.split()[0],
            "platform": platform.platform(), "machine": machine(), "packages": versions, "git": git_commit(root)}


def wandb_mode(cfg_mode: str | None) -> str:
    """The configured mode, else WANDB_MODE, else online only when credentials exist."""
    if cfg_mode:
        return cfg_mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def make_loggers(cfg: LoggerConfig, run_dir: Path, config: dict, group: str | None, name: str | None,
                 resume_id: str | None = None) -> list[Logger]:
    """CSV and W&B loggers; `resume_id` continues that W&B run (a resumed run logs into the one it stopped)."""
    loggers: list[Logger] = []
    if cfg.csv.enabled:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=""))
    if cfg.wandb.enabled:
        resume = {"id": resume_id, "resume": "allow"} if resume_id else {}
        wandb_logger = WandbLogger(project=cfg.wandb.project, entity=cfg.wandb.entity, group=group, name=name,
                                   save_dir=str(run_dir), mode=wandb_mode(cfg.wandb.mode), config=config,
                                   tags=list(cfg.wandb.tags), job_type="train", **resume)
        _ = wandb_logger.experiment  # start the run now, so a job that fails early is recorded as failed
        loggers.append(wandb_logger)
    return loggers


def wandb_id(loggers: list[Logger]) -> str | None:
    return next((lg.experiment.id for lg in loggers if isinstance(lg, WandbLogger)), None)


def log_results(loggers: list[Logger], results: dict) -> None:
    """before/after metrics under slash-separated names, plus a W&B table of both."""
    flat = {f"{stage}/{k}": v for stage in ("before", "after") for k, v in (results.get(stage) or {}).items()}
    step = results.get("train", {}).get("steps", 0)
    for lg in loggers:
        lg.log_metrics(flat, step=step)
        if isinstance(lg, WandbLogger):
            after = results["after"]
            before = results.get("before") or {}
            lg.log_table("eval/before_after", columns=["metric", "before", "after"],
                         data=[[k, before.get(k), after[k]] for k in after])
            lg.experiment.summary.update(flat)
        lg.save()


def finish(loggers: list[Logger], failed: bool) -> None:
    """Close W&B runs (a failed job is marked failed) so the next job of a sweep starts clean."""
    for lg in loggers:
        if isinstance(lg, WandbLogger) and lg._experiment is not None:
            lg.experiment.finish(exit_code=1 if failed else 0)


def write_json(path: Path, obj: dict) -> None:
    """Written to a temporary file, then renamed: a reader (or a full disk, or a kill) never
    leaves a half-written or empty file behind, and a file already there survives a failure."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
