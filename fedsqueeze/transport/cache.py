"""The encoded-model cache of the transfer server: single-flight, bounded LRU.

Each (target, base, spec, byte budget) is encoded once: concurrent identical requests
wait for the one encode in flight instead of starting their own, and later ones are
served from the cache until the entry is evicted (least recently used first, by entry
count, by bytes in memory and by bytes spooled to disk). Entries are also found by
manifest key, for ``StreamSegments``. An evicted entry's spool file is deleted (once the
streams reading it are done), and :meth:`EncodeCache.drop_spooled` deletes every one.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from fedsqueeze.codec import CodecSpec
from fedsqueeze.transport.prepare_spooled import SpooledEncoding
from fedsqueeze.wire.convert import segment_message
from fedsqueeze.wire.digests import SegmentDigest
from fedsqueeze.wire.types import Manifest, PartRef, SegmentData

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
        Empty for a spooled model.
    spooled
        A large model's encoding, its bodies in a spool file
        (:mod:`fedsqueeze.transport.spool`): each segment's message is built from the
        file when sent. ``None`` for a model held in memory.
    """

    manifest: Manifest
    messages: tuple[bytes, ...]
    spooled: SpooledEncoding | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held in memory by the messages."""
        return sum(len(m) for m in self.messages)

    @property
    def spool_bytes(self) -> int:
        """Bytes of its spool file (0 in memory)."""
        return self.spooled.stream.file.nbytes if self.spooled is not None else 0

    def message(self, segment_id: int) -> bytes:
        """The serialized message that carries segment ``segment_id``.

        Raises
        ------
        fedsqueeze.errors.NotFoundError
            The spooled entry was evicted meanwhile.
        fedsqueeze.errors.IntegrityError
            Its spool file was truncated.
        """
        if self.spooled is None:
            return self.messages[segment_id]
        return segment_message(SegmentData(segment_id, self.spooled.payload(segment_id)))

    def release(self) -> None:
        """Delete its spool file (a no-op in memory); streams reading it finish first."""
        if self.spooled is not None:
            self.spooled.stream.file.release()


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
        Current size (``nbytes``: in memory).
    spool_bytes
        Bytes in spool files.
    """

    encodes: int
    hits: int
    joined: int
    evictions: int
    entries: int
    nbytes: int
    spool_bytes: int = 0


class EncodeCache:
    """Single-flight LRU cache of :class:`PreparedModel`; thread-safe.

    Parameters
    ----------
    max_entries
        Most entries kept.
    max_bytes
        Most payload bytes kept in memory (the newest entry is kept even if alone it is
        larger).
    max_spool_bytes
        Most bytes kept in spool files (likewise).
    """

    def __init__(
        self, max_entries: int = 16, max_bytes: int = 1 << 30, max_spool_bytes: int = 32 << 30
    ) -> None:
        if max_entries < 1 or max_bytes < 1 or max_spool_bytes < 1:
            raise ValueError("max_entries, max_bytes and max_spool_bytes must be >= 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_spool_bytes = max_spool_bytes
        self._lock = threading.Lock()
        self._done: OrderedDict[CacheKey, PreparedModel] = OrderedDict()
        self._by_manifest: dict[bytes, PreparedModel] = {}
        self._inflight: dict[CacheKey, Future[PreparedModel]] = {}
        self._bytes = 0
        self._spool_bytes = 0
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
        self._spool_bytes += entry.spool_bytes
        while len(self._done) > 1 and (
            len(self._done) > self.max_entries
            or self._bytes > self.max_bytes
            or self._spool_bytes > self.max_spool_bytes
        ):
            old_key, old = self._done.popitem(last=False)
            self._forget(old)
            self._evictions += 1
            logger.debug("evicted encoding of %s… from the cache", old_key.target[:12])

    def _forget(self, old: PreparedModel) -> None:
        """Drop ``old`` (popped from ``_done``) from the counts and the manifest index,
        and delete its spool file unless another key still holds it."""
        self._bytes -= old.nbytes
        self._spool_bytes -= old.spool_bytes
        if not any(e is old for e in self._done.values()):
            self._by_manifest.pop(old.manifest.manifest_key, None)
            old.release()

    def discard(self, entry: PreparedModel) -> None:
        """Drop ``entry`` (a spool file found damaged, say): the next request encodes
        again."""
        with self._lock:
            for key in [k for k, e in self._done.items() if e is entry]:
                del self._done[key]
                self._bytes -= entry.nbytes
                self._spool_bytes -= entry.spool_bytes
            self._by_manifest.pop(entry.manifest.manifest_key, None)
        entry.release()

    def drop_spooled(self) -> None:
        """Drop every spooled entry and delete its spool file (the server's stop);
        entries in memory stay."""
        with self._lock:
            spooled = [(k, e) for k, e in self._done.items() if e.spooled is not None]
            for key, entry in spooled:
                del self._done[key]
                self._bytes -= entry.nbytes
                self._spool_bytes -= entry.spool_bytes
                self._by_manifest.pop(entry.manifest.manifest_key, None)
        for _key, entry in spooled:
            entry.release()

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
                self._spool_bytes,
            )
