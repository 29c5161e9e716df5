"""Models of real shapes with random weights, and data files that fill their length limits, for
the benchmarks (gpu_bench.py, step_cost.py --shape, sap_profile.py --shape). Nothing is downloaded.

A shape is a family's transformers config class (tests/standins.py) with a real model's layers,
widths, heads and vocabulary; values that do not change the cost (RoPE base...) are the class
defaults. Its folder holds only config.json and the stand-ins' byte-level tokenizer, which
load_base(random_weights=True) builds the model from (speed does not depend on the weights).
The data are local files in the real sets' schemas whose answers are longer than any length
limit up to 512 tokens, so every training row is cut to exactly data.max_length tokens.
"""

from __future__ import annotations

import json
import random
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: tests.standins

from tests.standins import ASSETS, FAMILIES, SIZES, build_tokenizer  # noqa: E402

# name -> (the conf/model option it runs with, its tests/standins.py family, its shape)
SHAPES = {
    "llama2_7b_chat": ("llama2_7b_chat", "llama", dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, head_dim=128, vocab_size=32000)),
    "llama3_8b_instruct": ("llama3_8b_instruct", "llama", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256)),
    "mistral_7b_instruct": ("mistral_7b_instruct", "mistral", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=32768, sliding_window=None)),  # v0.3
    "qwen2_5_7b_instruct": ("qwen2_5_7b_instruct", "qwen2", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, head_dim=128, vocab_size=152064)),
    "gemma2_9b_it": ("gemma2_9b_it", "gemma2", dict(
        hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, vocab_size=256000)),
    # a Llama of ~100M parameters for the CPU: a step's shares are not those of the 0.7M synthetic model
    "llama_100m": ("llama2_7b_chat", "llama", dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=12, head_dim=64, vocab_size=8000)),
}
FAMILY_SHAPES = [name for name, (option, _, _) in SHAPES.items() if name == option]  # the shipped families
TINY_SHAPE = dict(SIZES, num_hidden_layers=10)  # 10 layers: room for the reference probe's layers [3, 9]
PROMPT_WORDS = 16  # ~85 tokens with the Alpaca template and this tokenizer
ANSWER_WORDS = 600  # >= 600 tokens: longer than any data.max_length up to 512, so every row is cut to the limit
N_TASK, N_TEST = 80, 4  # 80 task (and alignment) rows: batches of 10 are all full
# the ~100M shape on 2 CPU cores: float32, and a batch a CPU steps through in seconds
CPU = ["trainer=cpu", "model.dtype=float32", "data.batch_size=4", "data.safety_batch_size=4", "data.max_length=128",
       "data.safety_max_length=128"]


def words() -> list[str]:
    """Words the stand-in tokenizer was trained on (fixture files): each is at least one token."""
    return sorted(set(re.findall(r"[a-z]+", " ".join(p.read_text().lower() for p in ASSETS.iterdir() if p.is_file()))))


def write_data(folder: Path, vocab: list[str]) -> list[str]:
    """Local files in the schema of each set the protocol reads, whose answers are longer than the
    length limits (up to 512 tokens): every training row is cut to exactly data.max_length /
    data.safety_max_length tokens. Returns the overrides that point the data config at them."""
    rng = random.Random(0)

    def text(n: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(n))

    def jsonl(name: str, rows: list[dict]) -> Path:
        path = folder / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    unsafe = [{"prompt": text(PROMPT_WORDS), "response": text(ANSWER_WORDS), "is_safe": False} for _ in range(16)]
    files = {
        "task_path": jsonl("task.jsonl", [{"instruction": text(PROMPT_WORDS), "input": "", "output": text(ANSWER_WORDS)}
                                          for _ in range(N_TASK + N_TEST)]),
        "poison_path": jsonl("poison.jsonl", unsafe),
        "harmful_eval_path": jsonl("harmful_eval.jsonl", unsafe[:4]),
        "safety_pairs_path": jsonl("safety_pairs.jsonl", [{"prompt": text(PROMPT_WORDS), "llama3_output": text(ANSWER_WORDS),
                                                           "response": text(ANSWER_WORDS)} for _ in range(16)]),
        "alignment_path": jsonl("alignment.jsonl", [{"prompt": text(PROMPT_WORDS), "refusal": text(ANSWER_WORDS),
                                                     "response": text(ANSWER_WORDS)} for _ in range(N_TASK)]),
    }
    return [f"data.{k}={v}" for k, v in files.items()] + [f"data.n_train={N_TASK}", f"data.n_test={N_TEST}"]


def write_model_folder(folder: Path, family: str, shape: dict, tokenizer) -> Path:
    """config.json of the shape and the tokenizer: all load_base(random_weights=True) reads."""
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    FAMILIES[family](**{"vocab_size": len(tokenizer), **shape, **ids}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prepare(name: str, folder: Path, tiny: bool = False) -> list[str]:
    """Write shape `name`'s model folder (tiny: the stand-ins' size) and the data files under
    `folder`; return the train.py overrides that run them (load_base with random_weights)."""
    option, family, shape = SHAPES[name]
    model = write_model_folder(folder / name, family, TINY_SHAPE if tiny else shape, build_tokenizer())
    data = folder / "data"
    data.mkdir(exist_ok=True)
    # align=none: the fine-tuning steps start from the model as built (the experiment's SFT alignment
    # stage would train 10,000 steps first); gpu_bench.py times the stage's step itself
    return ["experiment=harmful_finetuning_alpaca", "align=none", f"model={option}", f"model.name_or_path={model}",
            *write_data(data, words())]


def add_option(parser) -> None:
    parser.add_argument("--shape", choices=list(SHAPES),
                        help="a real model's shape with random weights and filled data files (benchmarks/shapes.py); "
                             "without a GPU it runs with the CPU settings (float32, batch 4 x 128 tokens)")


@contextmanager
def applied(args):
    """With --shape: the shape's folder and data in a temporary folder for the block, its overrides
    before the user's, random weights."""
    if not args.shape:
        yield args
        return
    with tempfile.TemporaryDirectory(prefix=f"shape-{args.shape}-") as folder:
        cpu = [] if torch.cuda.is_available() else CPU
        args.overrides = [*prepare(args.shape, Path(folder)), *cpu, *args.overrides]
        args.random_weights = True
        yield args
