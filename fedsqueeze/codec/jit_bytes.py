"""Compiled kernels (numba) of the lossless coder's byte planes: splitting words into
planes and joining them back, and the exponent buckets of format version 10
(:mod:`fedsqueeze.codec.grouping`, :mod:`fedsqueeze.codec.plane_buckets`).

Plain Python until :func:`fedsqueeze.codec.jit.ready` compiles them in this module (the
rules and the reasons are in :mod:`fedsqueeze.codec.jit`): callers ask
:func:`~fedsqueeze.codec.jit.use` first.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "KERNELS",
    "bucket_gather",
    "bucket_histogram",
    "bucket_scatter",
    "byte_counts",
    "join_planes2",
    "join_planes4",
    "split_plane",
    "warm",
]

U8 = npt.NDArray[np.uint8]
U16 = npt.NDArray[np.uint16]
I64 = npt.NDArray[np.int64]
Words = npt.NDArray[np.unsignedinteger]

# Every loop runs over a slice from index 0 (see fedsqueeze.codec.jit).


def split_plane(
    words: Words, base: Words, xor: bool, s1: int, m1: int, s2: int, m2: int, out: U8
) -> None:
    """``out[i] = ((v >> s1) & m1) | ((v >> s2) & m2)`` of ``v = words[i]`` (XOR
    ``base[i]`` when ``xor``): one byte plane of the words
    (:mod:`fedsqueeze.codec.planes`; ``m2 = 0`` for a plain byte)."""
    if xor:
        for i in range(out.size):
            v = words[i] ^ base[i]
            out[i] = ((v >> s1) & m1) | ((v >> s2) & m2)
    else:
        for i in range(out.size):
            v = words[i]
            out[i] = ((v >> s1) & m1) | ((v >> s2) & m2)


def join_planes2(p0: U8, p1: U8, swapped: bool, out: Words) -> None:
    """16-bit words from their two planes (:func:`fedsqueeze.codec.planes.join_planes`):
    plane 0 the exponent byte (below the sign when ``swapped``), plane 1 the next."""
    if swapped:
        for i in range(out.size):
            a = np.uint16(p0[i])
            b = np.uint16(p1[i])
            out[i] = (a << 7) | ((b & 0x80) << 8) | (b & 0x7F)
    else:
        for i in range(out.size):
            out[i] = (np.uint16(p0[i]) << 8) | np.uint16(p1[i])


def join_planes4(p0: U8, p1: U8, p2: U8, p3: U8, swapped: bool, out: Words) -> None:
    """32-bit words from their four planes (as :func:`join_planes2`)."""
    if swapped:
        for i in range(out.size):
            a = np.uint32(p0[i])
            b = np.uint32(p1[i])
            out[i] = (
                (a << 23)
                | ((b & 0x80) << 24)
                | ((b & 0x7F) << 16)
                | (np.uint32(p2[i]) << 8)
                | np.uint32(p3[i])
            )
    else:
        for i in range(out.size):
            out[i] = (
                (np.uint32(p0[i]) << 24)
                | (np.uint32(p1[i]) << 16)
                | (np.uint32(p2[i]) << 8)
                | np.uint32(p3[i])
            )


def byte_counts(data: U8, counts: I64) -> None:
    """``counts[v]``: how many bytes of ``data`` are ``v`` (``counts`` zeroed first).

    Four tables, one per byte of every four: an exponent plane repeats a few values, and
    with one table each increment waits for the previous one to the same count (measured
    on all-MiniLM-L6-v2's exponent planes: 1.9x slower)."""
    c0 = np.zeros(256, dtype=np.uint32)
    c1 = np.zeros(256, dtype=np.uint32)
    c2 = np.zeros(256, dtype=np.uint32)
    c3 = np.zeros(256, dtype=np.uint32)
    n = data.size
    body = n - n % 4
    for i in range(0, body, 4):
        c0[data[i]] += 1
        c1[data[i + 1]] += 1
        c2[data[i + 2]] += 1
        c3[data[i + 3]] += 1
    for i in range(body, n):
        c0[data[i]] += 1
    for v in range(256):
        counts[v] = np.int64(c0[v]) + np.int64(c1[v]) + np.int64(c2[v]) + np.int64(c3[v])


def bucket_histogram(exponents: U8, ranks: U16, plane: U8, hist: I64) -> None:
    """``hist[b, v]``: how many bytes ``v`` of ``plane`` fall in bucket ``b`` (the bucket
    of byte ``i`` is ``ranks[exponents[i]]``); ``hist`` is zeroed first."""
    hist[:] = 0
    for i in range(plane.size):
        hist[ranks[exponents[i]], plane[i]] += 1


def bucket_gather(exponents: U8, ranks: U16, plane: U8, starts: I64, out: U8) -> None:
    """``out``: the bytes of ``plane`` grouped by bucket (the bucket of byte ``i`` is
    ``ranks[exponents[i]]``; bucket ``b`` from ``starts[b]``), in index order within a
    bucket: a stable counting sort (:mod:`fedsqueeze.codec.grouping`'s exponent
    buckets). A copy of ``starts`` is the write cursor (a fresh array: LLVM then knows
    ``out`` writes cannot change it, 2.5x faster than updating ``starts`` in place)."""
    pos = starts.copy()
    for i in range(plane.size):
        b = ranks[exponents[i]]
        j = pos[b]
        out[j] = plane[i]
        pos[b] = j + 1


def bucket_scatter(exponents: U8, ranks: U16, grouped: U8, starts: I64, out: U8) -> None:
    """Inverse of :func:`bucket_gather`: ``out[i]`` is the next byte of bucket
    ``ranks[exponents[i]]`` in ``grouped`` (``starts`` copied, as there)."""
    pos = starts.copy()
    for i in range(out.size):
        b = ranks[exponents[i]]
        j = pos[b]
        out[i] = grouped[j]
        pos[b] = j + 1


def warm() -> None:
    """Each kernel called once on tiny inputs of the types its callers pass (compiled by
    then: :func:`fedsqueeze.codec.jit.warm` calls this)."""
    u = np.zeros(8, dtype=np.uint8)
    for uint in (np.uint16, np.uint32, np.uint64):
        words = np.zeros(8, dtype=uint)
        split_plane(words, words, False, 8, 0xFF, 0, 0, u)
        split_plane(words, words, True, 8, 0xFF, 0, 0, u)
    join_planes2(u, u, True, np.zeros(8, dtype=np.uint16))
    join_planes4(u, u, u, u, True, np.zeros(8, dtype=np.uint32))
    byte_counts(u, np.zeros(256, dtype=np.int64))
    ranks = np.zeros(256, dtype=np.uint16)
    bucket_histogram(u, ranks, u, np.zeros((1, 256), dtype=np.int64))
    bucket_gather(u, ranks, u, np.zeros(1, dtype=np.int64), u.copy())
    bucket_scatter(u, ranks, u, np.zeros(1, dtype=np.int64), u.copy())


#: The kernels, helpers before the kernels that call them.
KERNELS = (
    "split_plane",
    "join_planes2",
    "join_planes4",
    "byte_counts",
    "bucket_histogram",
    "bucket_gather",
    "bucket_scatter",
)
