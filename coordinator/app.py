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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Strategy,
)

from coordinator.budget import BudgetPolicy, EdgeRequest, Skip
from coordinator.dataplane import CoordinatorDataPlane, InstructionTemplate
from coordinator.distill import DistillConfig
from coordinator.frozen import FrozenParts
from coordinator.fusion import FeddfFusion
from coordinator.strategy import (
    CompressedStrategy,
    GlobalAggregator,
    InstructionFactory,
    RoundStats,
)
from coordinator.student_track import StudentAssignment, StudentTrack, TeacherLearning
from coordinator.version_store import VersionStore
from fedsqueeze.codec import state_digest
from fedsqueeze.codec.spec_text import with_freeze
from fedsqueeze.control import RoundInstruction
from fedsqueeze.deploy.parentwatch import watch_flower_parent
from fedsqueeze.errors import ConfigError, FedsqueezeError, RunFailedError
from fedsqueeze.runconfig import Aggregation, RunSettings, StrategyName
from fedsqueeze.tasks import Task, get_task
from fedsqueeze.tasks.evaluator import TestEvaluator
from fedsqueeze.tasks.proxy import split_proxy
from fedsqueeze.tasks.training import check_device

log = logging.getLogger(__name__)

#: Builds a run's budget policy once its version store is open.
PolicyFactory = Callable[[VersionStore], BudgetPolicy]


def build_strategy(settings: RunSettings) -> Strategy:
    """The Flower strategy named in the settings."""
    factories: dict[StrategyName, Callable[..., Strategy]] = {
        StrategyName.FEDAVG: FedAvg,
        StrategyName.FEDAVGM: functools.partial(
            FedAvgM,
            server_learning_rate=settings.server_lr,
            server_momentum=settings.server_momentum,
        ),
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
    failed_rounds: list[int] = field(default_factory=list)
    students: StudentTrack | None = None
    _evaluator: TestEvaluator | None = field(default=None, init=False, repr=False)

    @classmethod
    def open(
        cls,
        settings: RunSettings,
        *,
        policy: PolicyFactory | None = None,
        assignment: StudentAssignment | None = None,
    ) -> Coordinator:
        """Open the state directory, start the data plane, build the strategy.

        ``policy(store)`` builds the budget policy that chooses each edge's specs per
        round (or leaves it out); without one every edge gets the settings' specs and
        budgets. ``assignment`` says which edges train the student (with
        ``student-refresh-every``); without one, edges whose download budget is at most
        ``student-budget`` do.
        """
        root = Path(settings.state_dir)
        store = VersionStore(root, keep=settings.keep_versions)
        if store.completed_round and not settings.resume:
            raise ConfigError(
                f"{root} already holds a run at round {store.completed_round}: continue it "
                "with resume=true (flwr run . --run-config 'resume=true', or fedsqueeze "
                "coordinator --resume), or start afresh in another state-dir "
                "(--run-config 'state-dir=\"run2\"')"
            )
        task = get_task(settings.task)
        initial = dict(task.build_model(settings.seed).state_dict())
        frozen = settings.frozen(task.frozen)
        FrozenParts(frozen).check(initial, f"task {settings.task!r}")
        if frozen and settings.aggregation is not Aggregation.AVERAGE:
            raise ConfigError(
                "aggregation=feddf distils whole client models: it does not combine with "
                "frozen tensors (set freeze=none, or aggregation=average)"
            )
        if frozen:
            log.info("frozen tensors (sent at most once, never aggregated): %s", "|".join(frozen))
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
            down_spec=with_freeze(settings.down_spec, frozen),
            up_spec=with_freeze(settings.up_spec, frozen),
            task=settings.task,
            init_seed=settings.seed if settings.init_from_seed else -1,
            init_digest=init_digest if settings.init_from_seed else "",
            down_budget=settings.down_budget,
            up_budget=settings.up_budget,
            round_offset=offset,
            inline_limit=settings.inline_bytes,
        )
        budget = policy(store) if policy is not None else None
        instruct = _instruction_factory(plane, template, budget, store, frozen)
        students, fusion = _distillation(settings, task, store, assignment)
        student_instruct: InstructionFactory | None = None
        if students is not None:
            student_init = students.init_digest if settings.init_from_seed else ""
            # the frozen patterns name the teacher's tensors: none of them reach the student
            student_template = replace(
                template,
                init_digest=student_init,
                down_spec=settings.down_spec,
                up_spec=settings.up_spec,
                down_budget=settings.student_down_budget or settings.down_budget,
                up_budget=settings.student_up_budget or settings.up_budget,
            )
            student_instruct = _instruction_factory(
                plane, student_template, budget, store, (), student=True
            )
        aggregate_global: GlobalAggregator | None = None
        if fusion is not None:
            aggregate_global = functools.partial(_fuse_teacher, fusion, task, settings.seed)
        strategy = CompressedStrategy(
            build_strategy(settings),
            store,
            instruct,
            plane.pull,
            clip_norm=settings.clip_norm or None,
            round_offset=offset,
            frozen=frozen,
            students=students,
            student_instruction=student_instruct,
            aggregate_global=aggregate_global,
            fusion_warmup=settings.fusion_warmup,
            inline_limit=settings.inline_bytes,
            device=check_device(settings.coordinator_device, "coordinator-device"),
        )
        return cls(settings, store, plane, strategy, init_digest, offset, budget, students=students)

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
        if self._evaluator is None:
            self._evaluator = TestEvaluator(get_task(self.settings.task), self.settings.seed)
        task = self._evaluator.task
        result = self._evaluator(arrays.to_torch_state_dict())
        absolute = server_round + self.offset
        stats = self.strategy.stats.get(server_round)
        metrics: dict[str, float] = {
            "accuracy": result.accuracy,
            "loss": result.loss,
            "bytes-down": float(stats.bytes_down if stats else 0),
            "bytes-up": float(stats.bytes_up if stats else 0),
            **_loss_metrics(stats),
        }
        if self.students is not None:
            data = task.load_data()
            student = task.evaluate(self.students.model(), data.x_test, data.y_test)
            metrics["student-accuracy"] = student.accuracy
            metrics["student-updates"] = float(stats.student_accepted if stats else 0)
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
        if server_round > 0 and stats is not None and not stats.aggregated:
            self._count_failed_round(absolute, stats)
        return MetricRecord(dict(metrics.items()))

    def _count_failed_round(self, absolute: int, stats: RoundStats) -> None:
        """Stop the run once more rounds aggregated nothing than ``max-failed-rounds``.

        Raises
        ------
        RunFailedError
            The tolerance is used up; the round is recorded (state.json) before.
        """
        self.failed_rounds.append(absolute)
        allowed = self.settings.max_failed_rounds
        if len(self.failed_rounds) <= allowed:
            log.warning(
                "round %d aggregated nothing: %d of max-failed-rounds = %d used",
                absolute,
                len(self.failed_rounds),
                allowed,
            )
            return
        rounds = ", ".join(map(str, self.failed_rounds))
        raise RunFailedError(
            f"round {absolute} aggregated nothing ({stats.losses()}); "
            f"{len(self.failed_rounds)} round(s) without an update ({rounds}) is more than "
            f"max-failed-rounds = {allowed}: the run stops"
        )

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
            # Edges read epochs and lr from the run settings both sides share; naming them
            # in every train message would cost about 30 B per client and round.
            train_config=ConfigRecord(),
            evaluate_fn=self.evaluate,
        )

    def close(self) -> None:
        """Stop the data plane."""
        self.plane.close()


