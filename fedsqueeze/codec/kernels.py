"""The element-wise kernels of linear and NF4 quantization, chunked and multi-core.

:mod:`fedsqueeze.codec.quantization` decides *what* to compute; these functions compute
it fast, with exactly the arithmetic of the reference loops there (same operations in
the same order, so the codes and decoded values are bit-identical; the tests compare
both):

* quantize: ``clamp(round(x · (1/scale)) + zp, qmin, qmax)``;
* NF4 nearest: the index of the nearest codebook entry of ``x / scale``, ties down;
* dequantize: ``(q − zp) · scale`` or ``NF4[q] · scale``;
* ranges: per-set minimum and maximum.

Parameters come per tensor (scalars) or per *run*: :class:`Runs` says value ``i`` uses
set ``i // length``, which is what dense per-channel quantization (rows of a matrix) and
block-wise quantization (blocks of kept values) are. Runs let a chunk be a ``[rows,
length]`` view that broadcasts ``[rows, 1]`` parameters, instead of gathering a
parameter per value through an int64 index as large as the tensor (building that index
alone cost more than ``clone()``). Chunks of about a million values run on
:func:`fedsqueeze.codec.chunks.run_chunks`' worker threads.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from fedsqueeze.codec import jit, jit_select
from fedsqueeze.codec.chunks import CPU_CHUNK, chunk_bounds, run_chunks, scratch

__all__ = [
    "Runs",
    "copy_scatter",
    "dequantize_linear",
    "dequantize_table",
    "empty_numpy_backed",
    "float32_arrays",
    "nearest_nf4",
    "nf4_midpoints",
    "nf4_tables",
    "parallel_copy",
    "quantize_linear",
    "scatter",
    "value_range",
]

_CHUNK = CPU_CHUNK
_GPU_CHUNK = 1 << 24
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


@dataclass(frozen=True)
class Runs:
    """Parameter sets in consecutive runs: value ``i`` uses set ``i // length``.

    Attributes
    ----------
    length
        Values per set (the last set may hold fewer), ``>= 1``.
    """

    length: int

    def __post_init__(self) -> None:
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 1:
            raise ValueError(f"run length must be an integer >= 1, got {self.length!r}")

    def count(self, n: int) -> int:
        """Number of sets ``n`` values fill: ``ceil(n / length)``."""
        return -(-n // self.length)

    def index(self, n: int, device: torch.device | None = None) -> Tensor:
        """int64 ``[n]``: the set of each value (what per-value code paths need)."""
        return torch.div(torch.arange(n, device=device), self.length, rounding_mode="floor")


# ---------------------------------------------------------------------- ranges
def value_range(x: Tensor, runs: Runs | None) -> tuple[Tensor, Tensor]:
    """Minimum and maximum of ``x`` (float32 ``[]``), or of each run (float32 ``[C]``).

    NaN propagates into the result (the callers test for it). ``x`` is 1-D, non-empty.
    """
    n = x.numel()
    bounds = _bounds(n, runs, x.device)
    jitted = x.device.type == "cpu" and x.dtype == torch.float32 and jit.use(n)
    if runs is None:
        parts = torch.empty((len(bounds), 2), dtype=torch.float32, device=x.device)
        slot = {start: i for i, (start, _) in enumerate(bounds)}
        if jitted:  # one vectorized integer pass per part (torch.aminmax: ~1.6x the CPU)
            xs, flat = x.contiguous().numpy(), parts.view(-1).numpy()

            def span(start: int, stop: int) -> None:
                jit.span_range(xs, start, stop, flat, 2 * slot[start])

            _run(span, bounds, x.device)
            return parts[:, 0].amin(), parts[:, 1].amax()

        def part(start: int, stop: int) -> None:
            lo, hi = torch.aminmax(x[start:stop])
            parts[slot[start], 0] = lo
            parts[slot[start], 1] = hi

        _run(part, bounds, x.device)
        return parts[:, 0].amin(), parts[:, 1].amax()
    count = runs.count(n)
    lo_c = torch.empty(count, dtype=torch.float32, device=x.device)
    hi_c = torch.empty(count, dtype=torch.float32, device=x.device)

    if jitted:
        xs = x.contiguous().numpy()
        lo_np, hi_np = lo_c.numpy(), hi_c.numpy()

        def compiled(start: int, stop: int) -> None:
            jit.run_range(xs, start, stop, runs.length, lo_np, hi_np)

        _run(compiled, bounds, x.device)
        return lo_c, hi_c

    def rows(start: int, stop: int) -> None:
        v = _rows(x, start, stop, runs.length)
        r0 = start // runs.length
        # amin and amax reduce short rows ~20x faster than aminmax(dim=1) here.
        lo_c[r0 : r0 + v.shape[0]] = v.amin(1)
        hi_c[r0 : r0 + v.shape[0]] = v.amax(1)

    _run(rows, bounds, x.device)
    return lo_c, hi_c


# ---------------------------------------------------------------------- quantize
def quantize_linear(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: float, qmax: float, runs: Runs | None
) -> Tensor:
    """uint8 ``[n]``: ``clamp(round(x · (1/scale)) + zp, qmin, qmax)``, nearest rounding.

    ``scale`` and ``zero_point`` are float32 ``[]`` (per tensor) or ``[C]`` (per run).
    Rounding ``x/scale`` before adding the integer zero point keeps one rounding (adding
    it first would round once more at the code's magnitude); float32 before scaling.
    """
    n = x.numel()
    device = x.device
    out = torch.empty(n, dtype=torch.uint8, device=device)
    if runs is None:
        inv = float(1.0 / scale)
        zp = float(zero_point)
    else:
        inv_c = (1.0 / scale.to(device)).unsqueeze(1)
        zp_c = zero_point.to(device).unsqueeze(1)

    def chunk(start: int, stop: int) -> None:
        b = _scratch("a", stop - start, device)
        xs = x[start:stop].to(torch.float32)
        if runs is None:
            torch.mul(xs, inv, out=b)
            b.round_().add_(zp)
        else:
            r0 = start // runs.length
            bv = b.view(-1, _width(start, stop, runs.length))
            rows = slice(r0, r0 + bv.shape[0])
            torch.mul(xs.view(bv.shape), inv_c[rows], out=bv)
            bv.round_().add_(zp_c[rows])
        out[start:stop] = b.clamp_(qmin, qmax)

    _run(chunk, _bounds(n, runs, device), device)
    return out


def nearest_nf4(x: Tensor, scale: Tensor, codebook: Tensor, runs: Runs | None) -> Tensor:
    """uint8 ``[n]``: the nearest entry of ``codebook`` (NF4) to each ``x / scale``.

    Equal to :func:`fedsqueeze.codec.kmeans.assign` of ``x / scale`` (ties to the lower
    entry) for every ``x / scale`` in ``[−1, 1]``, which absmax scales guarantee; values
    beyond go to the nearer end, as there. Instead of a binary search per value
    (``bucketize``: ~40 ns a value here), a value's cell on a 256-cell grid of
    ``[−1, 1]`` gives its code through a table, plus one comparison with the one
    midpoint that may lie inside the cell (:func:`nf4_tables`).
    """
    n = x.numel()
    device = x.device
    below, inside = nf4_tables(codebook)
    below, inside = below.to(device), inside.to(device)
    out = torch.empty(n, dtype=torch.uint8, device=device)
    scale_f = float(scale) if runs is None else 0.0
    scale_c = scale.to(device).unsqueeze(1) if runs is not None else scale

    def chunk(start: int, stop: int) -> None:
        size = stop - start
        unit = _scratch("a", size, device)
        grid = _scratch("b", size, device)
        cells = _scratch("a", size, device, torch.int32)
        above = _scratch("a", size, device, torch.bool)
        xs = x[start:stop].to(torch.float32)
        if runs is None:
            torch.div(xs, scale_f, out=unit)
        else:
            r0 = start // runs.length
            uv = unit.view(-1, _width(start, stop, runs.length))
            torch.div(xs.view(uv.shape), scale_c[r0 : r0 + uv.shape[0]], out=uv)
        # cell = floor((unit + 1) · 128): one rounding in the addition (≤ 2^-24), which
        # the tables allow for; clamped to [0, 255] first, the integer conversion's
        # truncation is the floor.
        torch.add(unit, 1.0, out=grid)
        grid.mul_(_NF4_CELLS / 2).clamp_(0, _NF4_CELLS - 1)
        cells.copy_(grid)
        codes = out[start:stop]
        torch.index_select(below, 0, cells, out=codes)
        torch.index_select(inside, 0, cells, out=grid)
        torch.gt(unit, grid, out=above)
        codes.add_(above)

    _run(chunk, _bounds(n, runs, device), device)
    return out


# ---------------------------------------------------------------------- dequantize
def dequantize_linear(
    codes: Tensor, scale: Tensor, zero_point: Tensor, runs: Runs | None
) -> Tensor:
    """float32 ``[n]``: ``(q − zp) · scale`` (``q − zp`` is exact: one rounding)."""
    n = codes.numel()
    device = codes.device
    out = torch.empty(n, dtype=torch.float32, device=device)
    if runs is None:
        s, zp = float(scale), float(zero_point)
    else:
        scale_c = scale.to(device).unsqueeze(1)
        zp_c = zero_point.to(device).unsqueeze(1)

    def chunk(start: int, stop: int) -> None:
        o = out[start:stop]
        o.copy_(codes[start:stop])
        if runs is None:
            o.sub_(zp).mul_(s)
        else:
            r0 = start // runs.length
            ov = o.view(-1, _width(start, stop, runs.length))
            rows = slice(r0, r0 + ov.shape[0])
            ov.sub_(zp_c[rows]).mul_(scale_c[rows])

    _run(chunk, _bounds(n, runs, device), device)
    return out


def dequantize_table(codes: Tensor, table: Tensor, scale: Tensor, runs: Runs | None) -> Tensor:
    """float32 ``[n]``: ``table[q] · scale`` (NF4)."""
    n = codes.numel()
    device = codes.device
    table = table.to(device=device, dtype=torch.float32)
    out = torch.empty(n, dtype=torch.float32, device=device)
    scale_c = scale.to(device).unsqueeze(1) if runs is not None else scale.to(device)

    def chunk(start: int, stop: int) -> None:
        o = out[start:stop]
        idx = _scratch("a", stop - start, device, torch.int32)
        idx.copy_(codes[start:stop])
        torch.index_select(table, 0, idx, out=o)
        if runs is None:
            o.mul_(scale_c)
        else:
            r0 = start // runs.length
            ov = o.view(-1, _width(start, stop, runs.length))
            ov.mul_(scale_c[r0 : r0 + ov.shape[0]])

    _run(chunk, _bounds(n, runs, device), device)
    return out


# ---------------------------------------------------------------------- copy
def scatter(out: Tensor, indices: Tensor, values: Tensor) -> None:
    """``out[indices] = values`` for 1-D CPU tensors (``indices`` distinct): a large float32
    scatter by the compiled kernel in chunks on the worker threads, else NumPy's fancy
    assignment (torch's ``index_put`` of 2.5M positions cost ~5x that here)."""
    dst, at, got = out.numpy(), indices.contiguous().numpy(), values.contiguous().numpy()
    if (
        jit.use(at.size)
        and dst.dtype == np.float32
        and at.dtype == np.int64
        and got.dtype == np.float32
    ):
        # 2.5M positions: 15 ms against NumPy's 22 (random writes: the misses dominate).
        run_chunks(
            lambda a, b: jit_select.scatter_values(dst, at, a, b, got), chunk_bounds(at.size)
        )
    else:
        dst[at] = got


def copy_scatter(src: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """A copy of 1-D ``src`` with ``values`` at ``indices`` (increasing, distinct), in one
    pass: each chunk of the copy takes its own positions' values while it is in cache,
    on the worker threads (float32 on the CPU with the compiled kernel; else a copy and
    :func:`scatter`). A copy and then a scatter of a tenth of the values cost two passes
    over the memory: at one kept value in ten every cache line takes a write.

    Raises
    ------
    ValueError
        ``indices`` and ``values`` of different lengths.
    """
    if indices.numel() != values.numel():
        raise ValueError(f"{indices.numel()} indices for {values.numel()} values")
    n = src.numel()
    if not (
        jit.use(n)
        and src.device.type == "cpu"
        and src.dtype == torch.float32
        and values.dtype == torch.float32
        and indices.dtype == torch.int64
    ):
        out = parallel_copy(src)
        scatter(out, indices, values)
        return out
    out = empty_numpy_backed(n, torch.float32)
    dst, source = out.numpy(), src.contiguous().numpy()
    at, got = indices.contiguous().numpy(), values.contiguous().numpy()

    def chunk(start: int, stop: int) -> None:
        np.copyto(dst[start:stop], source[start:stop])
        lo, hi = np.searchsorted(at, (start, stop))
        jit_select.scatter_values(dst, at, int(lo), int(hi), got)

    run_chunks(chunk, chunk_bounds(n))
    return out


def float32_arrays(*tensors: Tensor | None) -> list[npt.NDArray[np.float32]] | None:
    """Flat NumPy views (copies where not contiguous) of float32 CPU tensors, an empty
    array for each ``None``; ``None`` unless every tensor given is float32 on the CPU
    (what the compiled kernels over a sum of tensors take)."""
    given = [t for t in tensors if t is not None]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in given):
        return None
    none = np.empty(0, dtype=np.float32)
    return [none if t is None else t.detach().contiguous().reshape(-1).numpy() for t in tensors]


def empty_numpy_backed(numel: int, dtype: torch.dtype) -> Tensor:
    """An uninitialised 1-D CPU tensor in NumPy memory (float16/32/64): huge pages for a
    large one, whose first touch is then several times cheaper than torch's 4 KiB pages
    (most of a large copy's cost)."""
    return torch.from_numpy(np.empty(numel, dtype=_NUMPY_DTYPES[dtype]))


def parallel_copy(x: Tensor) -> Tensor:
    """A contiguous copy of 1-D ``x``, written in chunks on the worker threads."""
    src = x.contiguous()
    if src.device.type == "cpu" and src.dtype in _NUMPY_DTYPES and not src.requires_grad:
        out = empty_numpy_backed(src.numel(), src.dtype)
    else:
        out = torch.empty_like(src)

    def chunk(start: int, stop: int) -> None:
        out[start:stop].copy_(src[start:stop])

    _run(chunk, _bounds(src.numel(), None, src.device), src.device)
    return out


# ---------------------------------------------------------------------- NF4 tables
_NF4_CELLS = 256
#: Slack around each cell for the rounding of ``unit + 1`` (≤ 2^-24 · 2): far larger.
_CELL_SLACK = 1e-6
_nf4_cache: dict[bytes, tuple[Tensor, Tensor]] = {}


def nf4_midpoints(codebook: Tensor) -> npt.NDArray[np.float32]:
    """float32 ``[len(codebook) − 1]``: the midpoints between neighbouring entries, as
    :func:`~fedsqueeze.codec.kmeans.assign` and :func:`nf4_tables` compute them (in
    float32). A value's nearest entry (ties to the lower) is how many lie strictly below
    it: what the compiled kernel (:func:`fedsqueeze.codec.jit.nf4_encode`) counts."""
    cb = codebook.detach().to(device="cpu", dtype=torch.float32)
    return ((cb[:-1] + cb[1:]) / 2).numpy()


def nf4_tables(codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Per grid cell: how many midpoints lie below it (uint8), and the midpoint inside
    it (float32; ``+inf`` when none).

    A value whose computed cell is ``c`` lies within :data:`_CELL_SLACK` of the cell's
    true span; with at most one midpoint ``m`` in that widened span, its code (the count
    of midpoints below it, as ``bucketize`` counts) is ``below[c] + (value > m)``.
    Midpoints are computed as :func:`~fedsqueeze.codec.kmeans.assign` does, in float32.
    """
    cb = codebook.detach().to(device="cpu", dtype=torch.float32)
    key = cb.numpy().tobytes()
    cached = _nf4_cache.get(key)
    if cached is not None:
        return cached
    mids = ((cb[:-1] + cb[1:]) / 2).tolist()
    below: list[int] = []
    inside: list[float] = []
    for c in range(_NF4_CELLS):
        left = -1.0 + 2.0 * c / _NF4_CELLS - _CELL_SLACK
        right = -1.0 + 2.0 * (c + 1) / _NF4_CELLS + _CELL_SLACK
        if c == 0:
            left = float("-inf")  # values below −1 land here too
        if c == _NF4_CELLS - 1:
            right = float("inf")
        first = bisect.bisect_left(mids, left)
        within = [m for m in mids[first:] if m <= right]
        if len(within) > 1:
            raise ValueError("codebook entries too close for a 256-cell grid")
        below.append(first)
        inside.append(within[0] if within else float("inf"))
    tables = (torch.tensor(below, dtype=torch.uint8), torch.tensor(inside, dtype=torch.float32))
    _nf4_cache[key] = tables
    return tables


# ---------------------------------------------------------------------- helpers
def _bounds(n: int, runs: Runs | None, device: torch.device) -> list[tuple[int, int]]:
    """Chunks of about a million values; with runs, whole runs per chunk and the short
    last run (if any) alone, so every chunk is a ``[rows, width]`` view."""
    chunk = _CHUNK if device.type == "cpu" else _GPU_CHUNK
    if runs is None:
        return chunk_bounds(n, chunk)
    length = runs.length
    full = n // length
    per = max(1, chunk // length)
    out = [(r * length, min(r + per, full) * length) for r in range(0, full, per)]
    if full * length < n:
        out.append((full * length, n))
    return out


def _width(start: int, stop: int, length: int) -> int:
    """Row width of chunk ``[start, stop)``: the run length, or the short last run's."""
    size = stop - start
    return length if size % length == 0 else size


def _rows(x: Tensor, start: int, stop: int, length: int) -> Tensor:
    return x[start:stop].view(-1, _width(start, stop, length))


def _scratch(
    key: str, numel: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> Tensor:
    if device.type == "cpu":
        return scratch(key, numel, dtype)
    return torch.empty(numel, dtype=dtype, device=device)


def _run(
    fn: Callable[[int, int], None], bounds: list[tuple[int, int]], device: torch.device
) -> None:
    if device.type == "cpu":
        run_chunks(fn, bounds)
    else:
        for start, stop in bounds:
            fn(start, stop)
