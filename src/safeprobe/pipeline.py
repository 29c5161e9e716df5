"""One run, start to end: `run(cfg)` for train.py and `evaluate_run(cfg)` for eval.py.

    config -> base model (aligned synthetic model, cached; or a pretrained one)
           -> [alignment stage: align.method re-aligns it, cached]            stages.py
           -> evaluate before -> adapter -> method module + data module -> Trainer.fit
           -> evaluate after -> [post-fine-tuning repair, evaluate again]      post/
           -> results.json, adapter, loggers
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from safeprobe import checkpoint, distributed, kernels
from safeprobe.cli import Interrupted, stop_between_steps
from safeprobe.config import (
    PROJECT_ROOT,
    ConfigError,
    EvalRunConfig,
    ModelConfig,
    TrainConfig,
    to_plain,
    validate,
)
from safeprobe.data.datamodule import SafetyDataModule, Splits, synthetic_splits
from safeprobe.data.formatting import collate, encode
from safeprobe.evaluation.evaluate import evaluate
from safeprobe.methods import build_method, method_spec
from safeprobe.models.factory import (
    Base,
    apply_adapter,
    check_targets,
    formatter,
    load_adapter,
    load_base,
    save_adapter,
)
from safeprobe.post import PostContext, apply_repair
from safeprobe.reporting.jobs import ERROR_FILE
from safeprobe.stages import alignment_stage, stage_config
from safeprobe.tracking import (
    environment,
    finish,
    log_results,
    make_loggers,
    wandb_id,
    weights_checksum,
    write_json,
)

log = logging.getLogger(__name__)
METRICS = ("harmful_score", "refusal_rate", "unusable_rate", "refusal_margin", "fine_tune_accuracy", "test_loss",
           "benign_compliance")


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


def data_needed(c: TrainConfig) -> tuple[str, ...]:
    """The data sets the fine-tuning method and the alignment stage's method read."""
    needed = method_spec(c.method.name).module.data_needed(c)
    if c.align.method is not None:  # the stage's safety pairs are the alignment prompts' (stages.py)
        stage = method_spec(c.align.method.name, "align.method").module.data_needed(stage_config(c))
        needed += ("alignment",) + tuple("harmful" if s == "safety" else s for s in stage)
    if c.post is not None:
        from safeprobe.post import REPAIRS

        needed += REPAIRS[c.post.name].data_needed
    return tuple(dict.fromkeys(needed))


def build_splits(base: Base, c: TrainConfig) -> Splits:
    """data.source=synthetic: the world's sets; hub: real data sets (data/sources.py)."""
    if (c.data.source == "synthetic") != (c.model.kind == "synthetic"):
        raise ConfigError(f"data.source={c.data.source} is invalid with model.kind={c.model.kind}; allowed: "
                          "synthetic data with the synthetic model, hub data with a pretrained model")
    if c.data.source == "synthetic":
        return synthetic_splits(base.world, c.data, c.eval.split)
    from safeprobe.data.sources import hub_splits

    return hub_splits(c.data, c.eval.split, data_needed(c))


def data_module(c: TrainConfig, base: Base, splits: Splits, fmt) -> SafetyDataModule:
    """The streams and the fine-tuning set that c.method asks for (same task batches for every method)."""
    module = method_spec(c.method.name).module
    return SafetyDataModule(c.data, splits, base.tokenizer, fmt, c.seed, streams=module.data_streams(c),
                            task_examples=module.task_examples(c, splits),
                            split_task=not c.trainer.use_distributed_sampler)


def fine_tuning_module(c: TrainConfig, base: Base, start: dict | None):
    """The method's LightningModule around the starting model with its adapter (a resumed run
    replays the batches before its checkpoint)."""
    model = base.model if base.adapter_continued else apply_adapter(base.model, c.adapter)
    model.train()  # HF models load in eval mode and Lightning leaves it: no dropout, no gradient checkpointing
    module = build_method(model, c)
    if start is not None:
        module.replay = checkpoint.Replay(start)
    return module


def check_distributed(c: TrainConfig) -> None:
    """What a sharded strategy (FSDP: no process holds the whole model) cannot run: methods that
    read or change whole weights outside the forward pass, checkpoints (docs/distributed.md)."""
    if not distributed.is_sharded(c.trainer.strategy):
        return
    if c.method.name not in SHARDABLE:
        raise ConfigError(f"method={c.method.name} is invalid with a sharded trainer.strategy (FSDP); allowed: "
                          f"{', '.join(SHARDABLE)} (the other methods read whole weights or their gradients on every "
                          "process: use trainer=ddp)")
    if c.resume:
        raise ConfigError("resume=true is invalid with a sharded trainer.strategy (FSDP); allowed: resume=false "
                          "(checkpoints hold whole weights, which no process has)")


