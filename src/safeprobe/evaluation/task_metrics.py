"""Fine-tune accuracy: does an answer solve a held-out task prompt? One scorer per task kind."""

from __future__ import annotations

from collections.abc import Callable


def exact_match(answer: str, target: str) -> bool:
    return answer.strip() == target.strip()


def first_word_label(answer: str, target: str) -> bool:
    """Classification: the first word of the answer is the label."""
    words = answer.strip().split()
    return bool(words) and words[0] == target


TASK_METRICS: dict[str, Callable[[str, str], bool]] = {
    "instruct": exact_match,
    "classify": first_word_label,
}
