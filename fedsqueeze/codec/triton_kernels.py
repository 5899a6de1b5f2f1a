"""The two Triton kernels of :mod:`fedsqueeze.codec.triton_select` (imported by it only
where Triton is installed: this module needs Triton, and under ``TRITON_INTERPRET=1``
set before Triton's first import it runs them through Triton's interpreter)."""

# mypy: disable-error-code="no-untyped-def,untyped-decorator,unused-ignore"
from __future__ import annotations

import triton  # type: ignore[import-not-found,import-untyped,unused-ignore]
import triton.language as tl  # type: ignore[import-not-found,import-untyped,unused-ignore]

__all__ = ["count", "write"]


@triton.jit
def _block(x_ptr, n, BLOCK: tl.constexpr):
    """This program's block: its id, its value positions, which lie inside the tensor,
    and their magnitudes in float32 (exact for fp16 and bf16 inputs)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    return pid, offs, inside, tl.abs(tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32))


@triton.jit
def count(x_ptr, bounds_ptr, counts_ptr, pos_ptr, mag_ptr, fill_ptr, cap, n, BLOCK: tl.constexpr):
    """Per block: how many magnitudes lie above the band ``bounds = [lo, hi]`` and in it
    (``counts[pid] = [above, band]``); the band's positions and magnitudes appended at
    ``fill`` (one atomic add per block; in no order across blocks; beyond ``cap``
    dropped, and ``fill`` then tells)."""
    pid, offs, inside, v = _block(x_ptr, n, BLOCK)
    lo = tl.load(bounds_ptr)
    hi = tl.load(bounds_ptr + 1)
    above = (v > hi) & inside
    band = (v >= lo) & (v <= hi) & inside
    in_band = tl.sum(band.to(tl.int32), 0)
    tl.store(counts_ptr + pid * 2, tl.sum(above.to(tl.int32), 0))
    tl.store(counts_ptr + pid * 2 + 1, in_band)
    base = tl.atomic_add(fill_ptr, in_band.to(tl.int64))
    dest = base + tl.cumsum(band.to(tl.int64), 0) - 1
    room = band & (dest < cap)
    tl.store(pos_ptr + dest, offs, mask=room)
    tl.store(mag_ptr + dest, v, mask=room)


@triton.jit
def write(x_ptr, cut_ptr, last_ptr, offsets_ptr, out_ptr, total, n, BLOCK: tl.constexpr):
    """Per block: the kept positions, in order, from ``offsets[pid]`` (at most ``total``
    in all): ``|x| >= lo`` and, when the cut lies in the band (``cuts = [lo, cut,
    in_band]``), past the cut (above it, or equal to it after the last position
    dropped, ``last``)."""
    pid, offs, inside, v = _block(x_ptr, n, BLOCK)
    lo = tl.load(cut_ptr)
    cut = tl.load(cut_ptr + 1)
    in_band = tl.load(cut_ptr + 2)  # 1.0: the cut lies in the band
    last = tl.load(last_ptr)
    keep = (v >= lo) & inside
    past_cut = (v > cut) | ((v == cut) & (offs > last))
    keep = tl.where(in_band != 0.0, keep & past_cut, keep)
    dest = tl.load(offsets_ptr + pid) + tl.cumsum(keep.to(tl.int64), 0) - 1
    tl.store(out_ptr + dest, offs, mask=keep & (dest < total))
