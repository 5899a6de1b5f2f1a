"""Device-resident hot paths of the codec: quantize + pack, unpack + dequantize, magnitude
selection, each a few whole-tensor torch operations on the tensor's own device.

The reference stages (:mod:`~fedsqueeze.codec.quantization`,
:mod:`~fedsqueeze.codec.kernels`, :mod:`~fedsqueeze.codec.bitpack`,
:mod:`~fedsqueeze.codec.pruning`) are written for a CPU: chunks of a million values on
worker threads, scalars read back to the host to pick the next step. On a GPU each such
read stalls the queue and each chunk is a launch, so the same arithmetic is written here
as whole-tensor operations with the parameters kept on the device: no value goes back to
the host between the first kernel of a tensor's encode and its last, then one scalar
read at the end checks what the reference checks on the way (finite range, fp16 scales,
padding bits, the pruning band). With :func:`compile_enabled` the element-wise parts
(quantize and pack, unpack and dequantize) run under ``torch.compile`` as one kernel
each, and fall back to eager once, for good, when compiling fails (no compiler, an
unsupported backend).

Results are *identical* to the reference for the specs handled here (nearest rounding;
affine, symmetric and NF4 schemes; per tensor, dense per channel and block-wise; 2, 3,
4 and 8 bits; fp32, fp16, bf16 and dq8 scales): the same float32 operations in the same
order, with the parameters as device tensors, never host scalars. That matters: on CUDA,
``tensor / python_float`` multiplies by the reciprocal (a CPU scalar operand takes that
shortcut), which is not the division the CPU reference does. ``tests/codec/test_fused.py``
compares codes, bytes and decoded values on the CPU; ``fedsqueeze.bench.gpucheck``
compares CUDA against CPU bytes.

Magnitude selection (:func:`magnitude_indices`, from
:mod:`~fedsqueeze.codec.fused_select`) keeps exactly the set the reference keeps; the
compile switch is :mod:`~fedsqueeze.codec.fused_compile`'s. This module is the one the
encoder and decoder call (:func:`encode_values`, :func:`dequantize_packed`,
:func:`magnitude_indices` for tensors on a device in :data:`DEVICE_TYPES`).

NF4 codes come from ``bucketize`` over the codebook midpoints (the reference's
:func:`~fedsqueeze.codec.kmeans.assign`, which its grid-table kernel equals on
``[−1, 1]``, the range absmax scales guarantee).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fedsqueeze.codec import bitpack
from fedsqueeze.codec.blockwise import FP16_SCALE_ERROR, NF4_CODEBOOK, DoubleQuant, store_scales
from fedsqueeze.codec.fused_blocks import stored_format
from fedsqueeze.codec.fused_compile import (
    COMPILE_ENV,
    compile_enabled,
    dividing_kernel,
    exact_kernel,
    failed_kernels,
    kernel,
    set_compile,
)
from fedsqueeze.codec.fused_select import HOST_BELOW, SAMPLE_ABOVE, band_ranks, magnitude_indices
from fedsqueeze.codec.kernels import Runs, nf4_midpoints
from fedsqueeze.codec.quantization import MAX_MAGNITUDE, MIN_SCALE, RANGE_ERROR, QuantParams
from fedsqueeze.codec.spec import Granularity, QuantScheme, QuantSpec, Rounding, ScaleFormat
from fedsqueeze.errors import FormatError

__all__ = [
    "COMPILE_ENV",
    "DEVICE_TYPES",
    "HOST_BELOW",
    "SAMPLE_ABOVE",
    "FusedCodes",
    "active",
    "band_ranks",
    "compile_enabled",
    "dequantize_packed",
    "encode_values",
    "failed_kernels",
    "magnitude_indices",
    "pack_bits",
    "quantize_packed",
    "set_compile",
    "supports",
    "supports_decode",
    "unpack_bits",
]

#: Row width of a per-tensor quantization's main part (a multiple of 8: every code width
#: packs whole bytes per row, so rows pack independently).
_ROW = 1024
_FP16_MAX = 65504.0
_SCHEMES = (QuantScheme.AFFINE, QuantScheme.SYMMETRIC, QuantScheme.NF4)
_PACKED_BITS = (2, 3, 4, 8)

#: Devices whose tensors the encoder and decoder send through this module (the CPU keeps
#: its threaded reference kernels, faster there; tests add "cpu" to check the hooks).
DEVICE_TYPES: set[str] = {"cuda"}


def active(device: torch.device) -> bool:
    """Whether tensors on ``device`` go through the fused paths (:data:`DEVICE_TYPES`)."""
    return device.type in DEVICE_TYPES


def encode_values(
    values: Tensor,
    q: QuantSpec,
    channels: object,
    num_channels: int,
    known_range: tuple[Tensor, Tensor] | None,
    need_decoded: bool,
) -> tuple[QuantParams, Tensor, Tensor] | None:
    """The encoder's hook: params, packed codes and what the receiver decodes (``values``
    itself unless ``need_decoded``) of ``values`` on an :func:`active` device; ``None``
    when this module does not take them (the reference path runs).

    Raises
    ------
    ValueError
        As the reference: values out of range, fp16 scales that do not fit.
    """
    if not active(values.device) or not values.numel() or not supports(q, channels):
        return None
    runs = channels if isinstance(channels, Runs) else None
    if q.granularity is Granularity.PER_TENSOR:
        runs = None
    elif runs is None:
        return None
    done = quantize_packed(values, q, runs, num_channels, known_range=known_range).checked()
    decoded = dequantize_packed(done.packed, done.qp, done.count, runs) if need_decoded else values
    return done.qp, done.packed, decoded


# ---------------------------------------------------------------------- element-wise
def _pack_flat(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes (any shape, ``numel`` a multiple of ``8 // gcd(bits, 8)``) packed as
    :func:`~fedsqueeze.codec.bitpack.pack_bits` packs them."""
    flat = codes.reshape(-1)
    if bits == 8:
        return flat
    if bits == 3:
        c = flat.view(-1, 8)
        b0 = c[:, 0] | (c[:, 1] << 3) | (c[:, 2] << 6)
        b1 = (c[:, 2] >> 2) | (c[:, 3] << 1) | (c[:, 4] << 4) | (c[:, 5] << 7)
        b2 = (c[:, 5] >> 1) | (c[:, 6] << 2) | (c[:, 7] << 5)
        return torch.stack((b0, b1, b2), dim=1).reshape(-1)
    per = 8 // bits
    g = flat.view(-1, per)
    out = g[:, 0]
    for j in range(1, per):
        out = out | (g[:, j] << (j * bits))
    return out


