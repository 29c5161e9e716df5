"""The `post` config group: repairs applied to the fine-tuned model after fine-tuning.

A repair is a function `repair(model, context, cfg) -> dict` registered with its typed config
(the post.* keys), as the fine-tuning methods are (methods/registry.py):

    @dataclass
    class SafeLoRAConfig(PostConfig):
        k: int = 10

    @register_repair("safelora", SafeLoRAConfig)
    def safelora(model, context, cfg) -> dict: ...

`data_needed` names the data sets a repair reads (datamodule.Splits fields: "harmful" is the
harmful prompt -> harmful answer stream), so a run loads them. It edits the model's weights in place and returns what it did (for results.json). `context`
(a PostContext) brings what a repair needs besides the model, loaded only when asked for.
`post_config(node)` turns a `post` node into the repair's typed config (None: no repair).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from safeprobe.config import ConfigError, require


@dataclass
class PostConfig:
    """Keys every repair has. A repair's own config subclasses it."""

    name: str | None = None


@dataclass
class PostContext:
    """What a repair may need besides the fine-tuned model.

    base_model: loads the unaligned model of the same architecture (SafeLoRA), on demand.
    calibration_batches: n harmful examples (harmful prompt -> harmful answer) as collated batches
        (formatting.collate: input_ids, attention_mask, labels), any batch size (Antidote).
    device: where a repair computes (the fine-tuned model should already be there).
    """

    base_model: Callable[[], torch.nn.Module] | None = None
    calibration_batches: Callable[[int], list[dict]] | None = None
    device: torch.device | str = "cpu"


@dataclass(frozen=True)
class RepairSpec:
    name: str
    config: type  # a PostConfig subclass: the post.* keys
    repair: Callable[[torch.nn.Module, PostContext, Any], dict]
    data_needed: tuple[str, ...] = ()  # data sets it reads (Splits fields), e.g. ("harmful",)


REPAIRS: dict[str, RepairSpec] = {}


def register_repair(name: str, config: type = PostConfig, data_needed: tuple[str, ...] = ()):
    """Function decorator: make `post=<name>` run this repair with `config`."""

    def add(fn):
        if name in REPAIRS:
            raise ValueError(f"repair {name!r} is registered twice ({REPAIRS[name].repair.__name__}, {fn.__name__})")
        REPAIRS[name] = RepairSpec(name, config, fn, tuple(data_needed))
        return fn

    return add


def repair_spec(name: Any, path: str = "post") -> RepairSpec:
    if name not in REPAIRS:
        raise ConfigError(f"{path}.name={name!r} is invalid; allowed: null, {', '.join(sorted(REPAIRS))}")
    return REPAIRS[name]


def post_config(node: Any, path: str = "post") -> PostConfig | None:
    """A `post` node -> the registered repair's typed config; None when there is no repair
    (node None, or its name null: conf/post/none.yaml)."""
    from omegaconf import DictConfig, OmegaConf

    from safeprobe.config import _check_keys, _typed, to_plain

    if node is None:
        return None
    if isinstance(node, PostConfig):
        return node if node.name is not None else None
    node = OmegaConf.create(to_plain(node))
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}={to_plain(node)!r} is invalid; allowed: a post-fine-tuning repair (conf/post/)")
    if node.get("name") is None:
        extra = [str(k) for k in node.keys() if k != "name"]
        if extra:
            raise ConfigError(f"{path}.{extra[0]} is set but {path}.name is null; allowed: a repair name "
                              f"({', '.join(sorted(REPAIRS))}) with its keys, or no {path}.* keys")
        return None
    spec = repair_spec(node.name, path)
    _check_keys(node, spec.config, path)
    return _typed(spec.config, node, path)


def apply_repair(model: torch.nn.Module, context: PostContext, cfg: PostConfig | None) -> dict | None:
    """Run the repair `cfg` names on `model` (in place, without gradients); what it did, with
    its name, config and wall time; None when cfg is None."""
    if cfg is None or cfg.name is None:
        return None
    from safeprobe.config import to_plain

    start = time.perf_counter()
    with torch.no_grad():
        report = repair_spec(cfg.name).repair(model, context, cfg)
    return {"name": cfg.name, "config": to_plain(cfg), **report, "seconds": round(time.perf_counter() - start, 3)}


# ------------------------------------------------------------------------ LoRA helpers


def model_root(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (its module names are the base model's:
    'model.layers.0.self_attn.q_proj'), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lora_layers(model: torch.nn.Module, repair: str) -> list[tuple[str, torch.nn.Module, str]]:
    """(name in the base model, PEFT LoRA layer, its adapter) for every LoRA layer, after checking
    that each is a plain, unmerged LoRA on a Linear layer with one active adapter. [] without LoRA."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, m in model_root(model).named_modules():
        if not isinstance(m, LoraLayer):
            continue
        adapters = [a for a in m.active_adapters if a in m.lora_A]
        require(len(adapters) == 1, "post.name", repair, f"a model with one active LoRA adapter ({name} has {adapters})")
        a = adapters[0]
        require(not m.merged, "post.name", repair, f"an unmerged LoRA ({name} is merged into its weights)")
        require(a not in m.lora_variant and not m.use_dora.get(a, False), "post.name", repair,
                f"a plain LoRA (no DoRA or other variant; {name} has one)")
        require(isinstance(m.lora_A[a], torch.nn.Linear) and isinstance(m.get_base_layer(), torch.nn.Linear),
                "post.name", repair, f"LoRA on Linear layers only ({name} is {type(m.get_base_layer()).__name__})")
        out.append((name, m, a))
    return out


from safeprobe.post import antidote, safelora  # noqa: E402  (they register themselves)

__all__ = ["REPAIRS", "PostConfig", "PostContext", "RepairSpec", "antidote", "apply_repair", "lora_layers",
           "model_root", "post_config", "register_repair", "repair_spec", "safelora"]