SHARDABLE = ("sft", "safeinstr")  # their loss is forward passes of the model alone


def eval_device(c: TrainConfig) -> torch.device:
    """Evaluate where training runs (Lightning hands the model back on the CPU after fit)."""
    gpu = c.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    return torch.device("cuda" if gpu else "cpu")


def _cell(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    return f"{value:10.2f}" if value is not None else f"{'-':>10}"


def print_table(results: dict) -> None:
    columns = {"before": results.get("before") or {}}
    if "before_repair" in results:  # a post-fine-tuning repair ran: the fine-tuned model, then the repaired one
        columns.update({"fine-tuned": results["before_repair"], "repaired": results["after"]})
    else:
        columns["after"] = results["after"]
    lines = [f"{'metric':<22}" + "".join(f"{k:>11}" for k in columns)]
    for k in METRICS:
        if k in results["after"]:
            lines.append(f"{k:<22}" + "".join(f" {_cell(m, k)}" for m in columns.values()))
    print(f"\n{results['method']} (seed {results['seed']})\n" + "\n".join(lines) + "\n", flush=True)


def resume_overrides(out: Path) -> str:
    """The overrides that, added to a run's command, continue it (or its sweep) from checkpoints."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return f"hydra.sweep.dir={hc.sweep.dir} resume=true"
    except (ImportError, ValueError):
        pass
    return f"hydra.run.dir={out} resume=true"


def run(cfg: DictConfig) -> dict | None:
    """The run's results (None on a rank > 0 of several processes: it joins the fit, rank 0
    evaluates and writes; docs/distributed.md)."""
    c: TrainConfig = validate(cfg)
    writer = distributed.is_writer(c.trainer)  # the one process that evaluates and writes
    path = kernels.pin(c.cpu_kernels, c.model.kind, c.trainer.accelerator)  # before any kernel runs
    out = Path(c.paths.output_dir)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    start = None  # a checkpoint to resume from
    if c.resume:
        finished, start = checkpoint.previous_run(out, cfg)
        if finished is not None:
            if writer:
                print(f"{out}: this run has finished (results.json); nothing to resume", flush=True)
            return finished
    # every check before anything is written: a run failing here leaves a reused folder as it was
    method_spec(c.method.name).module.check_config(c)  # e.g. probe layers vs depth
    check_distributed(c)
    base = load_base(c.model, c.paths.cache_dir)
    check_targets(base.model, c.adapter)
    check_post(c)
    splits = build_splits(base, c)
    fmt = formatter(base, c.data.prompt_format, c.data.system_prompt)
    base = alignment_stage(base, c, splits, fmt)
    start_sha = weights_checksum(base.model)  # which starting model, bit for bit
    if start is not None:
        checkpoint.check_start(start, start_sha, out)
    L.seed_everything(c.seed, workers=True)  # after the (possibly cached) alignment stages
    data = data_module(c, base, splits, fmt)
    sharded = distributed.is_sharded(c.trainer.strategy)
    saves = checkpoint.Checkpoints(out / checkpoint.CHECKPOINT, c.checkpoint_every,
                                   {"start_weights_sha256": start_sha}, start, saving=not sharded)

    def make_trainer(logger) -> L.Trainer:  # a strategy object serves one Trainer: each gets its own
        return L.Trainer(**distributed.trainer_kwargs(c.trainer, base.model), enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=str(out), callbacks=[saves], logger=logger)

    def reloaded() -> torch.nn.Module:  # a sharded fit: a whole model for the weights gathered on rank 0
        again = alignment_stage(load_base(c.model, c.paths.cache_dir), c, splits, fmt)
        return again.model if again.adapter_continued else apply_adapter(again.model, c.adapter)

    try:
        make_trainer(False)  # Lightning's own checks (devices, precision, strategy) before any work
    except (ValueError, TypeError) as e:  # e.g. FSDP without a GPU, a strategy argument of the wrong type
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"lightning rejected the trainer settings ({first}); allowed: settings this machine can "
                          "run, e.g. trainer=cpu") from None
    if not writer:  # a rank > 0: the same model and data, its part of the fit, nothing written
        trainer = make_trainer(False)
        module = fine_tuning_module(c, base, start)
        with stop_between_steps(), distributed.fitting(trainer, out / "config.yaml"):
            trainer.fit(module, datamodule=data)
            distributed.whole_model(trainer, module, None)  # its part in gathering sharded weights
        return None

    if start is None:
        (out / checkpoint.CHECKPOINT).unlink(missing_ok=True)  # a fresh run never resumes an older one's state
    (out / ERROR_FILE).unlink(missing_ok=True)  # an earlier attempt's failure (sweep jobs)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    env = {**environment(PROJECT_ROOT), "cpu_kernels": path, "start_weights_sha256": start_sha}
    write_json(out / "environment.json", env)  # the code's commit, wherever outputs go

    group, name = _hydra_job()
    loggers = make_loggers(c.logger, out, to_plain(cfg), group, name, resume_id=(start or {}).get("wandb_id"))
    if start is not None:
        checkpoint.carry_csv_rows(loggers, start["step"])
    phase, trainer = "evaluating the model before fine-tuning", None
    try:
        results = {"method": c.method.name, "seed": c.seed, "run_dir": str(out), "method_config": to_plain(c.method),
                   "stages": base.stages}
        ev = dict(tokenizer=base.tokenizer, formatter=fmt, splits=splits, cfg=c.eval, max_length=c.data.max_length)
        if start is not None:
            results["before"] = start["before"]
        else:
            results["before"] = evaluate(base.model.to(eval_device(c)), **ev) if c.eval.before else None
        phase = "fine-tuning"
        module = fine_tuning_module(c, base, start)
        model = module.model
        saves.extra.update(before=results["before"], wandb_id=wandb_id(loggers))
        trainer = make_trainer(loggers or False)
        with stop_between_steps(), distributed.fitting(trainer, out / "config.yaml"):
            trainer.fit(module, datamodule=data)
            model = distributed.whole_model(trainer, module, reloaded)  # sharded: gathered on rank 0
        results["train"] = {"seconds": round(saves.elapsed(), 2), "steps": trainer.global_step,
                            # a run resumed from its last step's checkpoint trains no step: the checkpoint's loss
                            "final_loss": float(trainer.callback_metrics.get("train/loss", (start or {}).get(
                                "loss", float("nan")))),
                            "dropped_examples": data.dropped, "resumed_from_step": start["step"] if start else None}
        phase = "evaluating the fine-tuned model"
        if c.post is not None:  # the fine-tuned model, then the repaired one (which is saved)
            results["before_repair"] = evaluate(model.to(eval_device(c)), **ev,
                                                generations_path=out / "generations_before_repair.jsonl")
            phase = f"repairing the fine-tuned model ({c.post.name})"
            results["stages"].append({"stage": "post-fine-tuning",
                                      **apply_repair(model, post_context(c, splits, base.tokenizer, fmt), c.post)})
            phase = "evaluating the repaired model"
        results["after"] = evaluate(model.to(eval_device(c)), **ev, generations_path=out / "generations.jsonl")
        results["eval"] = {"judges": list(c.eval.judges), "split": c.eval.split,
                           "n_harmful": len(splits.harmful_eval[: c.eval.n_harmful]),
                           "n_task": len(splits.task_test[: c.eval.n_task]), "max_new_tokens": c.eval.max_new_tokens,
                           "harmful_set": harmful_set_name(c), "judge_options": to_plain(c.eval.judge_options)}
        results["adapter"] = to_plain(c.adapter)
        if c.save_adapter:
            save_adapter(model, out / "adapter")
        write_json(out / "results.json", results)
        (out / checkpoint.CHECKPOINT).unlink(missing_ok=True)  # the run is complete
        log_results(loggers, results)
        print_table(results)
    except BaseException as e:
        if isinstance(e, Interrupted):
            steps = f" (after {trainer.global_step} steps)" if trainer and phase == "fine-tuning" else ""
            e.where = phase + steps
            if saves.saved_step is not None:
                e.resume = (f"checkpoint saved at step {saves.saved_step}; to continue, run the same command with "
                            f"{resume_overrides(out)}")
        finish(loggers, failed=True)
        raise
    finish(loggers, failed=False)
    return results


def unaligned_model_config(c: TrainConfig) -> ModelConfig:
    """The model before safety alignment, of the run's architecture (SafeLoRA's base): a pretrained
    model's model.base_name_or_path, or the synthetic chat model's base variant; else, when an
    alignment stage aligned an unaligned model, that model as it was before the stage."""
    if c.model.kind == "pretrained" and c.model.base_name_or_path:
        return dataclasses.replace(c.model, name_or_path=c.model.base_name_or_path, base_name_or_path=None)
    if c.model.kind == "synthetic" and c.model.variant == "chat":
        return dataclasses.replace(c.model, variant="base")
    if c.align.method is not None:
        return c.model
    what = "model.base_name_or_path=null" if c.model.kind == "pretrained" else "model.variant=base"
    raise ConfigError(f"{what} is invalid with post={c.post.name} and no alignment stage; allowed: the unaligned "
                      "model of the same architecture (model.base_name_or_path for a pretrained model), or an "
                      "alignment stage (align=...) that aligns this model first")


def check_post(c: TrainConfig) -> None:
    """SafeLoRA's needs, before any work: LoRA, a fine-tuning LoRA of its own, an unaligned model."""
    if c.post is None or c.post.name != "safelora":
        return
    if c.adapter.kind != "lora":
        raise ConfigError("post=safelora is invalid with adapter=full; allowed: adapter=lora (SafeLoRA projects a "
                          "LoRA's update)")
    if c.align.method is not None and c.align.lora == "single":
        raise ConfigError("post=safelora is invalid with align.lora=single; allowed: align.lora=double (a single LoRA "
                          "holds the alignment stage's update too, which SafeLoRA would project away)")
    unaligned_model_config(c)


