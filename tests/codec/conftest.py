"""Shared fixtures for codec tests: small real-looking models."""

from __future__ import annotations

import pytest
import torch


def make_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small CNN-like state dict with weights, biases and an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    return {
        "conv1.weight": torch.randn(8, 1, 3, 3, generator=g),
        "conv1.bias": torch.randn(8, generator=g),
        "fc1.weight": torch.randn(16, 72, generator=g) * 0.1,
        "fc1.bias": torch.randn(16, generator=g),
        "bn.running_mean": torch.randn(16, generator=g),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "head.weight": torch.randn(10, 16, generator=g).to(torch.float16),
        "flags": torch.tensor([True, False, True]),
    }


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    return make_state(0)
