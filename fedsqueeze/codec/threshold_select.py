"""Exact magnitude selection of a large float32 tensor on the CPU, as two passes of
chunks on every core that write only what they keep.

:func:`~fedsqueeze.codec.pruning.magnitude_selection` estimates the cut-off from a
sample, takes a band ``[lo, hi]`` around it that holds the exact cut-off with
overwhelming probability, and corrects inside the band. Its first version gathered,
per chunk, every index with ``|x| >= lo`` and its value, concatenated them, then
compressed the band's dropped entries out of the concatenation: three writes of the
kept set (20 MB of indices and 10 MB of values at 90% pruning of 25M values) into
fresh memory, on one thread for two of them.

Here the first pass keeps only counts and the band (``|x|`` in ``[lo, hi]``: about 1%
of the values). The exact cut ``c`` is the band's ``still``-th smallest magnitude; when
no tie straddles it, the kept set is exactly ``|x| > c`` (everything below ``lo`` is
dropped, and so is the band up to ``c``), and with no correction at all (``still =
0``) ``|x| >= lo``. Each chunk's count of kept values follows from its band, so the
second pass writes every chunk's kept indices and values straight into their place in
the outputs, on every core. Ties across the cut (few distinct magnitudes) are left to
the caller's path, which breaks them as ``torch.topk`` does.
"""

from __future__ import annotations

import enum

import numpy as np
import numpy.typing as npt

from fedsqueeze.codec import jit, jit_select
from fedsqueeze.codec.chunks import np_scratch, run_chunks

__all__ = ["CHUNK", "Outcome", "select_above"]

#: Values per chunk: the magnitudes (1 MiB of float32) stay in a core's L2 cache.
CHUNK = 1 << 18

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


class Outcome(enum.Enum):
    """Why :func:`select_above` selected nothing."""

    #: The band misses the exact cut-off (the caller falls back to ``topk``).
    MISS = "miss"
    #: A tie straddles the cut (the caller breaks ties as ``topk`` does).
    TIES = "ties"


def select_above(x: F32, prune: int, lo: float, hi: float) -> tuple[I64, F32] | Outcome:
    """The indices (increasing) and values of ``x`` (float32 ``[n]``) left when its
    ``prune`` smallest magnitudes are dropped, given a band ``[lo, hi]`` (``±inf``: no
    bound) that should hold the cut-off; or why not (:class:`Outcome`)."""
    n = x.size
    bounds = [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]
    lo32, hi32 = np.float32(lo), np.float32(hi)  # sample values: exact in float32
    at_least = np.zeros(len(bounds), dtype=np.int64)
    band: list[F32] = [np.empty(0, dtype=np.float32)] * len(bounds)

    compiled = jit.use(n)

    def first(start: int, stop: int) -> None:
        size = stop - start
        if compiled:  # the same comparisons in one compiled pass
            buf = np_scratch("sel_band", size, np.float32, CHUNK)
            packed = jit_select.band_pass(x, start, stop, lo32, hi32, buf)
            at_least[start // CHUNK] = packed >> 32
            band[start // CHUNK] = buf[: packed & 0xFFFFFFFF].copy()
            return
        mags = np_scratch("sel_mags", size, np.float32, CHUNK)
        ge = np_scratch("sel_ge", size, np.bool_, CHUNK)
        inside = np_scratch("sel_in", size, np.bool_, CHUNK)
        np.abs(x[start:stop], out=mags)
        np.greater_equal(mags, lo32, out=ge)
        np.less_equal(mags, hi32, out=inside)
        np.logical_and(inside, ge, out=inside)
        i = start // CHUNK
        at_least[i] = np.count_nonzero(ge)
        band[i] = mags[np.flatnonzero(inside)]

    run_chunks(first, bounds)
    n_ge = int(at_least.sum())
    n_band = sum(b.size for b in band)
    n_below = n - n_ge
    if n_below > prune or n_ge - n_band > n - prune:
        return Outcome.MISS
    still = prune - n_below
    if still == 0:
        counts, cut, strict = at_least, lo32, False
    else:
        mags_all = np.concatenate(band)
        cut = np.partition(mags_all, still - 1)[still - 1]
        if np.count_nonzero(mags_all <= cut) != still:
            return Outcome.TIES
        counts = at_least - np.array([np.count_nonzero(b <= cut) for b in band], dtype=np.int64)
        strict = True
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    indices = np.empty(total, dtype=np.int64)
    values = np.empty(total, dtype=np.float32)

    def second(start: int, stop: int) -> None:
        size = stop - start
        if compiled:
            o0, o1 = int(offsets[start // CHUNK]), int(offsets[start // CHUNK + 1])
            got = jit_select.select_pass(x, start, stop, cut, strict, indices, values, o0, o1)
            if got != o1 - o0:  # cannot happen: the same comparisons as the first pass
                raise RuntimeError("magnitude selection: a chunk's count changed between passes")
            return
        mags = np_scratch("sel_mags", size, np.float32, CHUNK)
        keep = np_scratch("sel_ge", size, np.bool_, CHUNK)
        piece = x[start:stop]
        np.abs(piece, out=mags)
        if strict:
            np.greater(mags, cut, out=keep)
        else:
            np.greater_equal(mags, cut, out=keep)
        at = np.flatnonzero(keep)
        i = start // CHUNK
        o0, o1 = int(offsets[i]), int(offsets[i + 1])
        if at.size != o1 - o0:  # cannot happen: the same comparisons as the first pass
            raise RuntimeError("magnitude selection: a chunk's count changed between passes")
        np.add(at, start, out=indices[o0:o1])
        np.take(piece, at, out=values[o0:o1])

    run_chunks(second, bounds)
    return indices, values
