"""Entropy coding with zstandard, applied only where it shrinks the data.

Frames are written without the magic number, content size, checksum or dictionary id:
the record header already says how long the decoded data is, and every byte saved
counts when a whole update is about a kilobyte.
"""

from __future__ import annotations

import zstandard

from fedsqueeze.errors import FormatError

_FORMAT = zstandard.FORMAT_ZSTD1_MAGICLESS
_decompressor = zstandard.ZstdDecompressor(format=_FORMAT)


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
    compressor = zstandard.ZstdCompressor(
        level=level,
        write_checksum=False,
        write_content_size=False,
        write_dict_id=False,
        threads=-1 if len(data) >= (8 << 20) else 0,
    )
    compressor_params = compressor.compress(data)
    # ZstdCompressor has no format= on older releases: strip the 4-byte magic by hand.
    packed = compressor_params[4:]
    return packed if len(packed) < len(data) else None


def decompress(data: bytes | memoryview, size: int) -> bytes:
    """Inverse of :func:`compress`; the result must be exactly ``size`` bytes.

    Raises
    ------
    FormatError
        If ``data`` is not a valid frame or does not decode to exactly ``size`` bytes.
    """
    try:
        out = _decompressor.decompressobj().decompress(bytes(data))
    except zstandard.ZstdError as exc:
        raise FormatError(f"corrupt zstd stream: {exc}") from exc
    if len(out) != size:
        raise FormatError(f"zstd stream decoded to {len(out)} bytes, header says {size}")
    return out
