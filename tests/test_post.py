"""Post-fine-tuning repairs (src/safeprobe/post): SafeLoRA and Antidote on a tiny random Llama
with a LoRA whose B is random, checked against independent computations."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from safeprobe.config import CONF_DIR, ConfigError
from safeprobe.data.formatting import collate
from safeprobe.post import REPAIRS, PostContext, apply_repair, lora_layers, post_config
from safeprobe.post.antidote import AntidoteConfig, input_statistics, targets
from safeprobe.post.safelora import SafeLoRAConfig

VOCAB, PAD = 40, 0


def tiny_llama(dtype=torch.float32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def with_lora(model: torch.nn.Module, r: int = 4, seed: int = 1) -> torch.nn.Module:
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    for name, p in peft.named_parameters():
        if "lora_B" in name:  # PEFT starts B at 0: give it a fine-tuned-looking value
            p.data.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3)
    return peft


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def lora_b_key(module: str) -> str:
    return f"base_model.model.{module}.lora_B.default.weight"


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


# --------------------------------------------------------------------------- SafeLoRA


@pytest.fixture
def safelora_case():
    """(fine-tuned PEFT model, unaligned model): the aligned weights plus random per-layer differences."""
    aligned = tiny_llama()
    unaligned = copy.deepcopy(aligned)
    g = torch.Generator().manual_seed(2)
    for _name, m in unaligned.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.data -= torch.randn(m.weight.shape, generator=g) * 0.1
    return with_lora(aligned), unaligned


def expected_cosines(peft, unaligned) -> dict[str, tuple[float, torch.Tensor]]:
    """cos(C B A, B A) and C B, with C = V V^T / ||V||_F formed explicitly (float64)."""
    out = {}
    for name, layer, a in lora_layers(peft, "test"):
        v = layer.base_layer.weight.double() - unaligned.get_submodule(name).weight.double()
        c = v @ v.T / torch.linalg.matrix_norm(v)
        b, A = layer.lora_B[a].weight.double(), layer.lora_A[a].weight.double()
        dw = b @ A
        cos = torch.nn.functional.cosine_similarity((c @ dw).reshape(1, -1), dw.reshape(1, -1)).item()
        out[name] = (cos, c @ b)
    return out


def run_safelora(peft, unaligned, **cfg) -> dict:
    context = PostContext(base_model=lambda: unaligned)
    return apply_repair(peft, context, SafeLoRAConfig(**cfg))


def check_projection(before: dict, peft, expected: dict, projected: set[str]) -> None:
    after = snapshot(peft)
    assert after.keys() == before.keys()
    changed = {lora_b_key(n) for n in projected}
    for key in after:
        if key in changed:
            name = key.removeprefix("base_model.model.").removesuffix(".lora_B.default.weight")
            torch.testing.assert_close(after[key], expected[name][1].float(), rtol=1e-5, atol=1e-6)
            assert not torch.equal(after[key], before[key])
        else:
            assert torch.equal(after[key], before[key]), key


def test_safelora_number_projects_exactly_the_k_lowest_cosines(safelora_case):
    peft, unaligned = safelora_case
    expected, before = expected_cosines(peft, unaligned), snapshot(peft)
    assert len(expected) == 14  # 7 Linear layers x 2 blocks
    report = run_safelora(peft, unaligned, mode="number", k=5)
    lowest = sorted(expected, key=lambda n: expected[n][0])[:5]
    assert set(report["projected"]) == set(lowest) and len(report["projected"]) == 5
    assert report["cosines"].keys() == expected.keys() and not report["skipped"]
    for name, c in report["cosines"].items():
        assert c == pytest.approx(expected[name][0], rel=1e-9, abs=1e-12)
    check_projection(before, peft, expected, set(lowest))
    json.dumps(report)


def test_safelora_k_above_the_layer_count_projects_every_layer(safelora_case):
    peft, unaligned = safelora_case
    expected, before = expected_cosines(peft, unaligned), snapshot(peft)
    report = run_safelora(peft, unaligned, k=100)
    assert set(report["projected"]) == set(expected)
    check_projection(before, peft, expected, set(expected))


def test_safelora_threshold_on_a_constructed_case(safelora_case):
    """Layer 0's q_proj: V = s e1 w^T and B's rows other than the first 0, so C B = s|w| B (cos 1,
    never projected). Its k_proj: same V, B's first row 0, so C B A = 0 (cos 0, projected: B -> 0).
    The rest: threshold halfway between two known cosines."""
    peft, unaligned = safelora_case
    keep, drop = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    g = torch.Generator().manual_seed(3)
    for name, first_row_only in ((keep, True), (drop, False)):
        layer = peft.get_base_model().get_submodule(name)
        base_w = unaligned.get_submodule(name).weight
        base_w.data.copy_(layer.base_layer.weight.data)
        base_w.data[0] -= torch.randn(base_w.shape[1], generator=g)  # V = e1 w^T
        b = layer.lora_B["default"].weight
        if first_row_only:
            b.data[1:] = 0
        else:
            b.data[0] = 0
    expected, before = expected_cosines(peft, unaligned), snapshot(peft)
    assert expected[keep][0] == pytest.approx(1.0, abs=1e-6)
    cos = sorted(c for n, (c, _) in expected.items() if n not in (keep, drop))
    threshold = (cos[5] + cos[6]) / 2
    report = run_safelora(peft, unaligned, mode="threshold", threshold=threshold)
    wanted = {n for n, (c, _) in expected.items() if c <= threshold}
    assert drop in wanted and keep not in wanted and len(wanted) == 7
    assert set(report["projected"]) == wanted
    assert report["cosines"][drop] == 0.0 and report["cosines"][keep] == pytest.approx(1.0, abs=1e-6)
    check_projection(before, peft, expected, wanted)
    assert torch.equal(snapshot(peft)[lora_b_key(drop)], torch.zeros_like(before[lora_b_key(drop)]))


def test_safelora_skips_a_layer_the_alignment_did_not_change_without_nan(safelora_case):
    """V = 0 (base weights equal to the aligned ones): C is undefined; the layer is skipped
    (never projected, not counted among the k), and no cosine is NaN."""
    peft, unaligned = safelora_case
    same = "model.layers.1.mlp.down_proj"
    unaligned.get_submodule(same).weight.data.copy_(peft.get_base_model().get_submodule(same).base_layer.weight.data)
    expected, before = expected_cosines(peft, unaligned), snapshot(peft)
    report = run_safelora(peft, unaligned, k=100)
    assert same in report["skipped"] and same not in report["cosines"] and same not in report["projected"]
    assert all(c == c for c in report["cosines"].values())  # no NaN
    assert set(report["projected"]) == set(expected) - {same}
    check_projection(before, peft, expected, set(expected) - {same})


def test_safelora_refuses_full_fine_tuning_and_a_mismatched_base():
    with pytest.raises(ConfigError) as e:
        run_safelora(tiny_llama(), tiny_llama())
    assert "post.name='safelora'" in one_line(e)
    peft = with_lora(tiny_llama())
    other = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ConfigError) as e:
        run_safelora(peft, other)
    assert "model.base_name_or_path" in one_line(e)


# --------------------------------------------------------------------------- Antidote


def harmful_rows(n: int, seed: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def calibration(rows: list[dict], per_batch: int = 4):
    def batches(n: int) -> list[dict]:
        picked = rows[:n]
        return [collate(picked[i:i + per_batch], PAD) for i in range(0, len(picked), per_batch)]
    return batches


def manual_statistics(model, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Independent of the repair: the input x of each LoRA layer (a pre-hook on PEFT's wrapper),
    A's input is x and B's is x A^T; the mean of squares over the tokens the mask marks real."""
    sums, counts, handles, current = {}, {}, [], {}
    for name, layer, a in lora_layers(model, "test"):
        def grab(_m, args, name=name, layer=layer, a=a):
            keep = current["mask"]
            x = args[0][keep].double()
            h = x @ layer.lora_A[a].weight.double().T
            for key, inp in ((f"{name}.lora_A", x), (f"{name}.lora_B", h)):
                sums[key] = sums.get(key, 0) + (inp * inp).sum(0)
                counts[key] = counts.get(key, 0) + inp.shape[0]
        handles.append(layer.register_forward_pre_hook(grab))
    with torch.no_grad():
        for b in batches:
            current["mask"] = b["attention_mask"].bool()
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in handles:
        h.remove()
    return {k: sums[k] / counts[k] for k in sums}