def _unpack_flat(packed: Tensor, bits: int) -> Tensor:
    """All codes of whole bytes (whole 3-byte groups for 3 bits), uint8 ``[m·8/bits]``."""
    if bits == 8:
        return packed
    if bits == 3:
        g = packed.view(-1, 3)
        b0, b1, b2 = g[:, 0], g[:, 1], g[:, 2]
        parts = (
            b0 & 7, (b0 >> 3) & 7, (b0 >> 6) | ((b1 & 1) << 2), (b1 >> 1) & 7,
            (b1 >> 4) & 7, (b1 >> 7) | ((b2 & 3) << 1), (b2 >> 2) & 7, b2 >> 5,
        )  # fmt: skip
        return torch.stack(parts, dim=1).reshape(-1)
    per = 8 // bits
    mask = (1 << bits) - 1
    return torch.stack([(packed >> (j * bits)) & mask for j in range(per)], dim=1).reshape(-1)


def _linear_codes(x: Tensor, inv: Tensor, zp: Tensor, qmin: float, qmax: float) -> Tensor:
    # The reference's order: float32, times 1/scale, round, plus the zero point, clamp.
    return torch.clamp(torch.round(x.to(torch.float32) * inv) + zp, qmin, qmax).to(torch.uint8)


def _nf4_codes(x: Tensor, scale: Tensor, mids: Tensor) -> Tensor:
    unit = x.to(torch.float32) / scale
    return torch.bucketize(unit, mids, out_int32=True).to(torch.uint8)


@kernel
def _qpack_linear(
    x2d: Tensor, inv: Tensor, zp: Tensor, qmin: float, qmax: float, bits: int
) -> Tensor:
    return _pack_flat(_linear_codes(x2d, inv, zp, qmin, qmax), bits)


@dividing_kernel
def _qpack_nf4(x2d: Tensor, scale: Tensor, mids: Tensor, bits: int) -> Tensor:
    return _pack_flat(_nf4_codes(x2d, scale, mids), bits)


