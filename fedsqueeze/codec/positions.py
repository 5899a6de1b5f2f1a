"""Sparse position coding: which flat indices of a tensor were kept.

Two codings, and :func:`encode_positions` picks whichever is smaller per tensor:

* :attr:`PositionCoding.BITMAP`: one bit per element, ``ceil(numel/8)`` bytes.
* :attr:`PositionCoding.RICE`: Golomb-Rice coding of the gaps between consecutive kept
  indices, ``g_0 = i_0`` and ``g_j = i_j − i_{j−1} − 1`` (so ``g >= 0``, and a run of
  consecutive indices costs gaps of 0). With parameter ``k`` each gap splits into a
  remainder ``g & (2^k − 1)`` and a quotient ``g >> k``. The payload is two streams, so
  that decoding is vectorised rather than a bit-serial loop:

  1. the ``count`` remainders, ``k`` bits each, bit-packed (LSB first, as
     :mod:`fedsqueeze.codec.bitpack`), ``ceil(count·k/8)`` bytes;
  2. the quotients in unary: ``q`` one-bits then one zero-bit per gap, bit-packed
     LSB first, the last byte padded with one-bits. Its length is implied by the total
     payload length; decoding finds the zero bits and differences their positions.

  ``k`` (0..30) is chosen to minimise the exact byte size. For geometric gaps this is
  within a few percent of their entropy: about 6 bits per kept value at 95% sparsity.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum
from functools import partial

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from fedsqueeze.codec import jit, jit_select
from fedsqueeze.codec.bitpack import pack_bits, packed_size, unpack_bits
from fedsqueeze.codec.chunks import submit
from fedsqueeze.codec.rice_encode import encode_rice, rice_sums
from fedsqueeze.errors import FormatError

__all__ = [
    "MAX_RICE_K",
    "EncodedPositions",
    "PositionCoding",
    "check_position_header",
    "decode_positions",
    "encode_positions",
    "encode_positions_soon",
    "indices_to_mask",
    "mask_to_indices",
    "max_payload_bytes",
]

#: Largest Rice parameter; gaps need at most ~log2(numel) bits.
MAX_RICE_K = 30
_INT32_MAX = (1 << 31) - 1
#: Kept positions from which the CPU encodes in chunks on every core
#: (:mod:`fedsqueeze.codec.rice_encode`: the same payload, ~6x less CPU at 2.5M).
_CHUNKED_ABOVE = 1 << 16


class PositionCoding(Enum):
    """How kept positions are stored."""

    BITMAP = 1
    RICE = 2


@dataclass(frozen=True, eq=False)
class EncodedPositions:
    """Kept positions of one tensor, encoded.

    Attributes
    ----------
    coding
        Which coding ``payload`` uses.
    count
        Number of kept positions.
    rice_k
        The Rice parameter (0 for :attr:`PositionCoding.BITMAP`).
    payload
        uint8 ``[m]`` on the indices' device.
    """

    coding: PositionCoding
    count: int
    rice_k: int
    payload: Tensor


def max_payload_bytes(numel: int) -> int:
    """The most bytes :func:`encode_positions` writes for a tensor of ``numel`` elements.

    It never writes more than the bitmap, ``ceil(numel/8)``, since it picks the smaller
    coding; decoders bound hostile payload lengths by this before allocating anything.
    """
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return packed_size(numel, 1)


def mask_to_indices(mask: Tensor) -> Tensor:
    """Flat indices of the ``True`` entries of a bool mask: int64 ``[k]``, increasing."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    return torch.nonzero(mask.reshape(-1)).view(-1)


def indices_to_mask(indices: Tensor, numel: int) -> Tensor:
    """Bool ``[numel]`` mask with ``True`` at ``indices`` (int64 ``[k]``, in range)."""
    if indices.dim() != 1 or indices.dtype != torch.int64:
        raise ValueError("indices must be 1-D int64")
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    if indices.numel() and not (bool(indices.min() >= 0) and bool(indices.max() < numel)):
        raise ValueError(f"indices out of range [0, {numel})")
    mask = torch.zeros(numel, dtype=torch.bool, device=indices.device)
    mask[indices] = True
    return mask


