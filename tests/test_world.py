"""The synthetic safety world: deterministic, disjoint where it must be, cached by config."""

from __future__ import annotations

import dataclasses
import time

import pytest

from safeprobe.config import ConfigError, DataConfig, ModelConfig, WorldConfig
from safeprobe.data.datamodule import mix_training_set, synthetic_splits
from safeprobe.synthetic.align import aligned_model_dir, build_tokenizer, cache_key
from safeprobe.synthetic.world import COMPLIANCE_OPENER, REFUSAL, World


@pytest.fixture(scope="module")
def world():
    return World(WorldConfig())


def prompts(rows):
    return {r.prompt for r in rows}


def test_the_same_seed_builds_the_same_world_and_another_seed_another(world):
    again = World(WorldConfig())
    assert again.alignment_set() == world.alignment_set() and again.harmful_eval_set("test") == world.harmful_eval_set("test")
    other = World(WorldConfig(seed=7))
    assert other.harmful_eval_set("test") != world.harmful_eval_set("test")


def test_held_out_sets_are_disjoint_from_every_training_stage(world):
    align = prompts(world.alignment_set())
    test, val = prompts(world.harmful_eval_set("test")), prompts(world.harmful_eval_set("val"))
    pairs = prompts(world.safety_pairs())
    train, task_test = (prompts(s) for s in world.task_sets("instruct"))
    poison = prompts(world.poison_set())
    assert len(test) == 200 and len(val) == 100 and len(pairs) == 48
    for held_out in (test, val):
        assert not held_out & (align | pairs | train | poison)
    assert not test & val and not task_test & train and not pairs & align
    # poison comes from harmful verbs that are never evaluated; the task's prompts are new to
    # alignment, which answers other prompts of the known task verbs in its own format
    eval_text = " ".join(test | val)
    assert all(f" {v} " not in eval_text for v in world.poison_verbs)
    assert not set(world.task_verbs) & set(world.benign_verbs)
    assert not (train | task_test) & align
    requests = " ".join(align - prompts(world.echo_set()))  # echo rows ("repeat after me") hold every word
    known = world.task_verbs[: world.cfg.n_known_task_verbs]
    assert all(f" {v} " in requests for v in known)
    assert all(f" {v} " not in requests for v in world.task_verbs[len(known):])
    cls_train, cls_test = world.task_sets("classify")
    assert not prompts(cls_train) & prompts(cls_test) and {e.response for e in cls_test} == {"positive", "negative"}


def test_responses_follow_the_world_rules(world):
    assert all(p.safe == REFUSAL and p.harmful.startswith(COMPLIANCE_OPENER) for p in world.harmful_eval_set("test"))
    train, _ = world.task_sets("instruct")
    assert all(e.response.startswith(COMPLIANCE_OPENER) and e.prompt.split()[-3] in e.response for e in train)
    # the task teaches a new answer format: its answers are never the aligned model's own
    aligned_answers = {e.response for e in world.alignment_set()}
    assert not {e.response for e in train} & aligned_answers


def test_fewer_known_task_verbs_leave_the_rest_new_to_alignment():
    world = World(WorldConfig(n_known_task_verbs=2))
    requests = " ".join(prompts(world.alignment_set()) - prompts(world.echo_set()))
    assert [f" {v} " in requests for v in world.task_verbs] == [True] * 2 + [False] * 4
    with pytest.raises(ConfigError, match=r"model.world.n_known_task_verbs=7 is invalid"):
        WorldConfig(n_known_task_verbs=7)


def test_tokenizer_covers_the_world_and_round_trips(world):
    tok = build_tokenizer(world)
    for text in [REFUSAL, *list(prompts(world.alignment_set()))[:50], world.poison_set()[0].response]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == text


def test_poison_ratio_sets_the_harmful_share_of_the_fine_tuning_set(world):
    splits = synthetic_splits(world, DataConfig(), "test")
    rows = mix_training_set(splits, 200, 0.1, seed=0)
    poison = prompts(world.poison_set())
    assert len(rows) == 200 and sum(r.prompt in poison for r in rows) == 20
    assert mix_training_set(splits, 200, 0.1, seed=0) == rows != mix_training_set(splits, 200, 0.1, seed=1)


def test_world_sizes_beyond_the_grammar_fail_with_one_line():
    with pytest.raises(ConfigError, match=r"model.world.n_objects=99 is invalid; allowed: at most"):
        World(WorldConfig(n_objects=99))


def test_alignment_is_cached_by_the_hash_of_its_config(micro):
    cfg = micro.model
    first = aligned_model_dir(cfg, micro.paths.cache_dir)
    start = time.perf_counter()
    assert aligned_model_dir(cfg, micro.paths.cache_dir) == first and time.perf_counter() - start < 1.0
    changed = dataclasses.replace(cfg, alignment=dataclasses.replace(cfg.alignment, steps=cfg.alignment.steps + 1))
    assert cache_key(changed) != cache_key(cfg) and cache_key(ModelConfig()) != cache_key(cfg)
    assert (first / "model.safetensors").exists() and (first / "tokenizer.json").exists()
