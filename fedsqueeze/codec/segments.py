"""Splitting an encoded model into transport segments of about 1 MiB, and joining them.

The model's byte stream (header, then records, without the trailing checksum: each
segment carries its own sha256 on the wire) is cut into segments that hold whole
records where they fit, so small tensors travel together and a large tensor spans
several segments. ``priority`` orders the stream (lower first) and ``level`` is the
highest refinement level of the records inside (0: the base layer), so progressive
transmission can send base layers before refinements without changing the wire format.
A segment never mixes base-level records with refinements; refinements of several
levels share one when the stream interleaves them (format version 5's global
rate-distortion order, :mod:`fedsqueeze.codec.level_order`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from fedsqueeze.codec.model import EncodedModel
from fedsqueeze.errors import FormatError

DEFAULT_SEGMENT_BYTES = 1 << 20
MAX_SEGMENTS = 1 << 20


@dataclass(frozen=True)
class Segment:
    """One piece of an encoded model's byte stream.

    Attributes
    ----------
    index
        Position in the stream (0-based); joining concatenates payloads by index.
    tensor_names
        Names of the tensors whose records this segment holds, wholly or in part.
    priority
        Lower is sent first.
    level
        The highest refinement level of its records (0: base-level records only).
    payload
        The bytes.
    """

    index: int
    tensor_names: tuple[str, ...]
    priority: int
    level: int
    payload: bytes

    @property
    def sha256(self) -> bytes:
        """sha256 digest of the payload."""
        return hashlib.sha256(self.payload).digest()


def split_segments(encoded: EncodedModel, max_bytes: int = DEFAULT_SEGMENT_BYTES) -> list[Segment]:
    """Cut ``encoded`` into segments of at most ``max_bytes``, in priority order."""
    if max_bytes < 64:
        raise ValueError(f"max_bytes must be at least 64, got {max_bytes}")
    pieces: list[tuple[str | None, int, bytes]] = [(None, 0, encoded.header.to_bytes())]
    for record in encoded.records:
        pieces.append((record.name, record.level, record.to_bytes()))
    segments: list[Segment] = []
    buf = bytearray()
    names: list[str] = []
    level = 0  # the highest level of what buf holds
    refining = False  # whether the pieces so far reached the refinements

    def flush() -> None:
        nonlocal buf, names, level
        if buf:
            idx = len(segments)
            segments.append(Segment(idx, tuple(names), idx, level, bytes(buf)))
            buf, names, level = bytearray(), [], 0

    for name, piece_level, data in pieces:
        if (piece_level > 0) != refining:
            flush()
            refining = piece_level > 0
        if len(buf) + len(data) > max_bytes and names:
            # Start a large record on a fresh segment, unless the buffer holds only the
            # stream header: a header-only segment would cost a descriptor for 9 bytes.
            flush()
        offset = 0
        while offset < len(data):
            room = max_bytes - len(buf)
            chunk = data[offset : offset + room]
            buf += chunk
            level = max(level, piece_level)
            offset += len(chunk)
            if name is not None and (not names or names[-1] != name):
                names.append(name)
            if len(buf) >= max_bytes:
                flush()
    flush()
    return segments


def split_progressive(
    encoded: EncodedModel, target_bytes: int, max_bytes: int = DEFAULT_SEGMENT_BYTES
) -> list[Segment]:
    """Cut a progressive model into segments of whole records, for truncation by budget.

    A segment ends where the refinements begin and once it holds ``target_bytes`` or more, so a
    byte budget buys whole records (a record cut by the budget would be bytes paid for and
    thrown away). Only a record longer than ``max_bytes`` spans several segments.
    """
    if not 64 <= target_bytes <= max_bytes:
        raise ValueError("target_bytes must be in [64, max_bytes]")
    pieces: list[tuple[str | None, int, bytes]] = [(None, 0, encoded.header.to_bytes())]
    for record in encoded.records:
        pieces.append((record.name, record.level, record.to_bytes()))
    segments: list[Segment] = []
    buf = bytearray()
    names: list[str] = []
    level = 0  # the highest level of what buf holds
    refining = False  # whether the pieces so far reached the refinements

    def flush() -> None:
        nonlocal buf, names, level
        if buf:
            idx = len(segments)
            segments.append(Segment(idx, tuple(names), idx, level, bytes(buf)))
            buf, names, level = bytearray(), [], 0

    for name, piece_level, data in pieces:
        if (piece_level > 0) != refining or (len(buf) + len(data) > max_bytes and names):
            flush()
            refining = piece_level > 0
        if name is not None and (not names or names[-1] != name):
            names.append(name)
        for offset in range(0, len(data), max_bytes):
            buf += data[offset : offset + max_bytes]
            level = max(level, piece_level)
            if len(buf) >= max_bytes:
                flush()
                if name is not None and offset + max_bytes < len(data):
                    names.append(name)
        if len(buf) >= target_bytes:
            flush()
    flush()
    return segments


def join_prefix(segments: Sequence[Segment]) -> bytes:
    """The stream bytes of the first segments of a model (for anytime decoding).

    ``segments`` must be segments ``0..k−1`` of one split, in any order; decode the
    result with :func:`fedsqueeze.codec.model.decode_prefix`.

    Raises
    ------
    FormatError
        A gap (a refinement without what precedes it), a duplicate, or no segment 0.
    """
    return b"".join(s.payload for s in _in_order(segments, "not a prefix: "))


def join_segments(segments: Sequence[Segment]) -> EncodedModel:
    """Reassemble segments (any order) into the encoded model.

    Raises
    ------
    FormatError
        Missing, duplicate or garbled segments.
    """
    if not segments:
        raise FormatError("no segments to join")
    return EncodedModel.parse_stream(b"".join(s.payload for s in _in_order(segments, "")))


def _in_order(segments: Sequence[Segment], context: str) -> list[Segment]:
    """``segments`` sorted by index, checked to be exactly ``0..len−1``."""
    if len(segments) > MAX_SEGMENTS:
        raise FormatError(f"{len(segments)} segments is more than the {MAX_SEGMENTS} allowed")
    ordered = sorted(segments, key=lambda s: s.index)
    for expected, seg in enumerate(ordered):
        if seg.index != expected:
            raise FormatError(
                f"{context}segment {expected} is missing or duplicated (got index {seg.index})"
            )
    return ordered
