"""The edge's part store: versions it held lately name tensors that need not travel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.dataplane import CoordinatorDataPlane
from coordinator.version_store import VersionStore
from edge.dataplane import Fetched, GrpcConnector
from edge.part_store import PartStore
from fedsqueeze.codec import state_digest
from fedsqueeze.transport.parts import part_digest
from tests.held_parts import fetch_lossless, small_model

pytestmark = pytest.mark.timeout(120)


def test_part_store_keeps_shared_parts_once_and_drops_the_oldest() -> None:
    v1, v2, v3 = small_model(1), small_model(2), small_model(3)
    v2["a.weight"] = v1["a.weight"]
    store = PartStore(max_versions=2)
    for v in (v1, v2, v3):
        store.add(state_digest(v), v)
    assert store.versions() == (state_digest(v2), state_digest(v3))
    held = store.held()
    assert held.digests == tuple(sorted(store.versions()))
    assert part_digest(v1["a.weight"]) in held.parts  # v2 still holds it
    assert part_digest(v1["b.weight"]) not in held.parts  # only v1 had it
    assert len(held.parts) == 6
    store.drop(state_digest(v2))
    assert part_digest(v1["a.weight"]) not in store.held().parts


@pytest.mark.parametrize("held_versions", [0, 3])
def test_a_model_once_held_comes_back_without_its_bytes(tmp_path: Path, held_versions: int) -> None:
    store = VersionStore(tmp_path)
    v1, v2 = small_model(1), small_model(2)
    d1 = store.publish(v1)
    d2 = store.publish(v2)
    plane = CoordinatorDataPlane(store)
    try:
        connector = GrpcConnector(held_versions=held_versions)
        first = fetch_lossless(connector, plane, d1, None)
        second = fetch_lossless(connector, plane, d2, first)
        back = fetch_lossless(connector, plane, d1, second)  # v1 again (a rollback, an A/B arm)
    finally:
        plane.close()
    assert back.digest == d1
    assert all(torch.equal(back.state[k], v) for k, v in v1.items())
    if held_versions:
        assert back.bytes_down < 1_000  # the manifest: both weights are held parts
        assert back.bytes_up < 200  # the request names one more version: 34 bytes
    else:
        assert back.bytes_down > 25_000  # the whole (lossless) delta from v2


def test_a_student_sharing_a_tensor_with_the_globalsmall_model(tmp_path: Path) -> None:
    store = VersionStore(tmp_path)
    earlier, teacher = small_model(0), small_model(1)
    student = {"embed.weight": teacher["a.weight"].clone(), "head.weight": torch.randn(10, 64)}
    d_earlier = store.publish(earlier)
    d_teacher = store.publish(teacher)
    d_student = store.publish(student, track="student")
    plane = CoordinatorDataPlane(store)

    def rounds(connector: GrpcConnector) -> Fetched:
        held = fetch_lossless(
            connector, plane, d_teacher, fetch_lossless(connector, plane, d_earlier, None)
        )
        return fetch_lossless(connector, plane, d_student, held)  # its base: the teacher, unrelated

    try:
        plain, shared = rounds(GrpcConnector(held_versions=0)), rounds(GrpcConnector())
    finally:
        plane.close()
    assert shared.digest == plain.digest == d_student
    assert torch.equal(shared.state["embed.weight"], teacher["a.weight"])
    # a.weight is 32 kB of float32: held under another name, it does not travel.
    assert plain.bytes_down - shared.bytes_down > 128 * 64 * 3
