"""A byte plane coded in buckets by its values' exponents (format version 10).

The byte after the exponent of an fp32 or bf16 value (its sign and 7 highest mantissa
bits) is not independent of the exponent: within a binade near the largest magnitudes a
trained weight's density falls, so the mantissa's leading bits lean low, and the lean
differs from one exponent to the next. One Huffman table for the whole plane cannot see
that, and on all-MiniLM-L6-v2 the plane is stored raw (not 1% to gain). Coded in
buckets, the plane's bytes are grouped by their value's exponent (a stable counting
sort): every exponent value with at least ``2^min log2`` values in the chunk gets a
bucket of its own, in increasing order, and the others share one last bucket; each
bucket is stored raw or as its own literal-only frame. The decoder holds the chunk's
exponent plane before this one, so the buckets' sizes and membership cost nothing to
send. On all-MiniLM-L6-v2 this is 127 kB (0.56%) off the bf16 model and 128 kB off the
fp32 one.

Layout (integers are LEB128 varints)::

    buckets = min log2 u8 · (coding u8 · length)^buckets · bucket data*

with coding 0 (raw: ``length`` is the bucket's size) or 1 (a magicless zstd frame that
decodes to exactly the bucket's size).

:func:`plan` decides without coding the plane twice: it codes in buckets when the
bytes' empirical entropy given their bucket (counted on every 4th value) is at least
:data:`GAIN` of the plane below the plane's own, after :data:`TABLE` bytes a bucket (a
literal-only frame codes close to the entropy: one Huffman table a block). Decoding a
plane in buckets costs its Huffman decode and a scatter where a raw plane is a view: on
MiniLM in bf16 about twice the CPU time (BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from fedsqueeze.codec import jit, jit_bytes
from fedsqueeze.codec.bytesio import ByteReader, write_varint
from fedsqueeze.codec.chunks import np_scratch
from fedsqueeze.errors import FormatError

__all__ = ["GAIN", "MIN_LOG2", "STRIDE", "TABLE", "decode", "encode", "entropy_bits", "plan"]

#: Values an exponent needs in a chunk for its own bucket (as log2), as written.
MIN_LOG2 = 12
#: Largest ``min log2`` a decoder accepts (a chunk's largest size).
MAX_LOG2 = 26
#: A plane is coded in buckets when its conditional entropy saves this share of it...
GAIN = 0.002
#: ... after this many bytes a bucket (a Huffman table and a frame header)...
TABLE = 64
#: ... as estimated from every this-many-th value of the chunk.
STRIDE = 4
_RAW, _ZSTD = 0, 1

Plane = npt.NDArray[np.uint8]
Ranks = npt.NDArray[np.uint16]


class Buckets(NamedTuple):
    """A chunk's buckets (:func:`buckets`)."""

    #: Each exponent value's bucket.
    ranks: Ranks
    #: Every bucket's size.
    sizes: list[int]
    #: ``[4, buckets]``: where each quarter of the chunk starts in every bucket.
    cursors: npt.NDArray[np.int64]


#: ``decode_part(coding, data, size)``: a raw or zstd bucket of ``size`` bytes.
PartDecoder = Callable[[int, memoryview, int], Plane]


def buckets(exponents: Plane, min_log2: int) -> Buckets:
    """Each exponent value's bucket and every bucket's size: the exponent values with at
    least ``2^min_log2`` values, in increasing order, then one bucket for the rest (if
    any); and each quarter's first place in every bucket (the compiled kernels' cursors:
    :func:`fedsqueeze.codec.jit_bytes.bucket_gather`)."""
    n = exponents.size
    quarter = n // 4
    counts4 = np.empty((4, 256), dtype=np.int64)
    if jit.use(n):
        jit_bytes.byte_counts(exponents, counts4)
    else:
        edges = (0, quarter, 2 * quarter, 3 * quarter, n)
        for q in range(4):
            counts4[q] = np.bincount(exponents[edges[q] : edges[q + 1]], minlength=256)
    counts = counts4.sum(axis=0)
    big = counts >= (1 << min_log2)
    count = int(big.sum())
    ranks = np.full(256, count, dtype=np.uint16)
    ranks[big] = np.arange(count, dtype=np.uint16)
    sizes = [int(c) for c in counts[big]]
    rest = int(counts[~big].sum())
    if rest:
        sizes.append(rest)
    # per[q, b]: quarter q's bytes in bucket b; each quarter's run follows the earlier ones'.
    per = counts4 @ (ranks[:, None] == np.arange(len(sizes))).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    cursors = starts + np.cumsum(per, axis=0) - per
    return Buckets(ranks, sizes, np.ascontiguousarray(cursors))


