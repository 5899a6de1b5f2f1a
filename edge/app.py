"""The edge ClientApp: plain Flower training code for the built-in tasks, plus the mod.

The ``train`` and ``evaluate`` functions below are written the usual Flower way (read an
``ArrayRecord``, return one with metrics). The fedsqueeze mod in front of them fetches
the model from the data plane and pushes the compressed update, so this is also the
example of adding compression to an existing Flower app.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edge.mod import fedsqueeze_mod
from fedsqueeze.control import TRACK_CONFIG_KEY, ModelTrack
from fedsqueeze.deploy.parentwatch import watch_flower_parent
from fedsqueeze.errors import ConfigError
from fedsqueeze.runconfig import Partitioning, RunSettings
from fedsqueeze.tasks import (
    Task,
    TaskData,
    get_task,
    partition_by_group,
    partition_dirichlet,
    partition_iid,
)
from fedsqueeze.tasks.proxy import split_proxy


@functools.lru_cache(maxsize=4)
def _client_data(task_name: str, proxy: int) -> TaskData:
    """The task's data as the clients hold it: without the coordinator's ``proxy``
    held-out training examples (:func:`fedsqueeze.tasks.proxy.split_proxy`), if any."""
    data = get_task(task_name).load_data()
    return split_proxy(data, proxy)[1] if proxy else data


@functools.lru_cache(maxsize=4)
def _split(
    task_name: str, partitioning: Partitioning, alpha: float, seed: int, parts: int, proxy: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every partition's train and test indices, computed once per process and split.

    A simulated client process (a Ray actor) trains many clients in turn; splitting the
    data set anew for each of them would cost work that grows with the number of clients
    (a Dirichlet draw over all of them, a tensor for each) on every contact. With more
    clients than training examples, ``parts`` is the number of examples (see
    :func:`_partition`).
    """
    data = _client_data(task_name, proxy)
    if partitioning is Partitioning.IID:
        train_parts = partition_iid(len(data.y_train), parts, seed)
    elif partitioning is Partitioning.NATURAL:
        if data.groups_train is None:
            raise ConfigError(f"task {task_name!r} has no natural groups; use iid or dirichlet")
        train_parts = partition_by_group(data.groups_train, parts, seed)
    else:
        train_parts = partition_dirichlet(data.y_train, parts, alpha, seed)
    test_parts = partition_iid(len(data.y_test), min(parts, len(data.y_test)), seed)
    return train_parts, test_parts


@functools.lru_cache(maxsize=64)
def _partition(
    task_name: str,
    partitioning: Partitioning,
    alpha: float,
    seed: int,
    pid: int,
    parts: int,
    proxy: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """This node's share of the train and test sets (same seed → same split everywhere).

    With more clients than training examples (10,000 virtual clients of the digits' 1,437
    images), the IID and Dirichlet splits have one partition per example and client ``p``
    holds partition ``p mod`` that number, as the test split already did. ``proxy``
    training examples are the coordinator's (see :attr:`RunSettings.held_out_proxy`):
    no client holds them.
    """
    data = _client_data(task_name, proxy)
    if partitioning is not Partitioning.NATURAL:
        parts = min(parts, len(data.y_train))
    train_parts, test_parts = _split(task_name, partitioning, alpha, seed, parts, proxy)
    tr, te = train_parts[pid % parts], test_parts[pid % len(test_parts)]
    return data.x_train[tr], data.y_train[tr], data.x_test[te], data.y_test[te]


def make_client_app(
    settings: RunSettings | None = None, mods: list[Any] | None = None
) -> ClientApp:
    """The edge ClientApp.

    Parameters
    ----------
    settings
        The run's settings; ``None`` reads them from each message's run config (a
        deployed run). Simulations pass them directly, since Flower's simulation entry
        point carries no run config.
    mods
        Flower mods in front of the training code (default: the fedsqueeze mod).
    """
    app = ClientApp(mods=[fedsqueeze_mod] if mods is None else mods)

    def settings_of(context: Context) -> RunSettings:
        return settings or RunSettings.from_run_config(context.run_config)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        watch_flower_parent()  # deployed: end with the SuperExec even if it is not reaped
        return train_on_partition(msg, context, settings_of(context))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        watch_flower_parent()
        return evaluate_on_partition(msg, context, settings_of(context))

    return app


def _is_student(msg: Message) -> bool:
    config = msg.content.config_records.get("config")
    track = config.get(TRACK_CONFIG_KEY) if config is not None else None
    return bool(track == ModelTrack.STUDENT.value)


def _setup(msg: Message, settings: RunSettings) -> tuple[Task, torch.nn.Module]:
    task = get_task(settings.task)
    if _is_student(msg):
        # The fedsqueeze mod says these arrays are the student (the student track).
        if task.build_student is None:
            raise ConfigError(f"task {settings.task!r} has no student architecture")
        model = task.build_student(settings.seed)
    else:
        model = task.build_model(settings.seed)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    return task, model


def _data(
    settings: RunSettings, context: Context
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    pid = int(context.node_config.get("partition-id", 0))
    parts = int(context.node_config.get("num-partitions", 1))
    return _partition(
        settings.task,
        settings.partitioning,
        settings.alpha,
        settings.seed,
        pid,
        parts,
        settings.held_out_proxy,
    )


def _client_seed(context: Context) -> int:
    # The partition id, where there is one, so a rerun of a simulation (whose node ids
    # are random) trains every client exactly as before.
    pid = context.node_config.get("partition-id")
    return int(pid) if isinstance(pid, int) else int(context.node_id % 1000)


def train_on_partition(msg: Message, context: Context, settings: RunSettings) -> Message:
    """Train the received model on this node's partition (plain Flower code)."""
    task, model = _setup(msg, settings)
    x, y, _, _ = _data(settings, context)
    server_round = msg.content.config_records["config"].get("server-round", 0)
    if not isinstance(server_round, int):
        raise ValueError(f"server-round must be an int, got {server_round!r}")
    # A compact student may diverge at its teacher's rate: it has its own (student-lr).
    lr = (settings.student_lr or settings.lr) if _is_student(msg) else settings.lr
    start = time.perf_counter()
    result = task.train(
        model,
        x,
        y,
        epochs=settings.epochs,
        lr=lr,
        batch_size=settings.batch_size,
        optimizer=settings.optimizer,
        l1_lambda=settings.l1_lambda,
        proximal_mu=settings.proximal_mu,
        seed=settings.seed * 1_000_003 + server_round * 1009 + _client_seed(context),
    )
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train-loss": result.loss,
            "compute-seconds": time.perf_counter() - start,
        }
    )
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def evaluate_on_partition(msg: Message, context: Context, settings: RunSettings) -> Message:
    """Evaluate the received model on this node's test share."""
    task, model = _setup(msg, settings)
    _, _, x, y = _data(settings, context)
    result = task.evaluate(model, x, y)
    metrics = MetricRecord(
        {"num-examples": result.num_examples, "eval-loss": result.loss, "eval-acc": result.accuracy}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


app = make_client_app()
"""The ClientApp Flower's Deployment Engine loads (``edge.app:app``)."""
