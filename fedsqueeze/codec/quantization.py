"""Linear and k-means quantization of 1-D value vectors: choose params → quantize → dequantize.

Schemes (:class:`~fedsqueeze.codec.spec.QuantScheme`), with ``qmax = 2^bits − 1``:

* AFFINE: ``w ≈ scale · (q − zp)``, ``q ∈ [0, qmax]``; the range always includes 0 and
  ``zp`` is an integer, so 0 is exact.
* SYMMETRIC: ``zp = 2^(bits−1)``, ``q ∈ [1, qmax]``, ``scale = max|w| / (2^(bits−1) − 1)``.
* POW2: SYMMETRIC with the scale rounded up to ``2^−p`` (``p`` an integer in
  ``[−126, 126]``), so dequantization is a shift.
* KMEANS: ``w ≈ codebook[q]`` (see :mod:`fedsqueeze.codec.kmeans`).
* NF4: ``w ≈ scale · NF4[q]`` with ``scale`` the absolute maximum (QLoRA; the codebook
  is fixed, see :mod:`fedsqueeze.codec.blockwise`).

Granularity PER_BLOCK works exactly as PER_CHANNEL with ``channels`` the block of each
value; its scales are stored in the spec's :class:`~fedsqueeze.codec.spec.ScaleFormat`
(rounded up, so the error bound holds with the stored scale).

Values must be finite with ``|w| <= 2^126``, which keeps every code of every scheme
finite after dequantization; decoders reject parameters under which some code is not.

Per-tensor parameters, and per-set parameters whose sets are consecutive runs
(:class:`~fedsqueeze.codec.kernels.Runs`: dense per-channel and block-wise), go through
the chunked multi-core kernels of :mod:`fedsqueeze.codec.kernels` with nearest rounding;
an explicit per-value index of sets (sparse per-channel), stochastic rounding and
k-means go through the loops here, chunks of about a million values with in-place
operations. Linear stochastic rounding takes one key from the generator per call and
hashes each value's position with it (:mod:`fedsqueeze.codec.draws`), so a compiled
kernel can make the same draws anywhere (:mod:`fedsqueeze.codec.select_quantize`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from fedsqueeze.codec import draws, jit
from fedsqueeze.codec.blockwise import (
    NF4_CODEBOOK,
    DoubleQuant,
    scale_bytes,
    scales_from_bytes,
    scales_to_bytes,
    store_scales,
)
from fedsqueeze.codec.chunks import chunk_bounds, run_chunks, scratch
from fedsqueeze.codec.kernels import (
    Runs,
    dequantize_linear,
    dequantize_table,
    nearest_nf4,
    quantize_linear,
    value_range,
)
from fedsqueeze.codec.kmeans import assign, assign_stochastic, kmeans_codebook
from fedsqueeze.codec.spec import Granularity, QuantScheme, Rounding, ScaleFormat
from fedsqueeze.errors import FormatError

__all__ = [
    "RANGE_ERROR",
    "QuantParams",
    "Runs",
    "choose_qparams",
    "dequantize",
    "linear_bounds",
    "qparams_from_bytes",
    "qparams_to_bytes",
    "quantize",
]

MIN_BITS, MAX_BITS = 2, 8
#: Smallest scale (float32's smallest normal, 2^−126): its reciprocal is finite.
MIN_SCALE = 2.0**-126
MAX_SHIFT = 126
#: Largest supported magnitude: with it, ``scale · max(zp, qmax − zp) <= 2^127``.
MAX_MAGNITUDE = 2.0**126
#: The refusal of values beyond it, or not finite (every path says it so).
RANGE_ERROR = f"values must be finite, with |x| <= 2^126 ({MAX_MAGNITUDE:.3g})"
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_CPU_CHUNK = 1 << 20
_GPU_CHUNK = 1 << 24
#: Which parameter set each value uses: an int64 index per value, or consecutive runs.
Channels = Tensor | Runs | None


@dataclass(frozen=True, eq=False)
class QuantParams:
    """Quantization parameters of one tensor (``eq=False``: they hold tensors).

    Attributes
    ----------
    bits
        Code width, 2..8.
    scheme
        The :class:`QuantScheme`.
    scale
        float32, ``[]`` (per tensor) or ``[C]`` (per channel), finite and > 0. For KMEANS
        the largest gap between adjacent centroids (nearest-centroid error ≤ scale/2
        between the first and last centroid), derived from the codebook.
    zero_point
        float32 holding integers in ``[0, 2^bits − 1]``, shaped like ``scale``;
        ``2^(bits−1)`` for SYMMETRIC and POW2, 0 for KMEANS.
    shift
        POW2 only: int32 ``p`` with ``scale = 2^−p``, shaped like ``scale``.
    codebook
        KMEANS only: float32 ``[2^bits]``, ascending, fp16-representable.
    scale_format
        How ``scale`` is stored (FP32 unless block-wise); ``scale`` holds the stored values.
    double_quant
        DQ8 scales only: their codes.
    """

    bits: int
    scheme: QuantScheme
    scale: Tensor
    zero_point: Tensor
    shift: Tensor | None = None
    codebook: Tensor | None = None
    scale_format: ScaleFormat = ScaleFormat.FP32
    double_quant: DoubleQuant | None = None

    def __post_init__(self) -> None:
        _check_bits(self.bits, ValueError)
        if self.scale.dtype != torch.float32 or self.scale.dim() > 1:
            raise ValueError("scale must be a float32 tensor of shape [] or [C]")
        if self.zero_point.shape != self.scale.shape:
            raise ValueError("zero_point must have the shape of scale")
        if (self.shift is not None) != (self.scheme is QuantScheme.POW2):
            raise ValueError("shift is given exactly for the POW2 scheme")
        if self.shift is not None and self.shift.shape != self.scale.shape:
            raise ValueError("shift must have the shape of scale")
        if (self.codebook is not None) != (self.scheme is QuantScheme.KMEANS):
            raise ValueError("codebook is given exactly for the KMEANS scheme")
        if self.codebook is not None and self.codebook.shape != (1 << self.bits,):
            raise ValueError(f"codebook must have shape [{1 << self.bits}]")
        if self.scheme is QuantScheme.NF4 and self.bits != 4:
            raise ValueError("NF4 is 4 bits")
        if (self.double_quant is not None) != (self.scale_format is ScaleFormat.DQ8):
            raise ValueError("double_quant is given exactly for DQ8 scales")

    @property
    def num_params(self) -> int:
        """Number of channels the params describe (1 per tensor)."""
        return self.scale.numel()


# ---------------------------------------------------------------------- choose
def choose_qparams(
    values: Tensor,
    bits: int,
    scheme: QuantScheme,
    granularity: Granularity,
    channels: Channels = None,
    num_channels: int = 1,
    scale_format: ScaleFormat = ScaleFormat.FP32,
    *,
    known_range: tuple[Tensor, Tensor] | None = None,
) -> QuantParams:
    """Quantization parameters covering ``values``.

    Parameters
    ----------
    values
        Floating ``[n]``, finite (the kept values of a tensor).
    bits
        Code width, 2..8.
    scheme, granularity
        See the enums; KMEANS is per tensor only.
    channels
        PER_CHANNEL only: int64 ``[n]``, each value's output channel in
        ``[0, num_channels)``, or :class:`Runs` when the channels are consecutive runs
        (``num_channels`` of them, the fast path).
    num_channels
        PER_CHANNEL only: ``C``. Channels without values get scale 1 and the middle
        zero point. PER_BLOCK: the same, with blocks for channels.
    scale_format
        How the scales will be stored; they are rounded up to it (PER_BLOCK only: per
        tensor and per channel, scales are FP32).
    known_range
        PER_TENSOR only: the minimum and maximum of ``values`` (float32 ``[]``), when
        the caller has found them already (a pass over the values fewer); checked as a
        computed range is.

    Returns
    -------
    QuantParams
        On ``values``' device; ``scale`` of shape ``[]`` or ``[C]``. Degenerate inputs
        (empty, all zero, one value) get a valid scale.

    Raises
    ------
    ValueError
        Bad arguments, or non-finite values.
    """
    _check_values(values)
    _check_bits(bits, ValueError)
    x = values.detach().contiguous()
    if known_range is not None and not (
        granularity is Granularity.PER_TENSOR or isinstance(channels, Runs)
    ):
        raise ValueError("known_range is for per-tensor quantization or runs")
    if granularity is Granularity.PER_TENSOR:
        if x.numel():
            lo, hi = value_range(x, None) if known_range is None else known_range
            _check_range(lo, hi)
        else:
            lo = hi = torch.zeros((), dtype=torch.float32, device=x.device)
        empty = torch.tensor(x.numel() == 0, device=x.device)
    elif granularity in (Granularity.PER_CHANNEL, Granularity.PER_BLOCK):
        if scheme is QuantScheme.KMEANS:
            raise ValueError("k-means quantization is per tensor only")
        ch = _checked_channels(channels, x.numel(), num_channels)
        if isinstance(ch, Runs):
            # every run holds values: none empty
            lo, hi = value_range(x, ch) if known_range is None else known_range
            if lo.shape != (num_channels,) or hi.shape != (num_channels,):
                raise ValueError(f"known_range must hold {num_channels} minima and maxima")
            empty = torch.zeros(num_channels, dtype=torch.bool, device=x.device)
            _check_range(lo.amin(), hi.amax())
        else:
            if x.numel():
                _check_range(*value_range(x, None))
            lo, hi, empty = _channel_range(x, ch, num_channels)
    else:
        raise ValueError(f"unknown granularity {granularity!r}")
    if granularity is not Granularity.PER_BLOCK:
        scale_format = ScaleFormat.FP32

    def stored(raw: Tensor) -> tuple[Tensor, DoubleQuant | None]:
        valid = _valid_scale(raw)
        if scale_format is ScaleFormat.FP32:
            return valid, None
        scale, dq = store_scales(valid.reshape(-1), scale_format)
        return scale.to(valid.device).reshape(valid.shape), dq

    mid = float(1 << (bits - 1))
    qmax = float((1 << bits) - 1)
    if scheme is QuantScheme.AFFINE:
        lo = torch.clamp(lo, max=0.0)
        hi = torch.clamp(hi, min=0.0)
        # Divide before subtracting: hi − lo overflows near float32's maximum.
        scale, dq = stored(hi / qmax - lo / qmax)
        # + 0.0: a zero point of −0 becomes +0 (a run's minimum of ±0 may come back with
        # either sign, whichever kernel reduced it; zero points are stored as codes).
        zp = torch.round(-lo / scale).clamp_(0.0, qmax).add_(0.0)
        zp = torch.where(empty, torch.full_like(zp, mid), zp)
        return QuantParams(bits, scheme, scale, zp, scale_format=scale_format, double_quant=dq)
    if scheme is QuantScheme.NF4:
        if bits != 4:
            raise ValueError("NF4 is 4 bits")
        scale, dq = stored(torch.maximum(-lo, hi))
        zp = torch.zeros_like(scale)
        return QuantParams(bits, scheme, scale, zp, scale_format=scale_format, double_quant=dq)
    if scheme in (QuantScheme.SYMMETRIC, QuantScheme.POW2):
        amax = torch.maximum(-lo, hi)
        raw = amax / (mid - 1.0)
        zp = torch.full_like(raw, mid)
        if scheme is QuantScheme.SYMMETRIC:
            scale, dq = stored(raw)
            return QuantParams(bits, scheme, scale, zp, scale_format=scale_format, double_quant=dq)
        shift = _pow2_shift(raw)
        return QuantParams(bits, scheme, _shift_scale(shift), zp, shift=shift)
    if scheme is QuantScheme.KMEANS:
        codebook = kmeans_codebook(x, bits)
        return _kmeans_params(bits, codebook)
    raise ValueError(f"unknown scheme {scheme!r}")


# ---------------------------------------------------------------------- quantize
def quantize(
    values: Tensor,
    qp: QuantParams,
    rounding: Rounding,
    channels: Channels = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Integer codes of ``values``.

    Parameters
    ----------
    values
        Floating ``[n]``, finite.
    qp
        From :func:`choose_qparams` (moved to ``values``' device if needed).
    rounding
        NEAREST: ``|dequantize(q) − x| ≤ scale/2`` (plus float rounding) inside the
        range. STOCHASTIC: ``floor(x/scale + zp + u)``, ``u ~ U[0, 1)``, so
        ``E[dequantize(q)] = x`` inside the range: for linear codes the draws of
        :func:`fedsqueeze.codec.draws.uniform` at the values' positions under one key
        from ``generator`` (on ``values``' device; the global RNG when ``None``). For
        KMEANS and NF4, stochastic rounding picks one of the two codebook entries
        around ``x`` with probabilities that make it unbiased between the first and
        last entry (draws from ``generator`` itself).
    channels
        int64 ``[n]`` or :class:`Runs` when ``qp`` is per channel; ignored for
        per-tensor params.
    generator
        See ``rounding``.

    Returns
    -------
    Tensor
        uint8 ``[n]``, codes in ``[0, 2^bits − 1]`` (``[1, …]`` for SYMMETRIC/POW2).
    """
    _check_values(values)
    if not isinstance(rounding, Rounding):
        raise ValueError(f"unknown rounding {rounding!r}")
    device = values.device
    x = values.detach().contiguous()
    if qp.codebook is not None:  # KMEANS
        codebook = qp.codebook.to(device)
        if rounding is Rounding.NEAREST:
            return assign(x, codebook)
        return assign_stochastic(x, codebook, generator)
    per_channel = qp.scale.dim() == 1
    ch_any = _checked_channels(channels, x.numel(), qp.num_params) if per_channel else None
    runs = ch_any if isinstance(ch_any, Runs) else None
    fast = rounding is Rounding.NEAREST and (not per_channel or runs is not None)
    if qp.scheme is QuantScheme.NF4:
        if fast:
            return nearest_nf4(x, qp.scale, NF4_CODEBOOK, runs)
        if per_channel:
            ch = _index(ch_any, x.numel(), device)
            unit = x.to(torch.float32) / qp.scale.to(device)[ch]
        else:
            unit = x.to(torch.float32) / float(qp.scale)
        table = NF4_CODEBOOK.to(device)
        if rounding is Rounding.NEAREST:
            return assign(unit, table)
        return assign_stochastic(unit, table, generator)
    qmin, qmax = _code_range(qp)
    if fast:
        return quantize_linear(x, qp.scale, qp.zero_point, qmin, qmax, runs)
    # Stochastic rounding, or a per-value index of channels: the reference loop, in
    # chunks on the worker threads (each value's draw depends on its position alone).
    stochastic = rounding is Rounding.STOCHASTIC
    n = x.numel()
    out = torch.empty(n, dtype=torch.uint8, device=device)
    k = draws.key(generator) if stochastic and n else None
    if per_channel:
        ch_all = _index(ch_any, n, device)
        inv_c = 1.0 / qp.scale.to(device)
        zp_c = qp.zero_point.to(device)
    else:
        inv = float(1.0 / qp.scale)
        zp = float(qp.zero_point)

    def chunk(start: int, stop: int) -> None:
        if device.type == "cpu":
            b = scratch("a", stop - start, torch.float32)
        else:
            b = torch.empty(stop - start, dtype=torch.float32, device=device)
        # Round x/scale first and add the integer zero point after: adding it before
        # would round once more at the code's magnitude (up to 1e-5 of a step).
        # float32 before scaling: a half-precision product would round to 11 bits.
        xs = x[start:stop].to(torch.float32)
        if per_channel:
            ch = ch_all[start:stop]
            torch.mul(xs, inv_c[ch], out=b)
        else:
            torch.mul(xs, inv, out=b)
        if k is not None:
            b.add_(draws.uniform(k, start, stop - start, device)).floor_()
        else:
            b.round_()
        if per_channel:
            b.add_(zp_c[ch])
        else:
            b.add_(zp)
        out[start:stop] = b.clamp_(qmin, qmax)

    bounds = chunk_bounds(n, _chunk_size(device))
    if device.type == "cpu":
        run_chunks(chunk, bounds)
    else:
        for start, stop in bounds:
            chunk(start, stop)
    return out


