"""The stages of a run around fine-tuning:

    starting model -> [alignment stage] -> fine-tuning (the method) -> [post-fine-tuning step]

The alignment stage (conf/align) is the provider re-aligning the model before the user
fine-tunes it, as the Vaccine / Booster / Lisa line of work does: a registered method
(`align.method`: sft, the plain control, or an alignment-stage defense such as vaccine)
trains a LoRA (the `adapter` settings; full weights with adapter=full) on the alignment
stream (plus the helpful answers to benign requests, where the data has them) as its task —
its harmful stream is the same prompts' harmful answers, its safety
stream the (refusal, harmful answer) pairs of those prompts. Then either the LoRA is merged
into the weights and fine-tuning trains a fresh one (align.lora=double), or fine-tuning goes
on training the same LoRA (single, as Booster does). The result is cached (cache.py) under a
key of everything that produced it — the model config, the stage config, the adapter, the
alignment data and formatting, and STAGE_VERSION — so every sweep job that needs it reuses
it, and any change to those makes a new one. The post-fine-tuning repairs are post/.
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
from safeprobe.distributed import trainer_kwargs
from safeprobe.models.factory import Base, apply_adapter, load_adapter, save_adapter

log = logging.getLogger(__name__)
STAGE_VERSION = 1  # bump when this code changes what a stage produces


def stage_config(c: TrainConfig) -> TrainConfig:
    """The run's config as the alignment stage sees it: its method, steps, learning rate, batch
    size and seed; everything else (model, adapter, data formatting, trainer) is the run's."""
    a = c.align
    return dataclasses.replace(
        c, method=a.method, seed=a.seed, optim=dataclasses.replace(c.optim, lr=a.lr),
        align=dataclasses.replace(a, method=None),  # inside the stage, no stage came before
        data=dataclasses.replace(c.data, batch_size=a.batch_size, safety_batch_size=a.batch_size),
        trainer=dataclasses.replace(c.trainer, max_steps=a.steps, max_epochs=-1, enable_progress_bar=False))


def stage_task(splits: Splits) -> list:
    """What the stage's method trains on as its task: the alignment stream, plus the helpful
    answers to benign requests where the data has them (the synthetic world: without them its
    tiny model learns to refuse everything, 0% benign compliance, instead of refusing harm)."""
    return splits.alignment + splits.helpful


def _data_hash(splits: Splits, fmt) -> str:
    rows = [(e.prompt, e.response) for e in stage_task(splits) + splits.harmful]
    return hashlib.sha256(json.dumps([fmt.style, fmt.system_prompt, rows]).encode()).hexdigest()


def stage_splits(splits: Splits) -> Splits:
    """The sets as the stage's method reads them: its task is the alignment stream, its safety
    pairs the alignment prompts with both answers."""
    return dataclasses.replace(splits, safety_pairs=splits.alignment_pairs)


def alignment_spec(c: TrainConfig, splits: Splits, fmt) -> dict:
    data = {k: getattr(c.data, k) for k in ("alignment_set", "n_alignment", "alignment_batch_size", "max_length",
                                             "safety_max_length", "prompt_format", "system_prompt", "shuffle_seed")}
    align = {k: v for k, v in to_plain(c.align).items() if k != "lora"}  # how it is used, not what is built
    return {"version": STAGE_VERSION, "model": to_plain(c.model), "align": align,
            "adapter": to_plain(c.adapter), "optim": to_plain(stage_config(c).optim), "data": data,
            "examples": _data_hash(splits, fmt), "precision": c.trainer.precision}


def _train_stage(base: Base, c: TrainConfig, splits: Splits, fmt, folder: Path) -> dict:
    from safeprobe.methods import build_method, method_spec

    s = stage_config(c)
    module_cls = method_spec(s.method.name, "align.method").module
    L.seed_everything(s.seed, workers=True)
    model = apply_adapter(copy.deepcopy(base.model), s.adapter)
    model.train()
    data = SafetyDataModule(s.data, stage_splits(splits), base.tokenizer, fmt, s.seed,
                            streams=module_cls.data_streams(s), task_examples=stage_task(splits))
    one = dataclasses.replace(s.trainer, devices=1, num_nodes=1, strategy="auto", timeout_minutes=None)  # one process
    trainer = L.Trainer(**trainer_kwargs(one), logger=False, enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=str(folder))
    start = time.perf_counter()
    log.info("alignment stage: %s for %d steps on %d alignment and %d helpful examples...", s.method.name,
             c.align.steps, len(splits.alignment), len(splits.helpful))
    trainer.fit(build_method(model, s), datamodule=data)
    seconds = time.perf_counter() - start
    save_adapter(model, folder / "weights")
    return {"steps": trainer.global_step, "seconds": round(seconds, 2), "peak_memory_mb": peak_memory_mb(),
            "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan")))}


def alignment_stage(base: Base, c: TrainConfig, splits: Splits, fmt) -> Base:
    """The starting model after the alignment stage (the base itself when align.method is null).
    align.lora=single keeps the stage's LoRA unmerged and trainable: fine-tuning continues it."""
    if c.align.method is None:
        return base
    folder = cached(c.paths.cache_dir, "align", alignment_spec(c, splits, fmt),
                    lambda tmp: _train_stage(base, c, splits, fmt, tmp))
    continued = c.align.lora == "single" and c.adapter.kind == "lora"
    model = load_adapter(base.model, folder / "weights", trainable=continued)
    if hasattr(model, "merge_and_unload") and not continued:
        model = model.merge_and_unload()
    summary = json.loads((folder / "stage.json").read_text())
    stage = {"stage": "alignment", "method": c.align.method.name, "lora": c.align.lora, "cache": str(folder),
             **{k: summary.get(k) for k in ("steps", "seconds", "peak_memory_mb", "final_loss")}}
    return dataclasses.replace(base, model=model, path=str(folder), stages=[*base.stages, stage],
                               adapter_continued=continued)


def peak_memory_mb() -> float:
    """This process's peak memory so far: the CUDA allocator's peak on a GPU, else the peak RSS."""
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

