"""Entropy coding with zstandard, applied only where it shrinks the data.

Frames are written without the magic number, content size, checksum or dictionary id:
the record header already says how long the decoded data is, and every byte saved
counts when a whole update is about a kilobyte.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import IO, cast

import zstandard

from fedsqueeze.errors import FormatError

_FORMAT = zstandard.FORMAT_ZSTD1_MAGICLESS
# zstandard's (de)compressor objects are not thread-safe: one per thread.
_local = threading.local()
#: Payloads larger than this (bytes) are sampled first (:func:`worth_it`).
SAMPLE_ABOVE = 4 << 20
#: The sample :func:`worth_it` compresses, from the middle of the payload.
SAMPLE_BYTES = 256 << 10
_MIN_GAIN = 0.03
#: Payloads shorter than this (bytes) are never compressed.
MIN_COMPRESSED = 16
#: Payloads from this size (bytes) are compressed by zstd's worker threads.
THREADED_FROM = 8 << 20


def compress(data: bytes | memoryview, level: int) -> bytes | None:
    """zstd-compress ``data``; ``None`` when that would not make it smaller.

    Parameters
    ----------
    data
        Bytes to compress.
    level
        zstandard level, 1..22 (0 disables compression and returns ``None``).
    """
    if level <= 0 or len(data) < MIN_COMPRESSED:
        return None
    if len(data) > SAMPLE_ABOVE and not worth_it(data, level):
        return None
    compressor = zstandard.ZstdCompressor(
        level=level,
        write_checksum=False,
        write_content_size=False,
        write_dict_id=False,
        threads=threads_for(len(data)),
    )
    framed = compressor.compress(data)
    # The frame's 4-byte magic number is implied by the magicless decoder: drop it.
    packed = framed[4:]
    return packed if len(packed) < len(data) else None


#: Sample that :func:`estimate` compresses (its window). On all-MiniLM-L6-v2's 26 tensors
#: of 128 KiB to 1 MiB the estimate of their level-3 size is within 0.7% (bf16) and 7.1%
#: (fp32), as 64 KiB gave (0.2% and 9.0%), at a quarter of the cost: 147 µs a tensor
#: with 64 KiB, a side script's measure.
_ESTIMATE_SAMPLE = 16 << 10


def estimate(data: bytes | memoryview, level: int) -> float:
    """About how many bytes :func:`compress` would make of ``data`` (``len(data)`` when
    it would not compress): a sample from the middle (:data:`_ESTIMATE_SAMPLE`),
    compressed and scaled up; exact for data no longer than the sample."""
    view = memoryview(data)
    if level <= 0 or len(view) < 16:
        return float(len(view))
    mid = len(view) // 2
    start = max(0, mid - _ESTIMATE_SAMPLE // 2)
    sample = view[start : start + _ESTIMATE_SAMPLE]
    packed = len(zstandard.ZstdCompressor(level=level, write_content_size=False).compress(sample))
    return min(float(len(view)), (packed - 4) * len(view) / len(sample))


def threads_for(size: int) -> int:
    """zstandard's ``threads`` for a payload of ``size`` bytes: its worker threads (one
    per core, ``-1``) from :data:`THREADED_FROM`, else none (``0``: on the caller's).

    The frame depends on it (multi-threaded zstd cuts the input into jobs), so every
    encoder of a payload uses this rule."""
    return -1 if size >= THREADED_FROM else 0


def worth_it(data: bytes | memoryview, level: int) -> bool:
    """Whether a sample from the middle shrinks by at least :data:`_MIN_GAIN`.

    Spares the full compression of large payloads that barely compress (raw fp32).
    """
    mid = len(data) // 2
    sample = bytes(memoryview(data)[mid : mid + SAMPLE_BYTES])
    size = len(zstandard.ZstdCompressor(level=level).compress(sample))
    return size < (1.0 - _MIN_GAIN) * len(sample)


def decompress(data: bytes | memoryview, size: int) -> bytes:
    """Inverse of :func:`compress`; the result must be exactly ``size`` bytes.

    Raises
    ------
    FormatError
        If ``data`` is not exactly one valid frame or does not decode to exactly ``size``
        bytes. Never allocates more than ``size`` bytes, whatever the frame claims (a
        few kilobytes of zstd can expand to gigabytes).
    """
    if size <= 0:
        raise FormatError("entropy-coded body of 0 bytes")  # compress() never makes one
    decompressor = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor(format=_FORMAT)
    raw = bytes(data)
    try:
        _check_declared(raw, size)
        out = decompressor.decompress(raw, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise FormatError(f"corrupt zstd stream: {exc}") from exc
    if len(out) != size:
        raise FormatError(f"zstd stream decoded to {len(out)} bytes, header says {size}")
    return out


def _check_declared(data: bytes | memoryview, size: int) -> zstandard.FrameParameters:
    """The frame's parameters; FormatError when it states a content size other than
    ``size`` (a frame that states one gets a buffer of that size, whatever
    ``max_output_size`` says: a wrong one is rejected before decompressing)."""
    params = zstandard.get_frame_parameters(data, format=_FORMAT)
    declared = params.content_size
    if declared not in (zstandard.CONTENTSIZE_UNKNOWN, size):
        raise FormatError(f"zstd frame declares {declared} bytes, header says {size}")
    return params


#: Blocks :func:`frame_length` walks at most (plus one per 64 KiB of output) before it
#: gives up; zstd's own blocks hold up to 128 KiB.
_MAX_WALKED_BLOCKS = 4096
#: A window this small is always allowed to the stream reader (zstd fits the window of a
#: small frame to its size, rounded up to a power of two).
_SMALL_WINDOW = 1 << 21
_MAGIC = b"\x28\xb5\x2f\xfd"


def frame_length(data: bytes | memoryview, size: int) -> int | None:
    """Length of the magicless zstd frame at the start of ``data``, from its headers.

    Walks the frame header and the block headers (not the blocks). ``None`` when the
    frame has more blocks than a frame of ``size`` bytes from zstd's encoder has (many
    tiny blocks: walking them would cost more than decoding). Raises FormatError when
    the headers run past the end of ``data`` or use the reserved block type.
    """
    view = memoryview(data)
    n = len(view)
    if n < 1:
        raise FormatError("corrupt zstd stream: empty frame")
    fhd = view[0]
    if fhd & 0x08:
        raise FormatError("corrupt zstd stream: reserved frame header bit set")
    fcs_flag, single, checksum, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
    pos = 1 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    pos += (1 if single else 0, 2, 4, 8)[fcs_flag]
    limit = _MAX_WALKED_BLOCKS + size // (64 << 10)
    for _ in range(limit):
        if pos + 3 > n:
            raise FormatError("corrupt zstd stream: truncated block header")
        header = view[pos] | view[pos + 1] << 8 | view[pos + 2] << 16
        last, kind, length = header & 1, (header >> 1) & 3, header >> 3
        if kind == 3:
            raise FormatError("corrupt zstd stream: reserved block type")
        pos += 3 + (1 if kind == 1 else length)
        if last:
            return pos + 4 * checksum
    return None


def decompress_into(data: bytes | memoryview, out: memoryview, step: int) -> Iterator[int]:
    """Decompress ``data`` (one frame from :func:`compress`) into ``out``, which it must
    fill exactly, ``step`` bytes at a time; yields how many bytes are filled after each
    step, so the caller can work on what has arrived while the rest decodes.

    The same checks as :func:`decompress` (FormatError for a wrong declared size, a
    corrupt frame, data after it, or a frame that decodes to more or fewer bytes than
    ``len(out)``), and never more memory than ``len(out)`` plus a window no larger
    than it (or than 2 MiB): a frame whose window is larger, or that is cut into many
    tiny blocks, is decoded in one call by :func:`decompress` instead.
    """
    size = len(out)
    if size <= 0:
        raise FormatError("entropy-coded body of 0 bytes")  # compress() never makes one
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    try:
        params = _check_declared(data, size)
    except zstandard.ZstdError as exc:
        raise FormatError(f"corrupt zstd stream: {exc}") from exc
    end = frame_length(data, size) if params.window_size <= max(size, _SMALL_WINDOW) else None
    if end is None:
        out[:] = decompress(data, size)
        yield size
        return
    if end > len(data):
        raise FormatError("corrupt zstd stream: the frame runs past the body")
    if end < len(data):
        raise FormatError(f"corrupt zstd stream: {len(data) - end} bytes after the frame")
    source = cast(IO[bytes], _Prefixed(data))  # read() is all the reader calls
    reader = zstandard.ZstdDecompressor().stream_reader(source, read_size=1 << 20)
    filled = 0
    try:
        while filled < size:
            got = reader.readinto(out[filled : min(size, filled + step)])
            if got == 0:
                raise FormatError(f"zstd stream decoded to {filled} bytes, header says {size}")
            filled += got
            yield filled
        if reader.read(1):
            raise FormatError(f"zstd stream decodes to more than the {size} bytes it should")
    except zstandard.ZstdError as exc:
        raise FormatError(f"corrupt zstd stream: {exc}") from exc


class _Prefixed:
    """A file-like source: the zstd magic number, then ``data`` (magicless frames, which
    the stream reader does not take)."""

    def __init__(self, data: bytes | memoryview) -> None:
        self._view = memoryview(data)
        self._pos = -1

    def read(self, n: int = -1) -> bytes | memoryview:
        if self._pos < 0:
            self._pos = 0
            return _MAGIC
        start = self._pos
        stop = len(self._view) if n < 0 else min(len(self._view), start + n)
        self._pos = stop
        return self._view[start:stop]
