"""The edge's part store on disk: survives a restart, bounded by bytes, verified on load."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from coordinator.dataplane import CoordinatorDataPlane
from coordinator.version_store import VersionStore
from edge.cache import DirectoryCache
from edge.dataplane import GrpcConnector
from edge.part_store import PartStore
from fedsqueeze.codec import state_digest
from fedsqueeze.transport.parts import part_digest
from tests.held_parts import fetch_lossless, small_model

pytestmark = pytest.mark.timeout(120)


def _raw(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def test_versions_and_parts_survive_a_reopen(tmp_path: Path) -> None:
    v1, v2 = small_model(1), small_model(2)
    v2["a.weight"] = v1["a.weight"]
    store = PartStore(3, directory=tmp_path)
    store.add(state_digest(v1), v1)
    store.add(state_digest(v2), v2)
    again = PartStore(3, directory=tmp_path)
    assert again.versions() == store.versions()
    assert again.nbytes == store.nbytes == _raw(v1) + _raw(v2) - _raw({"a": v1["a.weight"]})
    held = again.held()
    for state in (v1, v2):
        for tensor in state.values():
            assert torch.equal(held.parts[part_digest(tensor)], tensor)
    # one file per distinct part, and the index
    assert len(_files(tmp_path)) == len(held.parts) + 1


def test_least_recently_used_versions_go_first_beyond_the_byte_bound(tmp_path: Path) -> None:
    v1, v2, v3 = small_model(1), small_model(2), small_model(3)
    store = PartStore(10, directory=tmp_path, max_bytes=2 * _raw(v1))
    store.add(state_digest(v1), v1)
    store.add(state_digest(v2), v2)
    store.add(state_digest(v1), v1)  # used again: v2 is now the least recently used
    store.add(state_digest(v3), v3)
    assert store.versions() == (state_digest(v1), state_digest(v3))
    assert store.nbytes == 2 * _raw(v1)
    assert PartStore(10, directory=tmp_path).versions() == store.versions()
    assert len(_files(tmp_path)) == 2 * len(v1) + 1  # v2's files are gone


def test_a_version_larger_than_the_bound_is_not_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    v1 = small_model(1)
    store = PartStore(3, directory=tmp_path, max_bytes=_raw(v1) - 1)
    with caplog.at_level(logging.WARNING):
        store.add(state_digest(v1), v1)
    assert store.versions() == ()
    assert "larger than the part store's bound" in caplog.text


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_corrupt_part_file_is_dropped_with_its_versions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    v1, v2 = small_model(1), small_model(2)
    v2["b.bias"] = v1["b.bias"]
    store = PartStore(3, directory=tmp_path)
    store.add(state_digest(v1), v1)
    store.add(state_digest(v2), v2)
    victim = tmp_path / f"{part_digest(v1['a.weight']).hex()}.safetensors"
    data = victim.read_bytes()
    if damage == "flip":
        victim.write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
    elif damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:
        victim.unlink()
    with caplog.at_level(logging.WARNING):
        reopened = PartStore(3, directory=tmp_path)
    assert reopened.versions() == (state_digest(v2),)  # v1 needed the bad part
    held = reopened.held()
    assert part_digest(v1["a.weight"]) not in held.parts  # never used
    assert torch.equal(held.parts[part_digest(v1["b.bias"])], v1["b.bias"])  # v2 keeps it
    assert "dropped" in caplog.text
    assert not victim.exists()
    index = json.loads((tmp_path / "index.json").read_text())
    assert [v["digest"] for v in index["versions"]] == [state_digest(v2).hex()]


def test_an_unreadable_index_starts_empty_and_removes_the_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    v1 = small_model(1)
    PartStore(3, directory=tmp_path).add(state_digest(v1), v1)
    (tmp_path / "index.json").write_text("{not json")
    (tmp_path / ".index.json.abcd.tmp").write_bytes(b"torn")
    with caplog.at_level(logging.WARNING):
        reopened = PartStore(3, directory=tmp_path)
    assert reopened.versions() == ()
    assert "unreadable" in caplog.text
    assert _files(tmp_path) == {"index.json"}


@pytest.mark.parametrize("corrupt", [False, True])
def test_held_parts_survive_an_edge_restart(tmp_path: Path, corrupt: bool) -> None:
    """The edge process restarts between rounds (a new connector, a new cache object);
    the parts it held are named from disk and not resent, counted on the wire. A corrupt
    cache file is not used: the tensor travels again and the model is still exact."""
    store = VersionStore(tmp_path / "coordinator")
    v1, v2 = small_model(1), small_model(2)
    v3 = {**small_model(3), "a.weight": v1["a.weight"].clone()}  # v1's largest layer is back
    d1, d2, d3 = store.publish(v1), store.publish(v2), store.publish(v3)
    cache_dir = tmp_path / "edge"
    plane = CoordinatorDataPlane(store)
    try:
        first = fetch_lossless(
            GrpcConnector(), plane, d1, None, DirectoryCache(cache_dir).part_store()
        )
        second = fetch_lossless(
            GrpcConnector(), plane, d2, first, DirectoryCache(cache_dir).part_store()
        )
        # an edge restart: nothing in memory is left
        PartStore(3, directory=cache_dir / "parts")  # (what a new process loads)
        if corrupt:
            victim = cache_dir / "parts" / f"{part_digest(v1['a.weight']).hex()}.safetensors"
            victim.write_bytes(victim.read_bytes()[:100])
        reopened = PartStore(3, directory=cache_dir / "parts")
        third = fetch_lossless(GrpcConnector(), plane, d3, second, reopened)
        plain = fetch_lossless(GrpcConnector(held_versions=0), plane, d3, second, reopened)
    finally:
        plane.close()
    assert third.digest == plain.digest == d3
    assert all(torch.equal(third.state[k], v) for k, v in v3.items())
    layer = v1["a.weight"].numel() * 4
    if corrupt:
        assert third.bytes_down > plain.bytes_down - 1_000  # a.weight travelled again
    else:
        # a.weight (32 kB of random floats) did not travel: held since round 1, on disk
        assert plain.bytes_down - third.bytes_down > 0.75 * layer