def linear_bounds(
    qp: QuantParams,
) -> tuple[np.float32, np.float32, np.float32, np.float32, np.float32]:
    """Per-tensor linear params (AFFINE, SYMMETRIC, POW2) as a compiled kernel takes
    them, the float32 numbers :func:`quantize` and :func:`dequantize` compute with:
    ``(1/scale, zero_point, qmin, qmax, scale)``."""
    if qp.scale.dim() != 0 or qp.codebook is not None or qp.scheme is QuantScheme.NF4:
        raise ValueError("linear_bounds takes per-tensor linear params")
    qmin, qmax = _code_range(qp)
    return (
        np.float32(float(1.0 / qp.scale)),
        np.float32(float(qp.zero_point)),
        np.float32(qmin),
        np.float32(qmax),
        np.float32(float(qp.scale)),
    )


def _code_range(qp: QuantParams) -> tuple[float, float]:
    """The smallest and largest linear code: ``[0, 2^bits − 1]`` (AFFINE), ``[1, …]``
    (SYMMETRIC, POW2: the codes around the middle zero point)."""
    return (0.0 if qp.scheme is QuantScheme.AFFINE else 1.0), float((1 << qp.bits) - 1)


def dequantize(codes: Tensor, qp: QuantParams, channels: Channels = None) -> Tensor:
    """Float values of ``codes``.

    Parameters
    ----------
    codes
        uint8 ``[n]``, each ``< 2^bits``.
    qp
        The params (moved to ``codes``' device if needed).
    channels
        int64 ``[n]`` or :class:`Runs` when ``qp`` is per channel; ignored for
        per-tensor params.

    Returns
    -------
    Tensor
        float32 ``[n]`` on ``codes``' device: ``scale · (q − zp)`` or ``codebook[q]``.
    """
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise ValueError(f"codes must be 1-D uint8, got {codes.dtype} {tuple(codes.shape)}")
    codes = codes.contiguous()
    device = codes.device
    n = codes.numel()
    chunk = _chunk_size(device)
    tabled = qp.codebook is not None or qp.scheme is QuantScheme.NF4
    # amax is one fast reduction; a shifted copy and any() cost two passes.
    if tabled and qp.bits < 8 and n and int(codes.amax()) >> qp.bits:
        entries = "the 16-entry NF4" if qp.codebook is None else f"a {1 << qp.bits}-entry"
        raise FormatError(f"code out of range for {entries} codebook")
    if qp.codebook is not None:  # KMEANS
        out = torch.empty(n, dtype=torch.float32, device=device)
        codebook = qp.codebook.to(device=device, dtype=torch.float32)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            idx = codes[start:stop].to(torch.int32)
            torch.index_select(codebook, 0, idx, out=out[start:stop])
        return out
    per_set = qp.scale.dim() == 1
    ch_any = _checked_channels(channels, n, qp.num_params) if per_set else None
    if isinstance(ch_any, Tensor):  # a per-value index: gather the params chunk by chunk
        out = torch.empty(n, dtype=torch.float32, device=device)
        scale_c = qp.scale.to(device)
        zp_c = qp.zero_point.to(device)
        table = NF4_CODEBOOK.to(device)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            ch = ch_any[start:stop]
            o = out[start:stop]
            if qp.scheme is QuantScheme.NF4:
                torch.index_select(table, 0, codes[start:stop].to(torch.int32), out=o)
            else:
                # (q − zp) is exact in float32, so one rounding: as a lookup table.
                torch.sub(codes[start:stop], zp_c[ch], out=o)
            o.mul_(scale_c[ch])
        return out
    if qp.scheme is QuantScheme.NF4:
        return dequantize_table(codes, NF4_CODEBOOK, qp.scale, ch_any)
    return dequantize_linear(codes, qp.scale, qp.zero_point, ch_any)


