"""The on-disk version store: atomic, content-addressed, resumable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.version_store import VersionStore
from fedsqueeze.codec import state_digest
from fedsqueeze.errors import ConfigError


def _state(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3, 2), v), "n": torch.tensor(int(v))}


def test_publish_get_and_reopen(tmp_path: Path) -> None:
    store = VersionStore(tmp_path)
    d1 = store.publish(_state(1.0))
    assert d1 == state_digest(_state(1.0)).hex()
    assert store.head() == d1
    store.complete_round(1, {"accuracy": 0.5})
    reopened = VersionStore(tmp_path)
    assert reopened.head() == d1
    assert reopened.completed_round == 1
    assert reopened.round_metrics == {1: {"accuracy": 0.5}}
    got = reopened.get(d1)
    assert got is not None and torch.equal(got["w"], _state(1.0)["w"])


def test_keeps_last_k_plus_pinned(tmp_path: Path) -> None:
    store = VersionStore(tmp_path, keep=2)
    digests = [store.publish(_state(float(i))) for i in range(5)]
    store.record_edge("edge-a", digests[-1])
    assert store.versions == digests[-3:]  # head pinned + 2 kept
    assert store.get(digests[0]) is None
    assert not (tmp_path / "versions" / f"{digests[0]}.fsq").exists()
    # an edge holding an old version pins it
    store.record_edge("edge-b", digests[2])
    for i in range(5, 8):
        store.publish(_state(float(i)))
    assert store.has(digests[2])
    assert store.edge_version("edge-b") == digests[2]


def test_corrupted_version_file_is_detected(tmp_path: Path) -> None:
    store = VersionStore(tmp_path, cache_size=1)
    d1 = store.publish(_state(1.0))
    store.publish(_state(2.0))  # pushes d1 out of the memory cache
    path = tmp_path / "versions" / f"{d1}.fsq"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError):
        VersionStore(tmp_path).get(d1)


def test_bad_state_file_and_arguments(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(ConfigError):
        VersionStore(tmp_path)
    with pytest.raises(ValueError):
        VersionStore(tmp_path / "other", keep=0)
    store = VersionStore(tmp_path / "ok")
    with pytest.raises(ValueError):
        store.record_edge("e", "0" * 64)
    assert store.get("../../etc/passwd") is None


def test_no_temp_files_left(tmp_path: Path) -> None:
    store = VersionStore(tmp_path)
    for i in range(3):
        store.publish(_state(float(i)))
        store.complete_round(i + 1, {})
    leftovers = [p for p in tmp_path.rglob(".*") if p.is_file()]
    assert leftovers == []


def test_per_edge_prefix_records_survive_a_reopen_and_clear_on_a_whole_model(
    tmp_path: Path,
) -> None:
    store = VersionStore(tmp_path)
    coarse = store.publish(_state(1.0), track=None)
    whole = store.publish(_state(2.0))
    store.record_edge("e1", coarse, decoded_bytes=1234, levels=(0, 1, 1))
    store.record_edge("e2", whole)
    assert store.edge_prefix("e1") == (1234, (0, 1, 1))
    assert store.edge_prefix("e2") is None
    reopened = VersionStore(tmp_path)
    assert reopened.edge_prefix("e1") == (1234, (0, 1, 1))
    assert reopened.edge_version("e1") == coarse
    reopened.record_edge("e1", whole)  # it completed the stream: no prefix any more
    assert reopened.edge_prefix("e1") is None
    assert VersionStore(tmp_path).edge_prefix("e1") is None