def expected_pruned(model, stats: dict[str, torch.Tensor] | None, share: float) -> dict[str, torch.Tensor]:
    """Per pruned weight: the bool mask of its top-share scores per row (topk, not a sort)."""
    out = {}
    for name, layer, a in lora_layers(model, "test"):
        for part, lin in (("lora_A", layer.lora_A[a]), ("lora_B", layer.lora_B[a])):
            w = lin.weight.detach().double()
            score = w.abs() * (stats[f"{name}.{part}"].sqrt()[None, :] if stats is not None else 1)
            n = w.shape[1] - int(w.shape[1] * (1 - share))
            mask = torch.zeros_like(w, dtype=torch.bool)
            mask.scatter_(1, score.topk(n, dim=1).indices, True)
            out[f"base_model.model.{name}.{part}.default.weight"] = mask
    return out


def check_pruning(before: dict, model, masks: dict[str, torch.Tensor]) -> None:
    after = snapshot(model)
    for key in after:
        if key in masks:
            assert torch.equal(after[key], before[key].masked_fill(masks[key], 0)), key
        else:
            assert torch.equal(after[key], before[key]), key


@pytest.mark.parametrize("share", [0.1, 0.25])
def test_antidote_zeroes_exactly_the_top_share_of_each_rows_scores(share):
    peft = with_lora(tiny_llama(torch.float64), r=4)
    rows = harmful_rows(10)
    batches = calibration(rows)
    stats = manual_statistics(peft, batches(10))
    masks, before = expected_pruned(peft, stats, share), snapshot(peft)
    report = apply_repair(peft, PostContext(calibration_batches=batches), AntidoteConfig(share=share, n_calibration=10,
                                                                                        batch_size=3))
    check_pruning(before, peft, masks)
    # per row, the authors' rounding cols - int(cols * (1 - share)): B (r = 4 columns) loses 1 either way;
    # A loses 2 of 16 (hidden) and 3 of 24 (down_proj's input) at 0.1, 4 and 6 at 0.25
    per_row = {(m.shape[1], int(m[0].sum())) for m in masks.values()}
    assert per_row == ({(4, 1), (16, 2), (24, 3)} if share == 0.1 else {(4, 1), (16, 4), (24, 6)})
    assert all((m.sum(1) == m[0].sum()).all() for m in masks.values())
    assert report["mode"] == "lora" and report["layers"] == 28 and report["examples"] == 10
    assert report["tokens"] == sum(len(r["input_ids"]) for r in rows)
    assert report["weights_zeroed"] == sum(int(m.sum()) for m in masks.values())
    json.dumps(report)


