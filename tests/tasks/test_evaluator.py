"""One model instance scores a stream of states exactly as fresh models do."""

from __future__ import annotations

import pytest
import torch

from fedsqueeze.tasks import get_task
from fedsqueeze.tasks.evaluator import TestEvaluator


def test_reused_model_scores_each_state_like_a_fresh_model() -> None:
    task = get_task("digits-cnn")
    evaluator = TestEvaluator(task, seed=0)
    data = task.load_data()
    states = [task.build_model(seed).state_dict() for seed in (1, 2, 1)]
    for state in states:
        fresh = task.build_model(0)
        fresh.load_state_dict(state)
        expected = task.evaluate(fresh, data.x_test, data.y_test)
        assert evaluator(state) == expected
    first = evaluator.model
    evaluator(states[0])
    assert evaluator.model is first  # built once


def test_a_state_missing_a_tensor_is_refused_and_the_model_kept() -> None:
    task = get_task("digits-cnn")
    evaluator = TestEvaluator(task, seed=0)
    state = dict(task.build_model(1).state_dict())
    evaluator(state)
    other = task.build_model(2).state_dict()
    partial = {k: v for k, v in other.items() if k != "fc2.bias"}
    with pytest.raises(ValueError, match=r"missing \['fc2.bias'\]"):
        evaluator(partial)
    with pytest.raises(ValueError, match="unexpected"):
        evaluator({**other, "extra": torch.zeros(1)})
    for name, tensor in state.items():
        assert torch.equal(evaluator.model.state_dict()[name], tensor)
