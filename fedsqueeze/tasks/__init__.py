"""The built-in learning tasks, selectable by name, and data partitioning.

A :class:`Task` bundles a seeded model factory, a data loader and ``train`` / ``evaluate``.
``get_task("digits-cnn")``, ``get_task("digits-mlp")`` and ``get_task("minilm-text")`` (a
pretrained transformer; Hugging Face libraries are imported only when its model or data is
built) return the built-in ones;
``get_task("mypkg.tasks:my_task")`` loads a user task. :func:`partition_iid` and
:func:`partition_dirichlet` and :func:`partition_by_group` (natural groups) split a training
set among federated clients.
"""

from __future__ import annotations

from fedsqueeze.tasks.base import (
    EvalFn,
    EvalResult,
    Optimizer,
    Task,
    TaskData,
    TrainFn,
    TrainResult,
)
from fedsqueeze.tasks.digits_data import load_digits_data
from fedsqueeze.tasks.models import (
    DigitsCNN,
    DigitsMLP,
    build_digits_cnn,
    build_digits_mlp,
    build_seeded,
)
from fedsqueeze.tasks.partition import partition_by_group, partition_dirichlet, partition_iid
from fedsqueeze.tasks.registry import DIGITS_CNN, DIGITS_MLP, get_task, list_tasks
from fedsqueeze.tasks.training import evaluate, train

__all__ = [
    "DIGITS_CNN",
    "DIGITS_MLP",
    "DigitsCNN",
    "DigitsMLP",
    "EvalFn",
    "EvalResult",
    "Optimizer",
    "Task",
    "TaskData",
    "TrainFn",
    "TrainResult",
    "build_digits_cnn",
    "build_digits_mlp",
    "build_seeded",
    "evaluate",
    "get_task",
    "list_tasks",
    "load_digits_data",
    "partition_by_group",
    "partition_dirichlet",
    "partition_iid",
    "train",
]
