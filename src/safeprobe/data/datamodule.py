"""The `data` config group: the task stream, the safety-pair stream and the held-out sets.

A source yields plain examples (`Example`, `SafetyPair`); this module mixes in the
poison share, tokenizes with response-only labels, and serves a training batch of the
form {"task": ..., "safety": ...}. Every method sees the same task batches for the same
seed (the safety stream is drawn for every method, used only by those that need it).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from functools import partial

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from safeprobe.config import DataConfig
from safeprobe.data.formatting import PromptFormatter, collate, collate_pairs, encode, encode_pairs
from safeprobe.synthetic.world import Example, SafetyPair

log = logging.getLogger(__name__)


@dataclass
class Splits:
    """Everything one run needs, as plain text."""

    task_train: list[Example]
    task_test: list[Example]
    poison: list[Example]
    safety_pairs: list[SafetyPair]
    harmful_eval: list[SafetyPair]  # held-out harmful prompts (+ refusal/harmful answers for the margin)
    benign_eval: list[Example]
    task_kind: str  # instruct (exact match) | classify (first word = label)
    harmful_val: list[SafetyPair] = field(default_factory=list)  # scored as val/... next to a test split


def synthetic_splits(world, cfg: DataConfig, eval_split: str) -> Splits:
    train, test = world.task_sets(cfg.task)
    val = world.harmful_eval_set("val") if eval_split == "test" else []
    return Splits(train, test, world.poison_set(), world.safety_pairs(), world.harmful_eval_set(eval_split),
                  world.benign_eval_set(), cfg.task, val)


def mix_training_set(splits: Splits, n: int, poison_ratio: float, seed: int) -> list[Example]:
    """n examples, round(n * poison_ratio) of them harmful-with-harmful-answer, shuffled."""
    rng = random.Random(seed)
    n_poison = round(n * poison_ratio)
    if n_poison and not splits.poison:
        raise ValueError("data.poison_ratio > 0 but the data source has no harmful examples for poisoning")
    def draw(pool, k):
        pool = list(pool)
        rng.shuffle(pool)
        return [pool[i % len(pool)] for i in range(k)]  # cycles when k exceeds the pool
    rows = draw(splits.task_train, n - n_poison) + draw(splits.poison, n_poison)
    rng.shuffle(rows)
    return rows


class SafetyDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig, splits: Splits, tokenizer, formatter: PromptFormatter, seed: int):
        super().__init__()
        self.cfg, self.splits, self.tokenizer, self.formatter, self.seed = cfg, splits, tokenizer, formatter, seed
        self.pad_id = tokenizer.pad_token_id
        self.dropped = 0
        self.train_rows = self._encode(mix_training_set(splits, cfg.n_train, cfg.poison_ratio, seed))
        self.safety_rows = encode_pairs(tokenizer, formatter, splits.safety_pairs, cfg.safety_max_length or cfg.max_length)
        if not self.train_rows:
            raise ValueError("no training example fits data.max_length")

    def _encode(self, examples: list[Example]) -> list[dict]:
        rows = [encode(self.tokenizer, self.formatter, e.prompt, e.response, self.cfg.max_length) for e in examples]
        kept = [r for r in rows if r is not None]
        self.dropped += len(rows) - len(kept)
        if len(kept) < len(rows):
            log.warning("dropped %d of %d examples whose response did not fit data.max_length=%d",
                        len(rows) - len(kept), len(rows), self.cfg.max_length)
        return kept

    def _loader(self, rows, batch_size, collate_fn, seed_offset):
        g = torch.Generator().manual_seed(self.seed + seed_offset)
        return DataLoader(rows, batch_size=batch_size, shuffle=True, generator=g, collate_fn=collate_fn,
                          num_workers=self.cfg.num_workers)

    def train_dataloader(self):
        task = self._loader(self.train_rows, self.cfg.batch_size, partial(collate, pad_id=self.pad_id), 0)
        loaders = {"task": task}
        if self.safety_rows:
            loaders["safety"] = self._loader(self.safety_rows, self.cfg.safety_batch_size,
                                             partial(collate_pairs, pad_id=self.pad_id), 1)
        return CombinedLoader(loaders, mode="max_size_cycle")
