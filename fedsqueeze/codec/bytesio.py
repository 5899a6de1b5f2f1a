"""Bounds-checked reading and compact writing of the codec's byte formats.

Every read checks the remaining length first, so hostile input can only ever raise
:class:`~fedsqueeze.errors.FormatError`.
"""

from __future__ import annotations

import struct

from fedsqueeze.errors import FormatError, TruncatedError

_MAX_VARINT_BYTES = 10


def write_varint(out: bytearray, value: int) -> None:
    """Append ``value`` (≥ 0) as an unsigned LEB128 varint."""
    if value < 0:
        raise ValueError(f"varints are unsigned, got {value}")
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def varint_size(value: int) -> int:
    """Bytes :func:`write_varint` uses for ``value``."""
    return max(1, (value.bit_length() + 6) // 7)


class ByteReader:
    """A cursor over immutable bytes that raises ``FormatError`` instead of overrunning."""

    __slots__ = ("_data", "_end", "pos")

    def __init__(self, data: bytes | memoryview, pos: int = 0, end: int | None = None) -> None:
        self._data = memoryview(data)
        self._end = len(self._data) if end is None else end
        self.pos = pos

    @property
    def remaining(self) -> int:
        """Bytes left before the end."""
        return self._end - self.pos

    def take(self, count: int, what: str = "data") -> memoryview:
        """The next ``count`` bytes, without copying."""
        if count < 0 or count > self.remaining:
            if count < 0:
                raise FormatError(f"negative length for {what}")
            raise _truncated(what, count, self.remaining)
        view = self._data[self.pos : self.pos + count]
        self.pos += count
        return view

    def body(self, count: int) -> memoryview:
        """A record's body of ``count`` bytes (a streaming reader may defer it)."""
        return self.take(count, "record body")

    def u8(self, what: str = "byte") -> int:
        """One unsigned byte."""
        pos = self.pos
        if pos >= self._end:
            raise _truncated(what, 1, 0)
        self.pos = pos + 1
        return int(self._data[pos])

    def unpack(self, fmt: str, what: str = "field") -> tuple[float | int, ...]:
        """``struct.unpack`` of the next ``struct.calcsize(fmt)`` bytes."""
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def varint(self, what: str = "varint", limit: int = 1 << 62) -> int:
        """An unsigned LEB128 varint no larger than ``limit``."""
        data, pos, end = self._data, self.pos, self._end
        value = 0
        for i in range(_MAX_VARINT_BYTES):
            if pos >= end:
                self.pos = pos
                raise _truncated(what, 1, 0)
            byte = int(data[pos])
            pos += 1
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                self.pos = pos
                if value > limit:
                    raise FormatError(f"{what} = {value} exceeds the limit {limit}")
                return value
        self.pos = pos
        raise FormatError(f"{what}: varint longer than {_MAX_VARINT_BYTES} bytes")


def _truncated(what: str, count: int, left: int) -> TruncatedError:
    """The error for ``what`` needing ``count`` bytes where ``left`` remain."""
    return TruncatedError(f"truncated input: {what} needs {count} bytes, {left} left")