@kernel
def _deq_linear(packed: Tensor, scale: Tensor, zp: Tensor, bits: int, width: int) -> Tensor:
    codes = _unpack_flat(packed, bits).view(-1, width)
    return ((codes.to(torch.float32) - zp) * scale).reshape(-1)


@kernel
def _deq_table(packed: Tensor, scale: Tensor, table: Tensor, bits: int, width: int) -> Tensor:
    codes = _unpack_flat(packed, bits).view(-1, width)
    return (table[codes.to(torch.int64)] * scale).reshape(-1)


# ---------------------------------------------------------------------- quantize
@dataclass(frozen=True, eq=False)
class FusedCodes:
    """What :func:`quantize_packed` made (``eq=False``: it holds tensors).

    Attributes
    ----------
    qp
        The parameters, on the values' device (as :func:`choose_qparams` gives them).
    packed
        uint8 ``[ceil(n·bits/8)]`` on the device: the packed codes.
    count
        ``n``, the number of codes.
    flags
        bool ``[2]`` on the device: whether the values were in range, and whether the
        scales fit their format (fp16); :meth:`checked` reads them.
    """

    qp: QuantParams
    packed: Tensor
    count: int
    flags: Tensor

    def checked(self) -> FusedCodes:
        """``self``, after one read of :attr:`flags`.

        Raises
        ------
        ValueError
            Non-finite values or values beyond ``2^126`` (as ``choose_qparams``), else a
            block scale beyond fp16's range with fp16 scales (as ``store_scales``).
        """
        in_range, scales_fit = (bool(f) for f in self.flags.tolist())
        if not in_range:
            raise ValueError(RANGE_ERROR)
        if not scales_fit:
            raise ValueError(FP16_SCALE_ERROR)
        return self


def supports(q: QuantSpec, channels: object) -> bool:
    """Whether :func:`quantize_packed` takes spec ``q`` with these ``channels`` (``None``
    per tensor, :class:`Runs` per channel and per block; a per-value index is not)."""
    if q.rounding is not Rounding.NEAREST or q.scheme not in _SCHEMES:
        return False
    if q.bits not in _PACKED_BITS:
        return False
    if q.granularity is Granularity.PER_TENSOR:
        return True
    return isinstance(channels, Runs)


def quantize_packed(
    values: Tensor,
    q: QuantSpec,
    channels: Runs | None,
    num_channels: int = 1,
    *,
    known_range: tuple[Tensor, Tensor] | None = None,
) -> FusedCodes:
    """Choose parameters, quantize and pack ``values``, all on their device.

    Equal to ``choose_qparams`` → ``quantize`` → ``pack_bits`` of the reference for every
    spec :func:`supports` takes.

    Parameters
    ----------
    values
        Floating ``[n]``.
    q
        The quantization spec (:func:`supports` it).
    channels
        ``None`` per tensor; :class:`Runs` per channel (dense rows) or per block.
    num_channels
        The sets the runs fill (``ceil(n / length)``), as the reference takes it.
    known_range
        Per tensor: the values' minimum and maximum, when found already.

    Returns
    -------
    FusedCodes
        Unchecked: call :meth:`FusedCodes.checked` (one scalar read) before using it.

    Raises
    ------
    ValueError
        A spec or channels this path does not take, or mismatched arguments.
    """
    if values.dim() != 1 or not values.is_floating_point():
        raise ValueError(f"values must be 1-D floating, got {values.dtype} {tuple(values.shape)}")
    if not supports(q, channels):
        raise ValueError(f"the fused path does not take {q} with channels {channels!r}")
    if channels is not None and values.numel() and channels.count(values.numel()) != num_channels:
        raise ValueError(
            f"{values.numel()} values in runs of {channels.length} fill "
            f"{channels.count(values.numel())} sets, not {num_channels}"
        )
    if values.numel() == 0:
        raise ValueError("the fused path needs at least one value (the reference takes none)")
    x = values.detach().contiguous()
    device = x.device
    per_tensor = q.granularity is Granularity.PER_TENSOR
    runs = None if per_tensor else channels
    if runs is None:
        if known_range is not None:
            lo, hi = (r.to(device=device, dtype=torch.float32) for r in known_range)
        else:
            lo, hi = (r.to(torch.float32) for r in torch.aminmax(x))
        ok = (lo >= -MAX_MAGNITUDE) & (hi <= MAX_MAGNITUDE)
    else:
        if known_range is not None:
            raise ValueError("known_range is for per-tensor quantization")
        fmt = stored_format(q)
        width = runs.length
        if fmt is not ScaleFormat.DQ8 and x.numel() % width == 0 and (width * q.bits) % 8 == 0:
            # Whole runs that end on a byte: range, parameters, codes and packing of
            # each run in one kernel (one read of the values when compiled).
            mids = _nf4_midpoints(device)
            divisor = _divisor(q.scheme, q.bits, device)
            scale, zp, checks, packed = _qpack_runs(
                x.view(-1, width), mids, divisor, q.scheme.value, q.bits, fmt.value
            )
            qp = QuantParams(q.bits, q.scheme, scale, zp, scale_format=fmt)
            return FusedCodes(qp, packed, x.numel(), checks)
        lo, hi = _run_range(x, runs.length)
        ok = (lo.amin() >= -MAX_MAGNITUDE) & (hi.amax() <= MAX_MAGNITUDE)
    fmt = stored_format(q)
    qp, scale_ok = _params(lo, hi, q.scheme, q.bits, fmt)
    packed = _quantize_pack(x, qp, runs)
    return FusedCodes(qp, packed, x.numel(), torch.stack((ok, scale_ok)))


