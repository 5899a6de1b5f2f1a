"""The coordinator ServerApp: the global model's home, the data plane's server.

Per run it opens the version store, starts the data-plane server, builds the wrapped
strategy and runs it. Each round's global model is published as a version; edges get
only a control message; their updates come back over the data plane. After each round
the centralized evaluation is logged and the round is recorded as complete, so a
restarted coordinator (``resume = true``) continues from the last completed round.
"""

from __future__ import annotations

import functools
import logging
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Strategy,
)

from coordinator.budget import BudgetPolicy, EdgeRequest, Skip
from coordinator.dataplane import CoordinatorDataPlane, InstructionTemplate
from coordinator.strategy import CompressedStrategy, InstructionFactory
from coordinator.version_store import VersionStore
from fedsqueeze.codec import state_digest
from fedsqueeze.control import RoundInstruction
from fedsqueeze.errors import ConfigError
from fedsqueeze.runconfig import RunSettings, StrategyName
from fedsqueeze.tasks import get_task

log = logging.getLogger(__name__)

#: Builds a run's budget policy once its version store is open.
PolicyFactory = Callable[[VersionStore], BudgetPolicy]


def build_strategy(settings: RunSettings) -> Strategy:
    """The Flower strategy named in the settings."""
    factories: dict[StrategyName, Callable[..., Strategy]] = {
        StrategyName.FEDAVG: FedAvg,
        StrategyName.FEDPROX: functools.partial(FedProx, proximal_mu=settings.proximal_mu),
        StrategyName.FEDADAM: FedAdam,
        StrategyName.FEDYOGI: FedYogi,
        StrategyName.FEDMEDIAN: FedMedian,
        StrategyName.FEDTRIMMEDAVG: FedTrimmedAvg,
    }
    return factories[settings.strategy](
        fraction_train=settings.fraction_train,
        fraction_evaluate=settings.fraction_evaluate,
        min_train_nodes=settings.min_train_nodes,
        min_evaluate_nodes=max(1, min(settings.min_train_nodes, 2)),
        min_available_nodes=settings.min_available_nodes,
    )


class FailureReportingStrategy(CompressedStrategy):
    """Logs why each edge failed a round, in one line, before the usual aggregation.

    Flower's own report of error replies comes only from the wrapped strategy, which is
    not called when no update was accepted: a round where every edge failed to fetch
    would say nothing of why. The reason is the edge's exception message (for a failed
    fetch it names the cause, e.g. ``CERTIFICATE_VERIFY_FAILED``).
    """

    round_offset = 0

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                log.warning(
                    "round %d: edge %s failed: %s",
                    server_round + self.round_offset,
                    reply.metadata.src_node_id,
                    edge_failure(reply.error.reason or "no reason given"),
                )
        return super().aggregate_train(server_round, replies)


# Flower's reason for a ClientApp exception: "<class 'module.Error'>:<'message'>".
_FLOWER_REASON = re.compile(r"^<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>$", re.S)


def edge_failure(reason: str) -> str:
    """``"UnavailableError: fetching the model ... failed: ..."``, on one line."""
    match = _FLOWER_REASON.match(reason.strip())
    text = f"{match.group(1)}: {match.group(2)}" if match else reason
    return " ".join(text.split())


