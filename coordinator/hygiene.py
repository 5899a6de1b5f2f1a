"""Update hygiene: reject malformed updates, clip the rest to a norm bound.

An update is the difference between the model an edge returned and the model it
started from. Checks run before aggregation; a rejected update is logged and the round
goes on with the others.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rejection:
    """Why an update was not aggregated."""

    edge: str
    reason: str


def check_update(
    edge: str, update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> Rejection | None:
    """``None`` if ``update`` has the reference's names, shapes and finite values."""
    if set(update) != set(reference):
        missing = sorted(set(reference) - set(update))[:3]
        extra = sorted(set(update) - set(reference))[:3]
        return Rejection(edge, f"tensor names differ (missing {missing}, unexpected {extra})")
    for name, ref in reference.items():
        t = update[name]
        if tuple(t.shape) != tuple(ref.shape):
            return Rejection(edge, f"{name}: shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return Rejection(edge, f"{name}: NaN or Inf values")
    return None


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm over every floating tensor of the update."""
    total = 0.0
    for t in update.values():
        if t.is_floating_point():
            total += float(t.double().pow(2).sum())
    return math.sqrt(total)


def clip_update(
    update: Mapping[str, torch.Tensor], max_norm: float
) -> tuple[dict[str, torch.Tensor], float]:
    """Scale the update down to ``max_norm`` if it is longer; returns it and its norm."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norm = update_norm(update)
    if norm <= max_norm:
        return dict(update), norm
    scale = max_norm / norm
    clipped = {k: (v * scale if v.is_floating_point() else v) for k, v in update.items()}
    return clipped, norm
