"""Block-wise quantization's parts: block indices, stored scales and the NF4 codebook.

Block-wise (group-wise) quantization gives every block of ``B`` consecutive kept values
its own parameters. It goes through the same "which parameter set does each value use"
index as per-channel quantization (``channels_of``, here ``position // B`` over the kept
values), so pruning, top-k, deltas and progressive levels work with it unchanged.

What is new is how the many scales are stored (:class:`~fedsqueeze.codec.spec.ScaleFormat`):

* **FP16 / BF16**: each scale rounded *up* to the format, so the values of a block stay
  inside its grid and the nearest-rounding error stays ``≤ stored scale / 2``;
* **FP32**: as per-tensor and per-channel scales;
* **DQ8** (double quantization, after QLoRA): an 8-bit code per block on a logarithmic
  grid, ``scale = 2^e · 2^(code/16)``, with one int16 exponent ``e`` per group of 256
  blocks, chosen so the group's largest scale fits; codes are rounded up too. A stored
  scale is at most ``2^(1/16) − 1 ≈ 4.4%`` above the block's own, except in blocks
  ``2^16`` times smaller than their group's largest (they get ``2^e``). One byte per
  block plus 2 bytes per 256 blocks: 0.126 bits per value with blocks of 64, as QLoRA's.
  A log grid, not QLoRA's linear one, because outlier blocks are why blocks exist: on a
  linear 8-bit grid a block 1000× below its group's largest would get a scale several
  times its own.

The NF4 codebook is QLoRA's (Dettmers et al. 2023, appendix E): 16 quantiles of the
standard normal, normalized to ``[−1, 1]``, with an exact 0; values are ``absmax · NF4[q]``
per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from fedsqueeze.codec import jit
from fedsqueeze.codec.chunks import chunk_bounds
from fedsqueeze.codec.spec import ScaleFormat
from fedsqueeze.codec.workers import parallel_map
from fedsqueeze.errors import FormatError

__all__ = [
    "DQ_GROUP",
    "DQ_TABLE",
    "FP16_SCALE_ERROR",
    "NF4_CODEBOOK",
    "DoubleQuant",
    "block_index",
    "group_of",
    "num_blocks",
    "scale_bytes",
    "scales_from_bytes",
    "scales_to_bytes",
    "store_scales",
]

#: QLoRA's NF4 values (bitsandbytes ships the same constants), ascending.
NF4_CODEBOOK = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
#: Blocks per double-quantization group (one int16 exponent each).
DQ_GROUP = 256
_DQ_STEPS = 16  # codes per octave
#: ``2^(c/16)`` for ``c = 0..255`` as float32: the same table on every machine (the
#: compiled block pass, :func:`fedsqueeze.codec.jit.block_params`, reads it too).
DQ_TABLE = np.exp2(np.arange(256, dtype=np.float64) / _DQ_STEPS).astype(np.float32)
_MIN_EXP, _MAX_EXP = -126, 127 - 16  # every code of every group a finite normal float32
_FP16_MAX = 65504.0
#: The refusal of an fp16 block scale beyond fp16's range (every path says it so).
FP16_SCALE_ERROR = "a block scale beyond fp16's range: values beyond ±65504"
_MIN_SCALE = 2.0**-126


@dataclass(frozen=True, eq=False)
class DoubleQuant:
    """Double-quantized scales (``eq=False``: they hold tensors).

    Attributes
    ----------
    codes
        uint8 ``[C]``: each block's code on the 1/16-octave grid.
    exponents
        int16 ``[ceil(C / 256)]``: each group's power of two.
    """

    codes: Tensor
    exponents: Tensor

    def scales(self) -> Tensor:
        """float32 ``[C]``: ``2^e · 2^(code/16)``, exact (a table times a power of two)."""
        codes = self.codes.cpu().numpy().astype(np.int64)
        exps = np.repeat(self.exponents.cpu().numpy().astype(np.int32), DQ_GROUP)[: codes.size]
        return torch.from_numpy(np.ldexp(DQ_TABLE[codes], exps).astype(np.float32))


def group_of(fmt: ScaleFormat) -> int:
    """Blocks whose stored scales are chosen together: a group of double-quantized scales
    (its exponent comes from all its blocks), else one. A dense body's chunks start on
    such a group, in the encoder and in the decoder alike."""
    return DQ_GROUP if fmt is ScaleFormat.DQ8 else 1


def block_index(count: int, block_size: int, device: torch.device | None = None) -> Tensor:
    """int64 ``[count]``: the block of each kept value, ``position // block_size``."""
    return torch.div(torch.arange(count, device=device), block_size, rounding_mode="floor")


