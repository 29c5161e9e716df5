"""Model factory (the `model` config group) and adapters (the `adapter` group)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from safeprobe.config import AdapterConfig, ConfigError, ModelConfig, to_plain
from safeprobe.data.formatting import PromptFormatter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Base:
    """The frozen starting point of fine-tuning and everything needed to talk to it."""

    model: torch.nn.Module
    tokenizer: object
    path: str  # where the base weights come from (a cache folder or a Hub id)
    world: object | None = None  # the synthetic World, when model.kind == synthetic
    stages: list = field(default_factory=list)  # what the stages before fine-tuning did (stages.py)
    adapter_continued: bool = False  # model already holds the trainable LoRA to fine-tune (align.lora=single)


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


@contextmanager
def _reading(cfg: ModelConfig):
    """A pretrained model that cannot be read (no such Hub id, offline, a folder without a model) -> one line."""
    try:
        yield
    except (OSError, ValueError) as e:
        if cfg.kind != "pretrained":
            raise
        raise ConfigError(f"model.name_or_path={cfg.name_or_path!r} could not be loaded ({_first_line(e)}); allowed: a "
                          "Hugging Face model id (downloaded, or online) or a local folder holding config.json and "
                          "the weights") from None


def model_depth(cfg: ModelConfig) -> int:
    """Number of decoder layers, read from the config alone (no weights, no alignment)."""
    if cfg.kind == "synthetic":
        from safeprobe.synthetic.align import DEFAULT_ARCH

        return {**DEFAULT_ARCH, **cfg.arch}["num_hidden_layers"]
    from transformers import AutoConfig

    with _reading(cfg):
        config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    return getattr(config, "num_hidden_layers", None) or config.get_text_config().num_hidden_layers


def load_base(cfg: ModelConfig, cache_dir: str | Path, random_weights: bool = False) -> Base:
    """random_weights: the architecture of the folder's config.json with freshly initialized
    weights (benchmarks: speed does not depend on the values, and no weights need to be on disk);
    they are created on the default device (e.g. inside `with torch.device("cuda"):`)."""
    if cfg.kind == "synthetic":
        from safeprobe.synthetic.align import aligned_model_dir
        from safeprobe.synthetic.world import World

        path = str(aligned_model_dir(cfg, cache_dir))
        world = World(cfg.world)
    else:
        path, world = cfg.name_or_path, None
    hf_logging.disable_progress_bar()
    kwargs = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    with _reading(cfg):
        if random_weights:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # so LoRA weights get gradients through checkpoints
    return Base(model, tokenizer, path, world)


def formatter(base: Base, style: str, system_prompt: str | None) -> PromptFormatter:
    if base.world is not None:
        from safeprobe.synthetic.align import formatter_for

        return formatter_for(base.tokenizer)
    return PromptFormatter(base.tokenizer, style, system_prompt)


def check_targets(model: torch.nn.Module, cfg: AdapterConfig) -> None:
    """LoRA's target modules name layers of this model (a string is "all-linear" or a regex)."""
    targets = to_plain(cfg.target_modules)
    if cfg.kind != "lora" or isinstance(targets, str):
        return
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"adapter.target_modules={targets!r} is invalid ({', '.join(missing)} not in the model); "
                          f"allowed: all-linear or names of the model's layers, e.g. {', '.join(linear)}")


def apply_adapter(model: torch.nn.Module, cfg: AdapterConfig) -> torch.nn.Module:
    """LoRA through PEFT (only adapter weights trainable), or full fine-tuning."""
    if cfg.kind == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    targets = to_plain(cfg.target_modules)
    check_targets(model, cfg)
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of decoder blocks of any HF decoder whose blocks have an `mlp`
    (Llama, Qwen2, Mistral, Gemma...), found without naming the architecture."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and all(hasattr(b, "mlp") for b in module):
            return module
    raise ValueError(f"{type(model).__name__} has no list of decoder blocks with an `mlp`; SAP's probe cannot attach")


def save_adapter(model: torch.nn.Module, folder: Path) -> None:
    """PEFT adapters as safetensors; full fine-tuning saves the whole model the same way."""
    model.save_pretrained(folder, safe_serialization=True)


def load_adapter(base_model: torch.nn.Module, folder: Path, trainable: bool = False) -> torch.nn.Module:
    from safetensors import SafetensorError

    try:
        if (Path(folder) / "adapter_config.json").exists():
            from peft import PeftModel

            return PeftModel.from_pretrained(base_model, folder, is_trainable=trainable)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=base_model.dtype)
    except (OSError, ValueError, SafetensorError) as e:  # a truncated, missing or edited file
        raise ConfigError(f"the adapter folder {str(folder)!r} is invalid ({_first_line(e)}); allowed: a folder as "
                          "train.py saved it (save_adapter=true), whole and unedited") from None
