"""Fine-tune accuracy of the real tasks (the harmful-fine-tuning protocol, docs/real_models.md)
on hand-written model outputs."""

from __future__ import annotations

import pytest

from safeprobe.evaluation.task_metrics import TASK_METRICS, gsm8k_answer

SST2 = [
    ("positive", "positive", True),
    ("Positive.", "positive", True),
    ("The sentiment is negative", "negative", True),
    ("negative", "positive", False),
    ("positive or negative", "positive", False),  # names both labels: no credit
    ("", "negative", False),
    ("It is nonnegative", "negative", False),  # not the word itself
    ("I'm sorry, I cannot help with that.", "positive", False),
]
AGNEWS = [
    ("Sports", "Sports", True),
    ("sci/tech", "Sci/Tech", True),
    ("The article is about Business.", "Business", True),
    ("World", "Sports", False),
    ("World or Business", "World", False),
    ("Sci", "Sci/Tech", False),
    ("Worldwide sports news", "Sports", True),  # "Worldwide" is not the label World
    ("", "World", False),
]
TARGET = "Tom has 3 + 5 = <<3+5=8>>8 apples.\nThe final answer is:  8"
GSM8K = [
    ("3 + 5 = 8. The final answer is: 8", TARGET, True),
    ("The final answer is: 8.00", TARGET, True),
    ("He has 3 and buys 5, so 8", TARGET, True),  # no answer phrase: the last number
    ("The final answer is: 9 (I first thought 8)", TARGET, False),  # the number after the phrase wins
    ("The final answer is: eight, as 3 + 5 = 8", TARGET, False),  # the first number after the phrase is 3
    ("The final answer is: unknown", TARGET, False),  # no number at all
    ("", TARGET, False),
    ("The final answer is: 1,200", "The final answer is:  1200", True),  # thousands separators
    ("The final answer is: -4", "The final answer is:  -4", True),
]


@pytest.mark.parametrize("answer,target,correct", SST2)
def test_sst2_label_accuracy(answer, target, correct):
    assert TASK_METRICS["sst2"](answer, target) is correct


@pytest.mark.parametrize("answer,target,correct", AGNEWS)
def test_agnews_label_accuracy(answer, target, correct):
    assert TASK_METRICS["agnews"](answer, target) is correct


@pytest.mark.parametrize("answer,target,correct", GSM8K)
def test_gsm8k_accuracy(answer, target, correct):
    assert TASK_METRICS["gsm8k"](answer, target) is correct


def test_gsm8k_extraction():
    assert gsm8k_answer("so 12 then The final answer is: 42 and 7") == 42.0
    assert gsm8k_answer("12 apples, then 7") == 7.0
    assert gsm8k_answer("The final answer is: none; earlier 5") == 5.0
    assert gsm8k_answer("no digits here") is None
    assert gsm8k_answer("$1,234.5") == 1234.5