def test_antidote_padding_does_not_count():
    """The statistics are the same whether each example runs alone (no padding) or padded in a
    batch whose pad tokens are random ids; counting the padding would change them."""
    peft = with_lora(tiny_llama(torch.float64))
    rows = harmful_rows(8, seed=5)
    _, modules = targets(peft, AntidoteConfig())
    alone, *_ = input_statistics(peft, modules, calibration(rows, per_batch=1)(8), batch_size=1)
    padded_batches = calibration(rows, per_batch=8)(8)
    g = torch.Generator().manual_seed(6)
    for b in padded_batches:
        pads = b["attention_mask"] == 0
        assert pads.any()
        b["input_ids"][pads] = torch.randint(1, VOCAB, (int(pads.sum()),), generator=g)
    padded, examples, tokens = input_statistics(peft, modules, padded_batches, batch_size=8)
    assert examples == 8 and tokens == sum(len(r["input_ids"]) for r in rows)
    for k in alone:
        torch.testing.assert_close(padded[k], alone[k], rtol=1e-10, atol=1e-12)
    unmasked = {k: v for k, v in manual_statistics(peft, [{**b, "attention_mask": torch.ones_like(b["attention_mask"])}
                                                          for b in padded_batches]).items()}
    assert any(not torch.allclose(unmasked[k], alone[k]) for k in alone)


