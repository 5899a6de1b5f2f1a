"""Byte-grouped lossless coding of floats: exponent bytes apart from mantissa bytes.

The bytes of a float are far from alike: the exponent takes a few dozen values (about 2.7
bits of entropy in a trained model) while the low mantissa bytes are close to random.
Coded together, an entropy coder sees a mix and gains little (zstd: 1.09× on MiniLM in
fp32); split into *planes* (byte ``k`` of every value), the exponent plane shrinks to a
third and the mantissa planes are stored as they are. This is ZipNN's idea (Hershcovitch
et al., 2024); the format here is our own.

For the 8-bit-exponent formats (fp32, bf16) the sign bit and the exponent's lowest bit
trade places first, so one plane holds the whole exponent and the next one the sign and
7 mantissa bits; fp16 and fp64 planes are the plain bytes.

Body layout (integers are LEB128 varints)::

    body  = chunk log2 u8 · (coding u8 · length)^(chunks × width) · data*
    data  = the plane bytes of one chunk, raw or zstd-compressed (magicless frame)

Chunks are ``2^log2`` consecutive values (the last one shorter), listed chunk by chunk,
each chunk's planes from the most significant byte (the exponent's) down. Chunks are
coded and decoded independently, on all cores. The table fixes every plane's decoded
size from the element count alone, so a hostile body can never make the decoder write
more than ``numel × width`` bytes (each zstd frame is decoded with that bound).

The exponent plane is compressed with literal-only zstd parameters (no match search,
just zstd's Huffman literals): as small as pure Huffman coding on these planes and twice
as fast as level 1, whose matches cost more than they save here. Mantissa planes get
level 1 and stay raw unless that saves at least 1%.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from enum import IntEnum

import numpy as np
import torch
import zstandard

from fedsqueeze.codec.bytesio import ByteReader, write_varint
from fedsqueeze.errors import FormatError

#: Values per chunk written by default (2^20: a few MB per chunk, enough to spread a
#: large tensor over both cores while keeping zstd's tables adaptive).
DEFAULT_CHUNK_LOG2 = 20
MIN_CHUNK_LOG2 = 10
MAX_CHUNK_LOG2 = 26
#: Dtypes that can be grouped (their width is the number of planes).
GROUPED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SWAPPED = (torch.float32, torch.bfloat16)  # 8-bit exponents: swap sign and exponent LSB
_MIN_GAIN = 0.99  # a mantissa plane stays raw unless zstd saves at least 1%
_FORMAT = zstandard.FORMAT_ZSTD1_MAGICLESS

# Literals only: the shortest hash and search, matches of at least 7 bytes.
_LITERAL_PARAMS = zstandard.ZstdCompressionParameters(
    window_log=17,
    hash_log=6,
    chain_log=6,
    search_log=1,
    min_match=7,
    target_length=0,
    strategy=zstandard.STRATEGY_FAST,
    format=_FORMAT,
    write_content_size=False,
    write_checksum=False,
    write_dict_id=False,
)
_MANTISSA_PARAMS = zstandard.ZstdCompressionParameters.from_level(
    1, format=_FORMAT, write_content_size=False, write_checksum=False, write_dict_id=False
)

_local = threading.local()
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


class PlaneCoding(IntEnum):
    """How one plane of one chunk is stored."""

    RAW = 0
    ZSTD = 1


def _workers() -> ThreadPoolExecutor:
    """One pool for the process: zstd and numpy's copies release the GIL."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="fsq-group"
            )
        return _pool


def _coders() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdCompressor]:
    # zstandard's (de)compressors are not thread-safe: one set per thread.
    coders = getattr(_local, "coders", None)
    if coders is None:
        coders = _local.coders = (
            zstandard.ZstdCompressor(compression_params=_LITERAL_PARAMS),
            zstandard.ZstdCompressor(compression_params=_MANTISSA_PARAMS),
        )
    return coders


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor(format=_FORMAT)
    return d


def _chunk_planes(values: np.ndarray, swapped: bool) -> list[np.ndarray]:
    """``values`` (``[n, width]`` uint8, little endian) as planes, most significant first."""
    planes = np.ascontiguousarray(values.T)[::-1]
    if swapped:
        hi, lo = planes[0], planes[1]
        exponent = (hi << 1) | (lo >> 7)
        sign_mantissa = (lo & 0x7F) | (hi & 0x80)
        return [exponent, sign_mantissa, *planes[2:]]
    return list(planes)


