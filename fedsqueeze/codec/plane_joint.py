"""An fp32 or bf16 chunk's exponent coded jointly with its top mantissa bits (format
version 12).

The byte after the exponent (the sign and the 7 highest mantissa bits) is close to
random on its own, but its top bits depend on the exponent: within a binade near the
largest magnitudes a trained weight's density falls, so the leading mantissa bits lean
low, and the lean differs from one binade to the next. Version 10 codes that byte in
buckets by exponent (:mod:`fedsqueeze.codec.plane_buckets`); that needs a stable sort of
the plane on encode and its inverse on decode, plus a second Huffman plane, and on
all-MiniLM-L6-v2 in bf16 it tripled the decode's CPU time (99 ms against 34 on one core)
for 0.4% of the bytes.

Here the two planes become two others, with no sort:

- the *joint* plane: a byte per value, ``slot << k | top``, where ``top`` is the value's
  ``k`` highest mantissa bits and ``slot`` its exponent's place in the chunk's range
  (``0`` for a zero exponent, ``e − lo + 1`` for the others); it is Huffman-coded (a
  literal-only zstd frame), as the exponent plane was. Its code lengths now follow the
  exponent and the top bits together: the dependence the buckets caught.
- the *rest*: the sign and the ``7 − k`` mantissa bits below ``top``, ``8 − k`` bits a
  value, stored as they are. The first ``8·m`` values (``m = ⌊count/8⌋``) form eight
  segments of ``m``: segment ``j < 8 − k`` keeps its fields in the low bits of its own
  ``m`` bytes, and bit ``j`` of segment ``8 − k + s``'s fields goes to bit ``8 − k + s``
  of segment ``j``'s bytes; the last ``count mod 8`` fields take a byte each. Packing
  and unpacking are then byte loops over contiguous segments, which vectorize.

It applies when every nonzero exponent of the chunk lies in ``lo .. lo + 2^(8−k) − 2``
(a trained model's span is a few dozen binades). The encoder finds the span and
counts a sample of the chunk in one pass over its words (about 64K values: exponent
and top three mantissa bits, and the next plane's bytes; :func:`plan_words`),
estimates each ``k`` that fits (1 to 3) by the entropy of its joint plane plus the
rest's raw bits, and codes jointly with the best one when that saves :data:`GAIN` of
the two planes against the two coded apart (each at its own entropy: a pruned model's
many zeros make the next plane compressible, and the rest is stored raw); elsewhere
the chunk is coded as before (buckets where they pay). XOR deltas never take it: their
planes are mostly zero bytes, which zstd codes better apart.

On all-MiniLM-L6-v2 in bf16 (a side script, zstd's Huffman on every chunk): joint with
``k = 2`` 10.575 bits a value, ``k = 1`` 10.591, the exponent plane coded alone and the
next raw 10.642, in buckets 10.60; ZipNN 0.5.4 codes the same weights at 10.641. Decoding
costs the joint plane's Huffman decode (as the exponent plane's) and one compiled pass
that writes the words (:func:`fedsqueeze.codec.jit_bytes.joint_words`), where buckets
cost a second Huffman plane, a count of the exponents and a scatter (BENCHMARKS.md,
"Lossless float coding").

Layout (the chunk's two table entries of :mod:`fedsqueeze.codec.grouping`, both with
coding 3)::

    plane 0 = k u8 · lo u8 · coding u8 · joint plane (raw: count bytes; 1: a zstd frame)
    plane 1 = the rest, ⌊count / 8⌋ · (8 − k) + count mod 8 bytes

A decoder accepts ``1 <= k <= 3`` and ``1 <= lo <= 257 − 2^(8−k)``, so every joint byte
decodes to an exponent byte; every other check is a length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from fedsqueeze.codec import jit, jit_bytes
from fedsqueeze.codec.bytesio import ByteReader
from fedsqueeze.codec.chunks import np_scratch
from fedsqueeze.codec.plane_buckets import PartDecoder
from fedsqueeze.codec.planes import PlaneLayout, Words, join_planes
from fedsqueeze.errors import FormatError

__all__ = [
    "GAIN",
    "MAX_K",
    "Joint",
    "decode",
    "encode",
    "encode_words",
    "into_words",
    "plan",
    "plan_words",
    "rest_length",
]

#: The most mantissa bits coded with the exponent.
MAX_K = 3
#: Coded jointly when the estimate saves this share of the two planes' raw bytes.
GAIN = 0.002
#: About how many values the estimate counts (every ``n // SAMPLE``-th of a chunk's ``n``):
#: the entropies of 64K values are within a few thousandths of a bit of the chunk's.
SAMPLE = 1 << 16
_RAW, _ZSTD = 0, 1

Plane = npt.NDArray[np.uint8]
Counts = npt.NDArray[np.int64]


class Joint(NamedTuple):
    """How a chunk's planes 0 and 1 are coded jointly (:func:`plan`)."""

    #: Mantissa bits coded with the exponent.
    k: int
    #: The smallest nonzero exponent byte (slot 1).
    lo: int


