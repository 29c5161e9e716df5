"""Shared fixtures: a tiny synthetic world aligned once per session, offline everything."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

# one thread per process: the tiny models here gain nothing from more, and the sweep tests
# run two processes at once on a 2-core machine
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
                  WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from safeprobe.config import CONF_DIR, PROJECT_ROOT  # noqa: E402

# The test process computes on the native kernel path (cpu_kernels=auto then stays native in
# it); runs in subprocesses are told to, so their numbers compare with in-process ones.
# tests/test_reproducibility.py covers the portable path.
torch.backends.cpu.get_cpu_capability()

# small and fast: the micro world, a few steps, a few eval prompts, CSV logging only
FAST = ["model=synthetic_micro", "logger=csv", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1", "data.n_train=32", "data.batch_size=8", "data.safety_batch_size=4",
        "eval.n_harmful=8", "eval.n_task=8", "eval.max_new_tokens=20", "cpu_kernels=native"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cache")
    os.environ["SAFEPROBE_CACHE"] = str(d)  # for subprocesses (train.py / eval.py)
    return d


@pytest.fixture
def make_cfg(cache_dir, tmp_path):
    """Compose conf/train.yaml as `python train.py <overrides>` would, writing under tmp_path."""
    def make(*overrides: str, fast: bool = True, out: Path | None = None) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=[*(FAST if fast else []), f"paths.output_dir={out or tmp_path / 'run'}",
                                               f"paths.cache_dir={cache_dir}", *overrides])

    return make


@pytest.fixture(scope="session")
def micro(cache_dir):
    """The aligned micro base model (built on first use), its tokenizer and world."""
    from safeprobe.config import ModelConfig, validate

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["model=synthetic_micro", "paths.output_dir=unused", f"paths.cache_dir={cache_dir}"])
    c = validate(cfg)
    assert isinstance(c.model, ModelConfig)
    return c


def run_script(script: str, *args: str, cwd: Path = PROJECT_ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python <script> <args>` in `cwd`, its output captured (train.py / eval.py: in a warm interpreter, tests/warm.py)."""
    from tests import warm

    return warm.start(script, *args, cwd=cwd).finish(timeout)