def post_context(c: TrainConfig, splits: Splits, tokenizer, fmt) -> PostContext:
    """What the repairs read: the unaligned model (loaded when asked for) and harmful calibration batches."""
    def base_model() -> torch.nn.Module:
        return load_base(unaligned_model_config(c), c.paths.cache_dir).model.to(eval_device(c))

    def calibration_batches(n: int, batch_size: int = 8) -> list[dict]:
        rows = [encode(tokenizer, fmt, e.prompt, e.response, c.data.safety_max_length or c.data.max_length)
                for e in splits.harmful[:n]]
        rows = [r for r in rows if r is not None]
        return [collate(rows[i:i + batch_size], tokenizer.pad_token_id) for i in range(0, len(rows), batch_size)]

    return PostContext(base_model, calibration_batches, eval_device(c))


def run_model(base: Base, adapter: Path) -> torch.nn.Module:
    """A saved run's fine-tuned model: its adapter on its starting model. A LoRA continued from
    the alignment stage (align.lora=single) holds the stage's part too: its weights replace the
    stage's in place."""
    if not base.adapter_continued:
        return load_adapter(base.model, adapter)
    from peft.utils import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        set_peft_model_state_dict(base.model, load_file(adapter / "adapter_model.safetensors"))
    except (OSError, RuntimeError, SafetensorError) as e:
        raise ConfigError(f"the adapter folder {str(adapter)!r} is invalid ({type(e).__name__}); allowed: a folder "
                          "as train.py saved it (save_adapter=true), whole and unedited") from None
    return base.model