def encode_positions(indices: Tensor, numel: int) -> EncodedPositions:
    """Encode kept positions as a bitmap or Rice-coded gaps, whichever is smaller.

    Parameters
    ----------
    indices
        int64 ``[count]``, strictly increasing, in ``[0, numel)``.
    numel
        Number of elements of the tensor.

    Returns
    -------
    EncodedPositions
        Ties go to the bitmap, so the payload never exceeds :func:`max_payload_bytes`.

    Raises
    ------
    ValueError
        ``indices`` is not 1-D int64, not strictly increasing or out of range.
    """
    if indices.dim() != 1 or indices.dtype != torch.int64:
        raise ValueError("indices must be 1-D int64")
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    count = indices.numel()
    if count >= _CHUNKED_ABOVE and indices.device.type == "cpu":
        return _encode_chunked(indices, numel)
    if count:
        # g_0 = i_0, g_j = i_j − i_{j−1} − 1 (torch.diff with a prepend is ~3x slower).
        gaps = torch.empty_like(indices)
        gaps[:1] = indices[:1]
        torch.sub(indices[1:], indices[:-1], out=gaps[1:]).sub_(1)
        # Two scalar syncs validate the whole array: min gap >= 0 means strictly
        # increasing (and first >= 0), and the last index bounds them all.
        if bool(gaps.min() < 0) or int(indices[-1]) >= numel:
            raise ValueError(f"indices must be strictly increasing in [0, {numel})")
        if gaps.device.type == "cpu" and numel <= _INT32_MAX:
            gaps = gaps.to(torch.int32)  # the same values; half the bytes for every pass
    else:
        gaps = indices
    bitmap_size = packed_size(numel, 1)
    k, rice_size = _best_rice_k(gaps)
    if bitmap_size <= rice_size:
        return EncodedPositions(PositionCoding.BITMAP, count, 0, _encode_bitmap(indices, numel))
    return EncodedPositions(PositionCoding.RICE, count, k, _encode_rice(gaps, k))


def encode_positions_soon(indices: Tensor, numel: int) -> Future[EncodedPositions]:
    """:func:`encode_positions` for a caller with other work to do meanwhile: many
    indices on the CPU are encoded now, in chunks on every core (on a worker beside the
    caller they would run on one); fewer, on a worker while the caller goes on."""
    if indices.numel() >= _CHUNKED_ABOVE and indices.device.type == "cpu":
        done: Future[EncodedPositions] = Future()
        try:
            done.set_result(encode_positions(indices, numel))
        except Exception as exc:  # re-raised by result(), as the worker's would be
            done.set_exception(exc)
        return done
    return submit(partial(encode_positions, indices, numel))


def _encode_chunked(indices: Tensor, numel: int) -> EncodedPositions:
    """:func:`encode_positions` of many indices on the CPU, by the chunked kernels of
    :mod:`fedsqueeze.codec.rice_encode` (the same payload)."""
    idx = indices.contiguous().numpy()
    count = idx.size
    last = int(idx[-1])
    # sum(gaps) telescopes (checked below: the gaps must be >= 0 for it to mean anything).
    start = _walk_start(count, last - (count - 1))
    window = range(max(0, start - 2), min(MAX_RICE_K, start + 2) + 1)
    sums, increasing = rice_sums(idx, window)
    if not increasing or last >= numel:
        raise ValueError(f"indices must be strictly increasing in [0, {numel})")
    per_k = {k: sums[:, j] for j, k in enumerate(window)}

    def chunk_sums(k: int) -> npt.NDArray[np.int64]:
        if k not in per_k:  # outside the first pass's window: one more pass
            per_k[k] = rice_sums(idx, range(k, k + 1))[0][:, 0]
        return per_k[k]

    k, rice_size = _walk_k(count, start, lambda k: int(chunk_sums(k).sum()) + count * (1 + k))
    if packed_size(numel, 1) <= rice_size:
        # NumPy's scatter and packbits: _encode_bitmap's bytes (LSB first), ~3x faster.
        bits = np.zeros(numel, dtype=np.uint8)
        bits[idx] = 1
        payload = np.packbits(bits, bitorder="little")
        return EncodedPositions(PositionCoding.BITMAP, count, 0, torch.from_numpy(payload))
    payload = encode_rice(idx, k, chunk_sums(k))
    return EncodedPositions(PositionCoding.RICE, count, k, torch.from_numpy(payload))


def decode_positions(
    coding: PositionCoding, count: int, rice_k: int, payload: Tensor, numel: int
) -> Tensor:
    """Inverse of :func:`encode_positions`; treats every argument but ``numel`` as hostile.

    Parameters
    ----------
    coding, count, rice_k
        As in :class:`EncodedPositions`.
    payload
        uint8 ``[m]``; decoding happens on its device.
    numel
        Number of elements of the tensor (trusted: the caller has bounded it).

    Returns
    -------
    Tensor
        int64 ``[count]``, strictly increasing, in ``[0, numel)``.

    Raises
    ------
    FormatError
        Any inconsistency. Memory use is O(numel + m) whatever ``count`` claims.
    """
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    if check_position_header(payload, coding, count, rice_k, numel) is PositionCoding.BITMAP:
        return _decode_bitmap(payload, count, numel)
    return _decode_rice(payload, count, rice_k, numel)


