"""The synthetic world's models: a tiny Llama trained from scratch to answer benign requests
helpfully and refuse harmful ones (model.variant=chat, the default), or the same training with
harmful requests answered instead of refused (variant=base: the unaligned model). Cached on
disk under a hash of everything that determines it, so the second run (and every sweep job)
starts at once."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from safeprobe.cache import cached, key_of
from safeprobe.config import ModelConfig
from safeprobe.data.formatting import PromptFormatter, collate, encode
from safeprobe.methods.losses import task_loss
from safeprobe.synthetic.world import PROMPT_SUFFIX, SPECIAL, World

log = logging.getLogger(__name__)
CACHE_VERSION = 4  # bump when the alignment code changes what it produces

DEFAULT_ARCH = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True)


def build_tokenizer(world: World) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(world.vocab)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIAL['bos']} $A", special_tokens=[(SPECIAL["bos"], vocab[SPECIAL["bos"]])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
                                   pad_token=SPECIAL["pad"], unk_token=SPECIAL["unk"], model_max_length=128)


def formatter_for(tokenizer) -> PromptFormatter:
    return PromptFormatter(tokenizer, "plain", plain_suffix=PROMPT_SUFFIX)


def cache_spec(cfg: ModelConfig) -> dict:
    """All the aligned model depends on: architecture, alignment settings, and the alignment
    data and vocabulary themselves (so a change of the world's rules re-aligns, and a comment
    in world.py does not)."""
    world = World(cfg.world)
    data = hashlib.sha256(json.dumps([world.vocab, [(e.prompt, e.response) for e in training_set(world, cfg)]]).encode())
    spec = {"version": CACHE_VERSION, "data": data.hexdigest(), "arch": {**DEFAULT_ARCH, **cfg.arch},
            "world": dataclasses.asdict(cfg.world), "alignment": dataclasses.asdict(cfg.alignment)}
    return spec if cfg.variant == "chat" else {**spec, "variant": cfg.variant}  # chat: the key it always had


def training_set(world: World, cfg: ModelConfig) -> list:
    return world.base_set() if cfg.variant == "base" else world.alignment_set()


def cache_key(cfg: ModelConfig) -> str:
    return key_of(cache_spec(cfg))


def aligned_model_dir(cfg: ModelConfig, cache_dir: str | Path) -> Path:
    """Folder holding the aligned model and its tokenizer; built on first use (cache.py)."""
    return cached(cache_dir, "synthetic", cache_spec(cfg), lambda folder: _align(cfg, folder), marker="alignment.json")


def _align(cfg: ModelConfig, out: Path) -> dict:
    start = time.time()
    world = World(cfg.world)
    tok = build_tokenizer(world)
    fmt = formatter_for(tok)
    arch = {**DEFAULT_ARCH, **cfg.arch}
    torch.manual_seed(cfg.alignment.seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id, **arch))
    rows = [encode(tok, fmt, e.prompt, e.response, arch["max_position_embeddings"]) for e in training_set(world, cfg)]
    rng = random.Random(cfg.alignment.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.alignment.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.alignment.lr, total_steps=cfg.alignment.steps, pct_start=0.1)
    log.info("training the synthetic %s model (%.2fM parameters) on %d examples (%d steps)...", cfg.variant,
             sum(p.numel() for p in model.parameters()) / 1e6, len(rows), cfg.alignment.steps)
    model.train()
    for _ in range(cfg.alignment.steps):
        batch = collate(rng.sample(rows, min(cfg.alignment.batch_size, len(rows))), tok.pad_token_id)
        loss = task_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    seconds = time.time() - start
    log.info("trained in %.0f s (final loss %.4f) -> cached", seconds, loss.item())
    return {"final_loss": loss.item(), "seconds": round(seconds, 1), "model": dataclasses.asdict(cfg)}
