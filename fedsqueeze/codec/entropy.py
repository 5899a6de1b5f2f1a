"""Entropy coding with zstandard, applied only where it shrinks the data.

Frames are written without the magic number, content size, checksum or dictionary id:
the record header already says how long the decoded data is, and every byte saved
counts when a whole update is about a kilobyte.
"""

from __future__ import annotations

import threading

import zstandard

from fedsqueeze.errors import FormatError

_FORMAT = zstandard.FORMAT_ZSTD1_MAGICLESS
# zstandard's (de)compressor objects are not thread-safe: one per thread.
_local = threading.local()
_SAMPLE_ABOVE = 4 << 20  # payloads larger than this are sampled first
_SAMPLE_BYTES = 256 << 10
_MIN_GAIN = 0.03


def compress(data: bytes | memoryview, level: int) -> bytes | None:
    """zstd-compress ``data``; ``None`` when that would not make it smaller.

    Parameters
    ----------
    data
        Bytes to compress.
    level
        zstandard level, 1..22 (0 disables compression and returns ``None``).
    """
    if level <= 0 or len(data) < 16:
        return None
    if len(data) > _SAMPLE_ABOVE and not _worth_it(data, level):
        return None
    compressor = zstandard.ZstdCompressor(
        level=level,
        write_checksum=False,
        write_content_size=False,
        write_dict_id=False,
        threads=-1 if len(data) >= (8 << 20) else 0,
    )
    framed = compressor.compress(data)
    # The frame's 4-byte magic number is implied by the magicless decoder: drop it.
    packed = framed[4:]
    return packed if len(packed) < len(data) else None


#: Sample that :func:`estimate` compresses (its window: a size estimate within a few
#: percent on model tensors).
_ESTIMATE_SAMPLE = 64 << 10


def estimate(data: bytes | memoryview, level: int) -> float:
    """About how many bytes :func:`compress` would make of ``data`` (``len(data)`` when
    it would not compress): a 64 KiB sample from the middle, compressed and scaled up;
    exact for data no longer than the sample."""
    view = memoryview(data)
    if level <= 0 or len(view) < 16:
        return float(len(view))
    mid = len(view) // 2
    start = max(0, mid - _ESTIMATE_SAMPLE // 2)
    sample = view[start : start + _ESTIMATE_SAMPLE]
    packed = len(zstandard.ZstdCompressor(level=level, write_content_size=False).compress(sample))
    return min(float(len(view)), (packed - 4) * len(view) / len(sample))


def _worth_it(data: bytes | memoryview, level: int) -> bool:
    """Whether a sample from the middle shrinks by at least :data:`_MIN_GAIN`.

    Spares the full compression of large payloads that barely compress (raw fp32).
    """
    mid = len(data) // 2
    sample = bytes(memoryview(data)[mid : mid + _SAMPLE_BYTES])
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
        # A frame that states its content size gets a buffer of that size, whatever
        # max_output_size says: reject a wrong one before decompressing.
        declared = zstandard.get_frame_parameters(raw, format=_FORMAT).content_size
        if declared not in (zstandard.CONTENTSIZE_UNKNOWN, size):
            raise FormatError(f"zstd frame declares {declared} bytes, header says {size}")
        out = decompressor.decompress(raw, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise FormatError(f"corrupt zstd stream: {exc}") from exc
    if len(out) != size:
        raise FormatError(f"zstd stream decoded to {len(out)} bytes, header says {size}")
    return out
