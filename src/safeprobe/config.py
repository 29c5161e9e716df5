"""Typed schema of the Hydra config, and the checks that stop a bad run before training.

Every config group in conf/ has one dataclass here. `validate(cfg)` turns a composed
DictConfig into these dataclasses and raises `ConfigError` with one line naming the key
and what is allowed. `check_cli_overrides(argv)` does the same for command-line
overrides *before* Hydra composes (Hydra's own messages for a misspelled key or an
unknown option span several lines and do not list what is allowed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_ROOT / "conf"
if not OmegaConf.has_resolver("project_root"):  # conf/paths: never rely on the working directory
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
BOOKKEEPING = ("paths.", "logger", "hydra.", "trainer.enable_progress_bar", "eval.before")


def swept_keys(argv: list[str]) -> set[str]:
    """The keys a multirun command line sweeps (`seed=0,1`, `probe.eps=range(...)`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides([a for a in argv if "=" in a and not a.startswith("-")])
    except Exception:  # not Hydra's syntax: Hydra itself reports it
        return set()
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


def as_dirname(override_dirname: str, limit: int = 160) -> str:
    """A sweep job's folder name from its overrides: '/' made safe; the swept keys first (read
    from the command line), bookkeeping keys last; a name over `limit` characters cut with a
    hash of the whole. So names stay unique and the settings that tell jobs apart stay readable."""
    import sys

    swept = swept_keys(sys.argv[1:])
    items = [o.replace("/", "-") for o in str(override_dirname).split(",") if o]
    items.sort(key=lambda o: (o.split("=")[0].lstrip("+~") not in swept, o.lstrip("+~").startswith(BOOKKEEPING)))
    name = ",".join(items) or "default"
    if len(name) > limit:
        name = name[: limit - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


if not OmegaConf.has_resolver("as_dirname"):  # conf/hydra/default.yaml: the sweep's job folders
    OmegaConf.register_new_resolver("as_dirname", as_dirname)


class ConfigError(ValueError):
    """A configuration mistake; its message is one line meant for the user."""


class RunError(RuntimeError):
    """A run that cannot go on (training diverged, a broken model); one line for the user."""


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid; allowed: {allowed}")


def one_of(key: str, value: Any, options: tuple[str, ...]) -> None:
    require(value in options, key, value, ", ".join(options))


SEED_MAX = 2**32 - 1  # numpy's seeds, which Lightning's seed_everything and datasets' shuffle take


def require_seed(key: str, value: int) -> None:
    require(0 <= value <= SEED_MAX, key, value, f"an integer in [0, {SEED_MAX}]")


# --------------------------------------------------------------------------- groups


@dataclass
class WorldConfig:
    """The synthetic safety world's grammar sizes and split seed (see synthetic/world.py)."""

    seed: int = 1234
    n_templates: int = 6
    n_objects: int = 18
    n_harmful_verbs: int = 16
    n_poison_verbs: int = 4
    n_benign_verbs: int = 12
    n_task_verbs: int = 6
    n_known_task_verbs: int = 6  # task verbs the aligned model already answers (helpful format)
    n_safety_pairs: int = 48
    n_harmful_val: int = 100
    n_harmful_test: int = 200

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.name not in ("seed", "n_known_task_verbs"):
                require(getattr(self, f.name) >= 1, f"model.world.{f.name}", getattr(self, f.name), "an integer >= 1")
        require(self.n_poison_verbs < self.n_harmful_verbs, "model.world.n_poison_verbs",
                 self.n_poison_verbs, f"fewer than n_harmful_verbs ({self.n_harmful_verbs})")
        require(0 <= self.n_known_task_verbs <= self.n_task_verbs, "model.world.n_known_task_verbs",
                 self.n_known_task_verbs, f"an integer in [0, n_task_verbs={self.n_task_verbs}]")


@dataclass
class AlignmentConfig:
    """The alignment stage that makes the synthetic base model refuse harmful requests."""

    steps: int = 800
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self):
        require(self.steps >= 20, "model.alignment.steps", self.steps,
                "an integer >= 20 (its one-cycle schedule warms up over the first 10%)")
        require(self.lr > 0, "model.alignment.lr", self.lr, "a number > 0")


@dataclass
class ModelConfig:
    kind: str = "synthetic"  # synthetic: built and aligned here; pretrained: HF id or folder
    name_or_path: str | None = None
    # synthetic: chat (safety-aligned, the default) | base (the same model trained without safety data)
    variant: str = "chat"
    # the unaligned model of the same architecture, for post=safelora (pretrained; synthetic: its base variant)
    base_name_or_path: str | None = None
    arch: dict[str, Any] = field(default_factory=dict)  # LlamaConfig kwargs (synthetic)
    world: WorldConfig = field(default_factory=WorldConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    dtype: str = "float32"
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False

    def __post_init__(self):
        one_of("model.kind", self.kind, ("synthetic", "pretrained"))
        one_of("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        if self.kind == "synthetic":
            one_of("model.variant", self.variant, ("chat", "base"))
        else:
            require(self.variant == "chat", "model.variant", self.variant,
                    "chat (a pretrained model's base model is another model.name_or_path)")
        if self.kind == "pretrained":
            require(bool(self.name_or_path), "model.name_or_path", self.name_or_path,
                     "a Hugging Face model id or a local folder")
            local = str(self.name_or_path).startswith(("/", "./", "../", "~"))  # a Hub id is <org>/<name>
            require(not local or Path(self.name_or_path).expanduser().is_dir(), "model.name_or_path",
                    self.name_or_path, "a Hugging Face model id or an existing local folder")
            base = self.base_name_or_path
            require(base is None or not str(base).startswith(("/", "./", "../", "~")) or Path(base).expanduser().is_dir(),
                    "model.base_name_or_path", base, "null, a Hugging Face model id or an existing local folder")
        else:
            require(self.base_name_or_path is None, "model.base_name_or_path", self.base_name_or_path,
                    "null (the synthetic world's base model is model.variant=base)")


@dataclass
class AdapterConfig:
    kind: str = "lora"  # lora | full
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Any = "all-linear"  # a list of module names, or "all-linear"

    def __post_init__(self):
        one_of("adapter.kind", self.kind, ("lora", "full"))
        require(self.r >= 1, "adapter.r", self.r, "an integer >= 1")
        require(0 <= self.dropout < 1, "adapter.dropout", self.dropout, "a number in [0, 1)")


@dataclass
class ProbeConfig:
    """SAP's probe (docs/sap.md). eps is the probe radius per layer (the paper's beta)."""

    eps: float = 0.2
    harmful_step: float = 0.1  # delta = harmful_step * ||theta|| * g_hat (the paper's epsilon)
    layers: list[int] = field(default_factory=lambda: [2, 3])
    steps: int = 1
    step_size: float | None = None  # per ascent step; None = 2.5 * eps / steps
    norm: str = "linf"  # linf (sign step) | l2
    mode: str = "clean"  # clean | faithful (the reference code's stateful, stale Adam probe)
    temperature: float = 1.0
    contrast: str = "sequence"  # sequence: whole answers (the paper) | decision: up to the first differing token
    refresh_every: int = 16  # steps between new unsafe directions and probes (kept in between); 1: every step
    probe_examples: int | None = None  # task examples the probe search reads (the batch's first n); None: all
    safety_chunk: int | None = None  # safety pairs per backward of the direction pass; None: within the task batch
    # how grad_V [L(theta + delta, V) - L(theta, V)] is computed: finite (two passes, the paper's formula) |
    # midpoint (the integral of its derivative along delta, midpoint rule: one pass + a second backward,
    # exact in 16-bit) | auto (finite in float32, midpoint where the step computes in bf16/fp16)
    difference: str = "auto"

    def __post_init__(self):
        require(self.eps >= 0, "probe.eps", self.eps, "a number >= 0")
        require(self.refresh_every >= 1, "probe.refresh_every", self.refresh_every, "an integer >= 1")
        require(self.probe_examples is None or self.probe_examples >= 1, "probe.probe_examples", self.probe_examples,
                "null (the whole batch) or an integer >= 1")
        require(self.safety_chunk is None or self.safety_chunk >= 1, "probe.safety_chunk", self.safety_chunk,
                "null (as many as the task batch holds) or an integer >= 1")
        require(self.harmful_step >= 0, "probe.harmful_step", self.harmful_step, "a number >= 0")
        require(len(self.layers) >= 1 and all(i >= 0 for i in self.layers) and len(set(self.layers)) == len(self.layers),
                "probe.layers", list(self.layers), "a non-empty list of distinct decoder-layer indices >= 0")
        require(self.steps >= 1, "probe.steps", self.steps, "an integer >= 1")
        require(self.step_size is None or self.step_size > 0, "probe.step_size", self.step_size,
                 "null or a number > 0")
        one_of("probe.norm", self.norm, ("linf", "l2"))
        one_of("probe.mode", self.mode, ("clean", "faithful"))
        require(self.temperature > 0, "probe.temperature", self.temperature, "a number > 0")
        one_of("probe.contrast", self.contrast, ("sequence", "decision"))
        one_of("probe.difference", self.difference, ("auto", "finite", "midpoint"))


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float | None = 1.0

    def __post_init__(self):
        require(self.lr > 0, "optim.lr", self.lr, "a number > 0")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "a number >= 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", list(self.betas),
                "two numbers in [0, 1)")
        require(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip", self.grad_clip, "null or a number > 0")


HUB_TASKS = ("alpaca", "sst2", "agnews", "gsm8k")
HUB_POISON = ("beavertails",)
HUB_SAFETY_PAIRS = ("circuit_breakers", "beavertails_refusals")
HUB_HARMFUL_EVAL = ("beavertails", "advbench")
SYNTHETIC_ALIGNMENT = ("world", "safety_pairs")
HUB_ALIGNMENT = ("beavertails_refusals", "beavertails_safe", "safety_pairs")
DATA_FILE_TYPES = (".json", ".jsonl", ".parquet", ".csv")


@dataclass
class DataConfig:
    """source=synthetic: the generated world. source=hub: real data sets by Hugging Face id
    (data/sources.py), each replaceable by a local file in the same schema (the *_path keys)."""

    source: str = "synthetic"  # synthetic | hub
    task: str = "instruct"  # synthetic: instruct | classify; hub: alpaca | sst2 | agnews | gsm8k
    task_path: str | None = None  # a local file instead of the task's Hub training split
    task_test_path: str | None = None  # a local file instead of its Hub test split
    n_train: int = 512  # n: fine-tuning examples, poison included
    n_test: int | None = None  # held-out task examples (hub; None: the whole test split)
    poison_ratio: float = 0.0  # p: share of the n examples that are harmful prompts with harmful answers
    poison: str = "beavertails"  # hub: unsafe BeaverTails 30k_train prompt+response pairs
    poison_path: str | None = None
    safety_pairs: str = "circuit_breakers"  # hub: circuit_breakers (the reference's schema) | beavertails_refusals
    safety_pairs_path: str | None = None
    n_safety_pairs: int | None = None  # hub: the first n after shuffling (None: all)
    # the alignment stream (harmful prompt -> refusal or safe answer) and the harmful stream (the
    # same prompts -> harmful answers), for the defenses that declare them (docs/methods.md).
    # synthetic: world (the provider's alignment prompts) | safety_pairs (SAP's pairs);
    # hub: beavertails_refusals | beavertails_safe (safe answers; no harmful stream) | safety_pairs
    alignment_set: str | None = None  # None: world (synthetic), beavertails_refusals (hub)
    alignment_path: str | None = None  # hub: a local file instead of the Hub set, same schema
    n_alignment: int | None = None  # the first n after a seeded shuffle (None: all)
    alignment_batch_size: int | None = None  # None: batch_size
    harmful_eval: str = "beavertails"  # hub: unsafe BeaverTails 30k_test prompts | advbench
    harmful_eval_path: str | None = None
    refusal: str | None = None  # hub: a fixed refusal; with it the refusal margin is measured on real sets
    shuffle_seed: int = 42  # hub: the shuffle that picks train / held-out / safety-pair rows
    batch_size: int = 16
    safety_batch_size: int = 8
    max_length: int = 64
    safety_max_length: int | None = None  # None: max_length
    prompt_format: str = "plain"  # plain | chat | alpaca
    system_prompt: str | None = None
    num_workers: int = 0

    def __post_init__(self):
        one_of("data.source", self.source, ("synthetic", "hub"))
        one_of("data.task", self.task, ("instruct", "classify") if self.source == "synthetic" else HUB_TASKS)
        require(0 <= self.poison_ratio <= 1, "data.poison_ratio", self.poison_ratio, "a number in [0, 1]")
        for key in ("n_train", "batch_size", "safety_batch_size", "max_length"):
            require(getattr(self, key) >= 1, f"data.{key}", getattr(self, key), "an integer >= 1")
        for key in ("n_test", "n_safety_pairs", "safety_max_length", "n_alignment", "alignment_batch_size"):
            require(getattr(self, key) is None or getattr(self, key) >= 1, f"data.{key}", getattr(self, key),
                     "null or an integer >= 1")
        one_of("data.prompt_format", self.prompt_format, ("plain", "chat", "alpaca"))
        require_seed("data.shuffle_seed", self.shuffle_seed)
        if self.alignment_set is None:
            self.alignment_set = "world" if self.source == "synthetic" else "beavertails_refusals"
        one_of("data.alignment_set", self.alignment_set,
                SYNTHETIC_ALIGNMENT if self.source == "synthetic" else HUB_ALIGNMENT)
        if self.source == "hub":
            one_of("data.poison", self.poison, HUB_POISON)
            one_of("data.safety_pairs", self.safety_pairs, HUB_SAFETY_PAIRS)
            one_of("data.harmful_eval", self.harmful_eval, HUB_HARMFUL_EVAL)
        for key in ("task_path", "task_test_path", "poison_path", "safety_pairs_path", "harmful_eval_path",
                    "alignment_path"):
            path = getattr(self, key)
            require(path is None or Path(path).suffix in DATA_FILE_TYPES, f"data.{key}", path,
                     "null (the Hub data set) or a file ending in " + ", ".join(DATA_FILE_TYPES))


JUDGES = ("exact", "keyword", "beaverdam", "llamaguard", "harmbench")


@dataclass
class EvalConfig:
    judges: list[str] = field(default_factory=lambda: ["exact", "keyword"])
    split: str = "test"  # which held-out harmful split: val | test
    also_val: bool = True  # with split=test, also score the val split (val/...): choose on val, report test
    max_new_tokens: int = 24
    batch_size: int = 64
    n_harmful: int | None = None  # None = the whole split
    n_task: int | None = None
    before: bool = True  # also evaluate the model before fine-tuning
    # per-judge keyword arguments of evaluation/judges.py, e.g. beaverdam: {name_or_path: <id or folder>}
    judge_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        require(len(self.judges) >= 1 and all(j in JUDGES for j in self.judges), "eval.judges",
                 list(self.judges), "a non-empty list from " + ", ".join(JUDGES))
        require(set(self.judge_options) <= set(JUDGES), "eval.judge_options", sorted(self.judge_options),
                 "a mapping whose keys are judges: " + ", ".join(JUDGES))
        one_of("eval.split", self.split, ("val", "test"))
        require(self.max_new_tokens >= 1, "eval.max_new_tokens", self.max_new_tokens, "an integer >= 1")
        for key in ("n_harmful", "n_task"):
            require(getattr(self, key) is None or getattr(self, key) >= 1, f"eval.{key}", getattr(self, key),
                    "null (the whole split) or an integer >= 1")
        require(self.batch_size >= 1, "eval.batch_size", self.batch_size, "an integer >= 1")


PRECISIONS = ("32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true", "64-true", "64",
              "transformer-engine", "transformer-engine-float16")  # what lightning.Trainer takes


@dataclass
class TrainerConfig:
    """Passed to lightning.Trainer as keyword arguments (distributed.trainer_kwargs), but
    timeout_minutes, which goes to the strategy. Several processes: docs/distributed.md."""

    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    # a registered name (auto, ddp, ddp_spawn, fsdp, ...) or a node: _target_ (a Lightning strategy
    # class, e.g. lightning.pytorch.strategies.DDPStrategy) and its arguments (conf/trainer/fsdp.yaml)
    strategy: Any = "auto"
    precision: str = "32-true"
    max_steps: int = 200  # -1: no step limit (then max_epochs ends training)
    max_epochs: int = -1  # -1: no epoch limit (then max_steps ends training)
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    deterministic: bool = False
    accumulate_grad_batches: int = 1  # only 1: the methods step once per batch (manual optimization)
    # false: every rank takes its slice of the batch one process would see (the same run at any
    # device count); true: Lightning's DistributedSampler splits the task set (its own shuffle)
    use_distributed_sampler: bool = False
    timeout_minutes: float | None = None  # the process group's timeout (null: Lightning's, 30 minutes)

    def __post_init__(self):
        one_of("trainer.accelerator", self.accelerator, ("auto", "cpu", "gpu", "cuda", "mps", "tpu"))
        one_of("trainer.precision", self.precision, PRECISIONS)
        d = self.devices
        if isinstance(d, str) and d.lstrip("-").isdigit():
            d = int(d)
        require(d == "auto" or (type(d) is int and (d == -1 or d >= 1))
                or (isinstance(d, list) and d and len(set(d)) == len(d) and all(type(i) is int and i >= 0 for i in d)),
                "trainer.devices", self.devices, "auto, -1 (all), a number >= 1, or a list of distinct device indices")
        require(self.num_nodes >= 1, "trainer.num_nodes", self.num_nodes, "an integer >= 1")
        require(self.accumulate_grad_batches == 1, "trainer.accumulate_grad_batches", self.accumulate_grad_batches,
                "1 (every method takes one optimizer step per batch by manual optimization, which Lightning does not "
                "accumulate; for a larger batch raise data.batch_size, with model.gradient_checkpointing, or add devices)")
        require(self.timeout_minutes is None or self.timeout_minutes > 0, "trainer.timeout_minutes",
                self.timeout_minutes, "null or a number > 0")
        if self.strategy != "auto" or self.timeout_minutes is not None:  # only then import lightning: it takes seconds
            from safeprobe.distributed import check_strategy

            check_strategy(self.strategy, self.timeout_minutes)
        require(self.max_steps >= 1 or self.max_steps == -1, "trainer.max_steps", self.max_steps, "-1 or an integer >= 1")
        require(self.max_epochs >= 1 or self.max_epochs == -1, "trainer.max_epochs", self.max_epochs,
                 "-1 or an integer >= 1")
        require(self.max_steps >= 1 or self.max_epochs >= 1, "trainer.max_steps", self.max_steps,
                 "an integer >= 1 when trainer.max_epochs=-1 (one of the two must end training)")


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "safeprobe"
    entity: str | None = None
    mode: str | None = None  # None: online when logged in, else offline
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        require(self.mode in (None, "online", "offline", "disabled"), "logger.wandb.mode", self.mode,
                 "null, online, offline, disabled")


@dataclass
class CSVConfig:
    enabled: bool = True


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    csv: CSVConfig = field(default_factory=CSVConfig)


@dataclass
class PathsConfig:
    root_dir: str = "."
    output_dir: str = "outputs/run"
    cache_dir: str = ".cache/safeprobe"


@dataclass
class AlignConfig:
    """The optional alignment stage (conf/align): before fine-tuning, the provider re-aligns the
    starting model with a registered method trained on the alignment stream (as the task), as a
    LoRA (the `adapter` settings) merged into the weights. Cached under a key of everything that
    produced it (stages.py)."""

    method: Any = None  # None: no stage; else a method node, e.g. {name: sft}
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    lora: str = "double"  # double: merge the stage's LoRA, fine-tune a fresh one; single: fine-tune the stage's LoRA

    def __post_init__(self):
        require(self.steps >= 1, "align.steps", self.steps, "an integer >= 1")
        require(self.lr > 0 and math.isfinite(self.lr), "align.lr", self.lr, "a finite number > 0")
        require(self.batch_size >= 1, "align.batch_size", self.batch_size, "an integer >= 1")
        require_seed("align.seed", self.seed)
        one_of("align.lora", self.lora, ("double", "single"))


# what train.py may return to a Hydra sweeper: the metrics of results.json's "after"
OBJECTIVE_HARMFUL = ("harmful_score", *(f"harmful_score/{j}" for j in JUDGES), "refusal_rate", "unusable_rate",
                     "refusal_margin", "refusal_margin/sequence")  # also scored on the validation split: val/<name>
OBJECTIVE_TASK = ("fine_tune_accuracy", "test_loss", "benign_compliance")


def check_objective(objective: list[str], data: DataConfig, ev: EvalConfig) -> None:
    """`objective`: metrics after fine-tuning; val/... only where the run scores a validation split."""
    allowed = (*OBJECTIVE_HARMFUL, *OBJECTIVE_TASK, *(f"val/{m}" for m in OBJECTIVE_HARMFUL))
    require(len(objective) >= 1 and all(m in allowed for m in objective), "objective", list(objective),
            "a non-empty list of metrics after fine-tuning: " + ", ".join((*OBJECTIVE_HARMFUL, *OBJECTIVE_TASK))
            + ", and val/<harmful metric> (the validation split)")
    val = [m for m in objective if m.startswith("val/")]
    if val and not (data.source == "synthetic" and ev.split == "test" and ev.also_val):
        if data.source != "synthetic":
            why = "data.source=hub: the real harmful sets have no validation split"
            fix = "metrics without val/, which are the test split's (choosing on them tunes on the test set)"
        elif ev.split == "val":
            why, fix = "eval.split=val scores the validation split itself", f"the same without val/: {val[0][4:]}"
        else:
            why, fix = "eval.also_val=false", "eval.also_val=true"
        raise ConfigError(f"objective {val[0]!r} needs the validation split scored next to the test split, and this "
                          f"run scores none ({why}); allowed: {fix}")


@dataclass
class TrainConfig:
    seed: int = 0
    save_adapter: bool = True
    checkpoint_every: int = 50  # steps between checkpoints (0: none; one is still saved at SIGTERM / Ctrl-C)
    resume: bool = False  # continue the run in hydra.run.dir from its checkpoint (checkpoint.py)
    cpu_kernels: str = "auto"  # auto | native | portable: the same floating-point path on every x86-64 CPU (kernels.py)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    method: Any = field(default_factory=lambda: {"name": "sap"})  # checked against the method's registered config
    align: AlignConfig = field(default_factory=AlignConfig)
    post: Any = None  # the post-fine-tuning repair (conf/post): None, or a node such as {name: safelora}
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # what train.py returns to a Hydra sweeper (conf/hparams_search): these metrics after fine-tuning,
    # in the order of hydra.sweeper.direction; val/...: the validation split (docs/reporting.md)
    objective: list[str] = field(default_factory=lambda: ["harmful_score"])

    def __post_init__(self):
        require(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, "0 (off) or an integer >= 1")
        one_of("cpu_kernels", self.cpu_kernels, ("auto", "native", "portable"))
        check_objective(self.objective, self.data, self.eval)
        # the trained weights are their own master copy: in 16-bit, every update below the format's
        # resolution (relative 2^-8 in bf16) is rounded away
        require(self.trainer.precision not in ("bf16-true", "16-true"), "trainer.precision", self.trainer.precision,
                "32-true or a mixed precision such as bf16-mixed (a 16-bit '-true' precision trains 16-bit weights "
                "with no float32 master copy)")
        require(self.adapter.kind != "full" or self.model.dtype == "float32", "model.dtype", self.model.dtype,
                "float32 with adapter=full (the trained weights stay float32 master weights; trainer.precision="
                "bf16-mixed still computes in bf16), or adapter=lora (PEFT keeps LoRA weights in float32)")


@dataclass
class EvalRunConfig:
    """eval.py: re-evaluate a saved run folder (or an adapter inside one)."""

    run_dir: str | None = None
    eval: EvalConfig | None = None  # None: the saved run's eval settings; given keys replace the saved ones
    judges_only: bool = False  # score the run's saved generations.jsonl with eval.judges; no generation
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(wandb=WandbConfig(enabled=False)))
    paths: PathsConfig = field(default_factory=PathsConfig)


# ------------------------------------------------------------------------ validation

# keys that hold free-form mappings (checked by the library that takes them)
_FREE_FORM = {"model.arch"}


def _dataclass_of(schema: Any, name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(schema)}[name]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if dataclasses.is_dataclass(default):
        return type(default)
    if name == "eval" and schema is EvalRunConfig:
        return EvalConfig
    return None


def _check_keys(node: DictConfig, schema: type, path: str) -> None:
    allowed = [f.name for f in dataclasses.fields(schema)]
    for key in node.keys():
        full = f"{path}.{key}" if path else str(key)
        if key not in allowed:
            where = f"under '{path}'" if path else "at the top level"
            raise ConfigError(f"unknown key '{full}'; allowed keys {where}: {', '.join(allowed)}")
        sub = _dataclass_of(schema, key)
        child = node[key]
        if sub is not None and isinstance(child, DictConfig) and full not in _FREE_FORM:
            _check_keys(child, sub, full)


def _typed(schema: type, node: Any, path: str = "") -> Any:
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{path + '.' if path and key != '?' else path}{key}: {str(e).splitlines()[0]}") from None


def method_config(node: Any, path: str = "method") -> Any:
    """A `method` node -> the registered method's typed config (methods/registry.py)."""
    from safeprobe.methods import method_spec

    node = OmegaConf.create(to_plain(node) if node is not None else {})
    if "name" not in node:
        raise ConfigError(f"{path}.name is missing; allowed: one of the registered methods (conf/method/)")
    spec = method_spec(node.name, path)
    _check_keys(node, spec.config, path)
    return _typed(spec.config, node, path)


def _check_finite(node: Any, path: str = "") -> None:
    """Every number in the config is finite: inf or nan would pass the range checks (inf > 0)
    and silently turn a method into another (e.g. SAP into SFT)."""
    if isinstance(node, float):
        require(math.isfinite(node), path, node, "a finite number")
    elif dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            _check_finite(getattr(node, f.name), f"{path}.{f.name}".lstrip("."))  # free-form mappings too
    elif isinstance(node, dict):
        for k, v in node.items():
            _check_finite(v, f"{path}.{k}")
    elif isinstance(node, (list, tuple)):
        for v in node:
            _check_finite(v, path)


def validate(cfg: DictConfig, schema: type = TrainConfig) -> Any:
    """Check `cfg` against `schema`; return the typed dataclass or raise ConfigError."""
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    _check_keys(plain, schema, "")
    typed = _typed(schema, plain)
    if isinstance(typed, TrainConfig):
        require_seed("seed", typed.seed)
        typed.method = method_config(typed.method)
        if typed.align.method is not None:
            typed.align.method = method_config(typed.align.method, "align.method")
        if typed.post is not None and to_plain(typed.post).get("name") is not None:
            from safeprobe.post import post_config

            typed.post = post_config(typed.post)
        else:
            typed.post = None
    _check_finite(typed)
    return typed


def check_probe_layers(layers: list[int], n_layers: int) -> None:
    bad = [i for i in layers if not 0 <= i < n_layers]
    require(not bad, "probe.layers", list(layers),
             f"decoder-layer indices in [0, {n_layers - 1}] (the model has {n_layers} layers)")


# --------------------------------------------------------------- command-line checks

GROUPS = ("model", "adapter", "method", "probe", "align", "post", "data", "eval", "trainer", "logger", "experiment",
          "paths", "hparams_search")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_cli_overrides(args: list[str], schema: type = TrainConfig) -> None:
    """Reject a misspelled key or an unknown group option on the command line, before Hydra.

    Only plain `key=value` overrides are checked; `+key`, `++key`, `~key` and `hydra.*`
    are left to Hydra, as are values (checked by `validate` once the config is composed).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser, overrides = OverridesParser.create(), []
    for arg in (a for a in args if "=" in a and not a.startswith("-")):
        try:
            overrides += parser.parse_overrides([arg])
        except OverrideParseException:
            key, value = arg.split("=", 1)
            raise ConfigError(f"cannot read {arg!r}; quote a value that holds '=', ',' or spaces (a sweep job's folder "
                              f"does), e.g. \"{key}='{value}'\"") from None
    free_form = []  # overrides of a key inside a free-form mapping (model.arch.hidden_size=...)
    for o in overrides:
        key = o.key_or_group
        if o.is_add() or o.is_force_add() or o.is_delete() or key.split(".")[0].split("/")[0] == "hydra":
            continue
        if "/" not in key and "." not in key and key in GROUPS and (CONF_DIR / key).is_dir():
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            options = group_options(key)
            for v in values:
                if v not in options and v != "null":
                    raise ConfigError(f"{key}={v} is not a known option; allowed: {', '.join(options)}")
            continue
        node: type | None = schema
        parts = key.split(".")
        for i, part in enumerate(parts):
            path = ".".join(parts[:i])
            if path in ("method", "align.method"):  # the keys of the chosen method (methods/registry.py)
                chosen = _chosen_methods(overrides) if path == "method" else None
                for name in chosen or [None]:
                    allowed = _method_keys(name)
                    if part not in allowed:
                        which = f" for method={name}" if name else " (any method)"
                        raise ConfigError(f"unknown key '{key}'{which}; allowed keys under '{path}': {', '.join(allowed)}")
                first = (_chosen_methods([]) or [None])[0]
                if chosen and len(chosen) > 1 and part not in _method_keys(first) and not o.input_line.startswith("+"):
                    raise ConfigError(f"a sweep over methods composes the default method first, which lacks "
                                      f"'{key}'; write it as '++{o.input_line}'")
                break
            if path == "post":  # the keys of the repairs (post/)
                from safeprobe.post import REPAIRS

                allowed = sorted({f.name for spec in REPAIRS.values() for f in dataclasses.fields(spec.config)})
                if part not in allowed:
                    raise ConfigError(f"unknown key '{key}'; allowed keys under 'post': {', '.join(allowed)}")
                break
            if ".".join(parts[: i + 1]) in _FREE_FORM or node is None:
                if node is not None and i + 1 < len(parts):
                    free_form.append(o)
                break
            allowed = [f.name for f in dataclasses.fields(node)]
            if part not in allowed:
                where = f"under '{path}'" if path else "at the top level"
                raise ConfigError(f"unknown key '{key}'; allowed keys {where}: {', '.join(allowed)}")
            node = _dataclass_of(node, part)


    if free_form and schema is TrainConfig:
        _check_free_form(free_form, [o for o in overrides if o not in free_form])


def _check_free_form(free_form: list, others: list) -> None:
    """A key inside a free-form mapping must be one the composed mapping holds (Hydra's own
    message for a new one is several lines); a new key is added with '+'. Composes the config
    with the other overrides (a fraction of a second; only when such a key is given)."""
    from hydra import compose, initialize_config_dir

    if any(o.is_sweep_override() for o in others):
        return  # the mapping depends on the sweep's jobs: Hydra checks each
    plain = [o.input_line for o in others if o.key_or_group.split(".")[0] != "hydra"]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=plain)
    except Exception:  # noqa: BLE001  another override is wrong: Hydra or validate reports it
        return
    for o in free_form:
        parent, key = o.key_or_group.rsplit(".", 1)
        mapping = OmegaConf.select(cfg, parent)
        if not isinstance(mapping, DictConfig) or key not in mapping:
            held = ", ".join(str(k) for k in mapping) if isinstance(mapping, DictConfig) and len(mapping) else "no keys"
            raise ConfigError(f"unknown key '{o.key_or_group}' in the free-form mapping '{parent}', which holds {held}; "
                              f"to add a key write '+{o.input_line}'")


def _method_keys(name: str | None = None) -> list[str]:
    """The method.* keys of one registered method (its config's fields), or of any."""
    from safeprobe.methods import METHODS

    if name in METHODS:
        return [f.name for f in dataclasses.fields(METHODS[name].config)]
    return sorted({f.name for spec in METHODS.values() for f in dataclasses.fields(spec.config)})


def _chosen_methods(overrides: list) -> list[str] | None:
    """The method(s) a command line selects: `method=...`, else its experiment's, else train.yaml's."""
    import yaml

    def group_default(file: Path) -> str | None:
        for entry in (yaml.safe_load(file.read_text()) or {}).get("defaults", []):
            if isinstance(entry, dict):
                for k, v in entry.items():
                    if k.removeprefix("override ").lstrip("/") == "method":
                        return v
        return None

    given = {o.key_or_group: o for o in overrides if not (o.is_add() or o.is_force_add() or o.is_delete())}
    if "method" in given:
        o = given["method"]
        return list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
    if "experiment" in given and not given["experiment"].is_sweep_override():
        file = CONF_DIR / "experiment" / f"{given['experiment'].get_value_element_as_str()}.yaml"
        if file.is_file() and group_default(file):
            return [group_default(file)]
    default = group_default(CONF_DIR / "train.yaml")
    return [default] if default else None


def to_plain(cfg: DictConfig | ListConfig | Any) -> Any:
    """Hydra/OmegaConf containers -> plain Python (for PEFT, transformers, W&B, JSON)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return cfg
