"""The coordinator's start-up: state directory, resume, data plane, strategy choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi

from coordinator.app import Coordinator, build_strategy
from coordinator.version_store import VersionStore
from fedsqueeze.errors import ConfigError
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
        (StrategyName.FEDPROX, FedProx),
        (StrategyName.FEDADAM, FedAdam),
        (StrategyName.FEDYOGI, FedYogi),
        (StrategyName.FEDMEDIAN, FedMedian),
        (StrategyName.FEDTRIMMEDAVG, FedTrimmedAvg),
    ],
)
def test_every_supported_strategy_builds(name: StrategyName, cls: type) -> None:
    assert isinstance(build_strategy(RunSettings(strategy=name)), cls)


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


def test_an_edge_failure_is_one_line_naming_the_error_and_its_cause() -> None:
    from coordinator.app import edge_failure

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
