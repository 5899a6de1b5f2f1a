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
the outputs, on every core.

Ties across the cut follow :mod:`~fedsqueeze.codec.pruning`'s rule (of the values equal
to the cut, the lowest indices go first; :func:`tie_rule`). The chunks hold the tied
values in index order, so the ``need`` values to drop are the first ones of the first
chunks: a chunk whose tied values all go keeps ``|x| > c``, one whose tied values all
stay keeps ``|x| >= c``, and the one chunk (at most) that drops some and keeps the rest
takes a NumPy pass of its own. (This path once left ties to ``torch.topk`` over the
chunks' concatenated band: about half of the 25M-value normal tensors hit it at 90%
pruning, at three times the cost.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedsqueeze.codec import jit, jit_select
from fedsqueeze.codec.chunks import np_scratch, run_chunks

__all__ = [
    "CHUNK",
    "ChunkDone",
    "FirstPass",
    "finish",
    "first_pass",
    "magnitude",
    "select_above",
    "tie_rule",
    "top_within",
]

#: Values per chunk: the magnitudes (1 MiB of float32) stay in a core's L2 cache.
CHUNK = 1 << 18

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


def tie_rule(band: npt.NDArray[np.floating], still: int) -> I64:
    """Positions (increasing) of the ``still`` smallest values of 1-D ``band`` (``0 <
    still <= band.size``): all below the ``still``-th smallest, and of those equal to it
    the lowest positions first; NaN counts as the largest value. The positions a stable
    ascending sort puts first."""
    if not 0 < still <= band.size:
        raise ValueError(f"still must be in 1..{band.size}, got {still}")
    cut = np.partition(band, still - 1)[still - 1]
    if np.isnan(cut):
        tied = np.isnan(band)
        below = ~tied
    else:
        below = band < cut
        tied = band == cut
    need = still - int(np.count_nonzero(below))
    below[np.flatnonzero(tied)[:need]] = True
    return np.flatnonzero(below)


@dataclass(frozen=True)
class FirstPass:
    """What the first pass over a tensor found (:func:`first_pass`)."""

    #: The tensor's size.
    n: int
    #: The band's ends, as compared.
    lo: np.float32
    hi: np.float32
    #: Per chunk: how many magnitudes are ``>= lo``, and the band's (in index order).
    at_least: I64
    band: list[F32]
    #: The largest magnitude's float32 bit pattern (NaN above infinity above the rest)
    #: among the values with the sign bit clear, and among those with it set (0: none).
    top_pos: int
    top_neg: int

    @property
    def top(self) -> int:
        """The largest magnitude's float32 bit pattern."""
        return max(self.top_pos, self.top_neg)

    def extremes(self) -> tuple[float, float] | None:
        """The smallest and the largest value, when every value is finite (else
        ``None``); ``-0.0`` and ``0.0`` stand for "no negative" and "no positive"."""
        low, high = magnitude(self.top_neg), magnitude(self.top_pos)
        if low is None or high is None:
            return None
        return -low, high

    def within(self, limit: float) -> bool:
        """Whether every value is finite with ``|x| <= limit``."""
        return top_within(self.top, limit)


def magnitude(bits: int) -> float | None:
    """The magnitude whose float32 bit pattern (sign bit clear) is ``bits``; ``None`` for
    an infinity or a NaN."""
    if bits >= 0x7F800000:
        return None
    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])


def top_within(top: int, limit: float) -> bool:
    """Whether the largest magnitude's bit pattern ``top`` is finite with ``<= limit``."""
    value = magnitude(top)
    return value is not None and value <= limit


def select_above(x: F32, prune: int, lo: float, hi: float) -> tuple[I64, F32] | None:
    """The indices (increasing) and values of ``x`` (float32 ``[n]``, finite) left when
    its ``prune`` smallest magnitudes are dropped (ties at the cut: lowest indices
    first), given a band ``[lo, hi]`` (``±inf``: no bound) that should hold the cut-off;
    ``None`` when the band misses it. :func:`first_pass`, then :func:`finish`."""
    return finish(x, prune, first_pass(x, lo, hi))