# ---------------------------------------------------------------------- bytes
def qparams_to_bytes(qp: QuantParams) -> bytes:
    """Compact little-endian form of ``qp``, per parameter set (``C`` of them).

    AFFINE: ``C`` scales then ``C`` uint8 zero points; SYMMETRIC and NF4: ``C`` scales;
    POW2: ``C`` int8 shifts; KMEANS: ``2^bits`` float16 centroids. Scales are float32
    unless block-wise (then in ``qp.scale_format``, see
    :func:`~fedsqueeze.codec.blockwise.scales_to_bytes`).

    Raises
    ------
    ValueError
        Params that this form cannot carry exactly (hand-made ones: a codebook that is not
        fp16-representable, a fractional or out-of-range zero point, a bad scale or shift).
    """
    if qp.codebook is not None:  # KMEANS
        codebook = _np(qp.codebook).astype(np.float32)
        half = codebook.astype("<f2")
        if not np.array_equal(half.astype(np.float32), codebook):
            raise ValueError("k-means codebook is not exactly representable in float16")
        return half.tobytes()
    if qp.shift is not None:  # POW2
        shift = _np(qp.shift)
        if (np.abs(shift) > MAX_SHIFT).any():
            raise ValueError(f"shift outside [-{MAX_SHIFT}, {MAX_SHIFT}]")
        return shift.astype(np.int8).tobytes()
    scale_part = scales_to_bytes(qp.scale, qp.scale_format, qp.double_quant)
    if qp.scheme in (QuantScheme.SYMMETRIC, QuantScheme.NF4):
        return scale_part
    zp = _np(qp.zero_point)
    top = (1 << qp.bits) - 1
    if zp.dtype == np.float32 and jit.use(zp.size):  # the check and the bytes in one pass
        out = np.empty(zp.size, dtype=np.uint8)
        if not jit.zero_point_bytes(np.ascontiguousarray(zp), np.float32(top), out):
            raise ValueError(f"zero point must be an integer in [0, {top}]")
        return scale_part + out.tobytes()
    if ((zp != np.round(zp)) | (zp < 0) | (zp > top)).any():
        raise ValueError(f"zero point must be an integer in [0, {top}]")
    return scale_part + zp.astype(np.uint8).tobytes()


