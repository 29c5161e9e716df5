"""Evaluation (the `eval` config group): batched greedy generation, judges, and the metrics
of BENCHMARKS.md section 2: harmful score, refusal margin, fine-tune accuracy, test loss."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from safeprobe.config import EvalConfig
from safeprobe.data.datamodule import Splits
from safeprobe.data.formatting import IGNORE, PromptFormatter, collate, encode
from safeprobe.evaluation.judges import batches, judge_scores
from safeprobe.evaluation.task_metrics import TASK_METRICS
from safeprobe.methods.losses import sequence_logprobs


@torch.no_grad()
def generate(model, tokenizer, formatter: PromptFormatter, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers, batched with left padding."""
    answers = []
    device = next(model.parameters()).device
    for chunk in batches(prompts, batch_size):
        ids = [tokenizer(formatter(p), add_special_tokens=formatter.adds_bos)["input_ids"] for p in chunk]
        batch = collate([{"input_ids": i} for i in ids], tokenizer.pad_token_id, side="left")
        out = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=formatter.stop_token_ids)
        answers += [a.strip() for a in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]
    return answers


@torch.no_grad()
def _logprobs(model, tokenizer, formatter, pairs: list[tuple[str, str]], batch_size: int, max_length: int):
    """Teacher-forced log p(response | prompt) per pair, and the number of response tokens;
    NaN and 0 for a pair whose prompt alone fills max_length."""
    device = next(model.parameters()).device
    rows = [encode(tokenizer, formatter, p, r, max_length) for p, r in pairs]
    logps, counts = torch.full((len(rows),), float("nan")), torch.zeros(len(rows), dtype=torch.long)
    for chunk in batches([i for i, r in enumerate(rows) if r is not None], batch_size):
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in chunk], tokenizer.pad_token_id).items()}
        logps[chunk] = sequence_logprobs(model, batch).float().cpu()
        counts[chunk] = (batch["labels"][:, 1:] != IGNORE).sum(-1).cpu()
    return logps, counts


def evaluate(model, tokenizer, formatter: PromptFormatter, splits: Splits, cfg: EvalConfig, max_length: int,
             generations_path: Path | None = None) -> dict[str, float | None]:
    """All metrics for one model. Percentages are 0-100. Generations go to a jsonl file.
    The refusal margin is None when the harmful set has no (safe, harmful) answers, and the
    fine-tune accuracy None for a task without a scorer (its utility is the test loss)."""
    was_training = model.training
    model.eval()
    harmful = splits.harmful_eval[: cfg.n_harmful]
    task = splits.task_test[: cfg.n_task]
    bs = cfg.batch_size
    harm_answers = generate(model, tokenizer, formatter, [p.prompt for p in harmful], cfg.max_new_tokens, bs)
    task_answers = generate(model, tokenizer, formatter, [e.prompt for e in task], cfg.max_new_tokens, bs)
    metrics: dict[str, float | None] = dict(
        judge_scores([p.prompt for p in harmful], harm_answers, cfg.judges, cfg.judge_options))
    metrics["refusal_margin"] = None
    if all(p.safe is not None and p.harmful is not None for p in harmful):
        safe, _ = _logprobs(model, tokenizer, formatter, [(p.prompt, p.safe) for p in harmful], bs, max_length)
        harm, _ = _logprobs(model, tokenizer, formatter, [(p.prompt, p.harmful) for p in harmful], bs, max_length)
        metrics["refusal_margin"] = (safe - harm).nanmean().item()
    correct = TASK_METRICS.get(splits.task_kind)
    metrics["fine_tune_accuracy"] = None if correct is None else 100.0 * sum(
        correct(a, e.response) for a, e in zip(task_answers, task, strict=True)) / len(task)
    target, n_tokens = _logprobs(model, tokenizer, formatter, [(e.prompt, e.response) for e in task], bs, max_length)
    metrics["test_loss"] = (-target.nansum() / n_tokens.sum()).item()  # rows that fit
    if generations_path is not None:
        generations_path.parent.mkdir(parents=True, exist_ok=True)
        with open(generations_path, "w") as f:
            for p, a in zip(harmful, harm_answers, strict=True):
                f.write(json.dumps({"set": "harmful", "prompt": p.prompt, "answer": a}) + "\n")
            for e, a in zip(task, task_answers, strict=True):
                f.write(json.dumps({"set": "task", "prompt": e.prompt, "answer": a, "target": e.response}) + "\n")
    model.train(was_training)
    return metrics
