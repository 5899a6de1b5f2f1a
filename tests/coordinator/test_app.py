"""The coordinator's start-up: state directory, resume, data plane, strategy choice."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
)

from coordinator.app import Coordinator, OneLineErrors, build_strategy
from coordinator.budget import Choice, EdgeRequest, Skip
from coordinator.strategy import RoundStats
from coordinator.version_store import VersionStore
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.errors import ConfigError, RunFailedError
from fedsqueeze.runconfig import RunSettings, StrategyName


def test_open_starts_the_data_plane_and_publishes_the_seeded_model(tmp_path: Path) -> None:
    coordinator = Coordinator.open(RunSettings(state_dir=str(tmp_path)))
    try:
        assert coordinator.plane.address.startswith("127.0.0.1:")
        assert coordinator.plane.server.port > 0
        assert coordinator.store.head("init") == coordinator.init_digest
        arrays = coordinator.initial_arrays().to_torch_state_dict()
        assert set(arrays) == {
            "conv1.weight",
            "conv1.bias",
            "conv2.weight",
            "conv2.bias",
            "fc1.weight",
            "fc1.bias",
            "fc2.weight",
            "fc2.bias",
        }
    finally:
        coordinator.close()


def test_existing_run_needs_resume_and_resume_continues_from_the_last_round(tmp_path: Path) -> None:
    store = VersionStore(tmp_path)
    first = Coordinator.open(RunSettings(state_dir=str(tmp_path / "x")))
    first.close()
    trained = {k: v + 1 for k, v in first.initial_arrays().to_torch_state_dict().items()}
    store.publish(trained, track="global")
    store.complete_round(2, {"accuracy": 0.5})
    with pytest.raises(ConfigError, match="resume"):
        Coordinator.open(RunSettings(state_dir=str(tmp_path)))
    resumed = Coordinator.open(RunSettings(state_dir=str(tmp_path), resume=True, num_rounds=5))
    try:
        assert resumed.offset == 2
        start = resumed.initial_arrays().to_torch_state_dict()
        assert all(torch.equal(start[k], trained[k]) for k in trained)
    finally:
        resumed.close()


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        (StrategyName.FEDAVG, FedAvg),
        (StrategyName.FEDAVGM, FedAvgM),
        (StrategyName.FEDPROX, FedProx),
        (StrategyName.FEDADAM, FedAdam),
        (StrategyName.FEDYOGI, FedYogi),
        (StrategyName.FEDMEDIAN, FedMedian),
        (StrategyName.FEDTRIMMEDAVG, FedTrimmedAvg),
    ],
)
def test_every_supported_strategy_builds(name: StrategyName, cls: type) -> None:
    assert isinstance(build_strategy(RunSettings(strategy=name)), cls)


def test_server_momentum_reaches_fedavgm() -> None:
    settings = RunSettings.from_run_config(
        {"strategy": "fedavgm", "server-lr": 0.5, "server-momentum": 0.7}
    )
    strategy = build_strategy(settings)
    assert isinstance(strategy, FedAvgM) and strategy.server_opt
    assert (strategy.server_learning_rate, strategy.server_momentum) == (0.5, 0.7)
    assert RunSettings.from_run_config(settings.to_run_config()) == settings
    for bad in ({"server-momentum": 0.5}, {"server-lr": 2.0}):  # without fedavgm
        with pytest.raises(ConfigError, match="need strategy = fedavgm"):
            RunSettings.from_run_config(bad)
    for bad in ({"server-momentum": 1.0}, {"server-lr": 0.0}, {"server-momentum": -0.1}):
        with pytest.raises(ConfigError, match="server-momentum in"):
            RunSettings.from_run_config({"strategy": "fedavgm", **bad})


def test_bad_run_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown run-config key"):
        RunSettings.from_run_config({"num-rounds": 3, "nmu-rounds": 4})
    with pytest.raises(ConfigError):
        RunSettings.from_run_config({"num-rounds": "three"})
    with pytest.raises(ConfigError):
        RunSettings.from_run_config({"down-spec": "quant=5"})
    settings = RunSettings.from_run_config(
        {"num-rounds": 7, "partitioning": "dirichlet", "resume": "true"}
    )
    assert settings.num_rounds == 7 and settings.resume
    assert RunSettings.from_run_config(settings.to_run_config()) == settings


def test_min_nodes_and_max_failed_rounds_are_checked() -> None:
    for bad in ({"min-train-nodes": 0}, {"min-available-nodes": 0}, {"max-failed-rounds": -1}):
        with pytest.raises(ConfigError, match=">= "):
            RunSettings.from_run_config(bad)


def test_student_and_fusion_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="student-lr must be >= 0"):
        RunSettings.from_run_config({"student-lr": -0.01})
    with pytest.raises(ConfigError, match="fusion-warmup must be >= 0"):
        RunSettings.from_run_config({"fusion-warmup": -1})
    with pytest.raises(ConfigError):
        RunSettings.from_run_config({"student-from-teacher": "maybe"})
    s = RunSettings.from_run_config(
        {"student-lr": 0.02, "student-from-teacher": "false", "fusion-warmup": 4}
    )
    assert (s.student_lr, s.student_from_teacher, s.fusion_warmup) == (0.02, False, 4)
    assert RunSettings.from_run_config(s.to_run_config()) == s


def test_a_student_track_without_its_teacher_is_never_refreshed(tmp_path: Path) -> None:
    settings = RunSettings(
        state_dir=str(tmp_path), student_refresh_every=1, student_from_teacher=False
    )
    coordinator = Coordinator.open(settings)
    try:
        students = coordinator.students
        assert students is not None and not students.from_teacher
        assert not any(students.due(r) for r in range(1, 11))
    finally:
        coordinator.close()
    with_teacher = Coordinator.open(
        replace(settings, state_dir=str(tmp_path / "t"), student_from_teacher=True)
    )
    try:
        assert with_teacher.students is not None and with_teacher.students.due(1)
    finally:
        with_teacher.close()


def test_student_budgets_are_checked_and_read() -> None:
    for bad, message in (
        ({"student-refresh-every": 1, "student-down-budget": -1}, "must be >= 0 bytes"),
        ({"student-refresh-every": 1, "student-up-budget": -5}, "must be >= 0 bytes"),
        ({"student-down-budget": 595}, "need a student track"),
    ):
        with pytest.raises(ConfigError, match=message) as err:
            RunSettings.from_run_config(bad)
        assert "\n" not in str(err.value)
    s = RunSettings.from_run_config(
        {"student-refresh-every": 1, "student-down-budget": 595, "student-up-budget": "531"}
    )
    assert (s.student_down_budget, s.student_up_budget) == (595, 531)
    assert RunSettings.from_run_config(s.to_run_config()) == s


class _Recording:
    """A budget policy that records its requests and always says yes."""

    def __init__(self) -> None:
        self.requests: list[EdgeRequest] = []

    def choose(self, request: EdgeRequest) -> Choice | Skip:
        self.requests.append(request)
        return Choice("int8", "int8", 0, 0, 0)

    def observe(self, bytes_down: int, bytes_up: int, *, compute_s: float | None = None) -> None:
        del bytes_down, bytes_up, compute_s


def test_student_instructions_carry_the_student_budgets(tmp_path: Path) -> None:
    settings = RunSettings(
        state_dir=str(tmp_path),
        student_refresh_every=1,
        down_budget=3_700,
        up_budget=2_400,
        student_down_budget=595,
        student_up_budget=531,
    )
    coordinator = Coordinator.open(settings)
    try:
        students = coordinator.students
        student_instruct = coordinator.strategy._student_instruction
        assert students is not None and student_instruct is not None
        student = student_instruct(1, 7, students.init_digest)
        teacher = coordinator.strategy._instruction(1, 8, coordinator.init_digest)
        assert student is not None and teacher is not None
        assert (student.down_budget, student.up_budget) == (595, 531)
        assert (teacher.down_budget, teacher.up_budget) == (3_700, 2_400)
    finally:
        coordinator.close()
    # 0: the run's budgets
    plain = Coordinator.open(
        replace(settings, state_dir=str(tmp_path / "p"), student_down_budget=0, student_up_budget=0)
    )
    try:
        assert plain.students is not None and plain.strategy._student_instruction is not None
        same = plain.strategy._student_instruction(1, 7, plain.students.init_digest)
        assert same is not None and (same.down_budget, same.up_budget) == (3_700, 2_400)
    finally:
        plain.close()
    # With a budget policy, it is told which requests are a student edge's.
    recording = _Recording()
    policed = Coordinator.open(
        replace(settings, state_dir=str(tmp_path / "q")), policy=lambda store: recording
    )
    try:
        assert policed.students is not None and policed.strategy._student_instruction is not None
        policed.strategy._student_instruction(1, 7, policed.students.init_digest)
        policed.strategy._instruction(1, 8, policed.init_digest)
        assert [(r.node_id, r.student) for r in recording.requests] == [(7, True), (8, False)]
    finally:
        policed.close()


def _failed_round(coordinator: Coordinator, server_round: int) -> None:
    coordinator.strategy.stats[server_round] = RoundStats(
        failed=[("7", "<class 'UnavailableError'>:<'no route to the data plane'>")],
        dropped=["8"],
    )
    coordinator.evaluate(server_round, coordinator.initial_arrays())


def test_a_round_that_trained_nothing_fails_the_run_and_is_recorded(tmp_path: Path) -> None:
    coordinator = Coordinator.open(RunSettings(state_dir=str(tmp_path)))
    try:
        with pytest.raises(RunFailedError) as caught:
            _failed_round(coordinator, 1)
    finally:
        coordinator.close()
    message = str(caught.value)
    assert message.startswith("round 1 aggregated nothing (1 edge failed (edge 7: ")
    assert "1 edge dropped" in message and "max-failed-rounds = 0" in message
    metrics = VersionStore(tmp_path).round_metrics[1]
    assert metrics["round-failed"] == 1.0 and metrics["updates-accepted"] == 0.0
    assert metrics["edges-failed"] == 1.0 and metrics["edges-dropped"] == 1.0


def test_max_failed_rounds_tolerates_that_many(tmp_path: Path) -> None:
    coordinator = Coordinator.open(RunSettings(state_dir=str(tmp_path), max_failed_rounds=1))
    try:
        _failed_round(coordinator, 1)  # tolerated
        with pytest.raises(RunFailedError, match=r"2 round\(s\) without an update \(1, 2\)"):
            _failed_round(coordinator, 2)
    finally:
        coordinator.close()


def test_our_errors_reach_flowers_log_as_one_line(caplog: pytest.LogCaptureFixture) -> None:
    from flwr.common.logger import log

    flower = logging.getLogger("flwr")
    flower.addFilter(OneLineErrors())
    try:
        with caplog.at_level(logging.ERROR, logger="flwr"):
            try:
                raise RunFailedError("round 1 aggregated nothing (2 edges failed)")
            except RunFailedError as exc:
                log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=exc)
            try:
                raise RuntimeError("Ending simulation.") from ConfigError("state-dir used")
            except RuntimeError as exc:
                log(logging.ERROR, "%s raised an exception", "Simulation", exc_info=exc)
            try:
                raise KeyError("a bug")
            except KeyError as exc:
                log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=exc)
    finally:
        for f in [f for f in flower.filters if isinstance(f, OneLineErrors)]:
            flower.removeFilter(f)
    ours, wrapped, bug = [r for r in caplog.records if r.name == "flwr"]
    assert ours.getMessage() == (
        "ServerApp raised an exception: round 1 aggregated nothing (2 edges failed)"
    )
    assert wrapped.getMessage() == "Simulation raised an exception: state-dir used"
    assert ours.exc_info is None and wrapped.exc_info is None
    assert bug.exc_info is not None  # a bug keeps its traceback


def test_an_edge_failure_is_one_line_naming_the_error_and_its_cause() -> None:
    from coordinator.strategy import edge_failure

    reason = (
        "<class 'fedsqueeze.errors.UnavailableError'>:<'fetching the model from the data "
        "plane at 127.0.0.1:7443 (TLS) failed: Fetch: server unavailable after 6 attempts;\n"
        " cause: ... CERTIFICATE_VERIFY_FAILED'>"
    )
    assert edge_failure(reason) == (
        "UnavailableError: fetching the model from the data plane at 127.0.0.1:7443 (TLS) "
        "failed: Fetch: server unavailable after 6 attempts; cause: ... CERTIFICATE_VERIFY_FAILED"
    )
    assert edge_failure("An exception was raised when attempting to load `ClientApp`") == (
        "An exception was raised when attempting to load `ClientApp`"
    )


def test_student_edges_get_no_frozen_patterns_of_the_teacher(tmp_path: Path) -> None:
    # freeze= names teacher tensors: a student spec carrying them would leave the
    # averaged student without the tensors a pattern happened to match.
    settings = RunSettings(state_dir=str(tmp_path), freeze="conv1.*", student_refresh_every=1)
    coordinator = Coordinator.open(settings)
    try:
        teacher = coordinator.strategy._instruction(1, 7, "t")
        student_factory = coordinator.strategy._student_instruction
        assert student_factory is not None
        student = student_factory(1, 7, "s")
        assert teacher is not None and student is not None
        assert parse_spec(teacher.down_spec).freeze == ("conv1.*",)
        assert parse_spec(teacher.up_spec).freeze == ("conv1.*",)
        assert parse_spec(student.down_spec).freeze == ()
        assert parse_spec(student.up_spec).freeze == ()
    finally:
        coordinator.close()
