"""Prompt formatting and tokenization with response-only labels.

One function turns (prompt, response) into input_ids and labels where only the response
tokens and the token that ends an answer (EOS, or the chat template's end-of-turn token)
carry a loss; the same prompt text is what generation sees.

A prompt may carry an input section (Alpaca's instruction + input, the SST2 sentence, the
AGNews article): `with_input(instruction, input)` joins them with the Alpaca input header, and
each style renders it its own way (alpaca: the official with-input template; chat: the input
follows the instruction after a blank line).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch

IGNORE = -100

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n"
)
ALPACA_INPUT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)
INPUT_HEADER = "\n\n### Input:\n"
_END_MARK = "<<safeprobe-end-of-answer>>"


def with_input(instruction: str, input_text: str | None) -> str:
    """One prompt string for an instruction and its (possibly empty) input."""
    return instruction + INPUT_HEADER + input_text if input_text else instruction


def split_input(prompt: str) -> tuple[str, str]:
    """The inverse of `with_input`: (instruction, input), input "" when there is none."""
    instruction, _, input_text = prompt.partition(INPUT_HEADER)
    return instruction, input_text


class PromptFormatter:
    """plain: the synthetic world's "<prompt> answer :"; chat: the tokenizer's chat template
    (with an optional system prompt); alpaca: the Alpaca instruction template."""

    def __init__(self, tokenizer, style: str = "plain", system_prompt: str | None = None, plain_suffix: str = " answer :"):
        self.tokenizer, self.style, self.system_prompt, self.plain_suffix = tokenizer, style, system_prompt, plain_suffix

    def __call__(self, prompt: str) -> str:
        if self.style == "plain":
            return prompt + self.plain_suffix
        instruction, input_text = split_input(prompt)
        if self.style == "alpaca":
            if input_text:
                return ALPACA_INPUT_TEMPLATE.format(instruction=instruction, input=input_text)
            return ALPACA_TEMPLATE.format(prompt=instruction)
        content = f"{instruction}\n\n{input_text}" if input_text else instruction
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        return self._chat(messages + [{"role": "user", "content": content}], add_generation_prompt=True)

    def _chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The tokenizer's chat template, with its failures turned into one-line config errors."""
        from safeprobe.config import ConfigError

        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError("data.prompt_format=chat is invalid for this model; allowed: alpaca or plain "
                              "(its tokenizer has no chat template)")
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja2's TemplateError, raised by templates that reject a role
            if self.system_prompt and messages[0]["role"] == "system":
                raise ConfigError(f"data.system_prompt={self.system_prompt!r} is invalid for this model; allowed: "
                                  f"null (its chat template rejects a system prompt: {e})") from None
            raise

    @property
    def adds_bos(self) -> bool:
        # chat templates write their own BOS into the text
        return self.style != "chat"

    @cached_property
    def stop_token_id(self) -> int:
        """The token that ends an answer: for chat, the special token the template writes right
        after an assistant message (Gemma's <end_of_turn>, Qwen's <|im_end|>, Llama-2's </s>),
        else EOS. Training appends it to every response; generation stops on it."""
        eos = self.tokenizer.eos_token_id
        if self.style != "chat":
            return eos
        turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _END_MARK}]
        after = self._chat(turn, add_generation_prompt=False).rsplit(_END_MARK, 1)[-1]
        special = set(self.tokenizer.all_special_ids)
        ids = self.tokenizer(after, add_special_tokens=False)["input_ids"]
        return next((i for i in ids if i in special), eos)

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation stops on EOS and on the end-of-answer token."""
        return sorted({self.tokenizer.eos_token_id, self.stop_token_id})


def encode(tokenizer, formatter: PromptFormatter, prompt: str, response: str, max_length: int) -> dict | None:
    """Token ids with labels on the response + its end token only. Truncates the response from the
    right; returns None when nothing of the response would be left (never train on such a row)."""
    p = tokenizer(formatter(prompt), add_special_tokens=formatter.adds_bos)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [formatter.stop_token_id]
    room = max_length - len(p)
    if room <= 0:
        return None
    r = r[:room]
    return {"input_ids": p + r, "labels": [IGNORE] * len(p) + r}


def collate(rows: Sequence[dict], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad encoded rows into a batch (labels padded with IGNORE)."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in rows:
        n, pad = len(r["input_ids"]), width - len(r["input_ids"])
        ids, mask, lab = r["input_ids"], [1] * n, r.get("labels", [IGNORE] * n)
        if side == "right":
            ids, mask, lab = ids + [pad_id] * pad, mask + [0] * pad, lab + [IGNORE] * pad
        else:
            ids, mask, lab = [pad_id] * pad + ids, [0] * pad + mask, [IGNORE] * pad + lab
        out["input_ids"].append(ids)
        out["attention_mask"].append(mask)
        out["labels"].append(lab)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def encode_pairs(tokenizer, formatter, pairs, max_length: int) -> list[dict]:
    """Safety pairs -> rows of (safe, harmful) encodings; pairs that do not fit are dropped."""
    rows = []
    for p in pairs:
        safe = encode(tokenizer, formatter, p.prompt, p.safe, max_length)
        harm = encode(tokenizer, formatter, p.prompt, p.harmful, max_length)
        if safe is not None and harm is not None:
            rows.append({"safe": safe, "harmful": harm})
    return rows


def collate_pairs(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2B sequences: the B safe answers first, then the B harmful answers."""
    return collate([r["safe"] for r in rows] + [r["harmful"] for r in rows], pad_id)


def up_to_first_difference(pairs: dict) -> dict:
    """A pair batch (B safe rows, then B harmful rows) whose labels stop at the first answer
    token where the two answers of a pair differ: the margin becomes the log-odds of that one
    choice (refuse or comply), the shared prefix cancelling out."""
    safe_ids, harm_ids = pairs["input_ids"].chunk(2)
    differs = (safe_ids != harm_ids).long()
    first = torch.where(differs.any(-1), differs.argmax(-1), safe_ids.shape[1] - 1)
    keep = torch.arange(safe_ids.shape[1], device=first.device)[None, :] <= first[:, None]
    labels = pairs["labels"].masked_fill(~keep.repeat(2, 1), IGNORE)
    return {**pairs, "labels": labels}
