"""Training on several processes (trainer=ddp, ddp_cpu, fsdp): who writes, the Lightning
arguments, and the statistics every method pools over the ranks. See docs/distributed.md.

Who writes. One process evaluates and writes the run's files: rank 0, or the only process
(`is_writer`). Lightning's `ddp` strategy starts the other ranks of a single node when the
writer's fit begins, by running the same command again; `fitting` hands them the run's saved
config instead (SAFEPROBE_RUN_CONFIG), so they skip Hydra (no second sweep, no log file) and join
the fit through `pipeline.run`, which gives them the same starting model and data and lets them
write nothing. Ranks started by a scheduler (srun, torchrun) run the command themselves and
reach the same place.

Pooled statistics. Each rank computes the step on its slice of the global batch (the data
module gives every rank its slice of the batch one process would see) and DDP averages the
weight gradients over the ranks. So a method's loss on a rank is a *contribution*: a number
whose mean over the ranks is the loss of the whole global batch and whose gradient, averaged
over the ranks, is that loss's gradient. A mean over tokens divides the rank's sum by the mean
token count per rank (`count_mean`), not by its own count; a sum over rows is multiplied by
the world size; a function of a batch statistic takes the `pooled` statistic. Quantities a
method computes from gradients outside DDP's backward (SAP's unsafe direction and probe
gradient, Booster's harmful gradients, Vaccine's perturbation norm) are averaged with `mean`;
RepNoise's MMD, which pairs every row with every other, gathers the rows (`gather_rows`). With
one process every helper returns its input: the single-process numbers are unchanged bit for bit.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# set by launchers for the processes they start (Lightning: LOCAL_RANK, NODE_RANK; torchrun: RANK,
# GROUP_RANK; SLURM: SLURM_PROCID; LSF: JSM_NAMESPACE_RANK); any of them above 0 marks a rank > 0
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")  # Lightning's, for its children
RUN_CONFIG = "SAFEPROBE_RUN_CONFIG"  # the writer's saved config, for the ranks Lightning starts
SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")  # no rank holds the whole model
LAYER_POLICIES = ("auto_wrap_policy", "activation_checkpointing_policy")  # FSDP: "decoder_layer" = the model's


def rank_from_environment() -> int:
    """This process's rank as its launcher marked it, for messages (0 when none did)."""
    for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "LOCAL_RANK"):
        value = os.environ.get(key, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def is_writer(trainer_cfg=None) -> bool:
    """Whether this process evaluates and writes the run's files: the only process, or rank 0 of
    several. The single place that decides it (pipeline.run asks here, with the run's trainer
    settings: a run on one device writes whatever a scheduler set, e.g. `srun -n 4` of
    independent one-device runs)."""
    if trainer_cfg is not None and one_process(trainer_cfg):
        return True
    return all(os.environ.get(k, "0").strip() in ("", "0") for k in RANK_VARIABLES)


def one_process(trainer_cfg) -> bool:
    """The trainer settings run a single process: one node, one device."""
    d = trainer_cfg.devices
    one_device = d in (1, "1") or (isinstance(d, (list, tuple)) and len(d) == 1)
    return trainer_cfg.num_nodes == 1 and one_device


# ------------------------------------------------------------------ the Lightning arguments


def strategy_class(strategy: Any) -> type | None:
    """The Strategy class a trainer.strategy value names (None for auto)."""
    from lightning.pytorch.strategies import StrategyRegistry

    if isinstance(strategy, str):
        return None if strategy == "auto" else StrategyRegistry[strategy]["strategy"]
    return located(strategy["_target_"])


def located(path: str) -> Any:
    """The object a dotted path names (package.module.Class)."""
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def is_sharded(strategy: Any) -> bool:
    """True for the strategies where no rank holds the whole model (FSDP, DeepSpeed)."""
    cls = strategy_class(strategy)
    return cls is not None and any(c.__name__ in SHARDED for c in cls.__mro__)


def _layer_classes(value: Any, model) -> Any:
    """FSDP's wrap / checkpointing policy: "decoder_layer" (the model's decoder-layer class) or
    dotted class names -> the set of classes Lightning takes; anything else as given."""
    if value == "decoder_layer":
        from safeprobe.models.factory import decoder_layers

        if model is None:
            raise ValueError("the policy 'decoder_layer' needs the model")
        return {type(decoder_layers(model)[0])}
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return {located(v) for v in value}
    return value


def make_strategy(trainer_cfg, model=None) -> Any:
    """trainer.strategy as Lightning takes it: a name (with trainer.timeout_minutes, that
    strategy built with the timeout), or a `_target_` node instantiated with hydra."""
    from datetime import timedelta

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    s, minutes = trainer_cfg.strategy, trainer_cfg.timeout_minutes
    extra = {"timeout": timedelta(minutes=minutes)} if minutes is not None else {}
    if isinstance(s, str):
        if not extra or s == "auto":
            return s
        from lightning.pytorch.strategies import StrategyRegistry

        entry = StrategyRegistry[s]
        return entry["strategy"](**{**entry["init_params"], **extra})
    node = dict(s)
    cls = located(node.pop("_target_"))
    policies = {k: _layer_classes(node.pop(k), model) for k in LAYER_POLICIES if k in node}
    kwargs = instantiate(OmegaConf.create(node), _convert_="all") if node else {}
    return cls(**kwargs, **policies, **extra)


def trainer_kwargs(trainer_cfg, model=None) -> dict:
    """lightning.Trainer's keyword arguments for a validated TrainerConfig (the FSDP policies
    that name the decoder layer read it from `model`)."""
    from safeprobe.config import to_plain

    args = {k: v for k, v in to_plain(trainer_cfg).items() if k != "timeout_minutes"}
    args["strategy"] = make_strategy(trainer_cfg, model)
    return args


def check_strategy(strategy: Any, timeout_minutes: float | None) -> None:
    """trainer.strategy: a registered name, or a node whose _target_ is a Lightning Strategy and
    whose other keys are its arguments; trainer.timeout_minutes only with a strategy that takes one."""
    from lightning.pytorch.strategies import Strategy, StrategyRegistry

    from safeprobe.config import ConfigError, one_of, require

    if isinstance(strategy, str):
        one_of("trainer.strategy", strategy, ("auto", *StrategyRegistry.available_strategies()))
        cls = strategy_class(strategy)
    else:
        require(isinstance(strategy, dict) and isinstance(strategy.get("_target_"), str), "trainer.strategy",
                strategy, "a strategy name (auto, ddp, fsdp, ...) or a node with _target_ (a Lightning strategy class)")
        cls = strategy_class(strategy)
        require(isinstance(cls, type) and issubclass(cls, Strategy), "trainer.strategy._target_", strategy["_target_"],
                "a Lightning strategy class, e.g. lightning.pytorch.strategies.DDPStrategy")
        params = inspect.signature(cls).parameters
        for key in strategy:
            if key != "_target_" and key not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
                raise ConfigError(f"unknown key 'trainer.strategy.{key}' for {cls.__name__}; allowed keys: "
                                  + ", ".join(k for k in params if k not in ("self", "accelerator")))
        for key in LAYER_POLICIES:
            value = strategy.get(key)
            require(value is None or value == "decoder_layer" or (isinstance(value, list) and value and all(
                isinstance(v, str) and isinstance(located(v), type) for v in value)), f"trainer.strategy.{key}", value,
                "decoder_layer (the model's decoder-layer class) or a list of module classes by dotted path")
        require(timeout_minutes is None or "timeout" not in strategy, "trainer.timeout_minutes", timeout_minutes,
                "null when trainer.strategy sets its own timeout")
    if timeout_minutes is not None:
        takes = cls is not None and "timeout" in inspect.signature(cls).parameters
        require(takes, "trainer.timeout_minutes", timeout_minutes,
                "null with this strategy (it starts no process group); a number > 0 with ddp, fsdp, ...")


# -------------------------------------------------------------------- launching and ending


@contextmanager
def fitting(trainer, config_file: Path):
    """Around every rank's fit. Ranks that Lightning starts for the writer's fit read
    `config_file` (they are this command run again: train.py hands them to `cli.run_rank`).
    After the fit: those ranks are waited for (or stopped, when the fit failed), Lightning's
    watcher of them disarmed (a rank ending after the fit must not kill the writer), the
    variables Lightning set for them removed and the process group destroyed, so that what
    follows (evaluation) runs alone and the next job of a sweep starts its own ranks."""
    saved = {k: os.environ.get(k) for k in (*LAUNCH_VARIABLES, RUN_CONFIG)}
    os.environ[RUN_CONFIG] = str(config_file)
    ok = False
    try:
        yield
        ok = True
    finally:
        _end_children(trainer, wait=30.0 if ok else 10.0)  # on a signal they stop at this step too
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        end_process_group()


def _end_children(trainer, wait: float) -> None:
    procs: list[subprocess.Popen] = list(getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or [])
    if not procs:
        return
    for thread in threading.enumerate():  # lightning's _ChildProcessObserver SIGKILLs everyone when a child fails
        if thread.name == "child-process-observer":
            thread._terminate_all = lambda: None
    for p in procs:
        try:
            p.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
        if p.poll() is None:
            log.warning("stopping rank process %d", p.pid)
            p.kill()
            p.wait()


def whole_model(trainer, module, reloaded):
    """After fit: the fine-tuned model, whole, on the writer. Under a sharded strategy (FSDP) the
    ranks hold parts: every rank must call this (the gathering is collective); the writer loads
    the gathered weights into `reloaded()`, a fresh copy of the starting model; other ranks get
    None. Otherwise the module's model itself. (Sharded: untested without GPUs.)"""
    if not is_sharded_strategy(trainer.strategy):
        return module.model
    state = trainer.strategy.lightning_module_state_dict()  # full on rank 0 (state_dict_type: full), empty elsewhere
    if reloaded is None or not trainer.is_global_zero:
        return None
    model = reloaded()
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})  # the module's one child: model
    return model