def qparams_from_bytes(
    data: bytes | memoryview,
    offset: int,
    bits: int,
    scheme: QuantScheme,
    num_params: int,
    scale_format: ScaleFormat = ScaleFormat.FP32,
) -> tuple[QuantParams, int]:
    """Parse :func:`qparams_to_bytes`' form at ``offset``; treats ``data`` as hostile.

    Parameters
    ----------
    data, offset
        The buffer and where the params start.
    bits, scheme, num_params
        From the record header (also checked): ``num_params`` is ``C`` per channel, 1
        per tensor (giving ``scale`` of shape ``[]``), and 1 for KMEANS; the block
        count for block-wise params.
    scale_format
        How the scales are stored (block-wise records; FP32 otherwise).

    Returns
    -------
    tuple[QuantParams, int]
        The params (on the CPU) and the offset just past them.

    Raises
    ------
    FormatError
        Truncated data, bad header values, non-finite or non-positive scales, zero points
        out of range, shifts out of ``[−126, 126]``, a non-finite or unsorted codebook.
    """
    _check_bits(bits, FormatError)
    if not isinstance(scheme, QuantScheme):
        raise FormatError(f"unknown quantization scheme {scheme!r}")
    if num_params < 1 or (scheme is QuantScheme.KMEANS and num_params != 1):
        raise FormatError(f"invalid number of quantization parameter sets {num_params}")
    if scheme is QuantScheme.NF4 and bits != 4:
        raise FormatError(f"NF4 with {bits} bits")
    if scheme in (QuantScheme.POW2, QuantScheme.KMEANS):
        scale_format = ScaleFormat.FP32  # shifts and codebooks have their own forms
    scales_size = scale_bytes(scale_format, num_params)
    sizes = {
        QuantScheme.AFFINE: scales_size + num_params,
        QuantScheme.SYMMETRIC: scales_size,
        QuantScheme.NF4: scales_size,
        QuantScheme.POW2: num_params,
        QuantScheme.KMEANS: 2 << bits,
    }
    end = offset + sizes[scheme]
    if offset < 0 or end > len(data):
        raise FormatError("quantization parameters truncated")
    shape = () if num_params == 1 else (num_params,)
    mid = float(1 << (bits - 1))

    def read(dtype: str, count: int, at: int) -> npt.NDArray[Any]:
        return np.frombuffer(data, dtype=dtype, count=count, offset=at)

    if scheme is QuantScheme.KMEANS:
        cb = read("<f2", 1 << bits, offset).astype(np.float32)
        if not np.isfinite(cb).all() or (np.diff(cb) < 0).any():
            raise FormatError("k-means codebook is not finite and sorted")
        return _kmeans_params(bits, torch.from_numpy(cb)), end
    if scheme is QuantScheme.POW2:
        p = read("i1", num_params, offset).astype(np.int32)
        if (np.abs(p) > MAX_SHIFT).any():
            raise FormatError(f"power-of-two shift outside [-{MAX_SHIFT}, {MAX_SHIFT}]")
        _check_codes_finite(np.ldexp(1.0, -p), mid, bits)
        shift = torch.from_numpy(p).reshape(shape)
        zp = torch.full(shape, mid, dtype=torch.float32)
        return QuantParams(bits, scheme, _shift_scale(shift), zp, shift=shift), end
    scale_t, dq = scales_from_bytes(data, offset, scale_format, num_params)
    scale_np = scale_t.numpy()
    scale = scale_t.reshape(shape)
    extra: dict[str, Any] = {"scale_format": scale_format, "double_quant": dq}
    if scheme is QuantScheme.NF4:  # codes reach ±scale: finite
        return QuantParams(bits, scheme, scale, torch.zeros(shape), **extra), end
    if scheme is QuantScheme.SYMMETRIC:
        _check_codes_finite(scale_np, mid, bits)
        zp_mid = torch.full(shape, mid, dtype=torch.float32)
        return QuantParams(bits, scheme, scale, zp_mid, **extra), end
    zp_np = read("u1", num_params, offset + scales_size).astype(np.float32)
    if (zp_np > (1 << bits) - 1).any():
        raise FormatError(f"zero point out of range for {bits} bits")
    _check_codes_finite(scale_np, zp_np, bits)
    zp_t = torch.from_numpy(zp_np).reshape(shape)
    return QuantParams(bits, scheme, scale, zp_t, **extra), end


