"""The encoded-model cache of the transfer server: single-flight, bounded LRU.

Each (target, base, spec, byte budget) is encoded once: concurrent identical requests
wait for the one encode in flight instead of starting their own, and later ones are
served from the cache until the entry is evicted (least recently used first, by entry
count and by bytes). Entries are also found by manifest key, for ``StreamSegments``.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from fedsqueeze.codec import CodecSpec
from fedsqueeze.wire.digests import SegmentDigest
from fedsqueeze.wire.types import Manifest, PartRef

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheKey:
    """What identifies one encoding (digests in hex); ``held_parts``: the target's tensors
    left out because the client holds them (:mod:`fedsqueeze.transport.parts`);
    ``segment_digest``: how its segments are digested."""

    target: str
    base: str | None
    spec: CodecSpec
    byte_budget: int | None
    held_parts: tuple[PartRef, ...] = ()
    segment_digest: SegmentDigest = SegmentDigest.SHA256


@dataclass(frozen=True)
class PreparedModel:
    """An encoded model ready to stream.

    Attributes
    ----------
    manifest
        Its manifest.
    messages
        Indexed by segment id: the serialized message that carries the segment (built
        once, sent as is to every client, by ``Fetch`` and ``StreamSegments`` alike).
    """

    manifest: Manifest
    messages: tuple[bytes, ...]

    @property
    def nbytes(self) -> int:
        """Bytes held by the messages."""
        return sum(len(m) for m in self.messages)


@dataclass(frozen=True)
class CacheStats:
    """Counters of an :class:`EncodeCache`.

    Attributes
    ----------
    encodes
        Builds started (each is one encode).
    hits
        Requests served by a finished entry.
    joined
        Requests that waited for a build already in flight.
    evictions
        Entries dropped to stay within bounds.
    entries, nbytes
        Current size.
    """

    encodes: int
    hits: int
    joined: int
    evictions: int
    entries: int
    nbytes: int


class EncodeCache:
    """Single-flight LRU cache of :class:`PreparedModel`; thread-safe.

    Parameters
    ----------
    max_entries
        Most entries kept.
    max_bytes
        Most payload bytes kept (the newest entry is kept even if alone it is larger).
    """

    def __init__(self, max_entries: int = 16, max_bytes: int = 1 << 30) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be >= 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._done: OrderedDict[CacheKey, PreparedModel] = OrderedDict()
        self._by_manifest: dict[bytes, PreparedModel] = {}
        self._inflight: dict[CacheKey, Future[PreparedModel]] = {}
        self._bytes = 0
        self._encodes = self._hits = self._joined = self._evictions = 0

    def get_or_build(self, key: CacheKey, build: Callable[[], PreparedModel]) -> PreparedModel:
        """The entry for ``key``, built by ``build()`` unless cached or in flight.

        A build that raises is not cached: every request waiting for it gets the error,
        and the next request builds again.
        """
        with self._lock:
            entry = self._done.get(key)
            if entry is not None:
                self._done.move_to_end(key)
                self._hits += 1
                return entry
            pending = self._inflight.get(key)
            if pending is None:
                owner = True
                pending = Future()
                self._inflight[key] = pending
                self._encodes += 1
            else:
                owner = False
                self._joined += 1
        if not owner:
            return pending.result()
        try:
            entry = build()
        except BaseException as exc:
            with self._lock:
                del self._inflight[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._inflight[key]
            self._insert(key, entry)
        pending.set_result(entry)
        return entry

    def _insert(self, key: CacheKey, entry: PreparedModel) -> None:
        self._done[key] = entry
        self._by_manifest[entry.manifest.manifest_key] = entry
        self._bytes += entry.nbytes
        while len(self._done) > 1 and (
            len(self._done) > self.max_entries or self._bytes > self.max_bytes
        ):
            old_key, old = self._done.popitem(last=False)
            self._bytes -= old.nbytes
            self._evictions += 1
            if not any(e is old for e in self._done.values()):
                self._by_manifest.pop(old.manifest.manifest_key, None)
            logger.debug("evicted encoding of %s… from the cache", old_key.target[:12])

    def by_manifest_key(self, manifest_key: bytes) -> PreparedModel | None:
        """The cached entry with this manifest key, or ``None``."""
        with self._lock:
            return self._by_manifest.get(manifest_key)

    def stats(self) -> CacheStats:
        """Current counters."""
        with self._lock:
            return CacheStats(
                self._encodes,
                self._hits,
                self._joined,
                self._evictions,
                len(self._done),
                self._bytes,
            )
