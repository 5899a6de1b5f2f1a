"""What a client holds of a model being fetched, and how it is verified.

A :class:`FetchState` keeps the verified segments of one manifest across calls and
retries. Pass the same state to :meth:`TransferClient.fetch
<fedsqueeze.transport.client.TransferClient.fetch>` again after a failure and the fetch
resumes with only the missing segments. Every segment is checked against the digest the
manifest lists (SHA-256 or BLAKE3, as the manifest says) before it is kept; together
they cover every byte of the payload, so the reassembled payload needs no second hash
before it is parsed.

Verified segments are copied into one buffer laid out in segment-id order (the encoded
payload itself), allocated when the manifest is adopted, and parsed in place at the end
(no copy of the whole payload). Keeping each segment as its own fresh 1 MiB object costs
a page fault per 4 KiB on first touch, as much time as receiving the bytes; the buffer
asks for transparent huge pages where Linux offers them.

With a :class:`~fedsqueeze.transport.spool.SpoolPolicy`, the payload of a model of at
least its threshold (raw bytes, ``Manifest.raw_bytes``) goes to a file-backed shared
mapping instead (an unlinked file in the policy's
folder): page cache, which the kernel writes back and reclaims, not anonymous memory.
:meth:`FetchState.stream` then lends the verified stream for a part-by-part decode
(:mod:`fedsqueeze.transport.fetch_into`); :meth:`FetchState.close` unmaps it.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import threading
from collections.abc import Iterator

from fedsqueeze.codec import EncodedModel
from fedsqueeze.errors import IntegrityError
from fedsqueeze.transport.spool import SpoolPolicy, file_buffer
from fedsqueeze.wire.digests import segment_digest
from fedsqueeze.wire.types import Manifest, SegmentData, SegmentRequest

logger = logging.getLogger(__name__)

_HUGE_PAGE_BYTES = 2 << 20


def _allocate(nbytes: int, spool: SpoolPolicy | None = None) -> mmap.mmap | bytearray:
    """A zeroed writable buffer of ``nbytes``: file-backed with ``spool``, else
    anonymous, on huge pages where available."""
    if spool is not None and nbytes > 0:
        return file_buffer(nbytes, spool)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < _HUGE_PAGE_BYTES or advice is None:
        return bytearray(nbytes)
    # Private, not the default shared mapping: shared memory rarely gets huge pages.
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # huge pages switched off: ordinary pages then
        buffer.madvise(advice)
    return buffer


class FetchState:
    """Verified segments of one manifest; thread-safe.

    Parameters
    ----------
    max_segment_refetches
        How many times one segment may fail verification before :meth:`accept` raises.
    spool
        Keep the payload of a model of at least its threshold (raw bytes) in a
        file-backed mapping (``None``: always in memory).

    Raises
    ------
    fedsqueeze.errors.ConfigError
        The spool folder is not writable (checked here, not mid-fetch).
    """

    def __init__(self, max_segment_refetches: int = 3, *, spool: SpoolPolicy | None = None) -> None:
        if spool is not None and not isinstance(spool, SpoolPolicy):
            raise TypeError(f"spool must be a SpoolPolicy, not {type(spool).__name__}")
        if spool is not None:
            spool.check()
        self.max_segment_refetches = max_segment_refetches
        self.spool = spool
        self._spooled = False
        self._lock = threading.Lock()
        self._manifest: Manifest | None = None
        self._buffer: mmap.mmap | bytearray = bytearray()
        self._offsets: dict[int, int] = {}
        self._held: set[int] = set()
        self._failures: dict[int, int] = {}
        self.refetched = 0

    @property
    def manifest(self) -> Manifest | None:
        """The manifest being fetched, once known."""
        return self._manifest

    def adopt(self, manifest: Manifest) -> int:
        """Fetch ``manifest`` from now on; returns how many held segments it keeps.

        Segments held for an earlier manifest are kept where the new one lists the same
        id with the same size and sha256 (a re-encoding after a server restart usually
        gives the same bytes); the rest are dropped.
        """
        with self._lock:
            old, old_manifest = self._buffer, self._manifest
            if old_manifest is not None and (old_manifest.manifest_key, old_manifest.segments) == (
                manifest.manifest_key,
                manifest.segments,
            ):
                self._manifest = manifest  # the same stream; perhaps another prefix of it
                return len(self._held)
            offsets: dict[int, int] = {}
            position = 0
            for info in sorted(manifest.segments, key=lambda s: s.segment_id):
                offsets[info.segment_id] = position
                position += info.byte_length
            # By the model's size, as the server decides: the memory a client may spend
            # is a share of the model, and an int8 payload of a 1 GB model is 250 MB.
            spooled = (
                self.spool is not None and position > 0 and self.spool.applies(manifest.raw_bytes)
            )
            buffer = _allocate(position, self.spool if spooled else None)
            kept: set[int] = set()
            if old_manifest is not None:
                for segment_id in self._held:
                    before = old_manifest.segment(segment_id)
                    if not manifest.has_segment(segment_id):
                        continue
                    now = manifest.segment(segment_id)
                    same_digest = manifest.segment_digest is old_manifest.segment_digest
                    if same_digest and (now.byte_length, now.sha256) == (
                        before.byte_length,
                        before.sha256,
                    ):
                        start, end = offsets[segment_id], offsets[segment_id] + now.byte_length
                        source = self._offsets[segment_id]
                        buffer[start:end] = old[source : source + now.byte_length]
                        kept.add(segment_id)
                logger.info(
                    "manifest changed to %s…: kept %d of %d held segments",
                    manifest.manifest_key.hex()[:12],
                    len(kept),
                    len(self._held),
                )
            self._manifest, self._buffer, self._offsets, self._held = (
                manifest,
                buffer,
                offsets,
                kept,
            )
            self._spooled = spooled
        _unmap(old)
        return len(kept)

    @property
    def spooled(self) -> bool:
        """Whether the payload is kept in a file-backed mapping."""
        with self._lock:
            return self._spooled

    def close(self) -> None:
        """Unmap the buffer (a spooled one's file goes with it); the state is empty after."""
        with self._lock:
            old = self._buffer
            self._manifest, self._buffer, self._offsets, self._held = None, bytearray(), {}, set()
            self._spooled = False
        _unmap(old)

    @contextlib.contextmanager
    def stream(self) -> Iterator[memoryview]:
        """The verified stream of a complete fetch, lent for the block (a view on the
        buffer: nothing is copied).

        Raises
        ------
        IntegrityError
            Segments are missing.
        """
        with self._lock:
            manifest = self._current()
            if len(self._held) != len(manifest.segments):
                raise IntegrityError("cannot decode: segments are missing")
            buffer = self._buffer
        with memoryview(buffer) as view:
            yield view

    def _current(self) -> Manifest:
        if self._manifest is None:
            raise RuntimeError("no manifest adopted yet")
        return self._manifest

    def held_request(self) -> SegmentRequest | None:
        """The manifest key and the ids of the verified segments held, or ``None``."""
        with self._lock:
            if self._manifest is None or not self._held:
                return None
            return SegmentRequest(self._manifest.manifest_key, frozenset(self._held))

    def held_ids(self) -> frozenset[int]:
        """Ids of the verified segments held."""
        with self._lock:
            return frozenset(self._held)

    def missing_ids(self) -> list[int]:
        """Ids still to fetch (of the prefix, for a truncated manifest), in order."""
        with self._lock:
            manifest = self._current()
            return [s.segment_id for s in manifest.wanted if s.segment_id not in self._held]

    @property
    def complete(self) -> bool:
        """Whether every segment wanted is held (the prefix's, for a truncated manifest)."""
        with self._lock:
            manifest = self._manifest
            return manifest is not None and all(s.segment_id in self._held for s in manifest.wanted)

    @property
    def held_bytes(self) -> int:
        """Payload bytes held."""
        with self._lock:
            manifest = self._manifest
            if manifest is None:
                return 0
            return sum(manifest.segment(i).byte_length for i in self._held)

    def accept(self, data: SegmentData) -> bool:
        """Keep ``data`` if it verifies; returns whether it was new and kept.

        Raises
        ------
        IntegrityError
            The segment failed verification more than ``max_segment_refetches`` times,
            or the server sent a segment the manifest lacks.
        """
        with self._lock:
            algorithm = self._current().segment_digest
        digest = segment_digest(algorithm, data.payload)  # outside the lock: the slow part
        with self._lock:
            manifest = self._current()
            if not manifest.has_segment(data.segment_id):
                raise IntegrityError(
                    f"server sent segment {data.segment_id}, which manifest "
                    f"{manifest.manifest_key.hex()[:12]}… does not list"
                )
            if data.segment_id in self._held:
                return False
            info = manifest.segment(data.segment_id)
            fits = manifest.segment_digest is algorithm and info.byte_length == len(data.payload)
            if fits and info.sha256 == digest:
                start = self._offsets[data.segment_id]
                self._buffer[start : start + info.byte_length] = data.payload
                self._held.add(data.segment_id)
                return True
            failures = self._failures.get(data.segment_id, 0) + 1
            self._failures[data.segment_id] = failures
            self.refetched += 1
        logger.warning(
            "segment %d of %s… failed its %s check (%d time(s))",
            data.segment_id,
            manifest.manifest_key.hex()[:12],
            algorithm.name,
            failures,
        )
        if failures > self.max_segment_refetches:
            raise IntegrityError(
                f"segment {data.segment_id} failed verification {failures} times; giving up"
            )
        return False

    def prefix(self) -> bytes:
        """The stream bytes of the wanted prefix (a truncated manifest's first segments).

        Raises
        ------
        IntegrityError
            Segments of the prefix are missing.
        """
        with self._lock:
            manifest = self._current()
            wanted = manifest.wanted
            if any(s.segment_id not in self._held for s in wanted):
                raise IntegrityError("cannot decode the prefix: segments are missing")
            end = max(self._offsets[s.segment_id] + s.byte_length for s in wanted)
            return bytes(self._buffer[:end])

    def assemble(self) -> EncodedModel:
        """The encoded model, parsed from the verified segments in place.

        Raises
        ------
        IntegrityError
            Segments are missing.
        fedsqueeze.errors.CodecError
            The verified bytes do not parse (the server encoded garbage).
        """
        with self._lock:
            manifest = self._current()
            if len(self._held) != len(manifest.segments):
                raise IntegrityError("cannot assemble: segments are missing")
            buffer = self._buffer
        # Every byte was verified with its segment; parsing copies what it keeps,
        # so the view is released before anything could write to the buffer again.
        with memoryview(buffer) as view:
            return EncodedModel.parse_stream(view)


def _unmap(buffer: mmap.mmap | bytearray) -> None:
    """Close a replaced mapped buffer now rather than when collected (a spooled one
    holds disk space); one still lent out is left to the collector."""
    if isinstance(buffer, mmap.mmap):
        with contextlib.suppress(BufferError):
            buffer.close()
