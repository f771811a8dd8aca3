"""The testbed report's scoring agrees with lmms-eval's ChartQA scoring; acceptance is counted by type."""

from __future__ import annotations

import pytest
import torch

from lmms_msd.calibration.token_types import CONTENT, FUNCTION, NUMBER
from lmms_msd.speculative.tree import Tree
from lmms_msd.speculative.verify import Acceptance
from lmms_msd.testbed.report import AcceptanceByType, final_answer, relaxed_correct

CASES = [("42", "42"), ("40", "42"), ("41", "42"), ("0", "0"), ("Red", "red"), ("red", "blue"), ("5%", "0.05"),
         ("1,000", "1000"), ("Yes", "yes"), ("43.9", "42"), ("44.2", "42"), (" 42", "42")]


@pytest.mark.parametrize("prediction, target", CASES)
def test_relaxed_correct_matches_lmms_eval(prediction, target):
    utils = pytest.importorskip("lmms_eval.tasks.chartqa.utils")
    assert relaxed_correct(prediction, target) == utils.relaxed_correctness(prediction, target)


def test_final_answer_takes_the_last_answer_line():
    assert final_answer("The red bar is 40.\nAnswer: red") == "red"
    assert final_answer("Answer: 3. Then more. Answer: 35.") == "35"
    assert final_answer("blue") == "blue"


def test_acceptance_by_type_counts_path_and_bonus():
    types = torch.tensor([NUMBER, FUNCTION, CONTENT, NUMBER])
    observer = AcceptanceByType(types)
    tree = Tree(tokens=torch.tensor([1, 2, 0, 3]), parents=torch.tensor([-1, 0, 1, 0]),
                depths=torch.tensor([0, 1, 2, 1]), scores=torch.zeros(4))
    observer(tree, None, Acceptance(path=[0, 1, 2], bonus=3))  # accepted content 2, number 0; bonus number 3
    observer(tree, None, Acceptance(path=[0], bonus=1))  # bonus function word
    rates = observer.rates()
    assert rates["number"] == {"tokens": 2, "accepted": 1, "rate": 0.5}
    assert rates["content"] == {"tokens": 1, "accepted": 1, "rate": 1.0}
    assert rates["punctuation/function"] == {"tokens": 1, "accepted": 0, "rate": 0.0}