def test_antidote_without_calibration_scores_by_magnitude():
    peft = with_lora(tiny_llama(torch.float64))
    masks, before = expected_pruned(peft, None, 0.1), snapshot(peft)
    report = apply_repair(peft, PostContext(), AntidoteConfig(n_calibration=0))
    check_pruning(before, peft, masks)
    assert report["examples"] == 0
    with pytest.raises(ConfigError) as e:
        apply_repair(with_lora(tiny_llama()), PostContext(), AntidoteConfig())
    assert "post.n_calibration" in one_line(e)
    assert REPAIRS["antidote"].data_needed == ("harmful",) and REPAIRS["safelora"].data_needed == ()


def test_antidote_full_fine_tuning_prunes_the_named_layers_only():
    """The authors' full_finetuning mode: whole q/k/v weights, full_share per row."""
    model = tiny_llama(torch.float64)
    before = snapshot(model)
    report = apply_repair(model, PostContext(calibration_batches=calibration(harmful_rows(6))),
                          AntidoteConfig(full_share=0.2, n_calibration=6))
    after = snapshot(model)
    assert report["mode"] == "full" and report["layers"] == 6
    for k in after:
        if any(f"{p}.weight" in k for p in ("q_proj", "k_proj", "v_proj")):
            zeroed = (after[k] == 0) & (before[k] != 0)
            assert (zeroed.sum(1) == 16 - int(16 * 0.8)).all() and torch.equal(after[k][~zeroed], before[k][~zeroed])
        else:
            assert torch.equal(after[k], before[k]), k
    with pytest.raises(ConfigError) as e:
        apply_repair(tiny_llama(), PostContext(), AntidoteConfig(n_calibration=0, full_modules=["qkv"]))
    assert "post.full_modules" in one_line(e)


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["none", "safelora", "antidote"])
def test_each_yaml_gives_its_configs_defaults(name):
    node = yaml.safe_load((CONF_DIR / "post" / f"{name}.yaml").read_text())
    cfg = post_config(node)
    if name == "none":
        assert cfg is None and post_config(None) is None
    else:
        assert cfg == REPAIRS[name].config()


@pytest.mark.parametrize("node, key", [
    ({"name": "safelora", "kk": 3}, "post.kk"),
    ({"name": "antidote", "k": 3}, "post.k"),
    ({"name": "safelora", "k": 0}, "post.k"),
    ({"name": "safelora", "mode": "top"}, "post.mode"),
    ({"name": "safelora", "threshold": 1.5}, "post.threshold"),
    ({"name": "safelora", "k": "many"}, "post.k"),
    ({"name": "antidote", "share": 1.5}, "post.share"),
    ({"name": "antidote", "n_calibration": -1}, "post.n_calibration"),
    ({"name": "antidote", "batch_size": 0}, "post.batch_size"),
    ({"name": "wanda"}, "post.name"),
    ({"name": None, "k": 3}, "post.k"),
])
def test_bad_post_configs_fail_with_one_line_naming_the_key(node, key):
    with pytest.raises(ConfigError) as e:
        post_config(node)
    assert key in one_line(e)
