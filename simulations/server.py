"""The sweep's ServerApp: every arm, one after the other, on one simulation's clients.

A fedsqueeze arm is the project's coordinator (:class:`coordinator.app.Coordinator`:
version store, gRPC data plane on loopback, the strategy wrapper around Flower's FedAvg)
with a budget policy when the arm has one. The plain arm is Flower's own FedAvg with
the model in its messages. Both evaluate the global model centrally after every round on
the task's test split, and both run on the same :class:`~simulations.grid.SimGrid`, so
they see the same clients in the same rounds.
"""

from __future__ import annotations

import logging
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from coordinator.app import Coordinator, PolicyFactory
from coordinator.budget import Budget, BudgetPolicy, LadderPolicy, PolicyKind, RunBudget
from coordinator.frozen import FrozenParts
from coordinator.student_track import StudentAssignment
from coordinator.version_store import VersionStore
from fedsqueeze.codec import state_digest
from fedsqueeze.codec.spec_text import parse_spec, with_freeze
from fedsqueeze.control import RECEIPT_KEY, TrainReceipt
from fedsqueeze.tasks import get_task
from fedsqueeze.tasks.evaluator import TestEvaluator
from fedsqueeze.transport.shaping import LinkProfile
from simulations.baselines import ArmConfig, ArmKind
from simulations.config import SimulationConfig
from simulations.first_delivery import FirstDeliveryPolicy
from simulations.grid import RoundTraffic, SimGrid
from simulations.links import link_profile

log = logging.getLogger(__name__)

__all__ = ["ArmRun", "SweepServer", "model_bytes"]

#: Called after every evaluated round: ``(arm, round, accuracy)``.
ProgressFn = Callable[[str, int, float], None]


@dataclass
class ArmRun:
    """What one arm did, round by round (filled in while it runs)."""

    arm: ArmConfig
    traffic: dict[int, RoundTraffic] = field(default_factory=dict)
    accuracy: dict[int, float] = field(default_factory=dict)
    loss: dict[int, float] = field(default_factory=dict)
    wall_s: float = 0.0
    final_state: dict[str, torch.Tensor] | None = None


def model_bytes(task: str, seed: int) -> int:
    """The task model's size in fp32 bytes (what plain FedAvg moves per message)."""
    state = get_task(task).build_model(seed).state_dict()
    return sum(t.numel() * 4 for t in state.values() if t.is_floating_point())


