"""The container's trailer checksum: CRC-32 (zlib's polynomial and values), on every core.

A CRC is one pass over the whole model on both sides of every transfer: 6-7 ms for the
74 MB of a losslessly coded all-MiniLM-L6-v2 with ISA-L's CRC on one core here, a tenth
of the model's decode, and serial (it runs before any record is parsed). Large inputs are
therefore cut into pieces whose CRCs are computed on the worker threads (ISA-L's and
zlib's release the GIL) and joined with :func:`crc32_combine`, which needs only the
pieces' CRCs and lengths. The value is the same as one pass: a test checks it against
``zlib.crc32`` on every split.

``crc32_combine`` is the GF(2) polynomial arithmetic of zlib's ``crc32_combine``
(``multmodp`` / ``x2nmodp``) written in Python: about 30 polynomial products of 32 steps
for a piece of a few MB, tens of microseconds.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

from fedsqueeze.codec.workers import parallel_map, workers

__all__ = ["PIECE_BYTES", "crc32", "crc32_combine", "crc32_of"]

_crc32: Callable[[bytes | memoryview, int], int]
try:
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # optional: zlib's gives the same values
    _crc32 = zlib.crc32

#: Inputs of at least two pieces of this size are checked on several threads; smaller
#: ones in one call (a thread hand-off costs more than a CRC of a few MB saves).
PIECE_BYTES = 4 << 20

_POLY = 0xEDB88320  # CRC-32's polynomial, bit-reflected as zlib stores it
_ONE = 1 << 31  # the polynomial 1 (x^0) in the reflected representation


def _multmodp(a: int, b: int) -> int:
    """``a · b`` modulo the CRC polynomial (both reflected; ``a`` must not be 0)."""
    m = _ONE
    p = 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _powers() -> list[int]:
    """``x^(2^k)`` modulo the polynomial for k = 0..31."""
    table = [_ONE >> 1]  # x^1
    for _ in range(31):
        table.append(_multmodp(table[-1], table[-1]))
    return table


_X2N = _powers()


def _x2nmodp(n: int, k: int) -> int:
    """``x^(n · 2^k)`` modulo the polynomial."""
    p = _ONE
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC-32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)``."""
    if length2 < 0:
        raise ValueError(f"negative length {length2}")
    return (_multmodp(_x2nmodp(length2, 3), crc1 & 0xFFFFFFFF) ^ crc2) & 0xFFFFFFFF


def crc32_of(pieces: Sequence[bytes | memoryview]) -> int:
    """CRC-32 of the pieces one after another (``crc32(b"".join(pieces))``, without the
    join), on every core when they add up to several :data:`PIECE_BYTES`: the
    concatenation is cut into one span per worker, wherever the pieces' edges fall, and
    the spans' CRCs are joined with :func:`crc32_combine`. An encoded model is mostly
    records of a few MB or less, each of which :func:`crc32` checks on one core."""
    views = [_bytes_view(p) for p in pieces]
    size = sum(v.nbytes for v in views)

    def check(slices: list[memoryview]) -> int:
        crc = 0
        for piece in slices:
            crc = _crc32(piece, crc)
        return crc & 0xFFFFFFFF

    spans = 1 if size < 2 * PIECE_BYTES else min(workers()[1], size // PIECE_BYTES)
    if spans < 2:
        return check(views)
    step = -(-size // spans)
    cuts: list[list[memoryview]] = [[] for _ in range(spans)]
    at = 0
    for v in views:
        lo = 0
        while lo < v.nbytes:
            span = (at + lo) // step
            hi = min(v.nbytes, (span + 1) * step - at)
            cuts[span].append(v[lo:hi])
            lo = hi
        at += v.nbytes
    crc = 0
    for slices, part in zip(cuts, parallel_map(check, cuts), strict=True):
        crc = crc32_combine(crc, part, sum(s.nbytes for s in slices))
    return crc


def _bytes_view(data: bytes | memoryview) -> memoryview:
    """``data`` as a flat view of bytes."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def crc32(data: bytes | memoryview, value: int = 0) -> int:
    """CRC-32 of ``data`` as zlib computes it, continuing from ``value``: ISA-L's when the
    ``isal`` package is installed (the same values, about 5× faster), on every core for
    inputs of several :data:`PIECE_BYTES`."""
    view = _bytes_view(data)
    size = view.nbytes
    # The pool's size only for an input that could be cut (workers() takes a lock; the
    # container calls this for every record's header too).
    pieces = 1 if size < 2 * PIECE_BYTES else min(workers()[1], size // PIECE_BYTES)
    if pieces < 2:
        return _crc32(view, value) & 0xFFFFFFFF
    step = -(-size // pieces)
    bounds = [(i, min(size, i + step)) for i in range(0, size, step)]
    parts = parallel_map(lambda b: _crc32(view[b[0] : b[1]], 0) & 0xFFFFFFFF, bounds)
    crc = value & 0xFFFFFFFF
    for (start, stop), part in zip(bounds, parts, strict=True):
        crc = crc32_combine(crc, part, stop - start)
    return crc