_constants: dict[tuple[torch.device, object], Tensor] = {}


def _constant(device: torch.device, key: object, make: Callable[[], Tensor]) -> Tensor:
    """``make()`` copied to ``device`` once (``key`` names it), then reused."""
    got = _constants.get((device, key))
    if got is None:
        got = _constants[(device, key)] = make().to(device)
    return got


def _nf4_midpoints(device: torch.device) -> Tensor:
    """float32 ``[15]``: the NF4 codebook's midpoints on ``device``
    (:func:`~fedsqueeze.codec.kernels.nf4_midpoints`, the compiled CPU kernel's too)."""
    return _constant(device, "nf4", lambda: torch.from_numpy(nf4_midpoints(NF4_CODEBOOK)))


def _divisor(scheme: QuantScheme, bits: int, device: torch.device) -> Tensor:
    """The float32 scalar on ``device`` that the scheme's range is divided by for the
    scale: ``2^bits − 1`` affine, ``2^(bits−1) − 1`` symmetric, 1 (unused) for NF4. A
    tensor, not a number: inductor turns a division by a constant into a multiplication
    by its reciprocal, whose rounding differs from eager's in the last bit (the fifth
    H200 run: 2,266 of 4,008 per-channel int8 scales), and eager CUDA does the same
    with a host scalar."""
    if scheme is QuantScheme.AFFINE:
        value = float((1 << bits) - 1)
    elif scheme is QuantScheme.NF4:
        value = 1.0
    else:
        value = float(1 << (bits - 1)) - 1.0
    return _constant(device, value, lambda: torch.tensor(value, dtype=torch.float32))


