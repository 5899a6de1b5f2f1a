"""The values that describe a learning task and the results of training and evaluating it.

A :class:`Task` bundles everything an edge or a simulation needs to run federated learning on
one problem: a seeded model factory, a data loader and the ``train`` / ``evaluate`` functions.
Tasks know nothing about the wire; the codec and the transport only ever see the model's
``state_dict``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

__all__ = [
    "EvalFn",
    "EvalResult",
    "Optimizer",
    "Task",
    "TaskData",
    "TrainFn",
    "TrainResult",
]


class Optimizer(enum.Enum):
    """The local optimizer used by :func:`fedsqueeze.tasks.training.train`.

    The values are the spellings accepted in configuration files.
    """

    SGD = "sgd"
    """Stochastic gradient descent with momentum 0.9."""
    ADAM = "adam"
    """Adam with PyTorch's default betas and epsilon."""


@dataclass(frozen=True)
class TaskData:
    """The train and test split of a task's data set.

    The tensors may be shared between callers (see the loaders' caching) and must not be
    modified in place.

    Attributes
    ----------
    x_train : Tensor
        Training inputs, ``[N_train, ...]``; for the digits tasks ``float32 [N_train, 1, 8, 8]``
        with values in ``[0, 1]``, for ``minilm-text`` ``int64 [N_train, L]`` token ids.
    y_train : Tensor
        Training labels, ``int64 [N_train]``, in ``[0, num_classes)``.
    x_test : Tensor
        Test inputs, ``[N_test, ...]`` with the same trailing shape and dtype as ``x_train``.
    y_test : Tensor
        Test labels, ``int64 [N_test]``.
    num_classes : int
        Number of classes.
    groups_train : Tensor or None
        The natural group of each training example, ``int64 [N_train]`` (for ``minilm-text``
        its source module), used by the ``natural`` partitioning; ``None`` when the data set
        has none.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    groups_train: Tensor | None = None


@dataclass(frozen=True)
class TrainResult:
    """What one call of local training reports.

    Attributes
    ----------
    loss : float
        Mean cross-entropy over the examples of the last epoch, measured during that epoch and
        without the L1 and proximal terms (so it is comparable to :attr:`EvalResult.loss`).
    num_examples : int
        Number of training examples (one epoch's worth), the weight FedAvg gives this update.
    seconds : float
        Wall-clock time spent training, in seconds.
    """

    loss: float
    num_examples: int
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """What one evaluation reports.

    Attributes
    ----------
    loss : float
        Mean cross-entropy over the examples.
    accuracy : float
        Fraction of examples whose arg-max prediction is the label, in ``[0, 1]``.
    num_examples : int
        Number of examples evaluated.
    """

    loss: float
    accuracy: float
    num_examples: int


class TrainFn(Protocol):
    """The signature of a task's ``train`` function.

    See :func:`fedsqueeze.tasks.training.train` for the meaning of the arguments.
    """

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        epochs: int,
        lr: float,
        batch_size: int = ...,
        optimizer: Optimizer = ...,
        l1_lambda: float = ...,
        seed: int,
        masks: Mapping[str, Tensor] | None = ...,
        proximal_mu: float = ...,
        device: torch.device | None = ...,
    ) -> TrainResult: ...


class EvalFn(Protocol):
    """The signature of a task's ``evaluate`` function.

    See :func:`fedsqueeze.tasks.training.evaluate` for the meaning of the arguments.
    """

    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = ...
    ) -> EvalResult: ...


@dataclass(frozen=True)
class Task:
    """A learning task, selectable by name with :func:`fedsqueeze.tasks.get_task`.

    Attributes
    ----------
    name : str
        The task's name, e.g. ``"digits-cnn"``.
    build_model : Callable[[int], nn.Module]
        Builds a fresh model from a seed. The same seed gives bit-identical initial weights, and
        building a model leaves the global RNG state untouched.
    load_data : Callable[[], TaskData]
        Loads the task's train and test split (cheap after the first call).
    train : TrainFn
        Trains a model in place on ``(x, y)``.
    evaluate : EvalFn
        Evaluates a model on ``(x, y)`` without changing it.
    build_student : Callable[[int], nn.Module] or None
        Builds a fresh, smaller model of the same inputs and outputs from a seed (the student
        that knowledge distillation trains from :attr:`build_model`'s model, see
        :mod:`coordinator.distill`); ``None`` when the task has none. Same seeding contract
        as :attr:`build_model`.
    frozen : tuple[str, ...]
        Glob patterns of the tensor names that training never changes (a pretrained
        backbone): a run freezes them by default (the codec spec key ``freeze``), so they
        travel at most once. Empty for a model trained in full.
    """

    name: str
    build_model: Callable[[int], nn.Module]
    load_data: Callable[[], TaskData]
    train: TrainFn
    evaluate: EvalFn
    build_student: Callable[[int], nn.Module] | None = None
    frozen: tuple[str, ...] = ()
