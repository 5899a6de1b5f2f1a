"""Large ``bytes`` built in huge pages: the pieces of an encoded model joined into one
``bytes`` object without a page fault per 4 KiB.

``b"".join`` asks malloc for the result; a result of more than a few MB is a fresh map
of 4 KiB pages, and the copy into it takes a page fault per page. On these machines
joining all-MiniLM-L6-v2's 74 MB lossless body took 47 ms that way, more than the
copy itself (a side script: 13-15 ms into huge pages, the same bytes).

:func:`join` makes the ``bytes`` object with its contents uninitialized
(``PyBytes_FromStringAndSize(NULL, n)``, the C API's way to build one in place), asks
the kernel for huge pages on the 2 MiB-aligned part of its memory (``madvise``, as
NumPy does for its own large arrays), and copies the pieces in, in blocks on every
core (a large piece cut into blocks, runs of small ones taken together). Nothing else
can see the object before it is filled and returned. Where that
does not apply (small results, no ``madvise``, not CPython) it is ``b"".join``.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedsqueeze.codec.workers import parallel_map

__all__ = ["HUGE_FROM", "join"]

#: Results of at least this many bytes are built in huge pages (NumPy's threshold).
HUGE_FROM = 4 << 20
#: Bytes copied per task.
_BLOCK = 4 << 20
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)

Piece = bytes | bytearray | memoryview


def _c_api() -> tuple[Any, Any, Any] | None:
    """``PyBytes_FromStringAndSize``, ``PyBytes_AsString`` and ``madvise``, typed."""
    if platform.python_implementation() != "CPython" or _MADV_HUGEPAGE is None:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):  # pragma: no cover - no libc symbols to call
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    make = ctypes.pythonapi.PyBytes_FromStringAndSize
    make.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
    make.restype = ctypes.py_object
    address = ctypes.pythonapi.PyBytes_AsString
    address.argtypes = [ctypes.py_object]
    address.restype = ctypes.c_void_p
    return make, address, madvise


_API = _c_api()


def join(pieces: Sequence[Piece]) -> bytes:
    """``b"".join(pieces)``, built in huge pages when the result is large (see the
    module's text); the same bytes either way."""
    sizes = [memoryview(p).nbytes for p in pieces]
    total = sum(sizes)
    if _API is None or total < HUGE_FROM:
        return b"".join(pieces)
    make, address, madvise = _API
    out: bytes = make(None, total)
    start = int(address(out))
    first = -start % _HUGE_PAGE
    if total > first + _HUGE_PAGE:
        # Advice only: without it (refused, THP off) the copy below is merely slower.
        madvise(start + first, (total - first) // _HUGE_PAGE * _HUGE_PAGE, _MADV_HUGEPAGE)
    into = np.ctypeslib.as_array((ctypes.c_uint8 * total).from_address(start))
    # Tasks of about a block each, on every core: a large piece cut into blocks, runs of
    # small ones (headers, and the bodies of a model's many small tensors) taken
    # together. (at, piece, from, to) each.
    tasks: list[list[tuple[int, Piece, int, int]]] = [[]]
    filled = 0
    at = 0
    for piece, n in zip(pieces, sizes, strict=True):
        for lo in range(0, n, _BLOCK):
            hi = min(n, lo + _BLOCK)
            if filled + hi - lo > _BLOCK and tasks[-1]:
                tasks.append([])
                filled = 0
            tasks[-1].append((at + lo, piece, lo, hi))
            filled += hi - lo
        at += n

    def move(task: list[tuple[int, Piece, int, int]]) -> None:
        for where, piece, lo, hi in task:
            into[where : where + hi - lo] = np.frombuffer(piece, np.uint8, hi - lo, lo)

    parallel_map(move, tasks)
    return out