def harmful_set_name(c: TrainConfig) -> str:
    """Which harmful prompts were scored: the synthetic split, or the real set (and its file)."""
    if c.data.source == "synthetic":
        return f"synthetic/{c.eval.split}"
    return c.data.harmful_eval + (f" ({c.data.harmful_eval_path})" if c.data.harmful_eval_path else "")


def read_generations(path: Path, which: str = "harmful") -> list[dict]:
    """The rows of one set ("harmful" or "task") of a run's generations.jsonl."""
    if not path.is_file():
        raise ConfigError(f"judges_only=true is invalid here; allowed: a run_dir holding generations.jsonl ({path} is missing)")
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            row = "not JSON"
        if row is not None and not (isinstance(row, dict) and {"set", "prompt", "answer"} <= row.keys()):
            raise ConfigError(f"judges_only=true is invalid here; allowed: a run_dir whose generations.jsonl rows are "
                              f"objects with set, prompt and answer ({path}: line {i + 1} is not)")
        rows += [row] if row else []
    return [r for r in rows if r["set"] == which]


def compare_environment(run_dir: Path, start_weights_sha256: str | None, cpu_kernels: str = "native") -> list[str]:
    """eval.py: warn when this machine, its packages, the code or the starting weights differ from
    the run's (the re-evaluation then agrees with the run only statistically)."""
    from safeprobe.reporting.environments import environment_differences

    try:
        saved = json.loads((run_dir / "environment.json").read_text())
    except (OSError, json.JSONDecodeError):
        saved = {}
    now = {**environment(PROJECT_ROOT), "start_weights_sha256": start_weights_sha256, "cpu_kernels": cpu_kernels}
    lines = environment_differences({"the run": saved, "this evaluation": now})
    if saved.get("start_weights_sha256") != start_weights_sha256:
        lines.append(f"starting weights (sha256): {saved.get('start_weights_sha256')} (the run), "
                     f"{start_weights_sha256} (this evaluation)")
    for line in lines:
        log.warning("this evaluation differs from the run in %s: numbers agree only statistically", line)
    return lines


