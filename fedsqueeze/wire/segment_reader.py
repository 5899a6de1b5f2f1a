"""A direct reader of serialized segment messages (``StreamSegmentsResponse``, and
``FetchResponse`` carrying a segment: the same bytes).

The one message that is almost all payload: parsing it into a protobuf message and
copying the payload out again costs two copies of every segment, where slicing the
serialized bytes costs one. The reader follows the protobuf wire format (unknown fields
are skipped, as protobuf does) and returns ``None`` for anything it does not expect (a
known field repeated or of another wire type, groups, malformed input), which
:func:`fedsqueeze.wire.convert.segment_from_message` then hands to the protobuf parser.
"""

from __future__ import annotations

from collections.abc import Iterator

from fedsqueeze.wire.types import SegmentData


def read_segment_response(message: bytes, copy: bool = True) -> SegmentData | None:
    """The segment in a serialized segment message, or ``None`` (use protobuf).

    Parameters
    ----------
    message
        The serialized message.
    copy
        Return the payload as ``bytes`` (a copy); otherwise as a ``memoryview`` into
        ``message`` (which the view keeps alive).
    """
    try:
        return _read(message, copy)
    except (_WireFormatError, IndexError, UnicodeDecodeError):
        return None


class _WireFormatError(Exception):
    """Input the fast reader leaves to the protobuf parser."""


_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise _WireFormatError("varint too long")


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start, end) of each field; varints as (value, -1)."""
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise _WireFormatError("field number 0")
        if wire_type == _VARINT:
            value, pos = _varint(buf, pos)
            yield number, wire_type, value, -1
        elif wire_type == _LEN:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise _WireFormatError("field runs past the message")
            yield number, wire_type, pos, pos + length
            pos += length
        elif wire_type in (_I64, _I32):
            pos += 8 if wire_type == _I64 else 4
        else:
            raise _WireFormatError(f"wire type {wire_type}")
    if pos != end:
        raise _WireFormatError("truncated field")


def _read(buf: bytes, copy: bool) -> SegmentData | None:
    outer = list(_fields(buf, 0, len(buf)))
    # Exactly one top-level field, the segment: anything else (a FetchResponse carrying a
    # manifest, unknown fields) goes to the protobuf parser.
    if len(outer) != 1 or outer[0][:2] != (1, _LEN):
        return None
    segment_id = 0
    payload: bytes | memoryview = b"" if copy else memoryview(b"")
    seen: set[int] = set()
    for number, wire_type, start, end in _fields(buf, outer[0][2], outer[0][3]):
        if number in (2, 3):
            if number in seen:
                return None
            seen.add(number)
        if number == 2 and wire_type == _VARINT:
            segment_id = start & 0xFFFFFFFF
        elif number == 3 and wire_type == _LEN:
            payload = buf[start:end] if copy else memoryview(buf)[start:end]
        elif number in (2, 3):
            return None
    return SegmentData(segment_id=segment_id, payload=payload)
