"""Fisher sensitivities for the weighted refinement order."""

from __future__ import annotations

import pytest
import torch

from fedsqueeze.bench.progressive import SENTENCE_MODULES, stdlib_sentences
from fedsqueeze.bench.sensitivity import (
    CALIBRATION_MODULES,
    calibration_sentences,
    fisher_weights,
)


class _Two(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = torch.nn.Linear(6, 3, bias=False)
        self.unused = torch.nn.Linear(6, 3, bias=False)


def test_fisher_of_a_linear_map_is_the_input_energy_per_column() -> None:
    # y_s = W x_s: E_v ‖Σ_s v_s x_sᵀ‖² = rows · Σ_s ‖x_s‖², so per element Σ_s ‖x_s‖² / n.
    torch.manual_seed(0)
    net = _Two()
    x = torch.randn(5, 6)
    weights = fisher_weights(net, lambda: net.used(x), probes=3000, seed=1)
    expected = float(x.square().sum()) / 6
    assert weights["used.weight"] == pytest.approx(expected, rel=0.1)
    assert weights["unused.weight"] == 0.0
    # twice the input, four times the sensitivity (same probes)
    double = fisher_weights(net, lambda: net.used(2 * x), probes=3000, seed=1)
    assert double["used.weight"] == pytest.approx(4 * weights["used.weight"], rel=1e-6)
    with pytest.raises(ValueError, match="probes"):
        fisher_weights(net, lambda: net.used(x), probes=0)


def test_calibration_text_is_disjoint_from_the_test_sentences() -> None:
    assert not set(CALIBRATION_MODULES) & set(SENTENCE_MODULES)
    calibration = calibration_sentences()
    assert len(calibration) == 128
    assert not set(calibration) & set(stdlib_sentences(limit=1 << 30))
    assert calibration == sorted(set(calibration))
