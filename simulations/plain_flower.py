"""The reference for the simulator's cost: a plain Flower app, nothing of fedsqueeze's.

A ServerApp with Flower's own FedAvg sampling ``clients-per-round`` of ``num-clients``
nodes itself (``fraction_train``), the model in Flower's messages, and a ClientApp that
trains on its partition with the edge's plain training code
(:func:`edge.app.train_on_partition`: the same data split, model and local training as
the sweep's clients). The global model is evaluated centrally after every round on the
task's test split, as the sweep does. No :class:`~simulations.grid.SimGrid`, no
coordinator, no mod: what Flower 1.42's simulation engine costs on its own for the same
configuration, which ``fedsqueeze bench simulate`` runs side by side with the sweep's arms.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from edge.app import train_on_partition
from fedsqueeze.tasks import get_task
from simulations.config import SimulationConfig
from simulations.grid import SimulationError
from simulations.memory import PeakMemory

log = logging.getLogger(__name__)

__all__ = ["PlainOutcome", "make_plain_apps", "run_plain"]


@dataclass(frozen=True)
class PlainOutcome:
    """One run of the plain Flower app.

    Attributes
    ----------
    wall_s
        Wall-clock seconds of Flower's ``run_simulation`` (Ray's start included).
    peak_memory, peak_process_memory
        Peak resident bytes of the process tree and of its largest process (``None``
        without ``/proc``).
    accuracy
        Central test accuracy after each round, from round 0.
    """

    wall_s: float
    peak_memory: int | None
    peak_process_memory: int | None
    accuracy: tuple[float, ...]


def make_plain_apps(config: SimulationConfig, accuracy: list[float]) -> tuple[ServerApp, ClientApp]:
    """The ServerApp and ClientApp; the server appends each round's accuracy to ``accuracy``."""
    settings = config.run_settings(config.arms[0], "")
    task = get_task(config.task)
    threads = max(1, int(config.client_cpus))

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = task.build_model(config.seed)
        model.load_state_dict(arrays.to_torch_state_dict())
        data = task.load_data()
        result = task.evaluate(model, data.x_test, data.y_test)
        accuracy.append(result.accuracy)
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss})

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(config.threads)
        random.seed(config.seed)
        torch.manual_seed(config.seed)
        k = config.clients_per_round
        strategy = FedAvg(
            fraction_train=k / config.num_clients,
            fraction_evaluate=0.0,
            min_train_nodes=k,
            min_available_nodes=k,
        )
        strategy.start(
            grid,
            ArrayRecord(task.build_model(config.seed).state_dict()),
            num_rounds=config.num_rounds,
            timeout=config.round_timeout_s,
            train_config=ConfigRecord({"epochs": config.epochs, "lr": config.lr}),
            evaluate_fn=evaluate,
        )

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(threads)
        return train_on_partition(msg, context, settings)

    return server_app, client_app


def run_plain(config: SimulationConfig) -> PlainOutcome:
    """Run the plain Flower app on ``config``'s task, clients, rounds and training.

    Raises
    ------
    SimulationError
        The simulation failed or ended before its last round.
    """
    from simulations.engine import run_simulation  # deferred: imports Ray
    from simulations.runner import backend_config, set_train_device

    accuracy: list[float] = []
    server_app, client_app = make_plain_apps(config, accuracy)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, int(config.client_cpus))))
    set_train_device(config)  # client-gpus: the clients train on their GPU share
    started = time.perf_counter()
    with PeakMemory() as memory:
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=config.num_clients,
                backend_config=backend_config(config),
            )
        except Exception as exc:
            raise SimulationError(f"the plain Flower simulation failed: {exc}") from exc
    wall = time.perf_counter() - started
    if len(accuracy) < config.num_rounds + 1:
        raise SimulationError(f"the plain Flower app ended after {len(accuracy) - 1} rounds")
    log.info("plain Flower: %d rounds in %.1f s", config.num_rounds, wall)
    return PlainOutcome(wall, memory.peak_total, memory.peak_process, tuple(accuracy))
