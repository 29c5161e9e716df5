"""The stages of a run around fine-tuning:

    starting model -> [alignment stage] -> fine-tuning (the method) -> [post-fine-tuning step]

The alignment stage (conf/align) is the provider re-aligning the model before the user
fine-tunes it, as the Vaccine / Booster / Lisa line of work does: a registered method
(`align.method`, e.g. sft, the plain control) trains a LoRA (the `adapter` settings; full
weights with adapter=full) on the alignment stream as its task, and the LoRA is merged into
the weights ("double LoRA": fine-tuning then trains a fresh one). The result is cached
(cache.py) under a key of everything that produced it — the model config, the stage config,
the adapter, the alignment data and formatting, and STAGE_VERSION — so every sweep job that
needs it reuses it, and any change to those makes a new one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import lightning as L

from safeprobe.cache import cached
from safeprobe.config import TrainConfig, to_plain
from safeprobe.data.datamodule import SafetyDataModule, Splits
from safeprobe.models.factory import Base, apply_adapter, load_adapter, save_adapter

log = logging.getLogger(__name__)
STAGE_VERSION = 1  # bump when this code changes what a stage produces


def stage_config(c: TrainConfig) -> TrainConfig:
    """The run's config as the alignment stage sees it: its method, steps, learning rate, batch
    size and seed; everything else (model, adapter, data formatting, trainer) is the run's."""
    a = c.align
    return dataclasses.replace(
        c, method=a.method, seed=a.seed, optim=dataclasses.replace(c.optim, lr=a.lr),
        data=dataclasses.replace(c.data, batch_size=a.batch_size),
        trainer=dataclasses.replace(c.trainer, max_steps=a.steps, max_epochs=-1, enable_progress_bar=False))


def _data_hash(splits: Splits, fmt) -> str:
    rows = [(e.prompt, e.response) for e in splits.alignment + splits.harmful]
    return hashlib.sha256(json.dumps([fmt.style, fmt.system_prompt, rows]).encode()).hexdigest()


def alignment_spec(c: TrainConfig, splits: Splits, fmt) -> dict:
    data = {k: getattr(c.data, k) for k in ("alignment_set", "n_alignment", "alignment_batch_size", "max_length",
                                             "safety_max_length", "prompt_format", "system_prompt", "shuffle_seed")}
    return {"version": STAGE_VERSION, "model": to_plain(c.model), "align": to_plain(c.align),
            "adapter": to_plain(c.adapter), "optim": to_plain(stage_config(c).optim), "data": data,
            "examples": _data_hash(splits, fmt), "precision": c.trainer.precision}


def _train_stage(base: Base, c: TrainConfig, splits: Splits, fmt, folder: Path) -> dict:
    from safeprobe.methods import build_method, method_spec

    s = stage_config(c)
    module_cls = method_spec(s.method.name).module
    L.seed_everything(s.seed, workers=True)
    model = apply_adapter(copy.deepcopy(base.model), s.adapter)
    model.train()
    data = SafetyDataModule(s.data, splits, base.tokenizer, fmt, s.seed, streams=module_cls.data_streams(s),
                            task_examples=splits.alignment)
    trainer = L.Trainer(**{**to_plain(s.trainer), "devices": 1, "num_nodes": 1, "strategy": "auto"}, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(folder))
    start = time.perf_counter()
    log.info("alignment stage: %s for %d steps on %d alignment examples...", s.method.name, s.align.steps,
             len(splits.alignment))
    trainer.fit(build_method(model, s), datamodule=data)
    seconds = time.perf_counter() - start
    save_adapter(model, folder / "weights")
    return {"steps": trainer.global_step, "seconds": round(seconds, 2),
            "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan")))}


def alignment_stage(base: Base, c: TrainConfig, splits: Splits, fmt) -> Base:
    """The starting model after the alignment stage (the base itself when align.method is null)."""
    if c.align.method is None:
        return base
    folder = cached(c.paths.cache_dir, "align", alignment_spec(c, splits, fmt),
                    lambda tmp: _train_stage(base, c, splits, fmt, tmp))
    model = load_adapter(base.model, folder / "weights")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    summary = json.loads((folder / "stage.json").read_text())
    stage = {"stage": "alignment", "method": c.align.method.name, "cache": str(folder),
             **{k: summary.get(k) for k in ("steps", "seconds", "final_loss")}}
    return dataclasses.replace(base, model=model, path=str(folder), stages=[*base.stages, stage])