def check_position_header(
    payload: Tensor, coding: PositionCoding, count: int, rice_k: int, numel: int
) -> PositionCoding:
    """Check what a position record announces before any of it is decoded (shared by
    the whole and the chunked decoders); returns ``coding``.

    Raises
    ------
    ValueError
        ``payload`` is not 1-D uint8 (a caller's mistake).
    FormatError
        An unknown coding, ``count`` outside ``[0, numel]``, or a bitmap with a Rice
        parameter.
    """
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise ValueError("payload must be 1-D uint8")
    if not isinstance(coding, PositionCoding):
        raise FormatError(f"unknown position coding {coding!r}")
    if not 0 <= count <= numel:
        raise FormatError(f"position count {count} out of range for {numel} elements")
    if coding is PositionCoding.BITMAP and rice_k != 0:
        raise FormatError("bitmap positions with a non-zero Rice parameter")
    return coding


# ------------------------------------------------------------------ bitmap
def _encode_bitmap(indices: Tensor, numel: int) -> Tensor:
    bits = torch.zeros(numel, dtype=torch.uint8, device=indices.device)
    bits[indices] = 1
    return pack_bits(bits, 1)


def _decode_bitmap(payload: Tensor, count: int, numel: int) -> Tensor:
    if payload.numel() != packed_size(numel, 1):
        raise FormatError(f"bitmap of {numel} elements needs {packed_size(numel, 1)} bytes")
    bits = unpack_bits(payload, 1, numel)  # rejects set padding bits
    if int(torch.count_nonzero(bits)) != count:
        raise FormatError(f"bitmap holds a different number of positions than {count}")
    return torch.nonzero(bits).view(-1)


# ------------------------------------------------------------------ Rice
def _rice_bits(gaps: Tensor, k: int) -> int:
    """Exact bits of both streams for parameter ``k``: ``sum(g >> k) + n·(1 + k)``."""
    return _shifted_sum(gaps, k) + gaps.numel() * (1 + k)


def _shifted_sum(gaps: Tensor, k: int) -> int:
    """``sum(g >> k)``, exact (int64 sums); numpy on the CPU, ~5x faster than torch."""
    if gaps.device.type == "cpu":
        return int(np.right_shift(gaps.numpy(), k).sum(dtype=np.int64))
    return int((gaps >> k).sum())


def _rice_bytes(n: int, k: int, total_bits: int) -> int:
    return packed_size(n, k) + packed_size(total_bits - n * k, 1)


def _best_rice_k(gaps: Tensor) -> tuple[int, int]:
    """The ``k`` in 0..30 minimising the Rice payload's bytes, and that size.

    The bit count ``f(k)`` is convex in ``k`` (``f(k+1) − f(k) = n − Σ ceil((g>>k)/2)``
    grows with ``k``), so a walk from ``log2`` of the mean gap finds its minimum in a few
    passes over ``gaps`` instead of 31. Byte rounding adds under 2 bytes, so the byte
    optimum lies where ``f(k) < f_min + 16``, which the walk then scans.
    """
    n = gaps.numel()
    if n == 0:
        return 0, 0
    return _walk_k(n, _walk_start(n, _shifted_sum(gaps, 0)), lambda k: _rice_bits(gaps, k))


def _walk_start(n: int, total: int) -> int:
    """Where the walk over ``k`` starts: ``log2`` of the mean of ``n`` gaps summing to
    ``total``."""
    return min(MAX_RICE_K, max(0, int(total / n).bit_length() - 1))


def _walk_k(n: int, start: int, bits: Callable[[int], int]) -> tuple[int, int]:
    """:func:`_best_rice_k`'s walk from ``start``, given ``bits(k)``, the exact bit
    count of both streams for ``k`` (each asked for once)."""
    cache: dict[int, int] = {}

    def f(k: int) -> int:
        if k not in cache:
            cache[k] = bits(k)
        return cache[k]

    k = start
    while k > 0 and f(k - 1) <= f(k):
        k -= 1
    while k < MAX_RICE_K and f(k + 1) < f(k):
        k += 1
    best_k, best = k, _rice_bytes(n, k, f(k))
    for step in (-1, 1):
        j = k + step
        while 0 <= j <= MAX_RICE_K and f(j) < f(k) + 16:
            size = _rice_bytes(n, j, f(j))
            if size < best or (size == best and j < best_k):
                best_k, best = j, size
            j += step
    return best_k, best


