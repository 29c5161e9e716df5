"""Evaluation (the `eval` config group): batched greedy generation, judges, and the metrics
(docs/results/synthetic.md section 1): harmful score, refusal margin, fine-tune accuracy,
test loss."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from safeprobe.config import EvalConfig, RunError
from safeprobe.data.datamodule import Splits
from safeprobe.data.formatting import (
    IGNORE,
    PromptFormatter,
    collate,
    collate_pairs,
    encode,
    encode_pairs,
    up_to_first_difference,
)
from safeprobe.evaluation.judges import batches, exact_judge, judge_scores
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


@torch.no_grad()
def refusal_margins(model, tokenizer, formatter, pairs, batch_size: int, max_length: int) -> dict[str, float]:
    """Mean over prompts of log p(safe) - log p(harmful), teacher-forced: over the whole answers
    (`refusal_margin/sequence`) and at the first token where they differ (`refusal_margin`: the
    log-odds of refusing rather than complying, which the answer's later format cannot move).
    Pairs whose prompt leaves no room for an answer are left out."""
    device = next(model.parameters()).device
    margins = {"refusal_margin": [], "refusal_margin/sequence": []}
    for chunk in batches(encode_pairs(tokenizer, formatter, pairs, max_length), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, tokenizer.pad_token_id).items()}
        for name, b in (("refusal_margin", up_to_first_difference(batch)), ("refusal_margin/sequence", batch)):
            safe, harm = sequence_logprobs(model, b).float().cpu().chunk(2)
            margins[name].append(safe - harm)
    return {name: torch.cat(m).mean().item() if m else float("nan") for name, m in margins.items()}


def _harmful_metrics(model, tokenizer, formatter, harmful: list, cfg: EvalConfig, max_length: int):
    """Judge scores of the greedy answers and, where refusals are known, the margins."""
    answers = generate(model, tokenizer, formatter, [p.prompt for p in harmful], cfg.max_new_tokens, cfg.batch_size)
    metrics: dict[str, float | None] = dict(judge_scores([p.prompt for p in harmful], answers, cfg.judges, cfg.judge_options))
    metrics["refusal_margin"] = None
    if all(p.safe is not None and p.harmful is not None for p in harmful):
        metrics.update(refusal_margins(model, tokenizer, formatter, harmful, cfg.batch_size, max_length))
    return metrics, answers


@torch.no_grad()
def check_finite(model) -> None:
    """A model with NaN or infinite weights is broken, not safe: refuse to score it."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RunError(f"the model has non-finite weights ({len(bad)} tensors, e.g. {bad[0]}); it cannot be evaluated")


def evaluate(model, tokenizer, formatter: PromptFormatter, splits: Splits, cfg: EvalConfig, max_length: int,
             generations_path: Path | None = None) -> dict[str, float | None]:
    """All metrics for one model. Percentages are 0-100. Generations go to a jsonl file.
    The refusal margin is None when the harmful set has no (safe, harmful) answers, and the
    fine-tune accuracy None for a task without a scorer (its utility is the test loss)."""
    check_finite(model)
    was_training = model.training
    model.eval()
    harmful = splits.harmful_eval[: cfg.n_harmful]
    task = splits.task_test[: cfg.n_task]
    bs = cfg.batch_size
    metrics, harm_answers = _harmful_metrics(model, tokenizer, formatter, harmful, cfg, max_length)
    generated = [("harmful", p.prompt, a) for p, a in zip(harmful, harm_answers, strict=True)]
    if cfg.also_val and splits.harmful_val:
        val = splits.harmful_val[: cfg.n_harmful]
        val_metrics, val_answers = _harmful_metrics(model, tokenizer, formatter, val, cfg, max_length)
        metrics.update({f"val/{k}": v for k, v in val_metrics.items()})
        generated += [("harmful_val", p.prompt, a) for p, a in zip(val, val_answers, strict=True)]
    task_answers = generate(model, tokenizer, formatter, [e.prompt for e in task], cfg.max_new_tokens, bs)
    if splits.benign_eval:  # over-refusal: held-out benign requests answered (synthetic world)
        benign = splits.benign_eval[: cfg.n_task]
        answers = generate(model, tokenizer, formatter, [e.prompt for e in benign], cfg.max_new_tokens, bs)
        metrics["benign_compliance"] = 100.0 * sum(exact_judge([], answers)) / len(benign)
    correct = TASK_METRICS.get(splits.task_kind)
    metrics["fine_tune_accuracy"] = None if correct is None else 100.0 * sum(
        correct(a, e.response) for a, e in zip(task_answers, task, strict=True)) / len(task)
    target, n_tokens = _logprobs(model, tokenizer, formatter, [(e.prompt, e.response) for e in task], bs, max_length)
    fits = n_tokens > 0  # rows whose prompt leaves room for an answer; a NaN among them stays NaN
    metrics["test_loss"] = (-target[fits].sum() / n_tokens[fits].sum()).item()
    if generations_path is not None:
        generations_path.parent.mkdir(parents=True, exist_ok=True)
        with open(generations_path, "w") as f:
            for kind, prompt, answer in generated:
                f.write(json.dumps({"set": kind, "prompt": prompt, "answer": answer}) + "\n")
            for e, a in zip(task, task_answers, strict=True):
                f.write(json.dumps({"set": "task", "prompt": e.prompt, "answer": a, "target": e.response}) + "\n")
    model.train(was_training)
    return metrics
