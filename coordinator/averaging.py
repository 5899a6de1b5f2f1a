"""Weighted averaging of model states (FedAvg's mean), the one path every track uses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["average_states"]


def average_states(
    states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
) -> dict[str, Tensor]:
    """The weighted mean of floating tensors (FedAvg); other tensors from the first state.

    Accumulated in float64 and rounded once to each tensor's dtype, so the order of the
    states changes the result by at most that rounding.
    """
    if not states or len(states) != len(weights) or sum(weights) <= 0 or min(weights) < 0:
        raise ValueError("need states with one non-negative weight each, not all zero")
    total = float(sum(weights))
    out: dict[str, Tensor] = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            acc += state[name].to(torch.float64) * (weight / total)
        out[name] = acc.to(first.dtype)
    return out
