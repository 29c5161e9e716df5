"""Resume a killed fine-tuning run: checkpoints, and a replay of the data up to them.

A checkpoint (`checkpoint.pt` in the run folder, written to a temporary file and renamed)
holds what the next step depends on: the trainable weights, the optimizer's state, the
method's own state (`FineTuneModule.resume_state`: SAP's faithful probe and its optimizer,
Lisa's anchors and clock, sap_random's generator), the state of every random-number
generator, the step, and the evaluation before fine-tuning. It is written every
`checkpoint_every` steps and, whatever that setting, when SIGTERM or Ctrl-C arrives during
fine-tuning: the run stops at the end of the step it is in (a second signal stops it at once).

The data position is not stored. Every loader is seeded, so the resumed run replays its
data streams from the start, passing over the batches before the checkpoint without
computing on them (collation only), and so sees exactly the batches, dropout masks and
state the uninterrupted run had: its results.json metrics are the same (tests/test_resume.py).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger

from safeprobe import distributed
from safeprobe.cli import Interrupted, hold_signals, pending_stop
from safeprobe.config import RunError

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable(module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.model.named_parameters() if p.requires_grad}


def save(path: Path, module, trainer: L.Trainer, extra: dict) -> None:
    state = {"step": trainer.global_step, "weights": {n: p.detach().cpu() for n, p in trainable(module).items()},
             "optimizer": trainer.optimizers[0].state_dict(), "method": module.resume_state(), "rng": rng_state(),
             "loss": float(trainer.callback_metrics.get("train/loss", float("nan"))), **extra}  # the last step's
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # our own file, in the run's folder
    except Exception as e:  # truncated or garbled: pickle's, zip's and torch's errors
        raise RunError(f"the checkpoint {path} cannot be read ({type(e).__name__}); delete it to start the run over, "
                       "or run without resume=true") from None


def check_start(checkpoint: dict, start_weights_sha256: str | None, out: Path) -> None:
    """A run resumes from the starting model it began with, bit for bit (a cache rebuilt on
    another machine may differ in its last bits, and so would every step after it)."""
    if checkpoint.get("start_weights_sha256") != start_weights_sha256:
        raise RunError(f"the starting model differs from the one the run in {out} began with (weights sha256 "
                       f"{start_weights_sha256} vs {checkpoint.get('start_weights_sha256')}); resuming would mix "
                       "two runs: start over without resume=true")


class Replay:
    """A resumed run's first `step` batches: each is passed over untrained, the step counter
    advanced as if trained on; the checkpoint's state is put in place at the first and the
    random generators at the last, so the next batch trains exactly as it did."""

    def __init__(self, checkpoint: dict):
        self.checkpoint, self.step, self.done = checkpoint, checkpoint["step"], 0

    def skip(self, module) -> None:
        if self.done == 0:
            self._restore(module)
        self.done += 1
        progress = module.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress  # = global_step
        progress.increment_ready()
        progress.increment_completed()
        if self.done == self.step:
            set_rng_state(self.checkpoint["rng"])
            module.replay = None

    def _restore(self, module) -> None:
        ck = self.checkpoint
        if module.reads_initial_model:
            with module.initial_model():  # full fine-tuning keeps a copy of the start: take it before loading
                pass
        params = trainable(module)
        if set(params) != set(ck["weights"]):
            raise RunError("the checkpoint's weights do not match this model's trainable weights; delete "
                           "checkpoint.pt to start the run over")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(ck["weights"][name])
        module.trainer.optimizers[0].load_state_dict(ck["optimizer"])
        module.load_resume_state(ck["method"])


class Checkpoints(L.Callback):
    """Saves a checkpoint every `every` steps (0: never) and at a requested stop (SIGTERM,
    Ctrl-C), then ends the run there. `extra` is stored with it (the evaluation before)."""

    def __init__(self, path: Path, every: int, extra: dict, resumed: dict | None = None, saving: bool = True):
        self.path, self.every, self.extra = path, every, extra
        self.saving = saving  # False under a sharded strategy (FSDP): no process holds the whole weights
        self.seconds = resumed["seconds"] if resumed else 0.0  # training time before the resume
        self.saved_step = resumed["step"] if resumed else None
        self.start = time.perf_counter()

    def on_train_start(self, trainer, module) -> None:
        self.start = time.perf_counter()
        hold_signals()  # ours, not Lightning's (cli.hold_signals); several ranks then stop together (on_train_batch_end)

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self.start

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        signum = pending_stop()
        if trainer.world_size > 1:  # several processes stop after the same step: any one's signal stops all
            signum = int(distributed.maximum(torch.tensor(signum or 0, device=module.device))) or None
        if module.replay is None and trainer.is_global_zero and self.saving:  # rank 0 alone writes
            step = trainer.global_step
            if signum is not None or (self.every and step % self.every == 0 and step != trainer.max_steps):
                save(self.path, module, trainer, {**self.extra, "seconds": self.elapsed()})
                self.saved_step = step
        if signum is not None:
            raise Interrupted(signum)


def carry_csv_rows(loggers, step: int) -> None:
    """The CSV log of a resumed run: the rows logged before the checkpoint are kept, those a
    killed run wrote after it are dropped (the resumed run logs them again). Lightning's CSV
    logger deletes the file when it opens it, so the rows are read first and logged again."""
    for lg in loggers:
        path = Path(lg.log_dir) / "metrics.csv"
        if isinstance(lg, CSVLogger) and path.is_file():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) < step]
            for row in rows:
                lg.experiment.log_metrics({k: float(v) for k, v in row.items() if v and k != "step"}, int(row["step"]))


IGNORED = ("resume", "checkpoint_every", "objective")  # may differ between a run and its resumption (objective: what a sweeper reads back)


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in _flat(child, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def previous_run(out: Path, cfg) -> tuple[dict | None, dict | None]:
    """resume=true: (results, None) when the run in `out` has finished, (None, checkpoint) to
    continue it, (None, None) to start it (a sweep job that never began). Its settings must
    be the ones it ran with, bookkeeping aside (paths, loggers, progress bar)."""
    from omegaconf import OmegaConf

    from safeprobe.config import BOOKKEEPING, ConfigError

    saved_file = out / "config.yaml"
    if not saved_file.is_file():
        log.warning("resume=true: %s holds no run; starting it from the beginning", out)
        return None, None
    saved = _flat(OmegaConf.to_container(OmegaConf.load(saved_file)))
    now = _flat(OmegaConf.to_container(cfg, resolve=True))
    for key in sorted(set(saved) | set(now)):
        if key not in IGNORED and not key.startswith(BOOKKEEPING) and saved.get(key, "-") != now.get(key, "-"):
            raise ConfigError(f"resume=true is invalid with {key}={now.get(key, '(unset)')}; allowed: the settings "
                              f"the run in {out} started with ({key}={saved.get(key, '(unset)')})")
    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text()), None
    if not (out / CHECKPOINT).is_file():
        log.warning("resume=true: %s has no checkpoint (the run stopped before its first); starting from the "
                    "beginning", out)
        return None, None
    return None, load(out / CHECKPOINT)
