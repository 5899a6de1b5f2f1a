"""Where :func:`fedsqueeze.tasks.training.train` runs when it is given no device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedsqueeze.errors import ConfigError
from fedsqueeze.tasks import training


def _fit(model: nn.Module) -> float:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)
    return training.train(model, x, y, epochs=1, lr=0.1, seed=0).loss


def test_the_environment_names_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(training.DEVICE_ENV, "cpu")
    assert training.default_device() == torch.device("cpu")
    torch.manual_seed(0)
    with_env = _fit(nn.Linear(5, 3))
    monkeypatch.delenv(training.DEVICE_ENV)
    assert training.default_device() is None
    torch.manual_seed(0)
    assert _fit(nn.Linear(5, 3)) == with_env  # the same CPU training either way


def test_bad_or_missing_devices_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(training.DEVICE_ENV, "tpu")
    with pytest.raises(ConfigError, match="FEDSQUEEZE_TRAIN_DEVICE must be cpu, cuda"):
        _fit(nn.Linear(5, 3))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(training.DEVICE_ENV, "cuda")
    with pytest.raises(ConfigError, match="needs a CUDA device, and torch sees none"):
        _fit(nn.Linear(5, 3))
    assert training.check_device("cpu", "x") == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_on_cuda_and_returns_the_model_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(training.DEVICE_ENV, "cuda")
    model = nn.Linear(5, 3)
    _fit(model)
    assert next(model.parameters()).device.type == "cpu"
