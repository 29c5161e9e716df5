"""Real data sets (data.source=hub): each by Hugging Face id, or from a local file in the same
schema (data.*_path: .json, .jsonl, .parquet, .csv). The output is the run's `Splits`.

    set                 Hub id (split)                                   columns used
    task alpaca         yahma/alpaca-cleaned (train)                     instruction, input, output
    task sst2           stanfordnlp/sst2 (train / validation)            sentence, label
    task agnews         fancyzhx/ag_news (train / test)                  text, label
    task gsm8k          openai/gsm8k, main (train / test)                question, answer
    poison              PKU-Alignment/BeaverTails (30k_train), unsafe    prompt, response, is_safe
    harmful eval        PKU-Alignment/BeaverTails (30k_test), unsafe     prompt, response, is_safe
                        walledai/AdvBench (train)                        prompt, target
    safety pairs        justinphan3110/circuit_breakers_train (train)    prompt, llama3_output (safe), response (harmful)
                        anonymous4486/repnoise_beavertail (train)        prompt, refusal (safe), response (harmful)
    alignment stream    beavertails_refusals: the refusal set above      prompt, refusal, response
    (+ harmful stream)  beavertails_safe: BeaverTails 30k_train, safe    prompt, response, is_safe (no harmful stream)
                        safety_pairs: whichever set data.safety_pairs names

Selection: the training split is shuffled with data.shuffle_seed; a task
without a test split (alpaca) gives its first n_test rows to the held-out set and the next
n_train to training (the reference code's 100 / 1,900); otherwise training takes the first
n_train shuffled rows and the held-out set is the first n_test rows of the test split.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets

from safeprobe.config import DATA_FILE_TYPES, ConfigError, DataConfig
from safeprobe.data.datamodule import Splits, alignment_streams
from safeprobe.data.formatting import with_input
from safeprobe.evaluation.task_metrics import AGNEWS_LABELS, GSM8K_ANSWER_PROMPT, SST2_LABELS
from safeprobe.synthetic.world import Example, SafetyPair

log = logging.getLogger(__name__)

SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
AGNEWS_INSTRUCTION = ("Categorize the news article given in the input into one of the 4 categories:\n\n"
                      + "\n".join(AGNEWS_LABELS) + "\n")
GSM8K_QUESTION_SUFFIX = "\nFirst think step by step and then answer the final number.\n"


NON_TEXT = ("label", "is_safe")  # every other column read must hold text
OPTIONAL_TEXT = ("input",)  # alpaca's input is empty for most rows
BOOLEAN = ("true", "false", "1", "0")


class DataSourceError(ConfigError):
    """A data file or Hub data set that is missing or lacks a column; one line for the user."""


@dataclass(frozen=True)
class Table:
    """Where a data set lives on the Hub, and the columns a file standing in for it must have."""

    hub_id: str
    split: str
    columns: tuple[str, ...]
    config: str | None = None

    def describe(self) -> str:
        return f"{self.hub_id}{f' ({self.config})' if self.config else ''} split {self.split}"


# ------------------------------------------------------------------------- reading


def read_file(path: Path) -> datasets.Dataset:
    """A local .json (a list of records, or one record per line), .jsonl, .parquet or .csv file."""
    if path.suffix in (".json", ".jsonl"):
        text = path.read_text()
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
        if bad is not None:  # e.g. a list of numbers: datasets would fail with a TypeError
            raise ValueError(f"row {bad} is {rows[bad]!r}, not an object with named columns")
        return datasets.Dataset.from_list(rows)
    import pandas as pd

    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, keep_default_na=False)
    return datasets.Dataset.from_pandas(frame, preserve_index=False)


def load_table(table: Table, path: str | None, key: str) -> datasets.Dataset:
    """The local file `path` when given, else the Hub split; either must hold `table.columns`."""
    expected = ", ".join(table.columns)
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise DataSourceError(f"{key}={path!r}: no such file; expected a {'/'.join(DATA_FILE_TYPES)} file "
                                  f"with columns {expected} (the schema of {table.describe()})")
        try:
            data, where = read_file(file), f"{key}={path!r}"
        except (ValueError, OSError) as e:
            raise DataSourceError(f"{key}={path!r} could not be read ({str(e).splitlines()[0]}); "
                                  f"expected columns {expected}") from None
    else:
        try:
            data = datasets.load_dataset(table.hub_id, table.config, split=table.split)
        except Exception as e:  # offline, gated, renamed: say what to do instead
            raise DataSourceError(f"could not load {table.describe()} from the Hugging Face Hub "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                  f"log in, or set {key}=<a local file with columns {expected}>") from None
        where = table.describe()
    missing = [c for c in table.columns if c not in data.column_names]
    if missing:
        raise DataSourceError(f"{where} lacks column(s) {', '.join(missing)}; expected columns {expected}")
    for column in (c for c in table.columns if c not in NON_TEXT):  # a number or an empty cell would reach the tokenizer
        # a local file's empty cell (a CSV's missing value reads as '') is a mistake, except in optional columns
        empty_ok = path is None or column in OPTIONAL_TEXT
        bad = next((i for i, v in enumerate(data[column]) if not isinstance(v, str) or not (empty_ok or v.strip())), None)
        if bad is not None:
            raise DataSourceError(f"{where}: row {bad} has {column}={data[column][bad]!r}; expected text in column {column}")
    if "is_safe" in table.columns:  # any other value would silently count as unsafe
        bad = next((i for i, v in enumerate(data["is_safe"]) if str(v).strip().lower() not in BOOLEAN), None)
        if bad is not None:
            raise DataSourceError(f"{where}: row {bad} has is_safe={data['is_safe'][bad]!r}; expected true or false "
                                  "in column is_safe")
    return data


def _is_true(value) -> bool:
    """A boolean cell, whether the file stored it as a bool, a number or a string."""
    return str(value).strip().lower() in ("true", "1")


def _label(names: tuple[str, ...], value, where: str) -> str:
    """A class index, as a number or its text. -1 (an unlabelled row) would index the last name,
    and null or 1.5 are no label at all."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if not text.isdigit() or int(text) >= len(names):
        raise DataSourceError(f"{where}: label {value!r} is invalid; allowed: 0-{len(names) - 1} ({', '.join(names)})")
    return names[int(text)]