@dataclass
class Coordinator:
    """One run's coordinator: store, data plane and strategy, wired together."""

    settings: RunSettings
    store: VersionStore
    plane: CoordinatorDataPlane
    strategy: CompressedStrategy
    init_digest: str
    offset: int
    policy: BudgetPolicy | None = None

    @classmethod
    def open(cls, settings: RunSettings, *, policy: PolicyFactory | None = None) -> Coordinator:
        """Open the state directory, start the data plane, build the strategy.

        ``policy(store)`` builds the budget policy that chooses each edge's specs per
        round (or leaves it out); without one every edge gets the settings' specs and
        budgets.
        """
        root = Path(settings.state_dir)
        store = VersionStore(root, keep=settings.keep_versions)
        if store.completed_round and not settings.resume:
            raise ConfigError(
                f"{root} already holds a run at round {store.completed_round}: set "
                "resume = true to continue it, or choose another state directory"
            )
        task = get_task(settings.task)
        initial = dict(task.build_model(settings.seed).state_dict())
        init_digest = state_digest(initial).hex()
        if not store.has(init_digest):
            store.publish(initial, track="init")
        plane = CoordinatorDataPlane(
            store,
            host=settings.data_plane_host,
            port=settings.data_plane_port,
            advertise=settings.data_plane_advertise,
            tls_cert=Path(settings.tls_cert) if settings.tls_cert else None,
            tls_key=Path(settings.tls_key) if settings.tls_key else None,
        )
        offset = store.completed_round  # rounds already done when resuming
        template = InstructionTemplate(
            down_spec=settings.down_spec,
            up_spec=settings.up_spec,
            task=settings.task,
            init_seed=settings.seed if settings.init_from_seed else -1,
            init_digest=init_digest if settings.init_from_seed else "",
            down_budget=settings.down_budget,
            up_budget=settings.up_budget,
            round_offset=offset,
        )
        instruct: InstructionFactory = functools.partial(plane.instruction, template)
        budget = policy(store) if policy is not None else None
        if budget is not None:
            instruct = functools.partial(
                _budgeted, instruct, budget, store, init_digest if settings.init_from_seed else None
            )
        strategy = FailureReportingStrategy(
            build_strategy(settings),
            store,
            instruct,
            plane.pull,
            clip_norm=settings.clip_norm or None,
        )
        strategy.round_offset = offset
        return cls(settings, store, plane, strategy, init_digest, offset, budget)

    def initial_arrays(self) -> ArrayRecord:
        """Where this run starts: the last completed global model, or the seeded one."""
        head = self.store.head("global") if self.settings.resume else None
        state = self.store.get(head) if head else None
        if state is None:
            state = self.store.get(self.init_digest)
        if state is None:
            raise ConfigError("the initial model is missing from the version store")
        return ArrayRecord(state)

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Centralized evaluation on the task's test split; records the round."""
        task = get_task(self.settings.task)
        model = task.build_model(self.settings.seed)
        model.load_state_dict(arrays.to_torch_state_dict())
        data = task.load_data()
        result = task.evaluate(model, data.x_test, data.y_test)
        absolute = server_round + self.offset
        stats = self.strategy.stats.get(server_round)
        metrics: dict[str, float] = {
            "accuracy": result.accuracy,
            "loss": result.loss,
            "bytes-down": float(stats.bytes_down if stats else 0),
            "bytes-up": float(stats.bytes_up if stats else 0),
            "updates-accepted": float(stats.accepted if stats else 0),
            "updates-rejected": float(len(stats.rejected or []) if stats else 0),
            "updates-skipped": float(len(stats.skipped or []) if stats else 0),
        }
        if stats is not None and self.policy is not None:
            self.policy.observe(stats.bytes_down, stats.bytes_up)
        if server_round > 0:
            self.store.publish(arrays.to_torch_state_dict(), track="global")
            self.store.complete_round(absolute, metrics)
        log.info(
            "round %d%s: accuracy %.4f loss %.4f, %d B down, %d B up",
            absolute,
            _flower_round_note(server_round, self.offset),
            result.accuracy,
            result.loss,
            int(metrics["bytes-down"]),
            int(metrics["bytes-up"]),
        )
        return MetricRecord(dict(metrics.items()))

    def run(self, grid: Grid) -> None:
        """Run the remaining rounds."""
        remaining = self.settings.num_rounds - self.offset
        if remaining <= 0:
            log.info("all %d rounds already complete", self.settings.num_rounds)
            return
        self.strategy.start(
            grid,
            self.initial_arrays(),
            num_rounds=remaining,
            timeout=self.settings.round_timeout,
            train_config=ConfigRecord({"epochs": self.settings.epochs, "lr": self.settings.lr}),
            evaluate_fn=self.evaluate,
        )

    def close(self) -> None:
        """Stop the data plane."""
        self.plane.close()


def _flower_round_note(server_round: int, offset: int) -> str:
    """After a resume Flower counts this run's rounds from 1: say so beside ours."""
    if not offset:
        return ""
    if server_round == 0:
        return " (the model resumed from: Flower's initial evaluation of this run)"
    return f" (Flower's round {server_round} of this run)"


def _budgeted(
    instruct: InstructionFactory,
    policy: BudgetPolicy,
    store: VersionStore,
    init_digest: str | None,
    server_round: int,
    node_id: int,
    target: str,
) -> RoundInstruction | None:
    """The edge's instruction with the specs the policy chose, or ``None`` (skipped)."""
    # An edge never seen before holds the seeded initial model when it can rebuild it.
    held = store.edge_version(str(node_id)) or init_digest
    choice = policy.choose(EdgeRequest(server_round, node_id, target, held))
    if isinstance(choice, Skip):
        log.warning("round %d: edge %s skipped: %s", server_round, node_id, choice.reason)
        return None
    base = instruct(server_round, node_id, target)
    if base is None:
        return None
    return replace(
        base,
        down_spec=choice.down_spec,
        up_spec=choice.up_spec,
        down_budget=choice.down_payload,
        up_budget=choice.up_payload,
    )


def _show_our_logs() -> None:
    """Flower's app processes configure only Flower's logger: give ours a handler too.

    Without it, the one INFO line per round (accuracy, bytes, ratio) never reaches a
    deployed run's log.
    """
    if logging.getLogger().handlers:
        return
    for name in ("coordinator", "fedsqueeze", "edge"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)


def make_server_app(settings: RunSettings | None = None) -> ServerApp:
    """The coordinator ServerApp (``settings=None``: read from the run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _show_our_logs()
        run(grid, settings or RunSettings.from_run_config(context.run_config))

    return app


def run(grid: Grid, settings: RunSettings, *, policy: PolicyFactory | None = None) -> Coordinator:
    """Run a whole coordinator on ``grid``; returns it (stopped) for inspection."""
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    coordinator = Coordinator.open(settings, policy=policy)
    try:
        coordinator.run(grid)
    finally:
        coordinator.close()
    return coordinator


app = make_server_app()
"""The ServerApp Flower's Deployment Engine loads (``coordinator.app:app``)."""
