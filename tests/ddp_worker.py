"""Train methods for a few steps on the micro world, as one process or as rank 0 of several
(Lightning's ddp strategy runs this script again for the other ranks), and save what each run's
steps did: tests/test_ddp.py compares a 2-process run with a 1-process run at the same global
batch.

    python tests/ddp_worker.py OUT DEVICES NAME=OVERRIDE,OVERRIDE... [NAME=... ...]

OUT/NAME.pt holds the trainable weights before and after, and every step's gradient (as the
optimizer took it) and loss. An alignment-stage method (align=<name> in the overrides) is
trained as the alignment stage trains it (stages.py), on the stage's data.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from safeprobe.config import CONF_DIR, validate  # noqa: E402
from safeprobe.data.datamodule import SafetyDataModule  # noqa: E402
from safeprobe.distributed import trainer_kwargs  # noqa: E402
from safeprobe.methods import build_method, method_spec  # noqa: E402
from safeprobe.models.factory import apply_adapter, formatter, load_base  # noqa: E402
from safeprobe.pipeline import build_splits, data_module, fine_tuning_module  # noqa: E402
from safeprobe.stages import stage_config, stage_splits, stage_task  # noqa: E402


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors])


class Recorder(L.Callback):
    def __init__(self):
        self.record = {"grads": [], "losses": []}

    def on_train_start(self, trainer, module) -> None:
        self.record["start"] = flat(module.trainable_parameters())

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        params = module.trainable_parameters()
        self.record["grads"].append(flat(p.grad if p.grad is not None else torch.zeros_like(p) for p in params))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.record["losses"].append(float(trainer.callback_metrics["train/loss"]))

    def on_train_end(self, trainer, module) -> None:
        self.record["end"] = flat(module.trainable_parameters())


def train(overrides: list[str], devices: int, path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={path.parent}", *overrides])
    c = validate(cfg)
    base = load_base(c.model, c.paths.cache_dir)
    splits = build_splits(base, c)
    fmt = formatter(base, c.data.prompt_format, c.data.system_prompt)
    if c.align.method is not None:  # as stages._train_stage trains it
        s = stage_config(c)
        L.seed_everything(s.seed, workers=True)
        model = apply_adapter(copy.deepcopy(base.model), s.adapter)
        model.train()
        data = SafetyDataModule(s.data, stage_splits(splits), base.tokenizer, fmt, s.seed,
                                streams=method_spec(s.method.name, "align.method").module.data_streams(s),
                                task_examples=stage_task(splits))
        module, t = build_method(model, s), s.trainer
    else:  # as pipeline.run trains it
        L.seed_everything(c.seed, workers=True)
        data = data_module(c, base, splits, fmt)
        module, t = fine_tuning_module(c, base, None), c.trainer
    t = dataclasses.replace(t, devices=devices, strategy="ddp" if devices > 1 else "auto", enable_progress_bar=False)
    recorder = Recorder()
    trainer = L.Trainer(**trainer_kwargs(t), logger=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[recorder], default_root_dir=str(path.parent))
    trainer.fit(module, datamodule=data)
    if trainer.is_global_zero:
        torch.save(recorder.record, path)


def main(argv: list[str]) -> None:
    out, devices = Path(argv[0]), int(argv[1])
    for case in argv[2:]:
        name, _, overrides = case.partition("=")
        train([o for o in overrides.split(",") if o], devices, out / f"{name}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
