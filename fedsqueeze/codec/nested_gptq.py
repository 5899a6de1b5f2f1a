"""Calibrated progressive codes: GPTQ rounding at every level of nested bit planes.

A progressive tensor (:mod:`fedsqueeze.codec.progressive`) is sent as the top bits of
its ``B``-bit codes, level by level; after level ``k`` the receiver holds the top
``c_k`` bits and decodes each coarse bucket at its table entry. Nearest rounding makes
every prefix the nearest-rounded tensor at that width. With the input moments ``H`` of
a Linear on calibration data (:mod:`fedsqueeze.codec.gptq`) the encoder can instead
choose the codes so that every prefix has a small *output* error ``tr(ΔW H ΔWᵀ)``:

    level 0:  GPTQ on the coarse grid (bucket t decodes at t·2^s + table₀[t], s = B − c₀)
    level k:  GPTQ again from the original weights, each value restricted to the
              children of the bucket it took at level k − 1 (the nested planes must
              hold), so each level has its own error feedback for its own grid
    last:     the same with s = 0: the full codes, restricted to the chain of buckets.

Every level's grid is the receiver's (the tables are those of the nearest codes; the
codec then sends the bucket means of the codes chosen, as for nearest codes), so the
stream format does not change and the decoder needs neither ``H`` nor the calibration
data: calibrated codes are ordinary codes. What changes is which codes: a value may sit
in a bucket that is not its nearest when that lowers the output error, and then keeps
to that bucket at every finer level (the error feedback of the finer levels compensates
the constraint through the other columns).

The trust region (``margin``) is what the nesting costs: a value GPTQ moves to a
neighbouring bucket at a coarse level stays in it at every finer level, so the fine
levels (and the whole stream) are worse than nearest rounding's by up to ``margin``
codes on the values moved. On all-MiniLM-L6-v2 (``fedsqueeze bench progressive``,
``quant=8:symmetric:block384:dq:hadamard,levels=2+1+1+1+1+2``, weighted order;
BENCHMARKS.md, "Calibrated codes"): embedding cosine at 1/16 / 1/8 of fp32 / whole
stream 0.787 / 0.9885 / ≈1 with nearest codes, 0.825 / 0.9899 / 0.9995 with margin 2,
0.855 / 0.984 / 0.995 with margin 8. A residual design (refinements quantizing what the
first level left, so the fine levels do not inherit its choices) would lift the trade-off,
at the price of a new record kind; not built.

Columns go in falling order of ``H``'s diagonal (GPTQ's "act order": the inputs with
the most energy are rounded first, while the most columns are left to absorb their
error). On all-MiniLM-L6-v2 with row tiers (margin 8, moments over 79k tokens) it lifts
1/16 of fp32 from 0.9053 to 0.9090 with generic row weights and from 0.9199 to 0.9230
with the clients' own, 1/8 and the whole stream within ±0.0003 (BENCHMARKS.md, "Row
weights from the clients' own text"). The order is the encoder's: the decoder sees
ordinary codes.

The coarse levels' bucket tables are then refitted for the output error too
(:func:`output_tables`: the offsets each bucket decodes at, by least squares in the
``H`` metric, where the bucket means are least squares in the plain one): 1/16 of fp32
0.9230 → 0.9275 with the clients' own row weights, 1/8 and the whole stream unchanged.

Monotone property: every level's codes are nested in the coarser ones (tested, and the
decoder's prefix checks are unchanged). What falls level by level is the output error on
the calibration inputs, not the squared weight error of nearest rounding (tested on
random problems; not a theorem: each level is GPTQ, a greedy rounding).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedsqueeze.codec.gptq import feedback, normal_equations, prepare
from fedsqueeze.codec.kernels import Runs
from fedsqueeze.codec.progressive import bucket_table, cumulative_bits, reconstruct
from fedsqueeze.codec.quantization import QuantParams
from fedsqueeze.codec.rotation import rotate
from fedsqueeze.codec.row_tiers import check_row_weights
from fedsqueeze.codec.spec import QuantScheme

__all__ = [
    "REFIT_BUCKETS",
    "Calibration",
    "calibrated_codes",
    "nested_codes",
    "output_gains",
    "output_tables",
    "rotated_hessian",
]

_LINEAR = (QuantScheme.AFFINE, QuantScheme.SYMMETRIC, QuantScheme.POW2)


@dataclass(frozen=True)
class Calibration:
    """What the encoder of a progressive spec needs to choose calibrated codes.

    Attributes
    ----------
    hessians
        Tensor name → ``[cols, cols]`` input moments ``Σ x xᵀ`` of the Linear whose
        weight it is (``[rows, cols]``), over calibration inputs, in the weight's own
        (unrotated) basis. Tensors without an entry are rounded to nearest.
    margin
        The trust region of :func:`nested_codes`, in codes of the full width (0: nearest
        rounding at every level and the bucket means as tables, the stream an
        uncalibrated encode makes; above 0 the coarse tables are also refitted for the
        output error, :func:`output_tables`).
    damp
        Diagonal damping of ``H``, as a fraction of its mean.
    rows
        Tensor name → per-row weights (``[rows]``, finite, at least 0) of a lookup table
        (``[rows, dim]``): how often the calibration inputs read each row, the diagonal
        of a one-hot input's moments. The encoder sends such a table's rows in tiers by
        weight (:mod:`fedsqueeze.codec.row_tiers`, format version 11), so the rows read
        most get their refinements first.
    defer
        With ``rows``, in a full model of a dense spec (not a delta): the lightest tier
        is *deferred* (format version 13): its base level travels where the
        rate-distortion order puts it, and until then its rows decode to the tier's
        mean row, so rows hardly read need not cost a bit each before the rest of the
        model is refined, and much smaller prefixes decode. Off by default: the order
        is only as good as the row weights, and with counts of text the model does not
        serve it sends those rows too late (BENCHMARKS.md, "Deferred tiers").
    tier_costs
        With ``defer``: table name → ``(unread, fill)``, what the order's row weights
        miss about the deferred tier, measured on held-out text (e.g.
        :func:`fedsqueeze.bench.row_probe.minilm_tier_costs`): ``unread``, the output
        cost per unit of weighted squared error of noise in the rows the weights call
        unread, over that of noise in the rows they call read (the weights underrate
        such rows); ``fill``, the cost per unit of those rows at their mean row over that
        of noise in them (a row at the mean loses what sets it apart). The deferred
        tier's gains are multiplied by ``unread``, and its base level's gain counts the
        fill's squared error ``fill`` times. Missing tables: ``(1.0, 1.0)``.
    """

    hessians: Mapping[str, Tensor] = field(default_factory=dict)
    margin: int = 8
    damp: float = 0.01
    rows: Mapping[str, Tensor] = field(default_factory=dict)
    defer: bool = False
    tier_costs: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.margin < 0 or not self.damp >= 0:
            raise ValueError("margin and damp must be at least 0")
        for name, costs in self.tier_costs.items():
            if len(costs) != 2 or not all(math.isfinite(c) and c > 0 for c in costs):
                raise ValueError(f"the tier costs of {name!r} must be two finite numbers > 0")
        for name, h in self.hessians.items():
            if not isinstance(h, Tensor) or h.ndim != 2 or h.shape[0] != h.shape[1]:
                raise ValueError(f"the hessian of {name!r} must be a square matrix")
            if not bool(torch.isfinite(h).all()):
                raise ValueError(f"the hessian of {name!r} is not finite")
        for name, w in self.rows.items():
            try:
                check_row_weights(w)
            except ValueError as exc:
                raise ValueError(f"the row weights of {name!r}: {exc}") from None


def calibrated_codes(
    shape: tuple[int, ...],
    values: Tensor,
    codes: Tensor,
    qp: QuantParams,
    levels: tuple[int, ...],
    channels_of: Tensor | Runs | None,
    hessian: Tensor,
    seed: int | None,
    calibration: Calibration,
) -> Tensor:
    """The progressive encoder's codes of one dense tensor, chosen by :func:`nested_codes`.

    ``values`` (flat float32, rotated with ``seed`` when not ``None``) and their nearest
    ``codes`` (flat) as the encoder made them; returns codes of the same dtype and shape.
    A non-linear scheme (k-means, NF4) keeps its nearest codes.

    Raises
    ------
    ValueError
        ``hessian`` does not match the tensor's columns (``shape[1:]``'s product).
    """
    n = values.numel()
    rows, cols = _weight_matrix(shape, n, hessian)
    if qp.scheme not in _LINEAR or n == 0:
        return codes
    h = _in_basis(hessian, seed)
    if qp.scale.dim() == 0:
        scale = qp.scale.expand(n)
        zp = qp.zero_point.expand(n)
    else:
        index = (
            channels_of.index(n, values.device) if isinstance(channels_of, Runs) else channels_of
        )
        if index is None:
            raise ValueError("per-channel parameters need the channel of every value")
        scale, zp = qp.scale[index], qp.zero_point[index]
    tables = [
        bucket_table(codes, qp, cumulative_bits(levels, k), channels_of)
        if k < len(levels) - 1
        else None
        for k in range(len(levels))
    ]
    low = 1 if qp.scheme is not QuantScheme.AFFINE else 0
    chosen = nested_codes(
        values.reshape(rows, cols).cpu(), h, scale.reshape(rows, cols).cpu(),
        zp.reshape(rows, cols).cpu(), qp.bits, levels, tables, (low, (1 << qp.bits) - 1),
        nearest=codes.reshape(rows, cols).to(torch.int64).cpu(),
        margin=calibration.margin, damp=calibration.damp,
    )  # fmt: skip
    return chosen.reshape(codes.shape).to(device=codes.device, dtype=codes.dtype)


def _weight_matrix(shape: tuple[int, ...], n: int, hessian: Tensor) -> tuple[int, int]:
    """The ``rows × cols`` matrix ``n`` values of ``shape`` are seen as, checked against
    the ``[cols, cols]`` input moments (``ValueError``)."""
    rows = shape[0] if len(shape) >= 2 else 1
    cols = n // rows
    if hessian.shape != (cols, cols):
        raise ValueError(f"a hessian of shape {tuple(hessian.shape)} for {rows}x{cols} weights")
    return rows, cols


@dataclass(frozen=True)
class _OutputMetric:
    """A calibrated tensor as :func:`output_tables` and :func:`output_gains` see it: the
    ``rows × cols`` float64 values ``x`` (in the encoder's basis), the flat int64
    ``codes`` and the input moments ``h`` in the same basis."""

    rows: int
    cols: int
    h: Tensor
    x: Tensor
    codes: Tensor

    @classmethod
    def of(
        cls,
        shape: tuple[int, ...],
        values: Tensor,
        codes: Tensor,
        hessian: Tensor,
        seed: int | None,
    ) -> _OutputMetric:
        """Raises ``ValueError`` when ``hessian`` does not match the tensor's columns."""
        rows, cols = _weight_matrix(shape, values.numel(), hessian)
        x = values.reshape(rows, cols).to(torch.float64)
        return cls(rows, cols, _in_basis(hessian, seed), x, codes.reshape(-1).to(torch.int64))

    def error(self, e: Tensor) -> float:
        """``tr(E H Eᵀ)`` of an error ``e`` (``rows × cols``, float64)."""
        return float(((e @ self.h) * e).sum())


def _in_basis(hessian: Tensor, seed: int | None) -> Tensor:
    """The input moments (float64) in the basis the encoder's values are in: rotated with
    ``seed`` when not ``None``."""
    h = hessian.to(torch.float64)
    return rotated_hessian(h, seed) if seed is not None else h


def rotated_hessian(hessian: Tensor, seed: int) -> Tensor:
    """``M H Mᵀ`` (float64) for ``rotate(x) = M x`` per row: the input moments in the
    basis a rotated weight sees (``W x = (W Mᵀ)(M x)``)."""
    n = hessian.shape[0]
    m = rotate(torch.eye(n), seed).to(torch.float64).T
    return m @ hessian.to(torch.float64) @ m.T


def nested_codes(
    values: Tensor,
    hessian: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    bits: int,
    levels: tuple[int, ...],
    tables: list[Tensor | None],
    code_range: tuple[int, int],
    nearest: Tensor | None = None,
    margin: int = 8,
    damp: float = 0.01,
    block: int = 128,
) -> Tensor:
    """Codes of ``values`` chosen level by level by GPTQ, nested across levels.

    Parameters
    ----------
    values
        ``[rows, cols]`` float: what the quantizer sees (rotated if the spec rotates).
    hessian
        ``[cols, cols]`` input moments in the same basis as ``values``' rows.
    scale, zero_point
        ``[rows, cols]`` float: each value's quantization scale and zero point (code
        ``q`` decodes to ``(q − zero_point) · scale``).
    bits
        Code width ``B`` (``sum(levels)``).
    levels
        Bits each level adds.
    tables
        Per level, the ``2^c_k`` bucket offsets in code units the rounding assumes the
        receiver decodes with (``None`` for the last level).
    code_range
        Smallest and largest code allowed.
    nearest
        ``[rows, cols]`` int64 nearest-rounded codes; with it, every level's choice of
        a value is restricted to buckets holding a code within ``margin`` of the value's
        nearest code (a trust region: a value may move to a neighbouring bucket when it
        lies near the border, never far, so the finer levels are not tied to a bucket
        far from the value).
    margin
        See ``nearest``.
    damp, block
        As :func:`fedsqueeze.codec.gptq.gptq_codes`.

    Returns
    -------
    Tensor
        ``[rows, cols]`` int64 codes in ``code_range``; the top ``c_k`` bits of each are
        the bucket it took at level ``k``.
    """
    if sum(levels) != bits or len(tables) != len(levels):
        raise ValueError("levels must add up to bits, with one table per level")
    lo_code, hi_code = code_range
    if not 0 <= lo_code <= hi_code < 1 << bits:
        raise ValueError(f"code range {code_range} outside {bits}-bit codes")
    w, upper, perm = prepare(values, hessian, damp, act_order=True)
    scale64 = scale.to(torch.float64)
    zp64 = zero_point.to(torch.float64)
    near = None if nearest is None else nearest.to(torch.int64)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    parent: Tensor | None = None
    held = 0
    codes = torch.empty(0, dtype=torch.int64)
    for level, add in enumerate(levels):
        held += add
        shift = bits - held
        table = tables[level]
        offsets = (
            torch.zeros(1 << held, dtype=torch.float64)
            if table is None
            else table.to(torch.float64)
        )
        if offsets.numel() != 1 << held:
            raise ValueError(f"level {level} needs a table of {1 << held} entries")
        lo_all, hi_all = lo_code >> shift, hi_code >> shift
        prev = parent

        def pick(col: Tensor, j: int, shift: int = shift, offsets: Tensor = offsets,
                 add: int = add, lo_all: int = lo_all, hi_all: int = hi_all,
                 prev: Tensor | None = prev) -> tuple[Tensor, Tensor]:  # fmt: skip
            s, zp = scale64[:, j], zp64[:, j]
            units = col / s + zp
            if prev is None:
                lo = torch.full_like(units, lo_all, dtype=torch.int64)
                hi = torch.full_like(units, hi_all, dtype=torch.int64)
            else:
                first = prev[:, j] << add
                lo = first.clamp_min(lo_all)
                hi = (first + (1 << add) - 1).clamp_max(hi_all)
            if near is not None:
                # the window around the nearest code, clamped into the chain's buckets
                # (the chain wins where they do not meet: the planes must nest)
                low = (near[:, j] - margin).clamp_min(lo_code) >> shift
                high = (near[:, j] + margin).clamp_max(hi_code) >> shift
                lo, hi = torch.clamp(low, lo, hi), torch.clamp(high, lo, hi)
            guess = torch.floor(units / (1 << shift)).to(torch.int64)
            best = torch.zeros_like(guess)
            best_dist = torch.full_like(units, float("inf"))
            for step in (-1, 0, 1):
                cand = torch.minimum(torch.maximum(guess + step, lo), hi)
                dist = (cand * (1 << shift) + offsets[cand] - units).abs()
                better = dist < best_dist
                best = torch.where(better, cand, best)
                best_dist = torch.where(better, dist, best_dist)
            value = (best * (1 << shift) + offsets[best] - zp) * s
            return best, value

        codes = feedback(w, upper, perm, pick, block)
        parent = codes
    return codes


#: Coarse levels whose bucket table is refitted for the output error (at most this many
#: buckets: one small linear system each; finer tables keep their bucket means).
REFIT_BUCKETS = 16


def output_tables(
    shape: tuple[int, ...],
    values: Tensor,
    codes: Tensor,
    qp: QuantParams,
    levels: tuple[int, ...],
    tables: list[Tensor | None],
    channels_of: Tensor | Runs | None,
    hessian: Tensor,
    seed: int | None,
) -> list[Tensor | None]:
    """The bucket tables of a calibrated tensor's coarse levels, refitted for its output
    error ``tr(E H Eᵀ)`` instead of the squared weight error.

    A table holds, per bucket, the offset (in code units) the receiver decodes the
    bucket at. The bucket means (``tables``, :func:`~fedsqueeze.codec.progressive.bucket_table`)
    are the offsets nearest the full-precision decode in squared error; GPTQ chose the
    codes for the output error, and the offsets with the least output error are the
    least-squares solution of ``G t = g``, ``G_bc = tr(M_b H M_cᵀ)``,
    ``g_b = tr(M_b H Rᵀ)``, where ``M_b`` holds each value's scale where its bucket is
    ``b`` and ``R`` what the buckets' offset-0 decode leaves. Offsets are clamped into
    their bucket (the decoder refuses others), rounded as the stream stores them
    (float16), and kept only where they give a lower output error than the bucket means.
    Levels of more than :data:`REFIT_BUCKETS` buckets, the last level (no table), and
    non-linear schemes keep ``tables``. The decoder sees ordinary tables.

    Raises
    ------
    ValueError
        ``hessian`` does not match the tensor's columns.
    """
    out = list(tables)
    if qp.codebook is not None or qp.scheme not in _LINEAR:
        return out
    metric = _OutputMetric.of(shape, values, codes, hessian, seed)
    rows, cols, h, x, full = metric.rows, metric.cols, metric.h, metric.x, metric.codes
    for level, table in enumerate(tables):
        held = cumulative_bits(levels, level)
        n = 1 << held
        if table is None or n > REFIT_BUCKETS:
            continue
        top = full >> (qp.bits - held)
        zeros = torch.zeros(n, dtype=torch.float32)
        base = reconstruct(top, qp, held, zeros, channels_of).reshape(rows, cols).to(torch.float64)
        ones = torch.ones(n, dtype=torch.float32)
        unit = reconstruct(top, qp, held, ones, channels_of).reshape(rows, cols).to(torch.float64)
        unit -= base  # each value's scale: what one code unit of offset moves it
        buckets = top.reshape(rows, cols)
        masks = [unit * (buckets == b) for b in range(n)]
        gram, rhs = normal_equations(masks, x - base, h)
        unused = torch.diagonal(gram) <= 0  # no value there (or only zero scales)
        gram[unused, :] = 0.0
        gram[:, unused] = 0.0
        gram[unused, unused] = 1.0
        rhs[unused] = table.to(torch.float64)[unused]
        try:
            offsets = torch.linalg.solve(gram, rhs)
        except RuntimeError:  # singular: keep the bucket means
            continue
        top_offset = float((1 << (qp.bits - held)) - 1)
        refit = offsets.clamp(0.0, top_offset).to(torch.float16).to(torch.float32)
        if not bool(torch.isfinite(refit).all()):
            continue
        now = reconstruct(top, qp, held, table, channels_of).reshape(rows, cols)
        then = reconstruct(top, qp, held, refit, channels_of).reshape(rows, cols)
        if metric.error(x - then.to(torch.float64)) < metric.error(x - now.to(torch.float64)):
            out[level] = refit
    return out


def output_gains(
    shape: tuple[int, ...],
    values: Tensor,
    codes: Tensor,
    qp: QuantParams,
    levels: tuple[int, ...],
    tables: list[Tensor | None],
    channels_of: Tensor | Runs | None,
    hessian: Tensor,
    seed: int | None,
    decoded: Tensor | None = None,
) -> list[float]:
    """What each level of a calibrated tensor removes from its *output* error on the
    calibration inputs, ``tr(E H Eᵀ)`` with ``E`` the weights the receiver lacks, in
    weight units (times ``cols / tr(H)``, so isotropic inputs give the squared error):
    the gains the order weighs a calibrated tensor's levels by, as GPTQ chose its codes
    for that error. ``values`` (flat float32, rotated with ``seed`` when not ``None``)
    and ``codes`` as :func:`calibrated_codes` takes them; ``decoded`` (float32, like
    ``values``), if given, receives what the last level decodes to, as
    :func:`~fedsqueeze.codec.progressive.level_gains` gives it.

    Raises
    ------
    ValueError
        ``hessian`` does not match the tensor's columns.
    """
    metric = _OutputMetric.of(shape, values, codes, hessian, seed)
    rows, cols, x, full = metric.rows, metric.cols, metric.x, metric.codes
    trace = float(torch.diagonal(metric.h).sum())
    scale = cols / trace if trace > 0 else 1.0

    def error(e: Tensor) -> float:
        return metric.error(e) * scale

    before = error(x)
    gains = []
    for level in range(len(levels)):
        held = cumulative_bits(levels, level)
        after = reconstruct(full >> (qp.bits - held), qp, held, tables[level], channels_of)
        left = error(x - after.reshape(rows, cols).to(torch.float64))
        gains.append(before - left)
        before = left
        if decoded is not None and level == len(levels) - 1:
            decoded.reshape(-1).copy_(after.reshape(-1))
    return gains
