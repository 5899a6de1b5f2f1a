"""Many clients, one encode: the single-flight, bounded LRU encode cache."""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fedsqueeze.codec import CodecSpec, state_digest
from fedsqueeze.transport import EncodeCache
from fedsqueeze.transport.cache import CacheKey, PreparedModel
from tests.transport.conftest import make_state, perturb

# No entropy stage: the codec's shared zstd decompressor is not yet safe to use from many
# threads at once, and here 50 clients decode in one process.
SPEC = CodecSpec(entropy_level=0)


@pytest.mark.timeout(90)
def test_fifty_concurrent_clients_cost_one_encode(source, store, start_server, connect):
    base = make_state(0)
    source.publish(base)
    target = perturb(base, 1)
    digest = bytes.fromhex(source.publish(target))
    server = start_server(source, store)
    clients = [connect(server) for _ in range(50)]
    barrier = threading.Barrier(50)

    def fetch(client):
        barrier.wait(10)
        return client.fetch(spec=SPEC, base=base)

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(fetch, clients))
    assert all(r.manifest.base_digest is not None for r in results)
    assert all(state_digest(r.state) == digest for r in results)
    stats = server.stats().cache
    assert stats.encodes == 1
    assert stats.hits + stats.joined == 49


def _prepared(name: str, nbytes: int) -> PreparedModel:
    from fedsqueeze.wire.types import Manifest, SegmentInfo

    info = SegmentInfo(0, ("w",), 0, 0, nbytes, b"\x00" * 32)
    manifest = Manifest(name.encode(), b"\x01" * 32, None, SPEC, nbytes, b"\x01" * 32, (info,))
    return PreparedModel(manifest, (bytes(nbytes),))


def _key(n: int) -> CacheKey:
    return CacheKey(f"{n:064x}", None, SPEC, None)


def test_single_flight_builds_once_and_shares_failures():
    cache = EncodeCache()
    calls = []
    gate = threading.Event()

    def build() -> PreparedModel:
        calls.append(1)
        gate.wait(5)
        return _prepared("m1", 10)

    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(cache.get_or_build, _key(1), build) for _ in range(20)]
        time.sleep(0.1)
        gate.set()
        entries = {id(f.result()) for f in futures}
    assert len(calls) == 1 and len(entries) == 1
    assert cache.by_manifest_key(b"m1") is not None

    failing_gate = threading.Event()

    def failing() -> PreparedModel:
        calls.append(1)
        failing_gate.wait(5)
        raise RuntimeError("encode failed")

    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(cache.get_or_build, _key(2), failing) for _ in range(5)]
        time.sleep(0.1)
        failing_gate.set()
        errors = [f.exception() for f in futures]
    assert all(isinstance(e, RuntimeError) for e in errors)
    assert len(calls) == 2  # one failed build, shared
    assert cache.get_or_build(_key(2), lambda: _prepared("m2", 1)).manifest.manifest_key == b"m2"


def test_lru_bounds_entries_and_bytes():
    cache = EncodeCache(max_entries=3, max_bytes=100)
    for n in range(3):
        cache.get_or_build(_key(n), functools.partial(_prepared, f"m{n}", 10))
    cache.get_or_build(_key(0), lambda: _prepared("never", 1))  # hit: 0 is now recent
    cache.get_or_build(_key(3), lambda: _prepared("m3", 10))
    assert cache.by_manifest_key(b"m1") is None  # least recently used went first
    assert cache.by_manifest_key(b"m0") is not None
    cache.get_or_build(_key(4), lambda: _prepared("m4", 95))
    stats = cache.stats()
    assert stats.entries == 1 and stats.nbytes == 95 and stats.evictions == 4
    assert stats.encodes == 5 and stats.hits == 1
    with pytest.raises(ValueError):
        EncodeCache(max_entries=0)