def _code_chunk(values: np.ndarray, swapped: bool) -> list[tuple[PlaneCoding, bytes]]:
    literal, mantissa = _coders()
    out = []
    for k, plane in enumerate(_chunk_planes(values, swapped)):
        data = plane.data
        packed = (literal if k == 0 else mantissa).compress(data)
        if len(packed) < (len(data) if k == 0 else _MIN_GAIN * len(data)):
            out.append((PlaneCoding.ZSTD, packed))
        else:
            out.append((PlaneCoding.RAW, plane.tobytes()))
    return out


def encode_grouped(
    bits: torch.Tensor, dtype: torch.dtype, chunk_log2: int = DEFAULT_CHUNK_LOG2
) -> bytes:
    """The grouped body of a tensor's bits (or of its bits XOR its base's).

    Parameters
    ----------
    bits
        The values: a tensor of ``dtype`` or an integer view of the same width (XOR
        deltas; the sign/exponent swap is a bit permutation, so it commutes with XOR).
        Any shape, any device.
    dtype
        The float dtype the bits belong to, in :data:`GROUPED_DTYPES`.
    chunk_log2
        log2 of the values per chunk.
    """
    if not MIN_CHUNK_LOG2 <= chunk_log2 <= MAX_CHUNK_LOG2:
        raise ValueError(f"chunk_log2 must be in {MIN_CHUNK_LOG2}..{MAX_CHUNK_LOG2}")
    if dtype not in GROUPED_DTYPES or bits.element_size() != dtype.itemsize:
        raise ValueError(f"cannot group {bits.dtype} values as {dtype}")
    width = bits.element_size()
    host = bits.detach().to("cpu").contiguous().reshape(-1)
    values = host.view(torch.uint8).numpy().reshape(-1, width)
    swapped = dtype in _SWAPPED
    size = 1 << chunk_log2
    starts = range(0, values.shape[0], size)
    chunks = list(_workers().map(lambda s: _code_chunk(values[s : s + size], swapped), starts))
    table = bytearray([chunk_log2])
    for chunk in chunks:
        for coding, data in chunk:
            table.append(int(coding))
            write_varint(table, len(data))
    return b"".join([bytes(table), *(data for chunk in chunks for _, data in chunk)])