def plan(exponents: Plane, plane: Plane) -> Buckets | None:
    """The buckets of ``plane`` when coding it in buckets should pay, else ``None`` (see
    the module's text)."""
    found = buckets(exponents, MIN_LOG2)
    ranks, sizes = found.ranks, found.sizes
    if len(sizes) < 2:
        return None
    # Every 4th value: the entropies of a quarter of a chunk (>= 16K values) are within
    # a few hundredths of a percent of the whole's, at a quarter of the pass.
    hist = np.zeros((len(sizes), 256), dtype=np.int64)
    if jit.use(plane.size):
        jit_bytes.bucket_histogram(exponents, ranks, plane, STRIDE, hist)
    else:
        np.add.at(hist, (ranks[exponents[::STRIDE]], plane[::STRIDE]), 1)
    sampled = -(-plane.size // STRIDE)
    bits = entropy_bits(hist.sum(axis=0)) - sum(entropy_bits(h) for h in hist)
    saved = bits / 8 * plane.size / sampled
    if saved - TABLE * len(sizes) < GAIN * plane.size:
        return None
    return found


def encode(
    exponents: Plane,
    plane: Plane,
    compress: Callable[[memoryview], bytes],
    min_gain: float,
    found: Buckets,
) -> list[bytes | memoryview]:
    """``plane`` coded in the buckets of :func:`plan`: each bucket ``compress``-ed when
    that is below ``min_gain`` of its size, else raw. The coding is the pieces' bytes one
    after the other (left in pieces: the caller copies them once, into its body)."""
    ranks, sizes = found.ranks, found.sizes
    grouped = np_scratch("bucketed", plane.size, np.uint8, 1 << 20)
    if jit.use(plane.size):
        jit_bytes.bucket_gather(exponents, ranks, plane, found.cursors, grouped)
    else:
        grouped[:] = plane[np.argsort(ranks[exponents], kind="stable")]
    head = bytearray([MIN_LOG2])
    parts: list[bytes | memoryview] = []
    at = 0
    for size in sizes:
        data = grouped[at : at + size].data
        at += size
        packed = compress(data)
        # A raw bucket is copied: ``grouped`` is this thread's scratch, reused by its next
        # chunk before the caller copies the pieces.
        coding, kept = (_ZSTD, packed) if len(packed) < min_gain * size else (_RAW, bytes(data))
        head.append(coding)
        write_varint(head, len(kept))
        parts.append(kept)
    return [bytes(head), *parts]


def decode(data: memoryview, count: int, exponents: Plane, decode_part: PartDecoder) -> Plane:
    """The plane of a chunk of ``count`` values from its buckets, given the chunk's
    exponent plane; every bucket decodes to exactly its size (``decode_part`` checks a
    frame), and nothing may follow the last. The plane is a per-thread scratch buffer
    (fresh pages for two planes a chunk cost more than the scatter): valid until this
    thread's next call, which is after the caller has joined it into its words.

    Raises
    ------
    FormatError
        A bucket size beyond a chunk's, an unknown coding, a raw bucket of the wrong
        length, a bucket beyond the data, or trailing bytes.
    """
    reader = ByteReader(data)
    min_log2 = reader.u8("bucket size")
    if min_log2 > MAX_LOG2:
        raise FormatError(f"buckets of 2^{min_log2} values")
    ranks, sizes, cursors = buckets(exponents, min_log2)
    entries = []
    for size in sizes:
        coding = reader.u8("bucket coding")
        length = reader.varint("bucket length", len(data))
        if coding not in (_RAW, _ZSTD) or (coding == _RAW and length != size):
            raise FormatError(f"a bucket of {size} values coded {coding} in {length} bytes")
        entries.append((coding, length, size))
    grouped = np_scratch("buckets_in", count, np.uint8, 1 << 20)
    at = 0
    for coding, length, size in entries:
        grouped[at : at + size] = decode_part(coding, reader.take(length, "bucket data"), size)
        at += size
    if reader.remaining:
        raise FormatError(f"{reader.remaining} bytes after the last bucket")
    out = np_scratch("buckets_out", count, np.uint8, 1 << 20)
    if jit.use(count):
        jit_bytes.bucket_scatter(exponents, ranks, grouped, cursors, out)
    else:
        out[np.argsort(ranks[exponents], kind="stable")] = grouped
    return out


def entropy_bits(counts: npt.NDArray[np.int64]) -> float:
    """Bits of an ideal code of bytes with these counts (their empirical entropy)."""
    c = counts[counts > 0].astype(np.float64)
    return float(-(c * np.log2(c / c.sum())).sum())
