"""Rice-coded positions of a large index list, encoded in chunks on every core.

:func:`~fedsqueeze.codec.positions.encode_positions` computes the gaps of the kept
indices as a tensor, walks the Rice parameter ``k`` with a pass over all gaps per step,
and builds the unary stream as one byte per bit before packing it: on 2.5M kept
positions of a 25M-value tensor (90% pruning) that was ~140 ms of CPU, twice the
``clone()`` of the whole tensor, and it ran after the selection, on the encode's
critical path. This module computes the same payload, byte for byte, in two passes over
chunks of :data:`CHUNK` indices whose temporaries stay in cache:

1. each chunk's gaps (recomputed from the indices, never stored whole) are checked
   (strictly increasing) and reduced to ``sum(g >> k)`` for a window of ``k`` around
   the start of the walk. ``sum(g)`` telescopes to ``last − (count − 1)``, so the start
   (``log2`` of the mean gap) is known before any pass; a ``k`` the walk reaches outside
   the window costs one more pass (it never did on the inputs measured);
2. each chunk writes its remainders (``k`` bits a gap; chunks hold a multiple of 8
   gaps, so they start on a byte) and its unary bits, which start at the bit the
   earlier chunks' sums give; the bytes a chunk shares with its neighbours are merged
   afterwards on the calling thread.

The walk over ``k`` is :func:`~fedsqueeze.codec.positions._best_rice_k`'s own, given
the sums; the tests compare every payload with the reference path's.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedsqueeze.codec import jit, jit_select
from fedsqueeze.codec.chunks import np_scratch, run_chunks

__all__ = ["CHUNK", "encode_rice", "rice_sums"]

#: Gaps per chunk (a multiple of 8: remainders of every chunk start on a byte).
CHUNK = 1 << 16

I64 = npt.NDArray[np.int64]


def _gaps(idx: I64, start: int, stop: int) -> I64:
    """The gaps of ``idx[start:stop]`` into scratch: ``g_j = i_j − i_{j−1} − 1``, ``g_0 =
    i_0``."""
    g = np_scratch("rice_gaps", stop - start, np.int64, CHUNK)
    if start == 0:
        g[0] = idx[0]
        np.subtract(idx[1:stop], idx[: stop - 1], out=g[1:])
        np.subtract(g[1:], 1, out=g[1:])
    else:
        np.subtract(idx[start:stop], idx[start - 1 : stop - 1], out=g)
        np.subtract(g, 1, out=g)
    return g


def rice_sums(idx: I64, ks: range) -> tuple[npt.NDArray[np.int64], bool]:
    """Per chunk, ``sum(g >> k)`` for each ``k`` of ``ks`` (int64 ``[chunks, len(ks)]``),
    and whether every gap is ``>= 0`` (the indices strictly increasing, the first >= 0)."""
    count = idx.size
    bounds = [(a, min(a + CHUNK, count)) for a in range(0, count, CHUNK)]
    sums = np.zeros((len(bounds), len(ks)), dtype=np.int64)
    ok = np.ones(len(bounds), dtype=np.bool_)

    compiled = jit.use(count)

    def chunk(start: int, stop: int) -> None:
        i = start // CHUNK
        if compiled:  # the gaps, their check and every k's sum in one compiled pass
            ok[i] = jit_select.rice_sums(idx, start, stop, ks.start, sums[i])
            return
        g = _gaps(idx, start, stop)
        if g.min() < 0:
            ok[i] = False
            return
        t = np_scratch("rice_shifted", stop - start, np.int64, CHUNK)
        np.right_shift(g, ks.start, out=t)
        for j in range(len(ks)):
            if j:
                np.right_shift(t, 1, out=t)
            total = int(t.sum())
            sums[i, j] = total
            if total == 0:
                break  # and every larger k sums to 0 as well

    run_chunks(chunk, bounds)
    return sums, bool(ok.all())


def encode_rice(idx: I64, k: int, chunk_sums: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    """The Rice payload of the gaps of ``idx`` with parameter ``k``: remainders then the
    unary stream, as :func:`~fedsqueeze.codec.positions._encode_rice` writes it.
    ``chunk_sums`` is each chunk's ``sum(g >> k)`` (int64 ``[chunks]``)."""
    count = idx.size
    bounds = [(a, min(a + CHUNK, count)) for a in range(0, count, CHUNK)]
    rem_size = (count * k + 7) // 8
    unary_len = chunk_sums + np.array([b - a for a, b in bounds], dtype=np.int64)
    unary_start = np.concatenate([[0], np.cumsum(unary_len)[:-1]]).astype(np.int64)
    unary_bits = int(unary_len.sum())
    out = np.empty(rem_size + (unary_bits + 7) // 8, dtype=np.uint8)
    rem = out[:rem_size]
    unary = out[rem_size:]
    edges: list[list[tuple[int, int]]] = [[] for _ in bounds]

    # (up to 31 bits pending plus k low bits stay below the int64 sign bit)
    compiled = k <= 24 and jit.use(count)

    def chunk(start: int, stop: int) -> None:
        i = start // CHUNK
        bit0 = int(unary_start[i])
        if compiled:  # both streams of the chunk in one compiled pass each
            total = bit0 % 8 + int(unary_len[i])
            packed = np_scratch("rice_packed", -(-total // 8), np.uint8, CHUNK)
            rem_part = rem[start * k // 8 : -(-stop * k // 8)]
            written = jit_select.rice_chunk(idx, start, stop, k, rem_part, bit0 % 8, packed)
            if written != packed.size:  # cannot happen: the sums gave the length
                raise RuntimeError("rice coding: a chunk's unary length changed")
            edges[i] = _place(packed, bit0 // 8, unary)
            return
        g = _gaps(idx, start, stop)
        if k:
            _remainders(g, k, rem[start * k // 8 : -(-stop * k // 8)])
        edges[i] = _unary(g, k, bit0, unary)

    run_chunks(chunk, bounds)
    for pairs in edges:  # bytes shared by neighbouring chunks: start from 0, then OR
        for at, _ in pairs:
            unary[at] = 0
    for pairs in edges:
        for at, byte in pairs:
            unary[at] |= byte
    tail = unary_bits % 8
    if tail:  # the last byte's padding: one-bits
        unary[-1] |= (0xFF << tail) & 0xFF
    return out


def _remainders(g: I64, k: int, out: npt.NDArray[np.uint8]) -> None:
    """``g & (2^k − 1)``, ``k`` bits each, LSB first, into ``out`` (the chunk's bytes)."""
    m = g.size
    if k <= 8:
        low = np_scratch("rice_low", m, np.uint8, CHUNK)
        np.bitwise_and(g, (1 << k) - 1, out=low, casting="unsafe")
        spelled = np.unpackbits(low[:, None], axis=1, count=k, bitorder="little")
    else:  # the gaps' little-endian bytes, bit j of a gap in column j
        spelled = np.unpackbits(g.view(np.uint8).reshape(m, 8), axis=1, count=k, bitorder="little")
    packed = np.packbits(spelled.reshape(-1), bitorder="little")
    out[: packed.size] = packed


def _unary(g: I64, k: int, bit0: int, unary: npt.NDArray[np.uint8]) -> list[tuple[int, int]]:
    """Write the chunk's unary bits (``q = g >> k`` one-bits, then a zero-bit, per gap)
    that start at stream bit ``bit0``; return the bytes it shares with its neighbours
    (its first and last), as ``(index, bits)`` pairs to OR in."""
    q = np_scratch("rice_q", g.size, np.int64, CHUNK)
    np.right_shift(g, k, out=q)
    np.add(q, 1, out=q)
    np.cumsum(q, out=q)  # q[j] − 1 is gap j's zero bit, counted from the chunk's start
    phase = bit0 % 8
    length = int(q[-1])
    total = phase + length
    bits = np_scratch("rice_bits", total + (-total) % 8, np.uint8, 4 * CHUNK)
    bits[:phase] = 0
    bits[phase:total] = 1
    bits[total:] = 0
    np.add(q, phase - 1, out=q)
    bits[q] = 0
    return _place(np.packbits(bits, bitorder="little"), bit0 // 8, unary)


def _place(
    packed: npt.NDArray[np.uint8], first: int, unary: npt.NDArray[np.uint8]
) -> list[tuple[int, int]]:
    """Copy a chunk's unary bytes (``packed``, from stream byte ``first``) into ``unary``
    but its first and last, which it may share with its neighbours: returned as
    ``(index, bits)`` pairs to OR in."""
    last = first + packed.size - 1
    if packed.size > 2:
        unary[first + 1 : last] = packed[1:-1]
    if packed.size == 1:
        return [(first, int(packed[0]))]
    return [(first, int(packed[0])), (last, int(packed[-1]))]