def _distillation(
    settings: RunSettings,
    task: Task,
    store: VersionStore,
    assignment: StudentAssignment | None,
) -> tuple[StudentTrack | None, FeddfFusion | None]:
    """The student track and the FedDF fusion the settings ask for (each or neither)."""
    feddf = settings.aggregation is Aggregation.FEDDF
    if not settings.student_refresh_every and not feddf:
        return None, None
    if settings.student_refresh_every and task.build_student is None:
        raise ConfigError(f"task {settings.task!r} has no student architecture")
    proxy, _ = split_proxy(task.load_data(), settings.proxy_size)
    config = DistillConfig(
        temperature=settings.distill_temperature,
        epochs=settings.distill_epochs,
        proxy_size=settings.proxy_size,
        seed=settings.seed,
    )
    fusion = FeddfFusion(proxy.x, config) if feddf else None
    students = None
    if settings.student_refresh_every:
        assign = assignment or StudentAssignment(
            budget_of=lambda node: settings.down_budget, student_budget=settings.student_budget
        )
        students = StudentTrack(
            store,
            task,
            settings.seed,
            proxy.x,
            config,
            settings.student_refresh_every,
            assign,
            resume=settings.resume,
            from_teacher=settings.student_from_teacher,
            teacher_learning=TeacherLearning(
                settings.student_to_teacher_epochs,
                settings.student_to_teacher,
                # r: a student edge's step stood for a teacher edge's
                step_ratio=settings.lr / (settings.student_lr or settings.lr),
                optimizer=settings.optimizer,
                lr=settings.lr,
            ),
            **({"aggregate": fusion} if fusion is not None else {}),
        )
    return students, fusion


