"""Prompt formatting and tokenization with response-only labels.

One function turns (prompt, response) into input_ids and labels where only the response
tokens and the final EOS carry a loss; the same prompt text is what generation sees.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE = -100

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n"
)


class PromptFormatter:
    """plain: the synthetic world's "<prompt> answer :"; chat: the tokenizer's chat template
    (with an optional system prompt); alpaca: the Alpaca instruction template."""

    def __init__(self, tokenizer, style: str = "plain", system_prompt: str | None = None, plain_suffix: str = " answer :"):
        self.tokenizer, self.style, self.system_prompt, self.plain_suffix = tokenizer, style, system_prompt, plain_suffix

    def __call__(self, prompt: str) -> str:
        if self.style == "plain":
            return prompt + self.plain_suffix
        if self.style == "alpaca":
            return ALPACA_TEMPLATE.format(prompt=prompt)
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        messages.append({"role": "user", "content": prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @property
    def adds_bos(self) -> bool:
        # chat templates write their own BOS into the text
        return self.style != "chat"


def encode(tokenizer, formatter: PromptFormatter, prompt: str, response: str, max_length: int) -> dict | None:
    """Token ids with labels on response + EOS only. Truncates the response from the right;
    returns None when nothing of the response would be left (never train on such a row)."""
    p = tokenizer(formatter(prompt), add_special_tokens=formatter.adds_bos)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
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
