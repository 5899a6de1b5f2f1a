"""Block-wise parameters chosen chunk by chunk, inside the quantization pass.

Block-wise quantization of a large dense tensor used to choose its parameters in a
pass of its own (:func:`~fedsqueeze.codec.quantization.choose_qparams`: each block's
minimum and maximum, then the scales rounded up to their stored format, as whole-tensor
operations): ~34 ms of the ~160 ms encode of a 100 MB tensor with ``quant=4:block64``,
and one more read of the 100 MB. A block's parameters depend on its own values only,
so here each chunk of the pipeline (:mod:`fedsqueeze.codec.dense_encode`; chunks start
on a block) computes its blocks' parameters just before quantizing them, while the
chunk is in cache.

The arithmetic is :func:`~fedsqueeze.codec.quantization.choose_qparams`' own, element
by element in float32 (the same operations in the same order; the scales' rounding up
to fp16 / bf16 computes the same smallest representable value ``>=`` the raw scale),
so the parameters, codes and bytes are identical; the tests compare them with the
reference path, hostile ranges included. Here DQ8 scales (one exponent per 256 blocks)
and the POW2 and k-means schemes keep the separate pass; the compiled pass takes DQ8
too, a group of blocks at a time.

This NumPy version is opt-in (``dense_encode.FUSED_SCALES``): measured side by side on
these 2-core machines, the read it saves is paid back by ~30 small NumPy operations per
chunk (no CPU saved on one thread), and with two worker threads their Python steps
contend for the GIL (~10% more CPU). Where numba runs, the compiled
:func:`fedsqueeze.codec.jit.block_params` does the same arithmetic in one loop per chunk
and is always used; it also checks the values as it goes, so the encoder's separate
range pass over a block-wise or per-channel tensor is skipped
(``TensorEncoder.encode_checked``). This
module stays the reference it is tested against, and the path without numba.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from fedsqueeze.codec.blockwise import FP16_SCALE_ERROR
from fedsqueeze.codec.kernels import Runs
from fedsqueeze.codec.quantization import MAX_MAGNITUDE, MIN_SCALE, RANGE_ERROR
from fedsqueeze.codec.spec import Granularity, QuantScheme, QuantSpec, Rounding, ScaleFormat

__all__ = ["FORMATS", "SCHEMES", "block_params", "fusable", "stored_format"]

#: Scale formats whose blocks are independent (DQ8 groups 256 blocks).
FORMATS = (ScaleFormat.FP32, ScaleFormat.FP16, ScaleFormat.BF16)
#: Schemes whose parameters are chosen here.
SCHEMES = (QuantScheme.AFFINE, QuantScheme.SYMMETRIC, QuantScheme.NF4)

F32 = npt.NDArray[np.float32]
_FP16_MAX = np.float32(65504.0)
_FP16_TINY = np.float32(2.0**-24)  # blockwise._round_up's floor for fp16
_BF16_TINY = np.float32(2.0**-126)


def stored_format(q: QuantSpec) -> ScaleFormat:
    """The format a spec's scales are chosen in: its own for blocks; per channel (and
    per tensor) always fp32, as :func:`~fedsqueeze.codec.quantization.choose_qparams`
    chooses them."""
    return q.scales if q.granularity is Granularity.PER_BLOCK else ScaleFormat.FP32


def fusable(q: QuantSpec, channels: object, compiled: bool = False) -> bool:
    """Whether a block-wise or per-channel spec's parameters can be chosen chunk by
    chunk, its blocks or rows being runs of consecutive values (the rest of the
    pipeline's conditions are :func:`~fedsqueeze.codec.dense_encode.pipelines`'). A
    row's parameters are a block's with fp32 scales. Double-quantized scales only by
    the ``compiled`` kernel (:func:`fedsqueeze.codec.jit.block_params`), not here."""
    formats = (*FORMATS, ScaleFormat.DQ8) if compiled else FORMATS
    return (
        q.granularity in (Granularity.PER_BLOCK, Granularity.PER_CHANNEL)
        and isinstance(channels, Runs)
        and stored_format(q) in formats
        and q.scheme in SCHEMES
        and q.rounding is Rounding.NEAREST
        and q.bits in (2, 4, 8)
    )


def block_params(
    xs: F32, length: int, bits: int, scheme: QuantScheme, fmt: ScaleFormat, scale: F32, zp: F32
) -> None:
    """The parameters of the blocks of ``xs`` (float32, starting on a block; the last
    block may be short) into ``scale`` and ``zp`` (float32 ``[ceil(len(xs) / length)]``),
    as :func:`~fedsqueeze.codec.quantization.choose_qparams` computes them.

    Raises
    ------
    ValueError
        Non-finite values or ``|x| > 2^126``, as ``choose_qparams``; a scale beyond
        fp16's range with FP16 scales, as :func:`~fedsqueeze.codec.blockwise.store_scales`.
    """
    size = xs.size
    full = size // length
    t = torch.from_numpy(xs)
    lo = np.empty(scale.size, dtype=np.float32)
    hi = np.empty(scale.size, dtype=np.float32)
    if full:  # (the compiled path is jit.block_params, which this module is tested against)
        # torch's row reductions: ~10x NumPy's on rows of 64 here (one thread each).
        rows = t[: full * length].view(full, length)
        torch.amin(rows, 1, out=torch.from_numpy(lo[:full]))
        torch.amax(rows, 1, out=torch.from_numpy(hi[:full]))
    if full < scale.size:  # the short last block, as value_range
        tail = t[full * length :].view(1, -1)
        lo[full], hi[full] = float(tail.amin(1)), float(tail.amax(1))
    # choose_qparams' range check (NaN fails both comparisons).
    if not (bool((lo >= -MAX_MAGNITUDE).all()) and bool((hi <= MAX_MAGNITUDE).all())):
        raise ValueError(RANGE_ERROR)
    qmax = np.float32((1 << bits) - 1)
    mid = np.float32(1 << (bits - 1))
    if scheme is QuantScheme.AFFINE:
        # torch.clamp keeps a value equal to its bound, signed zeros included (NumPy's
        # minimum and maximum may not): the zero points' sign bits must be the same.
        zero = np.float32(0.0)
        np.copyto(lo, zero, where=lo > zero)
        np.copyto(hi, zero, where=hi < zero)
        # Divide before subtracting, as choose_qparams (hi − lo overflows near the top).
        raw = np.divide(hi, qmax)
        raw -= np.divide(lo, qmax)
    else:
        raw = np.maximum(np.negative(lo), hi)
        if scheme is QuantScheme.SYMMETRIC:
            raw /= mid - np.float32(1.0)
    _stored(raw, fmt, scale)
    if scheme is QuantScheme.AFFINE:
        np.negative(lo, out=lo)
        np.divide(lo, scale, out=lo)
        np.rint(lo, out=lo)  # torch.round: half to even, as rint
        np.copyto(lo, np.float32(0.0), where=lo < 0)  # clamp_(0, qmax), as above
        np.copyto(lo, qmax, where=lo > qmax)
        np.add(lo, np.float32(0.0), out=zp)  # −0 → +0, as choose_qparams
    elif scheme is QuantScheme.SYMMETRIC:
        zp.fill(mid)
    else:
        zp.fill(0.0)


def _stored(raw: F32, fmt: ScaleFormat, out: F32) -> None:
    """``store_scales(_valid_scale(raw), fmt)``: zeros to 1, at least 2^−126, then
    rounded up to the format."""
    r = np.where(raw > 0, raw, np.float32(1.0))
    np.maximum(r, np.float32(MIN_SCALE), out=r)
    if fmt is ScaleFormat.FP32:
        out[:] = r
    elif fmt is ScaleFormat.FP16:
        if bool((r > _FP16_MAX).any()):
            raise ValueError(FP16_SCALE_ERROR)
        low = r.astype(np.float16)  # round to nearest even, as torch's .to(float16)
        with np.errstate(over="ignore"):  # 65504's next is inf: never chosen (low >= r)
            up = np.nextafter(low, np.float16(np.inf))
        stored = np.where(low.astype(np.float32) >= r, low, up).astype(np.float32)
        np.maximum(stored, _FP16_TINY, out=out)
    elif fmt is ScaleFormat.BF16:
        # The smallest bfloat16 >= r (> 0, finite): its float32 bits rounded up to 16
        # high bits; what torch's round-to-nearest, then nextafter when below, gives.
        bits = r.view(np.uint32)
        up32 = ((bits + np.uint32(0xFFFF)) & np.uint32(0xFFFF0000)).view(np.float32)
        np.maximum(up32, _BF16_TINY, out=out)
    else:
        raise ValueError(f"scales in {fmt!r} are not chosen chunk by chunk")
