"""Shared pieces of the held-parts tests: a small three-tensor model and one lossless fetch
by edge 7, as the edge's mod would make it."""

from __future__ import annotations

import torch

from coordinator.dataplane import CoordinatorDataPlane, InstructionTemplate
from edge.dataplane import Fetched, GrpcConnector
from edge.part_store import PartStore


def small_model(seed: int) -> dict[str, torch.Tensor]:
    """Two matrices and a bias, seeded."""
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(128, 64, generator=g),
        "b.weight": torch.randn(96, 64, generator=g),
        "b.bias": torch.randn(96, generator=g),
    }


def fetch_lossless(
    connector: GrpcConnector,
    plane: CoordinatorDataPlane,
    target: str,
    held: Fetched | None,
    parts: PartStore | None = None,
) -> Fetched:
    """Edge 7 fetches ``target`` losslessly, naming what it ``held`` (and its ``parts``)."""
    template = InstructionTemplate(down_spec="lossless", up_spec="lossless")
    instruction = plane.instruction(template, 1, 7, target)
    if held is None:
        return connector.fetch(instruction, "7", None, None, parts=parts)
    return connector.fetch(instruction, "7", held.digest, held.state, parts=parts)