def is_sharded_strategy(strategy) -> bool:
    return any(c.__name__ in SHARDED for c in type(strategy).__mro__)


def end_process_group() -> None:
    """Destroy the default process group, if one is up: later code (evaluation) runs alone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------- pooling over ranks


def world_size() -> int:
    """The number of ranks in this fit (1 outside one, or in a single process)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def total(t):
    """The sum of `t` over the ranks (no gradient); `t` itself in one process."""
    import torch.distributed as dist

    if world_size() == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def maximum(t):
    """The largest value of `t` over the ranks (no gradient)."""
    import torch.distributed as dist

    if world_size() == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def mean(t):
    """The mean of `t` over the ranks (no gradient); `t` itself in one process."""
    w = world_size()
    return t if w == 1 else total(t) / w


def mean_(tensors: list) -> list:
    """Each tensor replaced in place by its mean over the ranks (one all-reduce for the lot)."""
    import torch
    import torch.distributed as dist

    w = world_size()
    if w == 1 or not tensors:
        return tensors
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= w
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return tensors


def count_mean(count):
    """The mean over the ranks of a count (tokens, rows): what a rank divides its sum by, so that
    the ranks' contributions average to the mean over the whole global batch. The count itself
    in one process."""
    return count if world_size() == 1 else total(count) / world_size()


