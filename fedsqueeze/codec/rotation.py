"""Incoherence processing: a randomized Hadamard rotation of a tensor before quantization.

A target tensor seen as an ``m × n`` matrix (``shape[0] × rest``; a 1-D tensor is
``1 × n``) has its columns multiplied by seeded random signs ``s ∈ {±1}ⁿ``, and then
every run of ``b`` consecutive values of each row by the normalised Walsh-Hadamard
matrix ``H_b / √b``, where ``b`` is the largest power of two dividing ``n`` (at most
:data:`MAX_HADAMARD`)::

    y = blockdiag(H_b / √b) · diag(s) · x        (per row)
    x = diag(s) · blockdiag(H_b / √b) · y        (the inverse: H_b / √b is its own)

The map is orthonormal, so it keeps every squared error: what quantization loses in the
rotated values is exactly what the decoded tensor loses, and the progressive levels'
gains, the refinement order and the error bounds carry over unchanged (the per-element
bound ``scale/2`` becomes the same bound on the L2 norm). What it changes is the
distribution the quantizer sees: each rotated value is a signed sum of ``b`` weights,
so a row's outliers are spread over its block and the values become close to Gaussian
with a range near ``√(2 ln b)`` standard deviations instead of the outliers' (QuIP#,
Tseng et al. 2024; QuaRot, Ashkboos et al. 2024). Data-free: the decoder needs only the
seed.

Measured on all-MiniLM-L6-v2 (``fedsqueeze bench progressive``, BENCHMARKS.md), 8-bit
codes sent as ``2+1+1+1+1+2`` levels: the prefix at 1/8 of fp32 has an embedding cosine
of 0.9866 rotated with per-channel scales in the relative order, against 0.9772 for the
best unrotated stream (``quant=8:block64:dq,levels=3+1+1+1+2``); with the weighted order
of :mod:`fedsqueeze.codec.level_order` 0.9898, and 0.9903 with 8-bit double-quantized
scales per 384 values. A 2-bit first level of every tensor becomes a model (0.71-0.79
at 1/16, where an unrotated 2-bit first level gives 0.025).

Signs come from SHAKE-128 of a fixed label and the record's 32-bit seed (the encoder
takes the CRC-32 of the tensor's name), so they are the same on every platform and
version of PyTorch; the seed travels in the record (:mod:`fedsqueeze.codec.container`,
format version 6).
"""

from __future__ import annotations

import hashlib
import math
import zlib

import torch

from fedsqueeze.errors import FormatError

__all__ = [
    "MAX_HADAMARD",
    "hadamard_block",
    "rotate",
    "rotation_seed",
    "signs",
    "unrotate",
]

#: Largest Walsh-Hadamard block (values): ``log2`` of it is the passes per value.
MAX_HADAMARD = 4096
_LABEL = b"fedsqueeze/rotation/hadamard/v1"


def rotation_seed(name: str) -> int:
    """The seed the encoder uses for tensor ``name`` (its CRC-32: different tensors get
    different signs, the same tensor the same ones in every round)."""
    return zlib.crc32(name.encode()) & 0xFFFFFFFF


def hadamard_block(n: int) -> int:
    """The block of a row of ``n`` values: the largest power of two dividing ``n``, at
    most :data:`MAX_HADAMARD` (1 for odd ``n``, where only the signs apply)."""
    if n < 1:
        raise ValueError(f"a row has at least one value, got {n}")
    return min(n & -n, MAX_HADAMARD)


def signs(seed: int, n: int, device: torch.device | None = None) -> torch.Tensor:
    """``n`` signs ``±1.0`` (float32) drawn from ``seed`` (0..2³²−1)."""
    if not 0 <= seed < 1 << 32:
        raise ValueError(f"a rotation seed is a 32-bit unsigned integer, got {seed}")
    raw = hashlib.shake_128(_LABEL + seed.to_bytes(4, "little")).digest((n + 7) // 8)
    bits = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8)
    unpacked = ((bits.unsqueeze(1) >> shifts) & 1).reshape(-1)[:n]
    return (1.0 - 2.0 * unpacked.to(torch.float32)).to(device or torch.device("cpu"))


def _matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    if not shape:
        return 1, 1
    m = shape[0]
    n = 1
    for d in shape[1:]:
        n *= d
    return (1, m) if len(shape) == 1 else (m, n)


def _walsh_hadamard(x: torch.Tensor, b: int) -> torch.Tensor:
    """``x`` (``[..., n]``, float32) with each run of ``b`` values of its last dimension
    multiplied by ``H_b / √b`` (fast transform, ``log2 b`` passes)."""
    rows, n = x.shape[0], x.shape[-1]
    y = x.reshape(rows, n // b, b)
    h = 1
    while h < b:
        y = y.reshape(rows, n // b, b // (2 * h), 2, h)
        first, second = y[:, :, :, 0, :], y[:, :, :, 1, :]
        y = torch.stack((first + second, first - second), dim=3)
        h *= 2
    return (y.reshape(rows, n) * (1.0 / math.sqrt(b))).reshape(x.shape)


def rotate(x: torch.Tensor, seed: int) -> torch.Tensor:
    """The rotated values of ``x`` (float32, the same shape).

    Raises
    ------
    TypeError
        ``x`` is not floating point.
    """
    if not x.is_floating_point():
        raise TypeError(f"only floats rotate, got {x.dtype}")
    m, n = _matrix(tuple(x.shape))
    if x.numel() == 0:
        return x.to(torch.float32).clone()
    flat = x.to(torch.float32).reshape(m, n) * signs(seed, n, x.device)
    return _walsh_hadamard(flat, hadamard_block(n)).reshape(x.shape)


def unrotate(y: torch.Tensor, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`rotate`: the values ``y`` (float32, ``numel`` of ``shape``)
    rotated back, in ``shape``.

    Raises
    ------
    FormatError
        ``y`` does not hold ``shape``'s values (a malformed record).
    """
    m, n = _matrix(shape)
    if y.numel() != m * n:
        raise FormatError(f"{y.numel()} rotated values for a tensor of shape {shape}")
    if y.numel() == 0:
        return y.reshape(shape)
    back = _walsh_hadamard(y.to(torch.float32).reshape(m, n), hadamard_block(n))
    return (back * signs(seed, n, y.device)).reshape(shape)
