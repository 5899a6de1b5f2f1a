"""The coordinator's record of what each edge holds: kept across restarts and eviction, so
a later fetch (after an edge or a coordinator restart) never sends a tensor the edge holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.dataplane import CoordinatorDataPlane
from coordinator.version_store import HELD_PER_EDGE, VersionStore
from edge.dataplane import Fetched, GrpcConnector
from edge.part_store import PartStore
from fedsqueeze.codec import state_digest
from tests.held_parts import fetch_lossless, small_model

pytestmark = pytest.mark.timeout(120)


def test_the_record_keeps_the_last_versions_each_edge_confirmed(tmp_path: Path) -> None:
    store = VersionStore(tmp_path, keep=1)
    digests = []
    for i in range(5):
        digests.append(store.publish(small_model(i)))
        store.record_edge("e1", digests[-1])  # its receipt of round i
    assert store.edge_holdings("e1") == tuple(digests[-HELD_PER_EDGE:])
    # pinned although keep=1 and newer versions came since
    for i in range(5, 9):
        store.publish(small_model(i))
    assert all(store.has(d) for d in digests[-HELD_PER_EDGE:])
    assert not store.has(digests[0]) and not store.has(digests[1])  # no longer held
    reopened = VersionStore(tmp_path, keep=1)  # a coordinator restart
    assert reopened.edge_holdings("e1") == tuple(digests[-HELD_PER_EDGE:])
    assert reopened.edge_version("e1") == digests[-1]


def test_held_versions_beyond_max_held_go_oldest_first(tmp_path: Path) -> None:
    store = VersionStore(tmp_path, keep=1, max_held=2)
    v = []
    for i, edge in enumerate(("e1", "e1", "e1", "e1", "e2", "e2")):
        v.append(store.publish(small_model(i)))
        store.record_edge(edge, v[-1])
    # e1 holds v3 now, v1 and v2 before; e2 holds v5, v4 before: three older versions
    # held, two may stay beyond keep: the oldest (v1) goes; v0 is the one unpinned
    # version keep=1 keeps
    assert store.edge_holdings("e1") == (v[2], v[3])
    assert store.edge_holdings("e2") == (v[4], v[5])
    assert not store.has(v[1]) and store.has(v[0])
    store.publish(small_model(9))
    assert all(store.has(d) for d in v[2:])


def _rounds_across_a_restart(tmp_path: Path, recorded: bool) -> tuple[Fetched, bool]:
    """Round 1 the edge fetches v1, round 2 v2; the coordinator publishes more and
    restarts, and the edge restarts too; round 3's v3 has v1's largest layer again.
    Returns round 3's fetch and whether v1 was still kept after the restart."""
    root = tmp_path / "coordinator"
    store = VersionStore(root, keep=1)
    v1, v2 = small_model(1), small_model(2)
    v3 = {**small_model(3), "a.weight": v1["a.weight"].clone()}
    d1 = store.publish(v1)
    parts = PartStore(3, directory=tmp_path / "edge-parts")
    plane = CoordinatorDataPlane(store)
    try:
        first = fetch_lossless(GrpcConnector(), plane, d1, None, parts)
        if recorded:
            store.record_edge("7", first.digest)  # the receipt of round 1
        d2 = store.publish(v2)
        second = fetch_lossless(GrpcConnector(), plane, d2, first, parts)
        if recorded:
            store.record_edge("7", second.digest)
        for i in range(10, 13):  # other tracks' versions, rounds the edge sat out
            store.publish(small_model(i), track=f"other{i}")
    finally:
        plane.close()
    store = VersionStore(root, keep=1)  # the coordinator restarts
    d3 = store.publish(v3)
    kept = store.has(d1)
    plane = CoordinatorDataPlane(store)
    try:
        # the edge restarts too: its part store comes from disk
        restarted = PartStore(3, directory=tmp_path / "edge-parts")
        third = fetch_lossless(GrpcConnector(), plane, d3, second, restarted)
    finally:
        plane.close()
    assert third.digest == d3 == state_digest(third.state).hex()
    assert all(torch.equal(third.state[k], v) for k, v in v3.items())
    return third, kept


def test_a_coordinator_restart_does_not_resend_held_parts(tmp_path: Path) -> None:
    """With the receipts recorded, v1 is still known after the restart and its layer
    does not travel (counted on the wire); without the record (keep=1) v1 is gone and
    the layer travels."""
    recorded, kept = _rounds_across_a_restart(tmp_path / "recorded", True)
    unrecorded, gone = _rounds_across_a_restart(tmp_path / "unrecorded", False)
    assert kept and not gone
    layer = small_model(1)["a.weight"].numel() * 4
    # a.weight: 32 kB of random floats, which lossless coding keeps most of
    assert unrecorded.bytes_down - recorded.bytes_down > 0.75 * layer
    assert recorded.bytes_up - unrecorded.bytes_up < 80  # the request names two versions
