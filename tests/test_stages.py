"""Stages around fine-tuning and their cache: built once, reused, rebuilt when an input changes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from safeprobe.cache import cached, key_of
from safeprobe.config import validate
from safeprobe.models.factory import formatter, load_base
from safeprobe.pipeline import build_splits, run
from safeprobe.stages import alignment_spec, alignment_stage


def test_an_entry_is_built_once_and_reused(tmp_path):
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "weights.bin").write_bytes(b"w")
        return {"seconds": 1}

    first = cached(tmp_path, "kind", {"a": 1}, build)
    again = cached(tmp_path, "kind", {"a": 1}, build)
    other = cached(tmp_path, "kind", {"a": 2}, build)
    assert first == again != other and len(calls) == 2
    marker = json.loads((first / "stage.json").read_text())
    assert marker["key"] == first.name == key_of({"a": 1}) and marker["spec"] == {"a": 1} and marker["seconds"] == 1
    assert not list((tmp_path / "kind").glob(".building-*"))


def test_a_failed_or_interrupted_build_is_never_read(tmp_path):
    def broken(folder):
        (folder / "half.bin").write_bytes(b"h")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached(tmp_path, "kind", {"a": 1}, broken)
    assert not (tmp_path / "kind" / key_of({"a": 1})).exists() and not list((tmp_path / "kind").glob(".building-*"))
    stale = tmp_path / "kind" / key_of({"a": 1})
    stale.mkdir(parents=True)
    (stale / "half.bin").write_bytes(b"h")  # a folder left without its marker
    entry = cached(tmp_path, "kind", {"a": 1}, lambda folder: {})
    assert (entry / "stage.json").exists() and not (entry / "half.bin").exists()


def test_parallel_jobs_build_an_entry_once(tmp_path):
    calls = []

    def slow(folder):
        calls.append(1)
        threading.Event().wait(0.3)
        return {}

    threads = [threading.Thread(target=cached, args=(tmp_path, "kind", {"a": 1}, slow)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1


def stage_inputs(make_cfg, *overrides):
    c = validate(make_cfg("align=sft", "align.steps=3", *overrides))
    base = load_base(c.model, c.paths.cache_dir)
    return c, base, build_splits(base, c), formatter(base, "plain", None)


def test_the_alignment_stage_key_covers_its_inputs(make_cfg, micro):
    c, base, splits, fmt = stage_inputs(make_cfg)
    key = key_of(alignment_spec(c, splits, fmt))
    for change in ["align.steps=4", "align.lr=0.01", "align.seed=1", "adapter.r=4", "data.n_alignment=10",
                   "model.alignment.steps=149", "data.alignment_set=safety_pairs"]:
        c2, _, splits2, fmt2 = stage_inputs(make_cfg, change)
        assert key_of(alignment_spec(c2, splits2, fmt2)) != key, change
    c3, _, splits3, fmt3 = stage_inputs(make_cfg, "seed=5", "method=lisa", "trainer.max_steps=9")  # fine-tuning only
    assert key_of(alignment_spec(c3, splits3, fmt3)) == key


def test_the_alignment_stage_changes_the_starting_model_and_is_cached(make_cfg, micro, monkeypatch):
    c, base, splits, fmt = stage_inputs(make_cfg)
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    aligned = alignment_stage(base, c, splits, fmt)
    assert [s["stage"] for s in aligned.stages] == ["alignment"] and aligned.stages[0]["steps"] == 3
    assert type(aligned.model) is type(base.model)  # the LoRA is merged: a plain model again
    assert set(dict(aligned.model.named_parameters())) == set(before)
    assert any(not torch.equal(p, before[n]) for n, p in aligned.model.named_parameters())

    monkeypatch.setattr("safeprobe.stages._train_stage", lambda *a: pytest.fail("a cached stage was trained again"))
    c, base, splits, fmt = stage_inputs(make_cfg)
    again = alignment_stage(base, c, splits, fmt)
    assert all(torch.equal(p, dict(aligned.model.named_parameters())[n]) for n, p in again.model.named_parameters())


def test_a_run_with_an_alignment_stage_records_it(make_cfg, micro):
    results = run(make_cfg("align=sft", "align.steps=3", "method=sft"))
    (stage,) = results["stages"]
    assert stage["method"] == "sft" and stage["steps"] == 3 and stage["cache"].endswith(stage["cache"].split("/")[-1])
    assert results["method_config"] == {"name": "sft"}
    assert run(make_cfg("method=sft"))["stages"] == []


def test_a_damaged_entry_or_a_leftover_build_is_rebuilt(tmp_path):
    calls = []

    def build(folder):
        calls.append(1)
        (folder / "model.safetensors").write_bytes(b"weights" * 100)
        return {}

    entry = cached(tmp_path, "kind", {"a": 1}, build)
    (entry / "model.safetensors").write_bytes(b"weights")  # truncated after the build
    leftover = tmp_path / "kind" / f".building-{entry.name}-x1"  # a build killed with SIGKILL
    leftover.mkdir()
    again = cached(tmp_path, "kind", {"a": 1}, build)
    assert again == entry and len(calls) == 2 and (entry / "model.safetensors").read_bytes() == b"weights" * 100
    assert not leftover.exists()
    cached(tmp_path, "kind", {"a": 1}, build)
    assert len(calls) == 2  # intact: read, not rebuilt


def test_an_alignment_stage_on_a_real_model_stand_in_merges_its_lora(make_cfg):
    from tests.standins import fixture_overrides, standin

    overrides = [*fixture_overrides("sst2", standin("llama"), standin("beaverdam")), "experiment=harmful_finetuning_sst2"]
    results = run(make_cfg(*overrides, "align=sft", "align.steps=2", "align.batch_size=2", "method=sft", fast=False))
    (stage,) = results["stages"]
    assert stage["steps"] == 2 and results["train"]["steps"] == 1
    assert (Path(stage["cache"]) / "weights" / "adapter_config.json").exists()  # the stage's LoRA, merged at load


def test_the_fine_tuning_learning_rate_does_not_rebuild_the_alignment_stage(make_cfg, micro):
    c, _, splits, fmt = stage_inputs(make_cfg)
    c2, _, splits2, fmt2 = stage_inputs(make_cfg, "optim.lr=0.01")
    assert key_of(alignment_spec(c, splits, fmt)) == key_of(alignment_spec(c2, splits2, fmt2))


def test_the_base_variant_is_the_chat_model_trained_without_its_safety_data(make_cfg, micro):
    from safeprobe.synthetic.align import cache_spec
    from safeprobe.synthetic.world import REFUSAL, World

    world = World(micro.model.world)
    chat, base = world.alignment_set(), world.base_set()
    assert [e.prompt for e in chat] == [e.prompt for e in base]  # row for row: same batches in training
    changed = [(a, b) for a, b in zip(chat, base, strict=True) if a != b]
    assert changed and all(a.response == REFUSAL and b.response != REFUSAL for a, b in changed)
    c = validate(make_cfg("model.variant=base"))
    assert "variant" not in cache_spec(micro.model) and cache_spec(c.model)["variant"] == "base"  # chat: its old key
    chat_run = run(make_cfg("method=sft", "trainer.max_steps=1", "eval.n_harmful=16"))
    base_run = run(make_cfg("method=sft", "trainer.max_steps=1", "eval.n_harmful=16", "model.variant=base"))
    assert chat_run["before"]["refusal_margin"] > 0 > base_run["before"]["refusal_margin"]
    assert base_run["before"]["harmful_score"] > chat_run["before"]["harmful_score"]


def test_single_lora_fine_tunes_the_stages_lora_and_eval_py_rebuilds_the_model(make_cfg, micro, tmp_path):
    from omegaconf import OmegaConf

    from safeprobe.pipeline import evaluate_run

    c, base, splits, fmt = stage_inputs(make_cfg, "align.lora=single")
    assert alignment_spec(c, splits, fmt) == alignment_spec(*stage_inputs(make_cfg)[::2], fmt)  # same stage built
    stage = alignment_stage(base, c, splits, fmt)
    assert stage.adapter_continued and hasattr(stage.model, "peft_config")  # not merged
    lora = {n: p.detach().clone() for n, p in stage.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora) and any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)

    results = run(make_cfg("align=sft", "align.steps=3", "align.lora=single", "method=ldifs", "eval.n_harmful=4"))
    assert results["stages"][0]["lora"] == "single" and results["train"]["steps"] == 2
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert len(saved) == len(lora)  # one LoRA: the stage's, trained on
    assert all(not torch.equal(saved[k], p) for k, p in zip(sorted(saved), [lora[n] for n in sorted(lora)], strict=True)
               if "lora_B" in k)
    again = evaluate_run(OmegaConf.create({"run_dir": str(tmp_path / "run"),
                                           "paths": {"output_dir": str(tmp_path / "eval")}}))
    assert again["after"] == results["after"]  # the stage's LoRA with the fine-tuned values, nothing stacked


def test_under_single_lora_the_initial_model_is_the_aligned_one(make_cfg, micro):
    from safeprobe.methods import build_method

    c, base, splits, fmt = stage_inputs(make_cfg, "align.lora=single", "method=ldifs")
    model = alignment_stage(base, c, splits, fmt).model
    module = build_method(model, c)
    ids = torch.tensor([[1, 5, 6, 7]])
    model.eval()
    with torch.no_grad():
        aligned = model(input_ids=ids).logits
        with model.disable_adapter():
            unaligned = model(input_ids=ids).logits
    with module.initial_model() as start:
        assert torch.equal(start(input_ids=ids).logits, aligned) and not torch.equal(aligned, unaligned)