def rest_length(count: int, k: int) -> int:
    """Bytes of the rest of ``count`` values: ``8 − k`` bits for each of the first
    ``8·⌊count/8⌋`` values, a byte for each of the last few."""
    return count // 8 * (8 - k) + count % 8


def _fits(lo: int, hi: int, k: int) -> bool:
    return hi - lo + 1 <= (1 << (8 - k)) - 1


def plan(exponents: Plane, plane: Plane) -> Joint | None:
    """The joint coding of a chunk's exponent plane and the next one when it should pay
    (see the module's text), else ``None`` (NumPy; :func:`plan_words` plans from the
    words with the compiled kernels)."""
    n = plane.size
    hi = int(exponents.max())
    lo = int(np.subtract(exponents, 1, dtype=np.uint8).min()) + 1  # a zero wraps to 255
    hist = np.zeros((256, 8), dtype=np.int64)
    step = max(1, n // SAMPLE)
    np.add.at(hist, (exponents[::step], (plane[::step] >> 4) & 7), 1)
    seconds = np.bincount(plane[::step], minlength=256).astype(np.int64)
    return _choose(n, hi, lo, hist, seconds)


def plan_words(words: Words) -> tuple[Joint | None, int]:
    """:func:`plan` from a chunk's fp32 (32-bit) or bf16 (16-bit) words, in one compiled
    pass over them (:func:`fedsqueeze.codec.jit_bytes.joint_stats`: callers ask
    :func:`fedsqueeze.codec.jit.use` first), and the chunk's largest exponent byte
    (255: a NaN or an Inf among the values)."""
    n = words.shape[0]
    span = np.empty(2, dtype=np.int64)
    hist = np.empty((256, 8), dtype=np.int64)
    seconds = np.empty(256, dtype=np.int64)
    jit_bytes.joint_stats(words, max(1, n // SAMPLE), span, hist, seconds)
    hi = int(span[0])
    return _choose(n, hi, int(span[1]) + 1, hist, seconds), hi


def _choose(n: int, hi: int, lo: int, hist: Counts, seconds: Counts) -> Joint | None:
    """The plan of a chunk of ``n`` values from its exponents' span (``lo``: the smallest
    nonzero one, 256 for none) and the sampled counts (``hist``: by exponent and top
    three mantissa bits; ``seconds``: the next plane's bytes)."""
    if hi == 0:
        lo = hi = 1  # every exponent zero: any k fits
    ks = [k for k in range(1, MAX_K + 1) if _fits(lo, hi, k)]
    sampled = int(seconds.sum())
    if not ks or sampled == 0:
        return None
    # An ideal code of counts c takes N·log2 N − Σ c·log2 c bits: of the rows that hold
    # values (a zero exponent, and lo..hi) grouped by exponent alone and with k = 1, 2,
    # 3 top bits, and of the next plane's bytes.
    bits = np.zeros(MAX_K + 2, dtype=np.float64)
    if jit.use(n):
        jit_bytes.joint_bits(hist, seconds, lo, hi, ks[-1], bits)
    else:
        rows = np.concatenate([hist[:1], hist[lo : hi + 1]])
        r = rows.shape[0]
        parts = [rows.sum(axis=1)] + [
            rows.reshape(r, 1 << k, 8 >> k).sum(axis=2).ravel() for k in ks
        ]
        counts = np.concatenate([*parts, seconds]).astype(np.float64)
        terms = counts * np.log2(np.maximum(counts, 1.0))
        starts = np.cumsum([0] + [len(p) for p in parts])
        found = sampled * np.log2(sampled) - np.add.reduceat(terms, starts)
        bits[: len(ks) + 1] = found[:-1]
        bits[-1] = found[-1]
    scale = n / sampled
    # The planes coded apart: the exponents' entropy, and the next plane's where that is
    # below 8 bits a value (many zeros: a pruned model), as a Huffman code would get it.
    plain = (bits[0] + min(8.0 * sampled, bits[-1])) * scale
    joint = [bits[k] * scale + (8 - k) * n for k in ks]
    best = int(np.argmin(joint))
    if plain - joint[best] < GAIN * 16 * n:
        return None
    return Joint(ks[best], lo)


def encode(
    exponents: Plane, plane: Plane, joint: Joint, compress: Callable[[memoryview], bytes]
) -> tuple[list[bytes | memoryview], memoryview]:
    """The chunk's two planes coded jointly: plane 0's pieces (its header, then the joint
    plane, ``compress``-ed when smaller) and plane 1's bytes (the rest, in an array of
    its own). NumPy; :func:`encode_words` codes from the words with a compiled kernel."""
    n = plane.size
    coded = np_scratch("joint_out", n, np.uint8, 1 << 20)
    rest = np.empty(rest_length(n, joint.k), dtype=np.uint8)
    _split(exponents, plane, joint.lo, joint.k, coded, rest)
    return _coded(coded, joint, compress), rest.data


def encode_words(
    words: Words, joint: Joint, compress: Callable[[memoryview], bytes], p2: Plane, p3: Plane
) -> tuple[list[bytes | memoryview], memoryview]:
    """:func:`encode` from a chunk's words in one compiled pass (after
    :func:`plan_words`), which also writes planes 2 and 3 of fp32 words into ``p2`` and
    ``p3`` (unused for bf16)."""
    n = words.shape[0]
    coded = np_scratch("joint_out", n, np.uint8, 1 << 20)
    rest = np.empty(rest_length(n, joint.k), dtype=np.uint8)
    jit_bytes.joint_split(words, _prm(joint.lo), joint.k, coded, rest, p2, p3)
    return _coded(coded, joint, compress), rest.data


def _coded(
    coded: Plane, joint: Joint, compress: Callable[[memoryview], bytes]
) -> list[bytes | memoryview]:
    """Plane 0's pieces: the header, and the joint plane compressed when smaller (else a
    copy: ``coded`` is this thread's scratch)."""
    packed = compress(coded.data)
    coding, kept = (_ZSTD, packed) if len(packed) < coded.size else (_RAW, bytes(coded.data))
    return [bytes([joint.k, joint.lo, coding]), kept]


def _prm(lo: int) -> npt.NDArray[np.uint16]:
    """The kernels' parameter array: the lowest nonzero exponent minus one."""
    return np.array([lo - 1], dtype=np.uint16)


def decode(
    head: memoryview, rest: memoryview, count: int, decode_part: PartDecoder
) -> tuple[Joint, Plane, Plane]:
    """A chunk's joint coding read back: its parameters, the joint plane (``count``
    bytes) and the rest (:func:`into_words` makes the words).

    Raises
    ------
    FormatError
        ``k`` or ``lo`` out of range, an unknown coding, a joint plane that is not
        ``count`` bytes, or a rest of the wrong length.
    """
    reader = ByteReader(head)
    k = reader.u8("joint bits")
    lo = reader.u8("joint lowest exponent")
    coding = reader.u8("joint coding")
    if not 1 <= k <= MAX_K or not 1 <= lo <= 257 - (1 << (8 - k)):
        raise FormatError(f"joint planes of {k} bits from exponent {lo}")
    if coding not in (_RAW, _ZSTD):
        raise FormatError(f"joint plane coded {coding}")
    data = reader.take(reader.remaining, "joint plane")
    if coding == _RAW and len(data) != count:
        raise FormatError(f"raw joint plane of {len(data)} bytes for {count} values")
    if len(rest) != rest_length(count, k):
        raise FormatError(f"{len(rest)} bytes of rest for {count} values of {k} joint bits")
    coded = decode_part(coding, data, count)
    return Joint(k, lo), coded, np.frombuffer(rest, dtype=np.uint8)


def into_words(joint: Joint, coded: Plane, rest: Plane, lower: list[Plane], out: Words) -> None:
    """The words of a chunk (``out``: 16-bit words of bf16, or 32-bit ones of fp32 with
    their two ``lower`` planes) from its joint plane and rest: one compiled pass, or
    planes 0 and 1 remade in NumPy and joined."""
    k, lo = joint
    n = out.shape[0]
    wide = out.dtype.itemsize == 4
    if jit.use(n):
        low2, low3 = lower if wide else (coded[:0], coded[:0])
        jit_bytes.joint_words(coded, rest, low2, low3, _prm(lo), k, out)
        return
    exponents = np.empty(n, dtype=np.uint8)
    plane = np.empty(n, dtype=np.uint8)
    _merge(coded, rest, lo, k, exponents, plane)
    join_planes([exponents, plane, *lower], PlaneLayout(out.dtype.itemsize, True), out)


def _fields(plane: Plane, k: int) -> Plane:
    """Each value's rest field: its sign above its ``7 − k`` lowest mantissa bits."""
    low = 7 - k
    return (((plane >> 7) << low) | (plane & ((1 << low) - 1))).astype(np.uint8)


def _split(exponents: Plane, plane: Plane, lo: int, k: int, coded: Plane, rest: Plane) -> None:
    """:func:`fedsqueeze.codec.jit_bytes.joint_split` in NumPy, from planes 0 and 1."""
    e = exponents.astype(np.int64)
    slot = np.where(e == 0, 0, e - lo + 1)
    coded[:] = (slot << k) | ((plane.astype(np.int64) & 0x7F) >> (7 - k))
    n, w = plane.size, 8 - k
    m = n // 8
    r = _fields(plane, k)
    segments = r[: 8 * m].reshape(8, m)
    hosts = segments[:w].copy()
    for s in range(k):
        for j in range(w):
            hosts[j] |= ((segments[w + s] >> j) & 1) << (w + s)
    rest[: w * m] = hosts.reshape(-1)
    rest[w * m :] = r[8 * m :]


def _merge(coded: Plane, rest: Plane, lo: int, k: int, exponents: Plane, plane: Plane) -> None:
    """:func:`fedsqueeze.codec.jit_bytes.joint_words` in NumPy, as planes 0 and 1."""
    n, w, low = plane.size, 8 - k, 7 - k
    m = n // 8
    hosts = rest[: w * m].reshape(w, m)
    r = np.empty(n, dtype=np.uint8)
    r[: w * m] = (hosts & ((1 << w) - 1)).reshape(-1)
    for s in range(k):
        spill = np.zeros(m, dtype=np.uint8)
        for j in range(w):
            spill |= ((hosts[j] >> (w + s)) & 1) << j
        r[(w + s) * m : (w + s + 1) * m] = spill
    r[8 * m :] = rest[w * m :]
    c = coded.astype(np.int64)
    slot = c >> k
    exponents[:] = np.where(slot == 0, 0, slot + lo - 1)
    r64 = r.astype(np.int64)
    plane[:] = ((r64 >> low) << 7) | ((c & ((1 << k) - 1)) << low) | (r64 & ((1 << low) - 1))
