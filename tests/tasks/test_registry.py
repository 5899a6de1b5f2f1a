"""Selecting tasks by name: built-ins, user tasks as ``module:attribute`` and bad names."""

from __future__ import annotations

import pytest

from fedsqueeze.errors import ConfigError
from fedsqueeze.tasks import (
    DIGITS_CNN,
    Task,
    build_digits_mlp,
    evaluate,
    get_task,
    list_tasks,
    load_digits_data,
    train,
)

_HERE = __name__

USER_TASK = Task(
    name="user-mlp",
    build_model=build_digits_mlp,
    load_data=load_digits_data,
    train=train,
    evaluate=evaluate,
)


def make_user_task() -> Task:
    return Task(
        name="user-made",
        build_model=build_digits_mlp,
        load_data=load_digits_data,
        train=train,
        evaluate=evaluate,
    )


class Namespace:
    task = USER_TASK


NOT_A_TASK = 42


def returns_wrong_type() -> object:
    return "digits-cnn"


def needs_an_argument(size: int) -> Task:
    raise AssertionError("never called")


def test_list_tasks_names_the_builtins() -> None:
    assert list_tasks() == ["digits-cnn", "digits-mlp", "minilm-text"]


@pytest.mark.parametrize("name", ["digits-cnn", "digits-mlp"])
def test_builtins_are_found_by_name(name: str) -> None:
    task = get_task(name)
    assert task.name == name
    assert get_task(name) is task


def test_builtin_task_runs_end_to_end() -> None:
    task = get_task("digits-cnn")
    assert task is DIGITS_CNN
    data = task.load_data()
    model = task.build_model(0)
    task.train(model, data.x_train[:32], data.y_train[:32], epochs=1, lr=0.01, seed=0)
    assert task.evaluate(model, data.x_test, data.y_test).num_examples == 360


def test_user_task_attribute() -> None:
    assert get_task(f"{_HERE}:USER_TASK") is USER_TASK


def test_user_task_factory() -> None:
    assert get_task(f"{_HERE}:make_user_task").name == "user-made"


def test_user_task_dotted_attribute() -> None:
    assert get_task(f"{_HERE}:Namespace.task") is USER_TASK


def test_unknown_name_lists_the_builtins() -> None:
    with pytest.raises(ConfigError, match="digits-cnn, digits-mlp"):
        get_task("digits-resnet")


def test_import_failure_is_chained() -> None:
    with pytest.raises(ConfigError) as info:
        get_task("no_such_module_for_fedsqueeze:task")
    assert isinstance(info.value.__cause__, ImportError)


@pytest.mark.parametrize(
    "name",
    [
        f"{_HERE}:MISSING",
        f"{_HERE}:NOT_A_TASK",
        f"{_HERE}:returns_wrong_type",
        f"{_HERE}:needs_an_argument",
        f"{_HERE}:",
        ":USER_TASK",
        f"{_HERE}:USER_TASK:extra",
    ],
)
def test_bad_user_tasks_are_config_errors(name: str) -> None:
    with pytest.raises(ConfigError):
        get_task(name)