# ------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    train: Table
    test: Table | None  # None: held-out rows come from the shuffled training split
    example: Callable[[dict], Example]


TASKS = {
    "alpaca": Task(Table("yahma/alpaca-cleaned", "train", ("instruction", "input", "output")), None,
                   lambda r: Example(with_input(r["instruction"], r["input"]), r["output"])),
    "sst2": Task(Table("stanfordnlp/sst2", "train", ("sentence", "label")),
                 Table("stanfordnlp/sst2", "validation", ("sentence", "label")),
                 lambda r: Example(with_input(SST2_INSTRUCTION, r["sentence"]), _label(SST2_LABELS, r["label"], "sst2"))),
    "agnews": Task(Table("fancyzhx/ag_news", "train", ("text", "label")), Table("fancyzhx/ag_news", "test", ("text", "label")),
                   lambda r: Example(with_input(AGNEWS_INSTRUCTION, r["text"]), _label(AGNEWS_LABELS, r["label"], "agnews"))),
    "gsm8k": Task(Table("openai/gsm8k", "train", ("question", "answer"), "main"),
                  Table("openai/gsm8k", "test", ("question", "answer"), "main"),
                  lambda r: Example(r["question"] + GSM8K_QUESTION_SUFFIX, r["answer"].replace("####", GSM8K_ANSWER_PROMPT))),
}


def task_sets(cfg: DataConfig) -> tuple[list[Example], list[Example]]:
    """(training pool of n_train examples, held-out examples) for data.task."""
    task = TASKS[cfg.task]
    train = load_table(task.train, cfg.task_path, "data.task_path").shuffle(seed=cfg.shuffle_seed)
    if task.test is None:
        if cfg.n_test is None:
            raise ConfigError(f"data.n_test=None is invalid for data.task={cfg.task}; allowed: an integer >= 1 "
                              "(the task has no test split, so held-out rows are taken from its training split)")
        if cfg.n_test >= len(train):
            raise ConfigError(f"data.n_test={cfg.n_test} is invalid; allowed: fewer than the {len(train)} rows of the "
                              "task's data, so some are left for training")
        test = train.select(range(cfg.n_test))
        train = train.select(range(cfg.n_test, min(cfg.n_test + cfg.n_train, len(train))))
    else:
        test = load_table(task.test, cfg.task_test_path, "data.task_test_path")
        test = test.select(range(min(cfg.n_test or len(test), len(test))))
        train = train.select(range(min(cfg.n_train, len(train))))
    if not len(train):
        raise ConfigError(f"data.n_test={cfg.n_test} is invalid; allowed: fewer than the {len(test)} rows of the "
                          "task's data, so some are left for training")
    if len(train) < cfg.n_train:  # the fine-tuning set then cycles through them (mix_training_set)
        log.warning("the task's data has %d training rows; data.n_train=%d repeats them", len(train), cfg.n_train)
    return [task.example(r) for r in train], [task.example(r) for r in test]


# ------------------------------------------------------------------------- safety sets

BEAVERTAILS = ("prompt", "response", "is_safe")
POISON = {"beavertails": Table("PKU-Alignment/BeaverTails", "30k_train", BEAVERTAILS)}
HARMFUL_EVAL = {"beavertails": Table("PKU-Alignment/BeaverTails", "30k_test", BEAVERTAILS),
                "advbench": Table("walledai/AdvBench", "train", ("prompt", "target"))}
