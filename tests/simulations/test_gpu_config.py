"""The GPU keys of an experiment: ``client-gpus`` (Ray's ``num_gpus`` per client actor)
and ``coordinator-device``; a clear error where the machine has no CUDA."""

from __future__ import annotations

import os

import pytest
import torch

from fedsqueeze.errors import ConfigError
from fedsqueeze.runconfig import RunSettings
from fedsqueeze.tasks import training
from simulations.config import load_config
from simulations.runner import backend_config, set_train_device

CUDA = torch.cuda.is_available()


def test_defaults_are_cpu_only() -> None:
    config = load_config(None)
    assert config.client_gpus == 0.0 and config.coordinator_device == "cpu"
    backend = backend_config(config)
    assert backend["client_resources"] == {"num_cpus": config.client_cpus, "num_gpus": 0.0}
    assert backend["init_args"]["num_gpus"] == 0  # type: ignore[index]
    assert config.run_settings(config.arms[0], "").coordinator_device == "cpu"


@pytest.mark.skipif(CUDA, reason="checks the error a machine without CUDA gives")
def test_client_gpus_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(
        ConfigError, match=r"client-gpus = 0.25 trains the clients on GPUs.*no CUDA"
    ):
        load_config(None, ["client-gpus=0.25"])
    with pytest.raises(ConfigError, match="coordinator-device = 'cuda' needs a CUDA device"):
        load_config(None, ["coordinator-device=cuda"])


def test_bad_values_are_refused() -> None:
    with pytest.raises(ConfigError, match="client-gpus must be >= 0"):
        load_config(None, ["client-gpus=-1"])
    with pytest.raises(ConfigError, match="coordinator-device must be cpu, cuda or cuda:N"):
        load_config(None, ["coordinator-device=tpu"])
    with pytest.raises(ConfigError, match="coordinator-device must be"):
        RunSettings(coordinator_device="gpu")


def test_gpu_clients_ask_ray_for_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a machine with two GPUs (the check and the count are torch's).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    config = load_config(None, ["client-gpus=0.25", "coordinator-device=cuda:1"])
    backend = backend_config(config)
    assert backend["client_resources"] == {"num_cpus": config.client_cpus, "num_gpus": 0.25}
    assert backend["init_args"]["num_gpus"] == 2  # type: ignore[index]
    assert config.run_settings(config.arms[0], "").coordinator_device == "cuda:1"
    with pytest.raises(ConfigError, match="needs a CUDA device, and torch sees 2"):
        load_config(None, ["coordinator-device=cuda:2"])


def test_the_training_device_reaches_ray_workers_by_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(training.DEVICE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    set_train_device(load_config(None, ["client-gpus=0.5"]))
    assert os.environ[training.DEVICE_ENV] == "cuda"
    set_train_device(load_config(None))
    assert training.DEVICE_ENV not in os.environ
