"""The in-memory model source and update store."""

from __future__ import annotations

import hashlib
import threading

import pytest

from fedsqueeze.codec import CodecSpec, encode_state, preset, state_digest
from fedsqueeze.errors import NotFoundError, PreconditionError
from fedsqueeze.transport import InMemoryModelSource, UpdateStore
from fedsqueeze.transport.source import encode_seed
from fedsqueeze.transport.updates import AddResult, ReceivedUpdate, UpdateRecord
from fedsqueeze.wire.types import is_hex_digest
from tests.transport.conftest import make_state, perturb


def test_publish_copies_and_resolves():
    source = InMemoryModelSource(keep=2)
    state = make_state(0)
    digest = source.publish(state)
    assert digest == state_digest(state).hex() and is_hex_digest(digest)
    state["fc.bias"].add_(1.0)  # the source holds its own copy
    held = source.get(digest)
    assert held is not None and state_digest(held).hex() == digest
    assert source.resolve("global") == digest == source.resolve(digest)
    with pytest.raises(NotFoundError):
        source.resolve("other")
    with pytest.raises(NotFoundError):
        source.resolve("0" * 64)
    with pytest.raises(ValueError):
        source.publish(state, track="a" * 64)


def test_keeps_the_last_versions_and_every_track_head():
    source = InMemoryModelSource(keep=2)
    side = source.publish(make_state(9), track="side")
    digests = [source.publish(make_state(i)) for i in range(4)]
    assert source.get(digests[0]) is None and source.get(digests[1]) is None
    assert source.get(side) is not None  # head of its track
    assert source.versions() == [side, digests[3]]
    assert source.resolve("global") == digests[3]


def test_encode_is_repeatable_even_with_stochastic_rounding():
    source = InMemoryModelSource()
    base = source.publish(make_state(0))
    target = source.publish(perturb(make_state(0), 1))
    spec = preset("topk10-int4")
    first = source.encode(target, base, spec, None)
    again = source.encode(target, base, spec, None)
    assert first.to_bytes() == again.to_bytes()
    assert first.base_digest == bytes.fromhex(base)
    assert encode_seed(target, base, spec) != encode_seed(target, None, spec)
    with pytest.raises(NotFoundError):
        source.encode("0" * 64, None, spec, None)


def _update(update_id: str, edge: str = "edge-0", seed: int = 1) -> ReceivedUpdate:
    base = make_state(0)
    encoded = encode_state(perturb(base, seed), CodecSpec(), base)
    payload = encoded.to_bytes()
    return ReceivedUpdate(
        update_id,
        edge,
        state_digest(base),
        hashlib.sha256(payload).digest(),
        len(payload),
        encoded,
        0.0,
    )


def test_update_store_is_idempotent_and_remembers_popped_ids():
    store = UpdateStore(remember=10)
    update = _update("u1")
    assert store.add(update) is AddResult.STORED
    assert store.add(update) is AddResult.DUPLICATE
    assert len(store) == 1 and "u1" in store
    assert store.lookup("u1") == UpdateRecord("edge-0", update.sha256, update.nbytes)
    with pytest.raises(PreconditionError):
        store.add(_update("u1", seed=2))
    with pytest.raises(PreconditionError):
        store.add(_update("u1", edge="edge-1"))
    assert store.pop("u1") is update
    assert store.pop("u1") is None and len(store) == 0
    assert store.add(update) is AddResult.DUPLICATE  # still counted once
    store.add(_update("u2"))
    store.add(_update("u3"))
    assert [u.update_id for u in store.list()] == ["u2", "u3"]
    assert [u.update_id for u in store.pop_all()] == ["u2", "u3"]
    assert store.list() == []


def test_update_store_under_contention():
    store = UpdateStore()
    update = _update("same")
    results: list[AddResult] = []
    threads = [
        threading.Thread(target=lambda: results.append(store.add(update))) for _ in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(AddResult.STORED) == 1 and len(store) == 1
