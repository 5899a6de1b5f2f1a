"""The edge connector continues its last stream: a fetch of the same target again sends
only what the edge lacks (the manifest alone when it lacks nothing), from the same base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.dataplane import CoordinatorDataPlane, InstructionTemplate
from coordinator.version_store import VersionStore
from edge.dataplane import GrpcConnector
from fedsqueeze.codec import state_digest

pytestmark = pytest.mark.timeout(120)

PROGRESSIVE = "quant=8,levels=4+4,targets=*,min-ndim=1,entropy=0"


def _model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "a.weight": torch.randn(64, 64, generator=g),
        "b.weight": torch.randn(96, 64, generator=g),
    }


def _fetch_twice(tmp_path: Path, spec: str, budget: int):  # type: ignore[no-untyped-def]
    store = VersionStore(tmp_path)
    target = store.publish(_model())
    plane = CoordinatorDataPlane(store)
    try:
        template = InstructionTemplate(down_spec=spec, up_spec="lossless", down_budget=budget)
        instruction = plane.instruction(template, 1, 7, target)
        connector = GrpcConnector()
        first = connector.fetch(instruction, "7", None, None)
        second = connector.fetch(instruction, "7", first.digest, first.state)
        whole = GrpcConnector().fetch(
            plane.instruction(
                InstructionTemplate(down_spec=spec, up_spec="lossless"), 1, 8, target
            ),
            "8",
            None,
            None,
        )
    finally:
        plane.close()
    return first, second, whole


def test_a_second_fetch_of_the_same_target_costs_about_the_manifest(tmp_path: Path) -> None:
    first, second, _ = _fetch_twice(tmp_path, "lossless", 0)
    assert first.digest == second.digest == state_digest(_model()).hex()
    assert first.bytes_down > 30_000  # 40 kB of float32, zstd takes a little
    assert second.bytes_down < 1_000  # the manifest and framing, no segment
    assert all(torch.equal(second.state[k], v) for k, v in _model().items())


def test_a_truncated_fetch_is_continued_without_a_byte_twice(tmp_path: Path) -> None:
    full = 64 * 64 + 96 * 64  # one byte per value at 8 bits, no entropy coding
    first, second, whole = _fetch_twice(tmp_path, PROGRESSIVE, full * 3 // 4)
    assert first.decoded_bytes and first.decoded_levels  # a prefix: the receipt says so
    assert second.decoded_bytes == 0 and second.decoded_levels == ()  # the rest: whole
    assert second.digest == whole.digest
    assert all(torch.equal(second.state[k], whole.state[k]) for k in whole.state)
    # The continuation fetched only the missing refinements: together the two fetches
    # cost the whole stream plus one more manifest, not a second stream.
    assert first.bytes_down + second.bytes_down < whole.bytes_down + 1_500
