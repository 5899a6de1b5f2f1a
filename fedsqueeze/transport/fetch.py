"""What a client holds of a model being fetched, and how it is verified.

A :class:`FetchState` keeps the verified segments of one manifest across calls and
retries. Pass the same state to :meth:`TransferClient.fetch
<fedsqueeze.transport.client.TransferClient.fetch>` again after a failure and the fetch
resumes with only the missing segments. Every segment is checked against the sha256 the
manifest lists before it is kept; the reassembled payload is checked against the
manifest's ``encoded_sha256`` before it is parsed.
"""

from __future__ import annotations

import hashlib
import logging
import threading

from fedsqueeze.codec import EncodedModel, Segment, join_segments
from fedsqueeze.errors import IntegrityError
from fedsqueeze.wire.types import Manifest, SegmentData

logger = logging.getLogger(__name__)


class FetchState:
    """Verified segments of one manifest; thread-safe.

    Parameters
    ----------
    max_segment_refetches
        How many times one segment may fail verification before :meth:`accept` raises.
    """

    def __init__(self, max_segment_refetches: int = 3) -> None:
        self.max_segment_refetches = max_segment_refetches
        self._lock = threading.Lock()
        self._manifest: Manifest | None = None
        self._held: dict[int, bytes] = {}
        self._digests: dict[int, bytes] = {}
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
            kept: dict[int, bytes] = {}
            for segment_id, payload in self._held.items():
                if not manifest.has_segment(segment_id):
                    continue
                info = manifest.segment(segment_id)
                digest = self._digests[segment_id]
                if info.byte_length == len(payload) and info.sha256 == digest:
                    kept[segment_id] = payload
            if self._manifest is not None and self._manifest != manifest:
                logger.info(
                    "manifest changed to %s…: kept %d of %d held segments",
                    manifest.manifest_id[:12],
                    len(kept),
                    len(self._held),
                )
            self._manifest = manifest
            self._held = kept
            self._digests = {i: self._digests[i] for i in kept}
            return len(kept)

    def _current(self) -> Manifest:
        if self._manifest is None:
            raise RuntimeError("no manifest adopted yet")
        return self._manifest

    def held_ids(self) -> frozenset[int]:
        """Ids of the verified segments held."""
        with self._lock:
            return frozenset(self._held)

    def missing_ids(self) -> list[int]:
        """Ids still to fetch, in the manifest's (priority) order."""
        with self._lock:
            return [
                s.segment_id for s in self._current().segments if s.segment_id not in self._held
            ]

    @property
    def complete(self) -> bool:
        """Whether every segment is held."""
        with self._lock:
            return self._manifest is not None and len(self._held) == len(self._manifest.segments)

    @property
    def held_bytes(self) -> int:
        """Payload bytes held."""
        with self._lock:
            return sum(len(p) for p in self._held.values())

    def accept(self, data: SegmentData) -> bool:
        """Keep ``data`` if it verifies; returns whether it was new and kept.

        Raises
        ------
        IntegrityError
            The segment failed verification more than ``max_segment_refetches`` times,
            or the server sent a segment of another manifest or one the manifest lacks.
        """
        digest = _sha256(data.payload)  # outside the lock: the slow part
        with self._lock:
            manifest = self._current()
            if data.manifest_id != manifest.manifest_id or not manifest.has_segment(
                data.segment_id
            ):
                raise IntegrityError(
                    f"server sent segment {data.segment_id} of manifest "
                    f"{data.manifest_id[:12]}…, not one of {manifest.manifest_id[:12]}…"
                )
            if data.segment_id in self._held:
                return False
            info = manifest.segment(data.segment_id)
            if info.byte_length == len(data.payload) and info.sha256 == digest:
                self._held[data.segment_id] = data.payload
                self._digests[data.segment_id] = digest
                return True
            failures = self._failures.get(data.segment_id, 0) + 1
            self._failures[data.segment_id] = failures
            self.refetched += 1
        logger.warning(
            "segment %d of %s… failed its sha256 check (%d time(s))",
            data.segment_id,
            manifest.manifest_id[:12],
            failures,
        )
        if failures > self.max_segment_refetches:
            raise IntegrityError(
                f"segment {data.segment_id} failed verification {failures} times; giving up"
            )
        return False

    def assemble(self) -> EncodedModel:
        """The encoded model, from all segments, after checking the whole payload's sha256.

        Raises
        ------
        IntegrityError
            Segments are missing, or the whole payload does not match the manifest.
        fedsqueeze.errors.CodecError
            The verified bytes do not parse (the server encoded garbage).
        """
        with self._lock:
            manifest = self._current()
            if len(self._held) != len(manifest.segments):
                raise IntegrityError("cannot assemble: segments are missing")
            ordered = [self._held[i] for i in range(len(manifest.segments))]
        whole = hashlib.sha256()
        for payload in ordered:
            whole.update(payload)
        if whole.digest() != manifest.encoded_sha256:
            raise IntegrityError("the reassembled payload does not match the manifest's sha256")
        segments = [
            Segment(info.segment_id, info.tensor_names, info.priority, info.level, ordered[i])
            for i, info in enumerate(sorted(manifest.segments, key=lambda s: s.segment_id))
        ]
        return join_segments(segments)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