# ---------------------------------------------------------------------- helpers
def _check_codes_finite(scale: npt.NDArray[Any], zp: npt.NDArray[Any] | float, bits: int) -> None:
    """FormatError unless every code ``0..2^bits − 1`` dequantizes to a finite float32.

    The largest scale times the farthest reach of any zero point settles most streams in
    three reductions (1.5 → 0.1 ms for a 100 MB tensor's 390K block parameters); the
    product of each pair is checked where that bound does not."""
    qmax = (1 << bits) - 1
    zps = np.asarray(zp)
    if scale.size and zps.size:
        bound = max(float(zps.max()), qmax - float(zps.min()))
        if float(scale.max()) * bound <= _FLOAT32_MAX:  # NaN fails: the exact check below
            return
    reach = np.maximum(zp, qmax - zps.astype(np.float64))
    if (scale.astype(np.float64) * reach > _FLOAT32_MAX).any():
        raise FormatError("quantization parameters put codes beyond the float32 range")


def _check_bits(bits: int, error: type[Exception]) -> None:
    if not (isinstance(bits, int) and MIN_BITS <= bits <= MAX_BITS):
        raise error(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")


def _check_values(values: Tensor) -> None:
    if values.dim() != 1 or not values.is_floating_point():
        raise ValueError(f"values must be 1-D floating, got {values.dtype} {tuple(values.shape)}")


def _checked_channels(channels: Channels, n: int, num_channels: int) -> Tensor | Runs:
    if num_channels < 1:
        raise ValueError(f"num_channels must be >= 1, got {num_channels}")
    if channels is None:
        raise ValueError("per-channel quantization needs channels")
    if isinstance(channels, Runs):
        if n and channels.count(n) != num_channels:
            raise ValueError(
                f"{n} values in runs of {channels.length} fill {channels.count(n)} sets, "
                f"not {num_channels}"
            )
        return channels if n else channels.index(0)
    if channels.dtype != torch.int64 or channels.shape != (n,):
        raise ValueError(f"channels must be int64 [{n}], got {channels.dtype} {channels.shape}")
    if n:
        lo, hi = torch.aminmax(channels)
        if not bool((lo >= 0) & (hi < num_channels)):
            raise ValueError(f"channels must be in [0, {num_channels})")
    return channels


def _index(channels: Tensor | Runs | None, n: int, device: torch.device) -> Tensor:
    """A per-value index of channels (built from runs for the reference loops)."""
    if channels is None:
        raise ValueError("per-channel quantization needs channels")
    return channels.index(n, device) if isinstance(channels, Runs) else channels


def _check_range(lo: Tensor, hi: Tensor) -> None:
    # NaN fails both comparisons; the bound keeps every code's value finite.
    if not bool((lo >= -MAX_MAGNITUDE) & (hi <= MAX_MAGNITUDE)):
        raise ValueError(RANGE_ERROR)


def _channel_range(x: Tensor, channels: Tensor, c: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel min and max (0 for empty channels) and the empty flags, float32 ``[C]``."""
    x32 = x.to(torch.float32)
    inf = float("inf")
    lo = torch.full((c,), inf, device=x.device).scatter_reduce(0, channels, x32, "amin")
    hi = torch.full((c,), -inf, device=x.device).scatter_reduce(0, channels, x32, "amax")
    empty = lo > hi
    zero = torch.zeros_like(lo)
    return torch.where(empty, zero, lo), torch.where(empty, zero, hi), empty


def _valid_scale(raw: Tensor) -> Tensor:
    """``raw`` with zeros (degenerate ranges) replaced by 1, and at least 2^−126."""
    scale = torch.where(raw > 0, raw, torch.ones_like(raw))
    return scale.clamp(min=MIN_SCALE).to(torch.float32)


def _pow2_shift(raw: Tensor) -> Tensor:
    """int32 ``p`` with ``2^−p`` the smallest power of two ``>= raw`` (0 for ``raw == 0``)."""
    mantissa, exponent = torch.frexp(raw)  # raw = m · 2^e, m in [0.5, 1)
    ceil_log2 = exponent - (mantissa == 0.5).to(exponent.dtype)
    shift = (-ceil_log2).clamp(-MAX_SHIFT, MAX_SHIFT)
    return torch.where(raw > 0, shift, torch.zeros_like(shift)).to(torch.int32)


def _shift_scale(shift: Tensor) -> Tensor:
    return torch.ldexp(torch.ones(shift.shape, device=shift.device), -shift).to(torch.float32)


def _kmeans_params(bits: int, codebook: Tensor) -> QuantParams:
    gap = (codebook[1:] - codebook[:-1]).max()
    scale = _valid_scale(gap.to(torch.float32))
    return QuantParams(bits, QuantScheme.KMEANS, scale, torch.zeros_like(scale), codebook=codebook)


def _chunk_size(device: torch.device) -> int:
    # CPU: a few MB of float32 temporaries stay in cache; GPU: fewer, larger launches.
    return _CPU_CHUNK if device.type == "cpu" else _GPU_CHUNK


def _np(t: Tensor) -> npt.NDArray[Any]:
    return t.detach().cpu().reshape(-1).numpy()