def decode_grouped(body: bytes | memoryview, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """Inverse of :func:`encode_grouped`: ``numel`` values of ``dtype`` (1-D, on the CPU).

    Raises
    ------
    FormatError
        A table that does not match ``numel`` and ``dtype``, a length beyond the body,
        a plane that does not decode to exactly its size, or trailing bytes.
    """
    if dtype not in GROUPED_DTYPES:
        raise FormatError(f"byte-grouped values of a {dtype} tensor")
    width = torch.empty((), dtype=dtype).element_size()
    reader = ByteReader(body)
    chunk_log2 = reader.u8("chunk size")
    if not MIN_CHUNK_LOG2 <= chunk_log2 <= MAX_CHUNK_LOG2:
        raise FormatError(f"chunk of 2^{chunk_log2} values")
    size = 1 << chunk_log2
    chunks = -(-numel // size)
    entries: list[tuple[int, PlaneCoding, memoryview]] = []
    lengths = []
    for _ in range(chunks * width):
        code = reader.u8("plane coding")
        try:
            coding = PlaneCoding(code)
        except ValueError as exc:
            raise FormatError(f"unknown plane coding {code}") from exc
        lengths.append((coding, reader.varint("plane length", len(body))))
    for i, (coding, length) in enumerate(lengths):
        chunk_values = min(size, numel - (i // width) * size)
        if coding is PlaneCoding.RAW and length != chunk_values:
            raise FormatError(f"raw plane of {length} bytes for {chunk_values} values")
        entries.append((chunk_values, coding, reader.take(length, "plane data")))
    if reader.remaining:
        raise FormatError(f"{reader.remaining} bytes after the last plane")
    out = np.empty((numel, width), dtype=np.uint8)
    swapped = dtype in _SWAPPED

    def decode_chunk(c: int) -> None:
        part = entries[c * width : (c + 1) * width]
        _assemble(out[c * size : c * size + size], [(k, d) for _, k, d in part], swapped)

    list(_workers().map(decode_chunk, range(chunks)))
    return torch.from_numpy(out.reshape(-1)).view(dtype)


def _assemble(
    rows: np.ndarray, planes: Sequence[tuple[PlaneCoding, memoryview | bytes]], swapped: bool
) -> None:
    """Decode one chunk's planes into ``rows`` (``[count, width]`` uint8)."""
    count, width = rows.shape
    values = [_plane(coding, memoryview(data), count) for coding, data in planes]
    if swapped:
        exponent, sign_mantissa = values[0], values[1]
        values[0] = (sign_mantissa & 0x80) | (exponent >> 1)
        values[1] = (sign_mantissa & 0x7F) | ((exponent & 1) << 7)
    for k, plane in enumerate(values):
        rows[:, width - 1 - k] = plane


def stream_grouped(
    read: Callable[[int], bytes], length: int, dtype: torch.dtype, numel: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Decode a grouped body of ``length`` bytes chunk by chunk, reading it with ``read``
    (which returns exactly the bytes asked for): yields ``(start, values)``, never
    holding more than one chunk. Same checks as :func:`decode_grouped`."""
    if dtype not in GROUPED_DTYPES:
        raise FormatError(f"byte-grouped values of a {dtype} tensor")
    width = torch.empty((), dtype=dtype).element_size()
    used = 0

    def take(count: int) -> bytes:
        nonlocal used
        if count > length - used:
            raise FormatError(f"grouped body: {count} bytes wanted, {length - used} left")
        used += count
        return read(count)

    def varint() -> int:
        value = 0
        for i in range(10):
            byte = take(1)[0]
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                return value
        raise FormatError("grouped body: varint longer than 10 bytes")

    chunk_log2 = take(1)[0]
    if not MIN_CHUNK_LOG2 <= chunk_log2 <= MAX_CHUNK_LOG2:
        raise FormatError(f"chunk of 2^{chunk_log2} values")
    size = 1 << chunk_log2
    chunks = -(-numel // size)
    table: list[tuple[PlaneCoding, int]] = []
    for i in range(chunks * width):
        code = take(1)[0]
        try:
            coding = PlaneCoding(code)
        except ValueError as exc:
            raise FormatError(f"unknown plane coding {code}") from exc
        plane_length = varint()
        count = min(size, numel - (i // width) * size)
        if coding is PlaneCoding.RAW and plane_length != count:
            raise FormatError(f"raw plane of {plane_length} bytes for {count} values")
        table.append((coding, plane_length))
    swapped = dtype in _SWAPPED
    for c in range(chunks):
        count = min(size, numel - c * size)
        planes = [(k, take(n)) for k, n in table[c * width : (c + 1) * width]]
        rows = np.empty((count, width), dtype=np.uint8)
        _assemble(rows, planes, swapped)
        yield c * size, torch.from_numpy(rows.reshape(-1)).view(dtype)
    if used != length:
        raise FormatError(f"{length - used} bytes after the last plane")


def _plane(coding: PlaneCoding, data: memoryview, count: int) -> np.ndarray:
    """One plane of ``count`` bytes; a zstd frame may not decode to more (bombs)."""
    if coding is PlaneCoding.RAW:
        return np.frombuffer(data, dtype=np.uint8)
    try:
        # A frame stating its content size gets a buffer of that size whatever
        # max_output_size says: refuse a wrong one first.
        declared = zstandard.get_frame_parameters(data, format=_FORMAT).content_size
        if declared not in (zstandard.CONTENTSIZE_UNKNOWN, count):
            raise FormatError(f"zstd plane declares {declared} bytes, expected {count}")
        raw = _decompressor().decompress(data, max_output_size=count, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise FormatError(f"corrupt zstd plane: {exc}") from exc
    if len(raw) != count:
        raise FormatError(f"zstd plane decoded to {len(raw)} bytes, expected {count}")
    return np.frombuffer(raw, dtype=np.uint8)


__all__ = [
    "DEFAULT_CHUNK_LOG2",
    "GROUPED_DTYPES",
    "PlaneCoding",
    "decode_grouped",
    "encode_grouped",
    "stream_grouped",
]