@exact_kernel
def _qpack_runs(
    rows: Tensor, mids: Tensor, divisor: Tensor, scheme_code: int, bits: int, fmt_code: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each row (a run: a block or a channel, ``width · bits`` a multiple of 8) of
    ``rows`` quantized and packed with its own fp32, fp16 or bf16 parameters: scales,
    zero points, ``[range ok, scales fit]`` and the packed codes, as :func:`_run_range`,
    :func:`_params` and :func:`_quantize_pack` make them one after the other. Compiled,
    the row's range, parameters and codes are one kernel (the rows are short: a
    block's values stay in registers between the reduction and the codes)."""
    lo, hi = torch.aminmax(rows, dim=1)
    lo, hi = lo.to(torch.float32), hi.to(torch.float32)
    ok = (lo.amin() >= -MAX_MAGNITUDE) & (hi.amax() <= MAX_MAGNITUDE)
    scale, zp, fits, _ = _param_values(lo, hi, scheme_code, bits, fmt_code, divisor)
    if scheme_code == QuantScheme.NF4.value:
        codes = _nf4_codes(rows, scale.unsqueeze(1), mids)
    else:
        qmin = 0.0 if scheme_code == QuantScheme.AFFINE.value else 1.0
        inv = torch.ones_like(scale) / scale  # a division (rounded as eager: divides)
        codes = _linear_codes(rows, inv.unsqueeze(1), zp.unsqueeze(1), qmin, float((1 << bits) - 1))
    return scale, zp, torch.stack((ok, fits)), _pack_flat(codes, bits)


@kernel
def _rows_range(v: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's minimum and maximum: one read of ``v`` (two with ``amin`` and ``amax``)."""
    lo, hi = torch.aminmax(v, dim=1)
    return lo, hi


def _run_range(x: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Per-run minimum and maximum, float32 ``[ceil(n / length)]``."""
    n = x.numel()
    rows = n // length
    lo_parts, hi_parts = [], []
    if rows:
        lo, hi = _rows_range(x[: rows * length].view(rows, length))
        lo_parts.append(lo)
        hi_parts.append(hi)
    if rows * length < n:
        tail = x[rows * length :]
        lo_parts.append(tail.amin().reshape(1))
        hi_parts.append(tail.amax().reshape(1))
    lo = torch.cat(lo_parts) if len(lo_parts) > 1 else lo_parts[0]
    hi = torch.cat(hi_parts) if len(hi_parts) > 1 else hi_parts[0]
    return lo.to(torch.float32), hi.to(torch.float32)


def _params(
    lo: Tensor, hi: Tensor, scheme: QuantScheme, bits: int, fmt: ScaleFormat
) -> tuple[QuantParams, Tensor]:
    """``choose_qparams``' arithmetic on device ranges; and whether the scales fit."""
    divisor = _divisor(scheme, bits, lo.device)
    scale, zp, fits, dq = _param_values(lo, hi, scheme.value, bits, fmt.value, divisor)
    return QuantParams(bits, scheme, scale, zp, scale_format=fmt, double_quant=dq), fits


def _param_values(
    lo: Tensor, hi: Tensor, scheme_code: int, bits: int, fmt_code: int, divisor: Tensor
) -> tuple[Tensor, Tensor, Tensor, DoubleQuant | None]:
    """:func:`_params` as tensors (the scheme and format as their int codes, so that it
    runs inside a compiled kernel for fp32, fp16 and bf16 scales): scales, zero points,
    whether the scales fit, and the double quantization (DQ8 scales: a host search).
    ``divisor`` is :func:`_divisor`'s scalar on the values' device."""
    scheme, fmt = QuantScheme(scheme_code), ScaleFormat(fmt_code)
    if scheme is QuantScheme.AFFINE:
        lo = torch.clamp(lo, max=0.0)
        hi = torch.clamp(hi, min=0.0)
        # Divide before subtracting: hi − lo overflows near float32's maximum.
        scale, dq, fits = _stored(hi / divisor - lo / divisor, fmt)
        return scale, torch.round(-lo / scale).clamp_(0.0, float((1 << bits) - 1)), fits, dq
    if scheme is QuantScheme.NF4:
        scale, dq, fits = _stored(torch.maximum(-lo, hi), fmt)
        return scale, torch.zeros_like(scale), fits, dq
    amax = torch.maximum(-lo, hi)
    scale, dq, fits = _stored(amax / divisor, fmt)
    return scale, torch.full_like(scale, float(1 << (bits - 1))), fits, dq


def _stored(raw: Tensor, fmt: ScaleFormat) -> tuple[Tensor, DoubleQuant | None, Tensor]:
    """Valid scales as ``fmt`` stores them (rounded up), the double quantization (DQ8)
    and whether they fit (fp16)."""
    valid = torch.where(raw > 0, raw, torch.ones_like(raw)).clamp(min=MIN_SCALE)
    valid = valid.to(torch.float32)
    fits = torch.ones((), dtype=torch.bool, device=raw.device)
    if fmt is ScaleFormat.FP32:
        return valid, None, fits
    if fmt is ScaleFormat.FP16:
        fits = (valid <= _FP16_MAX).all()
        return _round_up(valid, torch.float16), None, fits
    if fmt is ScaleFormat.BF16:
        return _round_up(valid, torch.bfloat16), None, fits
    # DQ8: a per-group search on the host (one scale per block; the reference's own).
    scale, dq = store_scales(valid.reshape(-1), fmt)
    return scale.to(valid.device).reshape(valid.shape), dq, fits


def _round_up(r: Tensor, dtype: torch.dtype) -> Tensor:
    """The smallest ``dtype`` value ``>= r`` (``r > 0``), as float32: the reference's
    ``nextafter`` written as one more in the bits (the next value up, for positives)."""
    low = r.to(dtype)
    up = (low.view(torch.int16) + 1).view(dtype)
    stored = torch.where(low.to(torch.float32) >= r, low, up)
    tiny = torch.finfo(dtype).tiny if dtype == torch.bfloat16 else 2.0**-24
    return stored.to(torch.float32).clamp(min=tiny)


def _quantize_pack(x: Tensor, qp: QuantParams, runs: Runs | None) -> Tensor:
    """Codes of ``x`` under ``qp``, packed: whole rows through one kernel, the short last
    row (and any row that does not end on a byte) on its own."""
    n = x.numel()
    bits = qp.bits
    width = _ROW if runs is None else runs.length
    rows = n // width
    nf4 = qp.scheme is QuantScheme.NF4
    mids = _nf4_midpoints(x.device) if nf4 else None
    qmin = 0.0 if qp.scheme is QuantScheme.AFFINE else 1.0
    qmax = float((1 << bits) - 1)
    inv = 1.0 / qp.scale

    def rows_of(p: Tensor, first: int, count: int) -> Tensor:
        return p if runs is None else p[first : first + count].unsqueeze(1)

    def qpack(part: Tensor, first: int, count: int) -> Tensor:
        if mids is not None:
            return _qpack_nf4(part, rows_of(qp.scale, first, count), mids, bits)
        return _qpack_linear(
            part, rows_of(inv, first, count), rows_of(qp.zero_point, first, count), qmin, qmax,
            bits,
        )  # fmt: skip

    if runs is not None and (width * bits) % 8:
        # Rows end inside a byte (per-channel rows of odd widths): a per-value index of
        # rows, all codes, then one packing.
        index = torch.div(torch.arange(n, device=x.device), width, rounding_mode="floor")
        if mids is not None:
            codes = _nf4_codes(x, qp.scale[index], mids)
        else:
            codes = _linear_codes(x, inv[index], qp.zero_point[index], qmin, qmax)
        return _pack_tail(codes, bits)
    parts = []
    main = rows * width
    if rows:
        parts.append(qpack(x[:main].view(rows, width), 0, rows))
    if main < n:
        tail = x[main:].view(1, n - main)
        if mids is not None:
            codes = _nf4_codes(tail, rows_of(qp.scale, rows, 1), mids)
        else:
            codes = _linear_codes(
                tail, rows_of(inv, rows, 1), rows_of(qp.zero_point, rows, 1), qmin, qmax
            )
        parts.append(_pack_tail(codes.reshape(-1), bits))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _pack_tail(codes: Tensor, bits: int) -> Tensor:
    """Pack any number of codes (zero padding up to a whole group, then cut)."""
    n = codes.numel()
    group = 8 if bits == 3 else max(1, 8 // bits)
    extra = (-n) % group
    padded = torch.cat((codes, codes.new_zeros(extra))) if extra else codes
    return _pack_flat(padded, bits)[: bitpack.packed_size(n, bits)]


# ---------------------------------------------------------------------- dequantize
def supports_decode(qp: QuantParams, channels: object) -> bool:
    """Whether :func:`dequantize_packed` takes these params and channels (linear and NF4
    codes of 2, 3, 4 or 8 bits; per tensor, or runs)."""
    if qp.codebook is not None or qp.bits not in _PACKED_BITS:
        return False
    return channels is None if qp.scale.dim() == 0 else isinstance(channels, Runs)


def dequantize_packed(
    packed: Tensor, qp: QuantParams, count: int, runs: Tensor | Runs | None
) -> Tensor:
    """Unpack ``count`` codes from ``packed`` and dequantize them, on ``packed``'s device.

    Equal to ``dequantize(unpack_bits(packed, bits, count), qp, runs)`` of the reference
    for what :func:`supports_decode` takes; ``packed`` is treated as hostile as there.

    Parameters
    ----------
    packed
        uint8 ``[ceil(count·bits/8)]``.
    qp
        The parameters (moved to ``packed``'s device).
    count
        Number of codes.
    runs
        ``None`` for per-tensor params, else the runs of the parameter sets.

    Returns
    -------
    Tensor
        float32 ``[count]``.

    Raises
    ------
    FormatError
        A length that does not match ``count``, or nonzero padding bits (one scalar read
        at the end).
    ValueError
        Params or runs this path does not take.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed must be 1-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    if not supports_decode(qp, runs) or isinstance(runs, Tensor):
        raise ValueError("the fused path does not take these parameters")
    bits = qp.bits
    _check_length(packed, bits, count)
    device = packed.device
    scale = qp.scale.to(device)
    zp = qp.zero_point.to(device)
    if runs is not None and count and runs.count(count) != qp.num_params:
        raise ValueError(f"{count} values in runs of {runs.length} do not fill {qp.num_params}")
    table = NF4_CODEBOOK.to(device) if qp.scheme is QuantScheme.NF4 else None
    if count == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    width = _ROW if runs is None else runs.length
    rows = count // width

    def rows_of(p: Tensor, first: int, n: int) -> Tensor:
        return p if runs is None else p[first : first + n].unsqueeze(1)

    def deq(codes: Tensor, first: int, n: int) -> Tensor:
        if table is not None:
            return table[codes.to(torch.int64)] * rows_of(scale, first, n)
        return (codes.to(torch.float32) - rows_of(zp, first, n)) * rows_of(scale, first, n)

    if runs is not None and (width * bits) % 8:
        codes = _unpack_tail(packed, bits, count)
        index = torch.div(torch.arange(count, device=device), width, rounding_mode="floor")
        if table is not None:
            out = table[codes.to(torch.int64)] * scale[index]
        else:
            out = (codes.to(torch.float32) - zp[index]) * scale[index]
        return _padding_checked(out, packed, bits, count)
    parts = []
    main = rows * width
    main_bytes = main * bits // 8
    if rows:
        s, z = rows_of(scale, 0, rows), rows_of(zp, 0, rows)
        if table is not None:
            parts.append(_deq_table(packed[:main_bytes], s, table, bits, width))
        else:
            parts.append(_deq_linear(packed[:main_bytes], s, z, bits, width))
    if main < count:
        codes = _unpack_tail(packed[main_bytes:], bits, count - main).view(1, -1)
        parts.append(deq(codes, rows, 1).reshape(-1))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return _padding_checked(out, packed, bits, count)


def _check_length(packed: Tensor, bits: int, count: int) -> None:
    if count < 0:
        raise FormatError(f"negative code count {count}")
    expected = bitpack.packed_size(count, bits)
    if packed.numel() != expected:
        raise FormatError(
            f"{count} codes of {bits} bits need {expected} bytes, got {packed.numel()}"
        )


def _padding_checked(out: Tensor, packed: Tensor, bits: int, count: int) -> Tensor:
    """``out``, once the unused high bits of the last byte read as zero (one scalar
    read, after every kernel of the decode is queued)."""
    used = (count * bits) % 8
    if used and bool(packed[-1] >> used):
        raise FormatError("non-zero padding bits after the last code")
    return out


def _unpack_tail(packed: Tensor, bits: int, count: int) -> Tensor:
    """``count`` codes from their bytes (padded to a whole group, then cut)."""
    group = 3 if bits == 3 else 1
    extra = (-packed.numel()) % group
    padded = torch.cat((packed, packed.new_zeros(extra))) if extra else packed
    return _unpack_flat(padded, bits)[:count]


# ---------------------------------------------------------------------- bit packing
def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """:func:`~fedsqueeze.codec.bitpack.pack_bits` on the codes' device, the range check
    read once after the packing is queued.

    Raises
    ------
    ValueError
        Unsupported ``bits``, a tensor that is not 1-D uint8, or a code ``>= 2**bits``.
    """
    if bits not in bitpack.SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {bitpack.SUPPORTED_BITS}, got {bits}")
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise ValueError(f"codes must be 1-D uint8, got {codes.dtype} {tuple(codes.shape)}")
    if bits == 8:
        return codes
    c = codes.contiguous()
    out = _pack_tail(c, bits)
    if c.numel() and bool((c.amax() >> bits) != 0):
        raise ValueError(f"codes do not fit in {bits} bits")
    return out


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """:func:`~fedsqueeze.codec.bitpack.unpack_bits` on ``packed``'s device.

    Raises
    ------
    ValueError
        ``packed`` is not 1-D uint8.
    FormatError
        Bad ``bits`` or ``count``, a length that does not match, nonzero padding bits.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed must be 1-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    if bits not in bitpack.SUPPORTED_BITS:
        raise FormatError(f"bits must be one of {bitpack.SUPPORTED_BITS}, got {bits}")
    _check_length(packed, bits, count)
    if bits == 8:
        return packed
    codes = _unpack_tail(packed.contiguous(), bits, count)
    return _padding_checked(codes, packed, bits, count)
