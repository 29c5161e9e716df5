"""One run, start to end: `run(cfg)` for train.py and `evaluate_run(cfg)` for eval.py.

    config -> base model (aligned synthetic model, cached; or a pretrained one)
           -> evaluate before -> adapter -> method module + data module -> Trainer.fit
           -> evaluate after -> results.json, adapter, loggers
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from safeprobe.config import EvalRunConfig, TrainConfig, check_probe_layers, to_plain, validate
from safeprobe.data.datamodule import SafetyDataModule, Splits, synthetic_splits
from safeprobe.evaluation.evaluate import evaluate
from safeprobe.methods import build_method
from safeprobe.models.factory import Base, apply_adapter, formatter, load_adapter, load_base, save_adapter
from safeprobe.tracking import environment, finish, log_results, make_loggers, write_json

log = logging.getLogger(__name__)
METRICS = ("harmful_score", "refusal_margin", "fine_tune_accuracy", "test_loss")


def _hydra_job() -> tuple[str | None, str | None]:
    """(W&B group, W&B run name): the sweep folder groups a multirun's jobs."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None, None
    if hc.mode == RunMode.MULTIRUN:
        return Path(hc.sweep.dir).as_posix().replace("/", "_"), f"{hc.job.num}_{hc.job.override_dirname}"
    return None, hc.job.override_dirname or None


def build_splits(base: Base, c: TrainConfig) -> Splits:
    return synthetic_splits(base.world, c.data, c.eval.split)


def print_table(results: dict) -> None:
    before, after = results.get("before") or {}, results["after"]
    lines = [f"{'metric':<22}{'before':>10}{'after':>10}"]
    for k in METRICS:
        b = f"{before[k]:10.2f}" if k in before else f"{'-':>10}"
        lines.append(f"{k:<22}{b}{after[k]:10.2f}")
    print(f"\n{results['method']} (seed {results['seed']})\n" + "\n".join(lines) + "\n", flush=True)


def run(cfg: DictConfig) -> dict:
    c: TrainConfig = validate(cfg)
    out = Path(c.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    write_json(out / "environment.json", environment(Path(c.paths.root_dir)))

    base = load_base(c.model, c.paths.cache_dir)
    if c.method.name == "sap":
        check_probe_layers(c.probe.layers, base.model.config.num_hidden_layers)
    splits = build_splits(base, c)
    fmt = formatter(base, c.data.prompt_format, c.data.system_prompt)
    L.seed_everything(c.seed, workers=True)  # after the (possibly cached) alignment stage
    data = SafetyDataModule(c.data, splits, base.tokenizer, fmt, c.seed)

    group, name = _hydra_job()
    loggers = make_loggers(c.logger, out, to_plain(cfg), group, name)
    try:
        results = {"method": c.method.name, "seed": c.seed, "run_dir": str(out)}
        ev = dict(tokenizer=base.tokenizer, formatter=fmt, splits=splits, cfg=c.eval, max_length=c.data.max_length)
        results["before"] = evaluate(base.model, **ev) if c.eval.before else None
        model = apply_adapter(base.model, c.adapter)
        module = build_method(model, c)
        trainer = L.Trainer(**to_plain(c.trainer), max_epochs=-1, logger=loggers or False, enable_checkpointing=False,
                            enable_model_summary=False, default_root_dir=str(out))
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        results["train"] = {"seconds": round(time.perf_counter() - start, 2), "steps": trainer.global_step,
                            "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
                            "dropped_examples": data.dropped}
        results["after"] = evaluate(model, **ev, generations_path=out / "generations.jsonl")
        results["eval"] = {"judges": list(c.eval.judges), "split": c.eval.split,
                           "n_harmful": len(splits.harmful_eval[: c.eval.n_harmful]),
                           "n_task": len(splits.task_test[: c.eval.n_task]), "max_new_tokens": c.eval.max_new_tokens}
        results["adapter"] = to_plain(c.adapter)
        if c.save_adapter:
            save_adapter(model, out / "adapter")
        write_json(out / "results.json", results)
        log_results(loggers, results)
        print_table(results)
    except BaseException:
        finish(loggers, failed=True)
        raise
    finish(loggers, failed=False)
    return results


def evaluate_run(cfg: DictConfig) -> dict:
    """Re-evaluate a saved run: its base model, its adapter, its (or new) eval settings."""
    e: EvalRunConfig = validate(cfg, EvalRunConfig)
    if not e.run_dir or not (Path(e.run_dir) / "config.yaml").exists():
        from safeprobe.config import ConfigError

        raise ConfigError(f"run_dir={e.run_dir!r} is invalid; allowed: a run folder holding config.yaml and adapter/")
    run_dir = Path(e.run_dir)
    saved = OmegaConf.load(run_dir / "config.yaml")
    if e.eval is not None:
        saved.eval = OmegaConf.structured(e.eval)
    c: TrainConfig = validate(saved)
    base = load_base(c.model, c.paths.cache_dir)
    model = load_adapter(base.model, run_dir / "adapter")
    splits = build_splits(base, c)
    fmt = formatter(base, c.data.prompt_format, c.data.system_prompt)
    out = Path(e.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        metrics = evaluate(model, base.tokenizer, fmt, splits, c.eval, c.data.max_length, out / "generations.jsonl")
    results = {"run_dir": str(run_dir), "method": c.method.name, "seed": c.seed, "after": metrics}
    write_json(out / "eval_results.json", results)
    print_table(results)
    return results
