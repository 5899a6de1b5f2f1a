"""Scoring a stream of model states on a task's test split with one model instance.

A coordinator or a sweep evaluates the global model every round. Building the task's
model each time is cheap for the digits CNN but not for a pretrained transformer
(``minilm-text`` reads 22.7M parameters from disk per build), so the model is built once
and each state is loaded into it.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from fedsqueeze.tasks.base import EvalResult, Task

__all__ = ["TestEvaluator"]


class TestEvaluator:
    """Evaluates states of ``task``'s model (built from ``seed`` on first use).

    Parameters
    ----------
    task
        The task whose model, test split and ``evaluate`` are used.
    seed
        The seed the model is built from; tensors a state leaves out (see
        :meth:`model`) keep this model's values.
    """

    __test__ = False  # not a pytest class, despite its name

    def __init__(self, task: Task, seed: int) -> None:
        self.task = task
        self.seed = seed
        self._model: nn.Module | None = None

    @property
    def model(self) -> nn.Module:
        """The one model instance (built on first use; holds the last state evaluated)."""
        if self._model is None:
            self._model = self.task.build_model(self.seed)
        return self._model

    def __call__(self, state: Mapping[str, Tensor]) -> EvalResult:
        """Load ``state`` (every tensor of the model) and score it on the test split.

        Raises
        ------
        ValueError
            If ``state`` lacks a tensor of the model or has one it lacks (the model is
            left as it was).
        """
        model = self.model
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"state does not fit {self.task.name!r}'s model: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        model.load_state_dict(dict(state))
        data = self.task.load_data()
        return self.task.evaluate(model, data.x_test, data.y_test)
