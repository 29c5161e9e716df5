"""The `data` config group: the streams a method reads and the held-out sets.

A source yields plain examples (`Example`, `SafetyPair`); this module tokenizes them with
response-only labels and serves training batches {stream: batch} for the streams the method
declares:

    task       the fine-tuning set (n examples, the poison share mixed in)   every method
    safety     SAP's contrastive pairs (harmful prompt, refusal, harmful answer)
    alignment  harmful prompt -> refusal or safe answer (Lisa, SafeInstr, ...)
    harmful    the same prompts -> harmful answers (Booster, RepNoise, ...)

The task stream alone sets the epoch; every other stream is an endless, independently
seeded cycle. So for the same seed every method sees the same task batches, whatever else
it reads (tested), and comparisons between methods are paired.

On several processes (DDP) the batch sizes are per process, and every stream is drawn as one
process would draw it at the global batch size (world size x data.batch_size), each rank taking
its contiguous slice of every global batch: the global batches are those of a single-process
run at that batch size, at any device count (docs/distributed.md). With
trainer.use_distributed_sampler=true, Lightning's DistributedSampler splits the task set
instead (its own shuffle); the endless streams are sliced either way.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from functools import partial

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler

from safeprobe.config import ConfigError, DataConfig
from safeprobe.data.formatting import PromptFormatter, collate, collate_pairs, encode, encode_pairs
from safeprobe.synthetic.world import Example, SafetyPair

log = logging.getLogger(__name__)
STREAMS = ("task", "safety", "alignment", "harmful")


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
    alignment: list[Example] = field(default_factory=list)  # harmful prompt -> refusal / safe answer
    harmful: list[Example] = field(default_factory=list)  # harmful prompt -> harmful answer
    alignment_pairs: list[SafetyPair] = field(default_factory=list)  # rows with both: the stage's pairs
    # benign prompts -> helpful answers: the helpful half of the provider's alignment data, which the
    # alignment stage trains on next to the refusals (synthetic world; real base models bring it)
    helpful: list[Example] = field(default_factory=list)


def alignment_streams(pairs: list[SafetyPair], n: int | None, seed: int) -> tuple[list[Example], list[Example],
                                                                                 list[SafetyPair]]:
    """(alignment, harmful, paired) from (prompt, safe, harmful) rows: the first n after a
    seeded shuffle; rows without a harmful answer feed the alignment stream only, the rows with
    both are the paired set (the safety stream of an alignment stage, e.g. RepNoise's pairs)."""
    rows = list(pairs)
    random.Random(seed).shuffle(rows)
    rows = rows[:n]
    return ([Example(p.prompt, p.safe) for p in rows if p.safe],
            [Example(p.prompt, p.harmful) for p in rows if p.harmful],
            [p for p in rows if p.safe and p.harmful])


def synthetic_splits(world, cfg: DataConfig, eval_split: str) -> Splits:
    train, test = world.task_sets(cfg.task)
    val = world.harmful_eval_set("val") if eval_split == "test" else []
    source = world.alignment_pairs() if cfg.alignment_set == "world" else world.safety_pairs()
    alignment, harmful, paired = alignment_streams(source, cfg.n_alignment, cfg.shuffle_seed)
    return Splits(train, test, world.poison_set(), world.safety_pairs(), world.harmful_eval_set(eval_split),
                  world.benign_eval_set(), cfg.task, val, alignment, harmful, paired, world.helpful_set())


def mix_training_set(splits: Splits, n: int, poison_ratio: float, seed: int, n_safety: int = 0,
                     replace_benign: bool = False) -> list[Example]:
    """n examples, round(n * poison_ratio) of them harmful-with-harmful-answer, shuffled; plus
    n_safety alignment examples (harmful prompt -> refusal), added to the n or, with
    replace_benign, taking the place of as many benign ones. n_safety=0 gives exactly the
    set (and order) every other method trains on."""
    rng = random.Random(seed)
    n_poison = round(n * poison_ratio)
    if n_poison and not splits.poison:
        raise ValueError("data.poison_ratio > 0 but the data source has no harmful examples for poisoning")
    n_benign = n - n_poison - (n_safety if replace_benign else 0)
    if n_benign < 1:
        raise ConfigError(f"{n_safety} safety examples replacing benign ones leave no task example of data.n_train={n} "
                          f"(poison: {n_poison}); allowed: fewer safety examples or a larger data.n_train")
    rows = draw(splits.task_train, n_benign, rng) + draw(splits.poison, n_poison, rng)
    if n_safety:
        if not splits.alignment:
            raise ConfigError("safety examples were asked for but the alignment set is empty; allowed: a "
                              "data.alignment_set with examples")
        rows += draw(splits.alignment, n_safety, rng)
    rng.shuffle(rows)
    return rows


def draw(pool, k: int, rng: random.Random) -> list:
    """k items of a shuffled copy of pool, cycling when k exceeds it."""
    pool = list(pool)
    rng.shuffle(pool)
    return [pool[i % len(pool)] for i in range(k)]


class Endless(IterableDataset):
    """Rows in a fresh seeded order on every pass, forever; the order continues across epochs.
    On several processes each rank reads the whole stream in global batches of world x
    batch_size rows and yields its slice of each (rank 0 the first batch_size rows, ...)."""

    def __init__(self, rows: list, seed: int, batch_size: int = 1, rank: int = 0, world: int = 1):
        self.rows, self.generator = rows, torch.Generator().manual_seed(seed)
        self.batch_size, self.rank, self.world = batch_size, rank, world

    def stream(self):
        while True:
            for i in torch.randperm(len(self.rows), generator=self.generator).tolist():
                yield self.rows[i]

    def __iter__(self):
        if self.world == 1:
            yield from self.stream()
            return
        size, rows = self.batch_size, []
        for row in self.stream():
            rows.append(row)
            if len(rows) == self.world * size:
                yield from rows[self.rank * size:(self.rank + 1) * size]
                rows = []


class RankSlices:
    """Batches of indices: each global batch (world x batch_size rows, as one process would draw
    them) cut into the ranks' contiguous slices, this rank's kept. A last, smaller global batch
    is split as evenly as possible; one with fewer rows than ranks is dropped by every rank."""

    def __init__(self, global_batches: BatchSampler, rank: int, world: int):
        self.global_batches, self.rank, self.world = global_batches, rank, world

    def __iter__(self):
        for batch in self.global_batches:
            if len(batch) < self.world:
                log.warning("the last batch of the epoch (%d rows) is dropped: fewer rows than the %d processes",
                            len(batch), self.world)
                continue
            base, extra = divmod(len(batch), self.world)
            start = self.rank * base + min(self.rank, extra)
            yield batch[start:start + base + (self.rank < extra)]

    def __len__(self) -> int:
        n, size = len(self.global_batches.sampler), self.global_batches.batch_size
        return n // size + (n % size >= self.world)


class SafetyDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig, splits: Splits, tokenizer, formatter: PromptFormatter, seed: int,
                 streams: tuple[str, ...] = ("task", "safety"), task_examples: list[Example] | None = None,
                 split_task: bool = True):
        super().__init__()
        self.cfg, self.splits, self.tokenizer, self.formatter, self.seed = cfg, splits, tokenizer, formatter, seed
        self.streams = streams
        self.split_task = split_task  # several processes: slice the task set here (else Lightning's sampler does)
        self.pad_id = tokenizer.pad_token_id
        self.dropped = 0
        if task_examples is None:
            task_examples = mix_training_set(splits, cfg.n_train, cfg.poison_ratio, seed)
        self.train_rows = self._encode(task_examples)
        if not self.train_rows:
            raise ValueError("no training example fits data.max_length")
        pairs_len = cfg.safety_max_length or cfg.max_length
        self.rows = {"task": self.train_rows}
        if "safety" in streams:
            self.rows["safety"] = encode_pairs(tokenizer, formatter, splits.safety_pairs, pairs_len)
        for name in ("alignment", "harmful"):
            if name in streams:
                self.rows[name] = self._encode(getattr(splits, name), "safety_max_length")
        for name in streams:
            if name not in STREAMS:
                raise ConfigError(f"data stream {name!r} is invalid; allowed: {', '.join(STREAMS)}")
            if not self.rows[name]:
                raise ConfigError(f"the {name} stream is empty (data.alignment_set={cfg.alignment_set}, "
                                  f"data.n_alignment={cfg.n_alignment}); allowed: a data set that has {name} examples")

    def _encode(self, examples: list[Example], key: str = "max_length") -> list[dict]:
        """Encoded rows; those whose response does not fit data.<key> are dropped (task drops counted)."""
        max_length = getattr(self.cfg, key) or self.cfg.max_length
        rows = [encode(self.tokenizer, self.formatter, e.prompt, e.response, max_length) for e in examples]
        kept = [r for r in rows if r is not None]
        if key == "max_length":
            self.dropped += len(rows) - len(kept)
        if len(kept) < len(rows):
            log.warning("dropped %d of %d examples whose response did not fit data.%s=%d",
                        len(rows) - len(kept), len(rows), key, max_length)
        return kept

    def train_dataloader(self):
        c, pad = self.cfg, self.pad_id
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        g = torch.Generator().manual_seed(self.seed)
        task = dict(collate_fn=partial(collate, pad_id=pad), num_workers=c.num_workers)
        if world > 1 and self.split_task:  # the single-process order at the global batch size, sliced
            batches = BatchSampler(RandomSampler(self.train_rows, generator=g), world * c.batch_size, drop_last=False)
            # the loader's generator too: each new iterator draws a seed from it first, as a shuffling loader's does
            loaders = {"task": DataLoader(self.train_rows, batch_sampler=RankSlices(batches, rank, world), generator=g,
                                          **task)}
        else:
            loaders = {"task": DataLoader(self.train_rows, batch_size=c.batch_size, shuffle=True, generator=g, **task)}
        sizes = {"safety": c.safety_batch_size, "alignment": c.alignment_batch_size or c.batch_size,
                 "harmful": c.alignment_batch_size or c.batch_size}
        for offset, name in enumerate(STREAMS[1:], start=1):
            if name in self.streams:
                collate_fn = partial(collate_pairs if name == "safety" else collate, pad_id=pad)
                # a generator of its own: without one, each new iterator draws its base seed from the
                # global RNG, which would shift the update's dropout masks away from SFT's
                stream = Endless(self.rows[name], self.seed + offset, sizes[name], rank, world)
                loaders[name] = DataLoader(stream, batch_size=sizes[name],
                                           collate_fn=collate_fn, generator=torch.Generator().manual_seed(self.seed + offset))
        return CombinedLoader(loaders, mode="min_size")