SAFETY_PAIRS = {"circuit_breakers": Table("justinphan3110/circuit_breakers_train", "train", ("prompt", "llama3_output", "response")),
                "beavertails_refusals": Table("anonymous4486/repnoise_beavertail", "train", ("prompt", "refusal", "response"))}


def clean_refusal(text: str) -> str:
    """Some refusals of the BeaverTails-with-refusals set repeat the request as
    "Question: ... Answer: <refusal>"; keep only the refusal."""
    if text.lstrip().startswith("Question:") and "Answer:" in text:
        return text.split("Answer:", 1)[1].strip()
    return text.strip()


def poison_set(cfg: DataConfig) -> list[Example]:
    """Harmful prompts with harmful answers (unsafe BeaverTails rows); loaded only when p > 0."""
    if cfg.poison_ratio == 0:
        return []
    rows = load_table(POISON[cfg.poison], cfg.poison_path, "data.poison_path")
    return [Example(r["prompt"], r["response"]) for r in rows if not _is_true(r["is_safe"])]


def harmful_eval_set(cfg: DataConfig) -> list[SafetyPair]:
    """Held-out harmful prompts in file order (the protocol scores the first N). The refusal
    margin needs a safe and a harmful answer: data.refusal and the set's harmful answer."""
    rows = load_table(HARMFUL_EVAL[cfg.harmful_eval], cfg.harmful_eval_path, "data.harmful_eval_path")
    if cfg.harmful_eval == "advbench":
        pairs = [SafetyPair(r["prompt"], cfg.refusal, r["target"]) for r in rows]
    else:
        pairs = [SafetyPair(r["prompt"], cfg.refusal, r["response"]) for r in rows if not _is_true(r["is_safe"])]
    if not pairs:  # a harmful score over no prompts would be NaN, or worse, read as safe
        raise DataSourceError(f"data.harmful_eval={cfg.harmful_eval} ({cfg.harmful_eval_path or 'the Hub set'}) has no "
                              "harmful rows to evaluate; expected rows with is_safe false")
    return pairs


def safety_pairs(cfg: DataConfig) -> list[SafetyPair]:
    """SAP's contrastive pairs: the first n_safety_pairs after a seeded shuffle (the reference: 48)."""
    rows = load_table(SAFETY_PAIRS[cfg.safety_pairs], cfg.safety_pairs_path, "data.safety_pairs_path")
    rows = rows.shuffle(seed=cfg.shuffle_seed)
    rows = rows.select(range(min(cfg.n_safety_pairs or len(rows), len(rows))))
    if cfg.safety_pairs == "circuit_breakers":
        return [SafetyPair(r["prompt"], r["llama3_output"], r["response"]) for r in rows]
    return [SafetyPair(r["prompt"], clean_refusal(r["refusal"]), r["response"]) for r in rows]


def alignment_pairs(cfg: DataConfig) -> list[SafetyPair]:
    """(harmful prompt, safe answer, harmful answer or None) rows behind the alignment and harmful streams."""
    if cfg.alignment_set == "safety_pairs":
        return safety_pairs(cfg)
    if cfg.alignment_set == "beavertails_safe":
        rows = load_table(POISON["beavertails"], cfg.alignment_path, "data.alignment_path")
        return [SafetyPair(r["prompt"], r["response"], None) for r in rows if _is_true(r["is_safe"])]
    rows = load_table(SAFETY_PAIRS["beavertails_refusals"], cfg.alignment_path, "data.alignment_path")
    return [SafetyPair(r["prompt"], clean_refusal(r["refusal"]), r["response"]) for r in rows]


def hub_splits(cfg: DataConfig, eval_split: str, streams: tuple[str, ...] = ("task", "safety")) -> Splits:
    """The run's sets; the alignment set is read only when a stream of the method needs it."""
    if eval_split != "test":
        raise ConfigError(f"eval.split={eval_split!r} is invalid for data.source=hub; allowed: test "
                          "(the real harmful sets have no validation split)")
    train, test = task_sets(cfg)
    splits = Splits(train, test, poison_set(cfg), safety_pairs(cfg), harmful_eval_set(cfg), [], cfg.task)
    if {"alignment", "harmful"} & set(streams):
        splits.alignment, splits.harmful, splits.alignment_pairs = alignment_streams(
            alignment_pairs(cfg), cfg.n_alignment, cfg.shuffle_seed)
    log.info("data: %d task train, %d task held-out, %d poison, %d safety pairs, %d alignment, %d harmful, "
             "%d harmful eval prompts", len(train), len(test), len(splits.poison), len(splits.safety_pairs),
             len(splits.alignment), len(splits.harmful), len(splits.harmful_eval))
    return splits