def pooled(contribution):
    """A tensor whose value is the mean of the ranks' contributions (the global batch's
    statistic) and whose gradient is this rank's: f(pooled(c)) then has, averaged over the
    ranks as DDP does, the gradient of f at the global statistic."""
    if world_size() == 1:
        return contribution
    return mean(contribution.detach()) + (contribution - contribution.detach())


def rows_before(n_rows: int) -> int:
    """How many rows of the global batch the lower ranks hold (this rank's rows follow them)."""
    import torch
    import torch.distributed as dist

    w = world_size()
    if w == 1:
        return 0
    mine = torch.tensor([n_rows], dtype=torch.long, device=_device())
    gathered = [torch.zeros_like(mine) for _ in range(w)]
    dist.all_gather(gathered, mine)
    return int(sum(int(g) for g in gathered[: rank()]))


def _device():
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_rows(x):
    """The ranks' `x` (the same shape on every rank) stacked along dim 0 in rank order, with a
    gradient: the gradient each rank takes back for its rows is the sum over the ranks of theirs
    (so a statistic every rank computes alike on the gathered rows gets, averaged by DDP, its
    exact gradient)."""
    if world_size() == 1:
        return x
    return _gather_rows_function().apply(x)


@functools.cache
def _gather_rows_function():
    import torch
    import torch.distributed as dist

    class GatherRows(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, x.contiguous())
            ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
            return torch.cat(parts)

        @staticmethod
        def backward(ctx, grad):
            grad = grad.contiguous().clone()
            dist.all_reduce(grad)
            return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]

    return GatherRows


def pad_to(x, dim: int, size: int, value=0):
    """x padded with `value` at the end of dimension `dim` to `size`."""
    import torch.nn.functional as F

    extra = size - x.shape[dim]
    if extra <= 0:
        return x
    pad = [0, 0] * (x.dim() - dim - 1) + [0, extra]
    return F.pad(x, pad, value=value)