def _fuse_teacher(
    fusion: FeddfFusion,
    task: Task,
    seed: int,
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
) -> dict[str, torch.Tensor]:
    return fusion(states, weights, lambda: task.build_model(seed))


def _loss_metrics(stats: RoundStats | None) -> dict[str, float]:
    """Who took part in a round and who did not, as the round's recorded metrics."""
    if stats is None:  # round 0: the initial model, no training
        return {}
    return {
        "updates-accepted": float(stats.accepted),
        "updates-rejected": float(len(stats.rejected)),
        "updates-skipped": float(len(stats.skipped)),
        "edges-failed": float(len(stats.failed)),
        "edges-dropped": float(len(stats.dropped)),
        "round-failed": float(not stats.aggregated),
    }


def _flower_round_note(server_round: int, offset: int) -> str:
    """After a resume Flower counts this run's rounds from 1: say so beside ours."""
    if not offset:
        return ""
    if server_round == 0:
        return " (the model resumed from: Flower's initial evaluation of this run)"
    return f" (Flower's round {server_round} of this run)"


def _instruction_factory(
    plane: CoordinatorDataPlane,
    template: InstructionTemplate,
    budget: BudgetPolicy | None,
    store: VersionStore,
    frozen: tuple[str, ...],
    *,
    student: bool = False,
) -> InstructionFactory:
    """The instructions from ``template``, with the specs ``budget`` chooses when there is
    one (an edge never seen holds ``template.init_digest``, if set; ``student``: the
    edges train the student track, within the policy's student budget), and the download
    inline when ``template.inline_limit`` allows it."""
    instruct: InstructionFactory = functools.partial(plane.instruction, template)
    init_digest = template.init_digest or None
    if budget is not None:
        instruct = functools.partial(
            _budgeted, instruct, budget, store, init_digest, frozen, student
        )
    if template.inline_limit:
        instruct = functools.partial(_inline, instruct, plane, store, init_digest)
    return instruct


def _inline(
    instruct: InstructionFactory,
    plane: CoordinatorDataPlane,
    store: VersionStore,
    init_digest: str | None,
    server_round: int,
    node_id: int,
    target: str,
) -> RoundInstruction | None:
    """The edge's instruction with its download inline when it fits
    (:meth:`CoordinatorDataPlane.with_payload`)."""
    instruction = instruct(server_round, node_id, target)
    if instruction is None:
        return None
    held = store.edge_version(str(node_id)) or (init_digest if instruction.init_digest else None)
    return plane.with_payload(instruction, held)


def _budgeted(
    instruct: InstructionFactory,
    policy: BudgetPolicy,
    store: VersionStore,
    init_digest: str | None,
    frozen: tuple[str, ...],
    student: bool,
    server_round: int,
    node_id: int,
    target: str,
) -> RoundInstruction | None:
    """The edge's instruction with the specs the policy chose (and the run's frozen
    patterns), or ``None`` (skipped)."""
    # An edge never seen before holds the seeded initial model when it can rebuild it.
    held = store.edge_version(str(node_id)) or init_digest
    choice = policy.choose(EdgeRequest(server_round, node_id, target, held, student))
    if isinstance(choice, Skip):
        log.warning("round %d: edge %s skipped: %s", server_round, node_id, choice.reason)
        return None
    base = instruct(server_round, node_id, target)
    if base is None:
        return None
    return replace(
        base,
        down_spec=with_freeze(choice.down_spec, frozen),
        up_spec=with_freeze(choice.up_spec, frozen),
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


class OneLineErrors(logging.Filter):
    """Flower logs a failed ServerApp with its traceback: for our own errors (a state
    directory already used, a run that trained nothing) one line says it all.

    Installed on Flower's logger; other exceptions (bugs) keep their tracebacks.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = _ours(record.exc_info[1] if record.exc_info else None)
        if error is not None:
            message = " ".join(f"{record.getMessage()}: {error}".split())
            record.msg, record.args = "%s", (message,)
            record.exc_info, record.exc_text = None, None
        return True


def _ours(exc: BaseException | None) -> FedsqueezeError | None:
    """``exc`` or the error it wraps (Flower re-raises some as RuntimeError), if ours."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, FedsqueezeError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _one_line_errors() -> None:
    flower = logging.getLogger("flwr")
    if not any(isinstance(f, OneLineErrors) for f in flower.filters):
        flower.addFilter(OneLineErrors())


def make_server_app(settings: RunSettings | None = None) -> ServerApp:
    """The coordinator ServerApp (``settings=None``: read from the run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        watch_flower_parent()  # deployed: end with the SuperExec even if it is not reaped
        _show_our_logs()
        _one_line_errors()
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