def _encode_rice(gaps: Tensor, k: int) -> Tensor:
    if gaps.numel() == 0:
        return gaps.new_empty(0, dtype=torch.uint8)
    remainders = _pack_fixed(gaps & ((1 << k) - 1), k)
    quotients = gaps >> k
    if gaps.device.type == "cpu":
        # numpy: the same stream, about twice as fast as torch's cumsum and scatter here.
        zero_np = np.cumsum(quotients.numpy() + 1, dtype=np.int64) - 1
        unary_bits = int(zero_np[-1]) + 1
        bits = np.ones(unary_bits + (-unary_bits) % 8, dtype=np.uint8)
        bits[zero_np] = 0
        unary = torch.from_numpy(np.packbits(bits, bitorder="little"))
        return torch.cat([remainders, unary])
    # Zero bit j (the terminator of gap j) sits after all earlier gaps' bits.
    zero_at = torch.cumsum(quotients + 1, 0) - 1
    unary_bits = int(zero_at[-1]) + 1
    stream = torch.ones(unary_bits + (-unary_bits) % 8, dtype=torch.uint8, device=gaps.device)
    stream[zero_at] = 0
    return torch.cat([remainders, pack_bits(stream, 1)])


def _decode_rice(payload: Tensor, count: int, k: int, numel: int) -> Tensor:
    if not 0 <= k <= MAX_RICE_K:
        raise FormatError(f"Rice parameter {k} out of range 0..{MAX_RICE_K}")
    if count == 0:
        if payload.numel():
            raise FormatError("positions payload for zero positions")
        return torch.empty(0, dtype=torch.int64, device=payload.device)
    rem_size = packed_size(count, k)
    unary = payload[rem_size:]
    # Each gap needs one terminating zero bit: bounds count by the payload before any
    # count-sized allocation.
    if payload.numel() < rem_size or count > 8 * unary.numel():
        raise FormatError(f"positions payload too short for {count} positions")
    if payload.device.type == "cpu" and jit.use(count):
        # One compiled pass over the unary bytes (the path below spells every bit out
        # as a byte: 117 of 133 ms of a 90%-pruned 100 MB tensor's decode); a payload it
        # refuses goes on below, which says why.
        data = payload.contiguous().numpy()
        used = count * k % 8
        # unpack_bits (the path below) refuses set padding bits after the remainders
        padded = used and int(data[rem_size - 1]) >> used
        out = np.empty(count, dtype=np.int64)
        if (
            not padded
            and jit_select.rice_decode(data[:rem_size], k, data[rem_size:], count, numel, out) == 0
        ):
            return torch.from_numpy(out)
    bits = unpack_bits(unary, 1, 8 * unary.numel())
    zeros = bits == 0
    if int(torch.count_nonzero(zeros)) != count:
        raise FormatError("unary stream does not hold one terminator per position")
    zero_at = torch.nonzero(zeros).view(-1)
    if int(zero_at[-1]) < 8 * unary.numel() - 8:
        raise FormatError("trailing bytes after the unary stream")
    quotients = torch.diff(zero_at, prepend=zero_at.new_full((1,), -1)) - 1
    remainders = _unpack_fixed(payload[:rem_size], k, count)
    # Bound the last index with Python ints before any int64 arithmetic can overflow.
    last = (int(quotients.sum()) << k) + int(remainders.sum()) + count - 1
    if last >= numel:
        raise FormatError(f"position {last} out of range for {numel} elements")
    gaps = (quotients << k) | remainders
    return torch.cumsum(gaps + 1, 0) - 1


# ------------------------------------------------------------------ fixed width
_CHUNK = 1 << 20


def _pack_fixed(values: Tensor, width: int) -> Tensor:
    """int64 ``[n]``, each ``< 2**width`` → uint8 ``[ceil(n·width/8)]`` (LSB first)."""
    if width == 0:
        return values.new_empty(0, dtype=torch.uint8)
    if width in (1, 2, 3, 4, 8):
        return pack_bits(values.to(torch.uint8), width)
    # Other widths: spell every value out bit by bit (n·width bytes, O(numel) since
    # the optimal k is about log2(numel/n)), then pack the bit string.
    if values.device.type == "cpu":
        shifts = np.arange(width, dtype=np.int64).astype(values.numpy().dtype)
        spelled = ((values.numpy()[:, None] >> shifts) & 1).astype(np.uint8)
        return torch.from_numpy(np.packbits(spelled.reshape(-1), bitorder="little"))
    n = values.numel()
    bits = torch.empty((n, width), dtype=torch.uint8, device=values.device)
    for j in range(width):
        bits[:, j] = (values >> j) & 1
    return pack_bits(bits.view(-1), 1)


def _unpack_fixed(packed: Tensor, width: int, count: int) -> Tensor:
    """Inverse of :func:`_pack_fixed`: int64 ``[count]``."""
    if width == 0:
        return torch.zeros(count, dtype=torch.int64, device=packed.device)
    if width in (1, 2, 3, 4, 8):
        return unpack_bits(packed, width, count).to(torch.int64)
    bits = unpack_bits(packed, 1, count * width).view(count, width)
    values = torch.zeros(count, dtype=torch.int64, device=packed.device)
    for j in range(width):
        values |= bits[:, j].to(torch.int64) << j
    return values
