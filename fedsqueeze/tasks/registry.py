"""Selecting a task by name: a built-in one, or a user task given as ``module:attribute``."""

from __future__ import annotations

import importlib

from fedsqueeze.errors import ConfigError
from fedsqueeze.tasks.base import Task
from fedsqueeze.tasks.digits_data import load_digits_data
from fedsqueeze.tasks.models import (
    build_digits_cnn,
    build_digits_cnn_student,
    build_digits_mlp,
    build_digits_mlp_student,
)
from fedsqueeze.tasks.text_task import MINILM_TEXT, TextTaskOptions, make_text_task, parse_text_task
from fedsqueeze.tasks.training import evaluate, train

__all__ = ["DIGITS_CNN", "DIGITS_MLP", "MINILM_TEXT_TASK", "get_task", "list_tasks"]

DIGITS_CNN = Task(
    name="digits-cnn",
    build_model=build_digits_cnn,
    load_data=load_digits_data,
    train=train,
    evaluate=evaluate,
    build_student=build_digits_cnn_student,
)
"""A 38,282-parameter CNN on the scikit-learn digits; its student has 4,794."""

DIGITS_MLP = Task(
    name="digits-mlp",
    build_model=build_digits_mlp,
    load_data=load_digits_data,
    train=train,
    evaluate=evaluate,
    build_student=build_digits_mlp_student,
)
"""LeNet-300-100 on the 64 pixels of the scikit-learn digits; its student (64→64→32→10)
has 6,570 parameters."""

MINILM_TEXT_TASK = make_text_task(TextTaskOptions())
"""all-MiniLM-L6-v2 (LoRA rank 4 + head) on the standard library's docstrings, 10 classes;
needs the ``text`` extra when a model or data set is built."""

_BUILTIN: dict[str, Task] = {task.name: task for task in (DIGITS_CNN, DIGITS_MLP)}


def list_tasks() -> list[str]:
    """Return the names of the built-in tasks, sorted.

    Returns
    -------
    list[str]
        ``["digits-cnn", "digits-mlp", "minilm-text"]``.
    """
    return sorted([*_BUILTIN, MINILM_TEXT])


def get_task(name: str) -> Task:
    """Return the task called ``name``.

    Parameters
    ----------
    name : str
        A built-in name (see :func:`list_tasks`; ``minilm-text`` takes options after an ``@``,
        see :mod:`fedsqueeze.tasks.text_task`), or ``"package.module:attribute"`` naming a
        :class:`Task` or a zero-argument callable returning one (the attribute may be dotted,
        ``module:obj.attr``).

    Returns
    -------
    Task
        The task.

    Raises
    ------
    ConfigError
        If the name is neither built in nor a loadable ``module:attribute``; an import failure
        is chained with ``from``.
    """
    task = _BUILTIN.get(name)
    if task is not None:
        return task
    text_options = parse_text_task(name)
    if text_options is not None:
        return make_text_task(text_options)
    if ":" not in name:
        raise ConfigError(
            f"unknown task {name!r}; built-in tasks: {', '.join(list_tasks())} "
            "(or give a user task as 'module:attribute')"
        )
    return _load_user_task(name)


def _load_user_task(spec: str) -> Task:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path or ":" in attr_path:
        raise ConfigError(f"a user task must be given as 'module:attribute', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {module_name!r} of task {spec!r}: {exc}") from exc
    obj: object = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ConfigError(
                f"task {spec!r}: {module_name!r} has no attribute {attr_path!r}"
            ) from exc
    if isinstance(obj, Task):
        return obj
    if not callable(obj):
        raise ConfigError(
            f"task {spec!r} is a {type(obj).__name__}, not a Task or a callable returning one"
        )
    try:
        made = obj()
    except TypeError as exc:
        raise ConfigError(f"task factory {spec!r} must take no arguments: {exc}") from exc
    if not isinstance(made, Task):
        raise ConfigError(f"task factory {spec!r} returned a {type(made).__name__}, not a Task")
    return made