def first_pass(x: F32, lo: float, hi: float, terms: tuple[F32, F32] | None = None) -> FirstPass:
    """One pass over ``x`` (float32 ``[n]``, contiguous) on every core: per chunk the
    count of magnitudes ``>= lo`` and the magnitudes in ``[lo, hi]``, and the largest
    magnitude (the encoder checks finiteness and range with it). With ``terms`` ``(b,
    r)`` (float32 ``[n]`` or empty), the pass is over ``(x − b) + r`` in float32, made
    chunk by chunk in cache and never whole (compiled kernels only)."""
    n = x.size
    bounds = [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]
    lo32, hi32 = np.float32(lo), np.float32(hi)  # sample values: exact in float32
    at_least = np.zeros(len(bounds), dtype=np.int64)
    band: list[F32] = [np.empty(0, dtype=np.float32)] * len(bounds)
    tops = np.zeros(2 * len(bounds), dtype=np.int32)
    bits = x.view(np.int32)

    compiled = jit.use(n)
    if terms is not None and not compiled:
        raise ValueError("the first pass over a sum needs the compiled kernels")

    def first(start: int, stop: int) -> None:
        size = stop - start
        i = start // CHUNK
        if terms is not None:  # the chunk's sum, then the pass over it
            summed = np_scratch("sel_sum", size, np.float32, CHUNK)
            jit_select.sum_into(x, terms[0], terms[1], start, stop, summed, 0)
            buf = np_scratch("sel_band", size, np.float32, CHUNK)
            words = summed.view(np.int32)
            packed = jit_select.band_pass(summed, words, 0, size, lo32, hi32, buf, tops, i)
            at_least[i] = packed >> 32
            band[i] = buf[: packed & 0xFFFFFFFF].copy()
            return
        if compiled:  # the same comparisons in one compiled pass
            buf = np_scratch("sel_band", size, np.float32, CHUNK)
            packed = jit_select.band_pass(x, bits, start, stop, lo32, hi32, buf, tops, i)
            at_least[i] = packed >> 32
            band[i] = buf[: packed & 0xFFFFFFFF].copy()
            return
        mags = np_scratch("sel_mags", size, np.float32, CHUNK)
        ge = np_scratch("sel_ge", size, np.bool_, CHUNK)
        inside = np_scratch("sel_in", size, np.bool_, CHUNK)
        words = np_scratch("sel_bits", size, np.int32, CHUNK)
        np.abs(x[start:stop], out=mags)
        np.greater_equal(mags, lo32, out=ge)
        np.less_equal(mags, hi32, out=inside)
        np.logical_and(inside, ge, out=inside)
        np.bitwise_and(bits[start:stop], 0x7FFFFFFF, out=words)
        at_least[i] = np.count_nonzero(ge)
        band[i] = mags[np.flatnonzero(inside)]
        negative = np.signbit(x[start:stop])
        tops[2 * i] = words.max(where=~negative, initial=0)
        tops[2 * i + 1] = words.max(where=negative, initial=0)

    run_chunks(first, bounds)
    pairs = tops.reshape(-1, 2).max(axis=0, initial=0)
    return FirstPass(n, lo32, hi32, at_least, band, int(pairs[0]), int(pairs[1]))


#: What :func:`finish` calls after each chunk's selection, on the chunk's worker thread:
#: ``(start, stop, o0, o1, indices, values)``, the chunk ``x[start:stop]`` having put its
#: kept indices and values at ``[o0, o1)`` of the two outputs.
ChunkDone = Callable[[int, int, int, int, I64, F32], None]


def finish(
    x: F32,
    prune: int,
    first: FirstPass,
    then: ChunkDone | None = None,
    copy: F32 | None = None,
) -> tuple[I64, F32] | None:
    """:func:`select_above`'s result from its first pass over the same values (``x``
    may be another array holding them); ``None`` when the band misses the cut-off.
    ``then``: called after each chunk, while the chunk is still in cache (a quantizer
    fused into this pass, :mod:`fedsqueeze.codec.select_quantize`); ``copy``: an array
    of ``x``'s size that each chunk copies itself into on the way."""
    n = x.size
    if first.n != n:
        raise ValueError(f"the first pass saw {first.n} values, not {n}")
    bounds = [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]
    lo32, at_least, band = first.lo, first.at_least, first.band
    compiled = jit.use(n)
    n_ge = int(at_least.sum())
    n_band = sum(b.size for b in band)
    n_below = n - n_ge
    if n_below > prune or n_ge - n_band > n - prune:
        return None
    still = prune - n_below
    # Per chunk: whether it keeps |x| > cut (strict) or |x| >= cut, or (the one chunk
    # where the tied values' drops end) how many of its tied values go.
    strict = np.zeros(len(bounds), dtype=np.bool_)
    split: dict[int, int] = {}
    if still == 0:
        counts, cut = at_least, lo32
    else:
        mags_all = np.concatenate(band)
        cut = np.partition(mags_all, still - 1)[still - 1]
        need = still - int(np.count_nonzero(mags_all < cut))  # tied values that go
        counts = at_least.copy()
        for i, b in enumerate(band):
            tied = int(np.count_nonzero(b == cut))
            drop = min(tied, need)
            need -= drop
            counts[i] -= int(np.count_nonzero(b < cut)) + drop
            if drop == tied:
                strict[i] = True  # also where nothing ties: |x| > cut
            elif drop:
                split[i] = drop
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    indices = np.empty(total, dtype=np.int64)
    values = np.empty(total, dtype=np.float32)
    no_copy = np.empty(0, dtype=np.float32)

    def second(start: int, stop: int) -> None:
        i = start // CHUNK
        o0, o1 = int(offsets[i]), int(offsets[i + 1])
        chunk(start, stop, i, o0, o1)
        if then is not None:
            then(start, stop, o0, o1, indices, values)

    def chunk(start: int, stop: int, i: int, o0: int, o1: int) -> None:
        size = stop - start
        if compiled and i not in split:
            got = jit_select.select_pass(
                x, start, stop, cut, bool(strict[i]), indices, values, o0, o1,
                no_copy if copy is None else copy,
            )  # fmt: skip
            if got != o1 - o0:  # cannot happen: the same comparisons as the first pass
                raise RuntimeError("magnitude selection: a chunk's count changed between passes")
            return
        mags = np_scratch("sel_mags", size, np.float32, CHUNK)
        keep = np_scratch("sel_ge", size, np.bool_, CHUNK)
        piece = x[start:stop]
        if copy is not None:
            copy[start:stop] = piece
        np.abs(piece, out=mags)
        if strict[i] or i in split:
            np.greater(mags, cut, out=keep)
        else:
            np.greater_equal(mags, cut, out=keep)
        if i in split:  # its first split[i] tied values go, the rest stay
            keep[np.flatnonzero(mags == cut)[split[i] :]] = True
        at = np.flatnonzero(keep)
        if at.size != o1 - o0:  # cannot happen: the same comparisons as the first pass
            raise RuntimeError("magnitude selection: a chunk's count changed between passes")
        np.add(at, start, out=indices[o0:o1])
        np.take(piece, at, out=values[o0:o1])

    run_chunks(second, bounds)
    return indices, values