def num_blocks(count: int, block_size: int) -> int:
    """``ceil(count / block_size)``."""
    return -(-count // block_size)


def store_scales(raw: Tensor, fmt: ScaleFormat) -> tuple[Tensor, DoubleQuant | None]:
    """The scales as ``fmt`` stores them, each ``>= raw`` (float32 ``[C]``, ``raw > 0``).

    Raises
    ------
    ValueError
        A scale beyond fp16's range with FP16 scales (values beyond ±65504: the encoder
        reports such tensors before quantizing them).
    """
    r = raw.detach().to(torch.float32).cpu().clamp(min=_MIN_SCALE)
    if fmt is ScaleFormat.FP32:
        return r, None
    if fmt is ScaleFormat.FP16:
        if bool((r > _FP16_MAX).any()):
            raise ValueError(FP16_SCALE_ERROR)
        return _round_up(r, torch.float16), None
    if fmt is ScaleFormat.BF16:
        return _round_up(r, torch.bfloat16), None
    if fmt is ScaleFormat.DQ8:
        dq = _double_quantize(r.numpy().astype(np.float32))
        return dq.scales(), dq
    raise ValueError(f"unknown scale format {fmt!r}")


def _round_up(r: Tensor, dtype: torch.dtype) -> Tensor:
    """The smallest ``dtype`` value ``>= r`` (and > 0), as float32."""
    low = r.to(dtype)
    up = torch.nextafter(low, torch.full_like(low, float("inf")))
    stored = torch.where(low.to(torch.float32) >= r, low, up)
    tiny = torch.finfo(dtype).tiny if dtype == torch.bfloat16 else 2.0**-24
    return stored.to(torch.float32).clamp(min=tiny)


def _double_quantize(r: npt.NDArray[np.float32]) -> DoubleQuant:
    """:func:`_double_quantize_part` in steps of whole groups on every core (each group's
    codes depend on that group alone: the same codes as one call)."""
    bounds = chunk_bounds(r.size, STEP)
    if len(bounds) < 2:
        return _double_quantize_part(r)
    parts = parallel_map(lambda b: _double_quantize_part(r[b[0] : b[1]]), bounds)
    return DoubleQuant(torch.cat([p.codes for p in parts]), torch.cat([p.exponents for p in parts]))


#: Scales per step of :func:`_double_quantize` on every core: whole groups of
#: ``DQ_GROUP``. NumPy takes one thread a call: the 390K scales of a 100 MB tensor's
#: blocks of 64 took 36 ms to choose and serialize as NF4 with double-quantized scales,
#: 29 ms in steps (a side script, the two alternated).
STEP = 1 << 16


def _double_quantize_part(r: npt.NDArray[np.float32]) -> DoubleQuant:
    n = r.size
    groups = -(-n // DQ_GROUP)
    padded = np.full(groups * DQ_GROUP, _MIN_SCALE, dtype=np.float32)
    padded[:n] = r
    grid = padded.reshape(groups, DQ_GROUP)
    top = grid.max(axis=1)
    _, e2 = np.frexp(top)  # top = m · 2^e2, m in [0.5, 1): top < 2^e2
    # The smallest e with top <= 2^e · table[255], found exactly by trying e2 − 17 upward.
    exps = (e2 - 17).astype(np.int64)
    for _ in range(3):
        short = np.ldexp(DQ_TABLE[-1], exps) < top
        exps = exps + short
    exps = np.clip(exps, _MIN_EXP, _MAX_EXP)
    unit = np.ldexp(np.float32(1.0), -exps)[:, None]  # exact: a power of two
    codes = np.searchsorted(DQ_TABLE, (grid * unit).astype(np.float32), side="left")
    codes = np.minimum(codes, 255).reshape(-1)[:n].astype(np.uint8)
    return DoubleQuant(torch.from_numpy(codes), torch.from_numpy(exps.astype(np.int16)))


def scale_bytes(fmt: ScaleFormat, count: int) -> int:
    """Serialized size of ``count`` scales in ``fmt``."""
    if fmt is ScaleFormat.DQ8:
        return count + 2 * (-(-count // DQ_GROUP))
    return {ScaleFormat.FP32: 4, ScaleFormat.FP16: 2, ScaleFormat.BF16: 2}[fmt] * count


def scales_to_bytes(scale: Tensor, fmt: ScaleFormat, dq: DoubleQuant | None) -> bytes:
    """Little-endian scales; DQ8: ``C`` codes then the int16 exponents."""
    flat = scale.detach().cpu().reshape(-1).to(torch.float32)
    if fmt is ScaleFormat.DQ8:
        if dq is None or dq.codes.numel() != flat.numel():
            raise ValueError("dq scales need their codes")
        exps = dq.exponents.cpu().numpy().astype("<i2")
        return bytes(dq.codes.cpu().numpy().astype(np.uint8).tobytes()) + exps.tobytes()
    # NumPy on one thread: torch's element-wise checks on ~400K scales fork an OpenMP
    # team each (~6 ms of a 100 MB block-wise encode on a loaded machine); same checks.
    values = flat.numpy()
    if fmt is ScaleFormat.FP16 and jit.use(values.size):  # the checks and bits in one pass
        bits16 = np.empty(values.size, dtype="<i2")
        status = jit.fp16_bits(np.ascontiguousarray(values), bits16)
        if status == 1:
            raise ValueError("scale must be finite and positive")
        if status:
            raise ValueError("scales are not exactly representable in fp16")
        return bits16.tobytes()
    if not bool((np.isfinite(values) & (values > 0)).all()):
        raise ValueError("scale must be finite and positive")
    if fmt is ScaleFormat.FP32:
        return values.astype("<f4").tobytes()
    if fmt is ScaleFormat.FP16:
        with np.errstate(over="ignore"):  # beyond fp16: inf, then found inexact
            half = values.astype("<f2")  # round to nearest even, as torch's .to(float16)
        exact = np.array_equal(half.astype(np.float32), values)
        raw = half.view("<i2")
    else:  # bfloat16: the high 16 bits of the float32, exact when the low ones are 0
        bits32 = values.view(np.uint32)
        exact = not bool((bits32 & np.uint32(0xFFFF)).any())
        raw = (bits32 >> np.uint32(16)).astype("<u2").view("<i2")
    if not exact:
        raise ValueError(f"scales are not exactly representable in {fmt.name.lower()}")
    return raw.tobytes()


def scales_from_bytes(
    data: bytes | memoryview, offset: int, fmt: ScaleFormat, count: int
) -> tuple[Tensor, DoubleQuant | None]:
    """Parse :func:`scales_to_bytes`' form (the caller has checked the length).

    Raises
    ------
    FormatError
        A non-finite or non-positive scale, or a double-quantization exponent outside
        the range that keeps every code a finite normal float32.
    """

    def read(dtype: str, n: int, at: int) -> npt.NDArray[Any]:
        return np.frombuffer(data, dtype=dtype, count=n, offset=at)

    dq: DoubleQuant | None = None
    if fmt is ScaleFormat.DQ8:
        codes = read("u1", count, offset).copy()
        exps = read("<i2", -(-count // DQ_GROUP), offset + count).astype(np.int16)
        if ((exps < _MIN_EXP) | (exps > _MAX_EXP)).any():
            raise FormatError("double-quantized scale exponent out of range")
        dq = DoubleQuant(torch.from_numpy(codes), torch.from_numpy(exps))
        scale = dq.scales().numpy()
    elif fmt is ScaleFormat.FP32:
        scale = read("<f4", count, offset).astype(np.float32)
    else:
        bits16 = torch.from_numpy(read("<i2", count, offset).astype(np.int16))
        half = torch.float16 if fmt is ScaleFormat.FP16 else torch.bfloat16
        scale = bits16.view(half).to(torch.float32).numpy()
    if not (np.isfinite(scale) & (scale > 0)).all():
        raise FormatError("block scale is not finite and positive")
    return torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)), dq
