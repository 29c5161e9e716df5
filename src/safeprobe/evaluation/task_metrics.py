"""Fine-tune accuracy: does an answer solve a held-out task prompt? One scorer per task kind.

Real tasks follow the harmful-fine-tuning protocol (docs/real_models.md): SST2 and AGNews are
label accuracy, GSM8K compares the number after "The final answer is: " (else the last
number). A task without a scorer here (alpaca) reports no accuracy; its utility is test loss.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

SST2_LABELS = ("negative", "positive")  # by the data set's label id
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
GSM8K_ANSWER_PROMPT = "The final answer is: "  # replaces GSM8K's "####" in the training targets
_NUMBER = re.compile(r"-?\d+\.?\d*")


def exact_match(answer: str, target: str) -> bool:
    return answer.strip() == target.strip()


def first_word_label(answer: str, target: str) -> bool:
    """Classification: the first word of the answer is the label."""
    words = answer.strip().split()
    return bool(words) and words[0] == target


def mentioned_labels(answer: str, labels: tuple[str, ...]) -> set[str]:
    """The labels an answer names, case-insensitively, as whole words ("Sci/Tech" included)."""
    return {label for label in labels
            if re.search(rf"(?<![a-z]){re.escape(label.lower())}(?![a-z])", answer.lower())}


def label_accuracy(answer: str, target: str, labels: tuple[str, ...]) -> bool:
    """Correct when the answer names the target label and no other one. The protocol's code
    counts any answer containing the label; naming two labels ("positive or negative") would
    then be right whatever the target, so it is wrong here."""
    return mentioned_labels(answer, labels) == {target}


def gsm8k_answer(text: str) -> float | None:
    """The number after "The final answer is: ", else the last number; None when there is none."""
    text = text.replace(",", "")
    numbers = _NUMBER.findall(text)
    if GSM8K_ANSWER_PROMPT in text:
        after = _NUMBER.findall(text.split(GSM8K_ANSWER_PROMPT, 1)[1])
        numbers = after[:1] or numbers[-1:]
    if not numbers:
        return None
    return float(numbers[-1])


def gsm8k_accuracy(answer: str, target: str) -> bool:
    predicted, expected = gsm8k_answer(answer), gsm8k_answer(target)
    return predicted is not None and predicted == expected


TASK_METRICS: dict[str, Callable[[str, str], bool]] = {
    "instruct": exact_match,
    "classify": first_word_label,
    "sst2": partial(label_accuracy, labels=SST2_LABELS),
    "agnews": partial(label_accuracy, labels=AGNEWS_LABELS),
    "gsm8k": gsm8k_accuracy,
}