class SweepServer:
    """Runs every arm of a config on the grid Flower hands the ServerApp.

    Parameters
    ----------
    config
        The experiment.
    work_dir
        Where each fedsqueeze arm keeps its coordinator state (``work_dir/NAME``).
    links, abort
        Passed to the :class:`SimGrid`.
    progress
        Told about every evaluated round.
    """

    def __init__(
        self,
        config: SimulationConfig,
        work_dir: Path,
        links: tuple[LinkProfile, ...],
        abort: threading.Event,
        progress: ProgressFn | None = None,
    ) -> None:
        self.config = config
        self.work_dir = work_dir
        self.links = links
        self.abort = abort
        self.progress = progress
        self.runs: list[ArmRun] = []
        self._evaluators: dict[str, TestEvaluator] = {}

    def main(self, grid: Grid) -> None:
        """The ServerApp's body."""
        cfg = self.config
        torch.set_num_threads(cfg.threads)
        sim = SimGrid(
            grid,
            num_clients=cfg.num_clients,
            clients_per_round=cfg.clients_per_round,
            seed=cfg.seed,
            links=self.links,
            deadline_s=cfg.deadline_s or None,
            round_timeout_s=cfg.round_timeout_s,
            abort=self.abort,
            compute_s=cfg.compute_s or None,
        )
        sim.discover()
        for arm in cfg.arms:
            run = ArmRun(arm)
            self.runs.append(run)
            started = time.perf_counter()
            if arm.kind is ArmKind.FLOWER:
                self._run_flower(sim, run)
            else:
                self._run_fedsqueeze(sim, run)
            run.wall_s = time.perf_counter() - started
            log.info("%s: %d rounds in %.1f s", arm.name, cfg.num_rounds, run.wall_s)

    # ------------------------------------------------------------------ evaluation
    def _evaluate(
        self, run: ArmRun, server_round: int, arrays: ArrayRecord, frozen: FrozenParts
    ) -> MetricRecord:
        # one model per arm: another arm may have trained what this one keeps frozen
        evaluator = self._evaluators.get(run.arm.name)
        if evaluator is None:
            task = get_task(self.config.arm_task(run.arm))
            evaluator = self._evaluators[run.arm.name] = TestEvaluator(task, self.config.seed)
        state = arrays.to_torch_state_dict()
        # frozen tensors never change: the arm's model still holds the initial ones
        run.final_state = frozen.merge(state, evaluator.model.state_dict()) if frozen else state
        result = evaluator(run.final_state)
        self._record(run, server_round, result.accuracy, result.loss)
        return MetricRecord({"accuracy": result.accuracy, "loss": result.loss})

    def _record(self, run: ArmRun, server_round: int, accuracy: float, loss: float) -> None:
        run.accuracy[server_round] = accuracy
        run.loss[server_round] = loss
        log.info("%s round %d: accuracy %.4f", run.arm.name, server_round, accuracy)
        if self.progress is not None:
            self.progress(run.arm.name, server_round, accuracy)

    # ------------------------------------------------------------------ arms
    def _run_flower(self, sim: SimGrid, run: ArmRun) -> None:
        cfg = self.config
        sim.begin_arm(run.arm.name, on_round=lambda t: run.traffic.__setitem__(t.server_round, t))
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        task = get_task(cfg.arm_task(run.arm))
        # Frozen tensors stay out of Flower's messages: each client holds its own copy.
        frozen = FrozenParts(cfg.arm_frozen(run.arm))
        initial = ArrayRecord(frozen.trainable(task.build_model(cfg.seed).state_dict()))
        strategy = FedAvg(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1
        )
        strategy.start(
            sim,
            initial,
            num_rounds=cfg.num_rounds,
            timeout=cfg.round_timeout_s,
            train_config=ConfigRecord({"epochs": cfg.epochs, "lr": run.arm.lr or cfg.lr}),
            evaluate_fn=lambda r, arrays: self._evaluate(run, r, arrays, frozen),
        )

    def _run_fedsqueeze(self, sim: SimGrid, run: ArmRun) -> None:
        cfg, arm = self.config, run.arm
        state_dir = self.work_dir / arm.name
        shutil.rmtree(state_dir, ignore_errors=True)
        settings = cfg.run_settings(arm, str(state_dir))
        policies: list[BudgetPolicy] = []
        factory = self._policy_factory(sim, arm, policies)
        random.seed(settings.seed)
        torch.manual_seed(settings.seed)
        server = self

        class _Coordinator(Coordinator):
            def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
                run.final_state = arrays.to_torch_state_dict()
                metrics = super().evaluate(server_round, arrays)
                acc, loss = metrics.get("accuracy", 0.0), metrics.get("loss", 0.0)
                server._record(run, server_round, float(acc), float(loss))  # type: ignore[arg-type]
                return metrics

        assignment = None
        if arm.student_links:
            weak = {link_profile(name) for name in arm.student_links}
            assignment = StudentAssignment(link_of=sim.link_of_node, weak_link=weak.__contains__)
        coordinator = _Coordinator.open(settings, policy=factory, assignment=assignment)
        store = coordinator.store

        def on_round(traffic: RoundTraffic) -> None:
            run.traffic[traffic.server_round] = traffic
            if policies and traffic.per_client:
                slowest = max(t.compute_s for t in traffic.per_client.values())
                policies[0].observe(0, 0, compute_s=slowest)

        def on_dropped(reply: Message) -> None:
            _adopt_straggler(store, reply, policies[0] if policies else None)

        sim.begin_arm(arm.name, on_round=on_round, on_dropped=on_dropped)
        try:
            coordinator.run(sim)
        finally:
            coordinator.close()

    def _policy_factory(
        self, sim: SimGrid, arm: ArmConfig, out: list[BudgetPolicy]
    ) -> PolicyFactory | None:
        if arm.kind is not ArmKind.FEDSQUEEZE:
            return None
        # Every fedsqueeze arm goes through a policy (fixed specs: a ladder of one, no
        # sizing when there is no budget), so every edge gets the same treatment, such
        # as a zero delta when it already holds the target.
        cfg = self.config
        total = arm.total_budget or int(
            arm.budget_fraction
            * model_bytes(cfg.arm_task(arm), cfg.seed)
            * 2
            * cfg.clients_per_round
            * cfg.num_rounds
        )
        adaptive = arm.policy is PolicyKind.ADAPTIVE
        progressive = arm.policy is PolicyKind.PROGRESSIVE
        ladders = (
            (arm.down_ladder, arm.up_ladder) if adaptive else ((arm.down_spec,), (arm.up_spec,))
        )
        if progressive:
            # A ladder of progressive specs when the arm has one, else its one spec.
            graded = all(parse_spec(text).levels for text in arm.down_ladder)
            ladders = (arm.down_ladder if graded else (arm.down_spec,), arm.up_ladder)
        # The policy sizes its specs by encoding: with the run's frozen patterns in them,
        # it sizes (and encodes) only what travels, not a 22.7M-parameter backbone.
        frozen = cfg.arm_frozen(arm)
        ladders = (
            tuple(with_freeze(t, frozen) for t in ladders[0]),
            tuple(with_freeze(t, frozen) for t in ladders[1]),
        )

        def factory(store: VersionStore) -> BudgetPolicy:
            policy = LadderPolicy(
                store,
                *ladders,
                budget=Budget(arm.down_budget, arm.up_budget),
                student_budget=Budget(
                    arm.student_down_budget or arm.down_budget,
                    arm.student_up_budget or arm.up_budget,
                )
                if arm.student_links
                else None,
                run_budget=RunBudget(total, arm.down_share) if total else None,
                num_rounds=cfg.num_rounds,
                clients_per_round=cfg.clients_per_round,
                # Fixed specs without a budget are sent to everyone, stragglers included
                # (they are then dropped at the deadline, as a deployment's would be).
                link_of=sim.link_of_node if arm.budgeted else None,
                deadline_s=(cfg.deadline_s or None) if arm.budgeted else None,
                progressive=progressive,
            )
            out.append(policy)
            if arm.first_delivery:
                init = state_digest(get_task(cfg.arm_task(arm)).build_model(cfg.seed).state_dict())
                return FirstDeliveryPolicy(policy, arm.first_delivery, init.hex())
            return policy

        return factory


def _adopt_straggler(store: VersionStore, reply: Message, policy: BudgetPolicy | None) -> None:
    """A straggler's update is dropped, but it holds what it fetched, and its bytes count."""
    if reply.has_error() or RECEIPT_KEY not in reply.content.config_records:
        return
    receipt = TrainReceipt.from_records(
        reply.content.config_records[RECEIPT_KEY],
        reply.content.metric_records.get("metrics", MetricRecord()),
    )
    if store.has(receipt.held):
        store.record_edge(
            str(reply.metadata.src_node_id),
            receipt.held,
            decoded_bytes=receipt.decoded_bytes,
            levels=receipt.decoded_levels,
        )
    if policy is not None:  # its inline download is counted where it was sent
        policy.observe(receipt.bytes_down, receipt.bytes_up + len(receipt.update))