def _given_eval(cfg: DictConfig) -> dict | None:
    """The eval.* keys set for this eval.py call (conf/eval.yaml marks the others ???)."""
    node = cfg.get("eval")
    if node is None:
        return None
    given = {k: node[k] for k in node if not OmegaConf.is_missing(node, k)}
    return OmegaConf.to_container(OmegaConf.create(given), resolve=True) or None


def evaluate_run(cfg: DictConfig) -> dict:
    """Re-evaluate a saved run: its base model, its adapter, its eval settings with the given
    eval.* keys replacing the saved ones. judges_only=true scores the run's saved generations
    with eval.judges instead, loading no model but the judges'."""
    given = _given_eval(cfg)
    e: EvalRunConfig = validate(OmegaConf.merge(cfg, {"eval": None}, {"eval": given}), EvalRunConfig)
    if not e.run_dir or not (Path(e.run_dir) / "config.yaml").exists():
        raise ConfigError(f"run_dir={e.run_dir!r} is invalid; allowed: a run folder holding config.yaml and adapter/")
    run_dir = Path(e.run_dir)
    try:
        saved = OmegaConf.load(run_dir / "config.yaml")
    except Exception as err:  # yaml's and OmegaConf's parse errors
        raise ConfigError(f"run_dir={e.run_dir!r} is invalid; allowed: a run folder whose config.yaml can be read "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    missing = [k for k in ("model", "adapter", "method", "data", "eval", "paths") if k not in (saved or {})]
    if missing:  # a cut config would be filled with defaults, and the wrong model evaluated
        raise ConfigError(f"run_dir={e.run_dir!r} is invalid; allowed: a run folder whose config.yaml is complete "
                          f"(it lacks {', '.join(missing)})")
    adapter = run_dir / "adapter"
    if not e.judges_only and not ((adapter / "adapter_config.json").exists() or (adapter / "config.json").exists()):
        raise ConfigError(f"run_dir={e.run_dir!r} is invalid; allowed: a run folder holding adapter/ (train.py with "
                          f"save_adapter=true writes it), or judges_only=true to score its generations.jsonl")
    if given:
        saved.eval = OmegaConf.merge(saved.eval, given)
    c: TrainConfig = validate(saved)
    path = kernels.pin(c.cpu_kernels, c.model.kind, c.trainer.accelerator)  # the run's floating-point path
    out = Path(e.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"run_dir": str(run_dir), "method": c.method.name, "seed": c.seed}
    if e.judges_only:
        from safeprobe.evaluation.judges import judge_scores

        rows = read_generations(run_dir / "generations.jsonl")
        results["after"] = judge_scores([r["prompt"] for r in rows], [r["answer"] for r in rows], c.eval.judges,
                                        c.eval.judge_options)
        results["eval"] = {"judges": list(c.eval.judges), "judges_only": True, "n_harmful": len(rows),
                           "harmful_set": harmful_set_name(c), "judge_options": to_plain(c.eval.judge_options)}
    else:
        base = load_base(c.model, c.paths.cache_dir)
        splits = build_splits(base, c)
        fmt = formatter(base, c.data.prompt_format, c.data.system_prompt)
        base = alignment_stage(base, c, splits, fmt)  # the run's starting model (cached), then its adapter
        results["environment_warnings"] = compare_environment(run_dir, weights_checksum(base.model), path)
        model = run_model(base, run_dir / "adapter").to(eval_device(c))
        with torch.no_grad():
            results["after"] = evaluate(model, base.tokenizer, fmt, splits, c.eval, c.data.max_length,
                                        out / "generations.jsonl")
    write_json(out / "eval_results.json", results)
    print_table(results)
    return results
