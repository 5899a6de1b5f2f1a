"""Fixed-width bit packing of small integer codes.

Code ``i`` occupies stream bits ``[i·bits, (i+1)·bits)``, least significant bit first, and
stream bit ``j`` is bit ``j % 8`` (LSB first) of byte ``j // 8``: the little-endian bit
order. ``n`` codes take ``ceil(n·bits/8)`` bytes; the unused high bits of the last byte
are zero, so the packing is canonical and :func:`unpack_bits` rejects anything else.

Every path is vectorised torch on the tensor's own device. Widths 1, 2 and 4 divide a
byte and pack by shifting strided views together (width 1 on CPU goes through numpy's
``packbits``, much faster; widths 2 and 4 of many codes on the CPU through the compiled
chunk kernel of :mod:`fedsqueeze.codec.jit`, one pass instead of three); width 3 packs
eight codes into three bytes; width 8 is the identity.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from fedsqueeze.codec import jit
from fedsqueeze.codec.chunks import CPU_CHUNK, chunk_bounds, run_chunks, scratch
from fedsqueeze.errors import FormatError

__all__ = ["SUPPORTED_BITS", "pack_bits", "packed_size", "unpack_bits"]

#: Code widths this module packs.
SUPPORTED_BITS = (1, 2, 3, 4, 8)
_CHUNK = CPU_CHUNK


def packed_size(count: int, bits: int) -> int:
    """Bytes taken by ``count`` codes of ``bits`` bits: ``ceil(count·bits/8)``."""
    return (count * bits + 7) // 8


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack codes of ``bits`` bits each into a byte stream.

    Parameters
    ----------
    codes
        uint8 ``[n]``, every value ``< 2**bits``.
    bits
        1, 2, 3, 4 or 8.

    Returns
    -------
    Tensor
        uint8 ``[ceil(n·bits/8)]`` on ``codes``' device. For ``bits == 8`` this is
        ``codes`` itself (no copy): do not modify one expecting the other to stay.

    Raises
    ------
    ValueError
        Unsupported ``bits``, a tensor that is not 1-D uint8, or a code ``>= 2**bits``.
    """
    _check_bits(bits, ValueError)
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise ValueError(f"codes must be 1-D uint8, got {codes.dtype} {tuple(codes.shape)}")
    if bits == 8:
        return codes
    n = codes.numel()
    # One scalar sync: a code that does not fit would silently corrupt its neighbours.
    # (amax is one fast reduction; a shifted copy and any() are two passes.)
    if n and int(codes.amax()) >> bits:
        raise ValueError(f"codes do not fit in {bits} bits")
    if bits == 1 and codes.device.type == "cpu":
        return _pack1_numpy(codes.contiguous())
    if bits == 3:
        return _pack3(_pad_to_multiple(codes.contiguous(), 8))[: packed_size(n, bits)]
    if codes.device.type == "cpu" and jit.use(n):
        return _pack_compiled(codes.contiguous(), bits)
    return _pack_divisor(codes, bits)


def _pack_compiled(codes: Tensor, bits: int) -> Tensor:
    """:func:`_pack_divisor`'s bytes (widths 2 and 4) by the compiled kernel, in chunks
    of whole bytes on the worker threads."""
    src = codes.numpy()
    n = src.size
    out = np.empty(packed_size(n, bits), dtype=np.uint8)
    per_byte = 8 // bits

    def chunk(start: int, stop: int) -> None:
        jit.pack(src[start:stop], stop - start, bits, out, start // per_byte)

    run_chunks(chunk, chunk_bounds(n, _CHUNK))  # _CHUNK: whole bytes of every width
    return torch.from_numpy(out)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`; treats ``packed`` as hostile.

    Parameters
    ----------
    packed
        uint8 ``[m]``.
    bits
        1, 2, 3, 4 or 8 (it usually comes from a header, so a bad value is a
        :class:`FormatError`).
    count
        Number of codes to read.

    Returns
    -------
    Tensor
        uint8 ``[count]`` on ``packed``'s device, each ``< 2**bits``. For ``bits == 8``
        this is ``packed`` itself.

    Raises
    ------
    ValueError
        ``packed`` is not 1-D uint8 (a programming mistake, not bad data).
    FormatError
        Bad ``bits`` or ``count``, ``m != ceil(count·bits/8)`` (short or trailing bytes),
        or non-zero padding bits in the last byte.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed must be 1-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    _check_bits(bits, FormatError)
    if count < 0:
        raise FormatError(f"negative code count {count}")
    expected = packed_size(count, bits)
    if packed.numel() != expected:
        raise FormatError(
            f"{count} codes of {bits} bits need {expected} bytes, got {packed.numel()}"
        )
    if bits == 8:
        return packed
    used = (count * bits) % 8
    if used and bool((packed[-1] >> used).any()):
        raise FormatError("non-zero padding bits after the last code")
    if bits == 3:
        return _unpack3(packed)[:count]
    if bits == 1 and packed.device.type == "cpu":
        return _unpack1_numpy(packed.contiguous(), count)
    return _unpack_divisor(packed, bits, count)


def _check_bits(bits: int, error: type[Exception]) -> None:
    if bits not in SUPPORTED_BITS:
        raise error(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    extra = (-x.numel()) % multiple
    if not extra:
        return x
    return torch.cat([x, x.new_zeros(extra)])


def _pack_divisor(codes: Tensor, bits: int) -> Tensor:
    """Pack widths that divide 8 (1, 2, 4): OR shifted strided views together, in chunks
    of output bytes on the worker threads (:mod:`fedsqueeze.codec.chunks`)."""
    per_byte = 8 // bits
    groups = _pad_to_multiple(codes.contiguous(), per_byte).view(-1, per_byte)
    out = torch.empty(groups.shape[0], dtype=torch.uint8, device=codes.device)

    def chunk(start: int, stop: int) -> None:
        o = out[start:stop]
        o.copy_(groups[start:stop, 0])
        shifted = _scratch("a", stop - start, o.device)
        for j in range(1, per_byte):
            torch.bitwise_left_shift(groups[start:stop, j], j * bits, out=shifted)
            o.bitwise_or_(shifted)

    _run(chunk, out.numel(), out.device)
    return out


def _unpack_divisor(packed: Tensor, bits: int, count: int) -> Tensor:
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    packed = packed.contiguous()
    codes = torch.empty((packed.numel(), per_byte), dtype=torch.uint8, device=packed.device)

    def chunk(start: int, stop: int) -> None:
        shifted = _scratch("a", stop - start, packed.device)
        for j in range(per_byte):
            torch.bitwise_right_shift(packed[start:stop], j * bits, out=shifted)
            torch.bitwise_and(shifted, mask, out=codes[start:stop, j])

    _run(chunk, packed.numel(), packed.device)
    return codes.view(-1)[:count]


def _scratch(key: str, numel: int, device: torch.device) -> Tensor:
    if device.type == "cpu":
        return scratch(key, numel, torch.uint8)
    return torch.empty(numel, dtype=torch.uint8, device=device)


def _run(fn: Callable[[int, int], None], n: int, device: torch.device) -> None:
    if device.type == "cpu":
        run_chunks(fn, chunk_bounds(n, _CHUNK))
    else:
        fn(0, n)


def _pack3(padded: Tensor) -> Tensor:
    """Eight 3-bit codes (uint8 ``[8g]``) → three bytes each (uint8 ``[3g]``).

    Works byte lane by byte lane in uint8 (bits shifted past the top fall off), which
    avoids int32 temporaries four times the size of the codes.
    """
    c = padded.view(-1, 8)
    out = torch.empty((c.shape[0], 3), dtype=torch.uint8, device=padded.device)
    out[:, 0] = c[:, 0] | (c[:, 1] << 3) | (c[:, 2] << 6)
    out[:, 1] = (c[:, 2] >> 2) | (c[:, 3] << 1) | (c[:, 4] << 4) | (c[:, 5] << 7)
    out[:, 2] = (c[:, 5] >> 1) | (c[:, 6] << 2) | (c[:, 7] << 5)
    return out.view(-1)


def _unpack3(packed: Tensor) -> Tensor:
    """Inverse of :func:`_pack3` for a stream padded to whole 3-byte groups."""
    g = _pad_to_multiple(packed, 3).view(-1, 3)
    b0, b1, b2 = g[:, 0], g[:, 1], g[:, 2]
    out = torch.empty((g.shape[0], 8), dtype=torch.uint8, device=packed.device)
    out[:, 0] = b0 & 7
    out[:, 1] = (b0 >> 3) & 7
    out[:, 2] = (b0 >> 6) | ((b1 & 1) << 2)
    out[:, 3] = (b1 >> 1) & 7
    out[:, 4] = (b1 >> 4) & 7
    out[:, 5] = (b1 >> 7) | ((b2 & 3) << 1)
    out[:, 6] = (b2 >> 2) & 7
    out[:, 7] = b2 >> 5
    return out.view(-1)


def _pack1_numpy(codes: Tensor) -> Tensor:
    # numpy's C loop is ~40x faster than eight strided torch passes on CPU.
    return torch.from_numpy(np.packbits(codes.numpy(), bitorder="little"))


def _unpack1_numpy(packed: Tensor, count: int) -> Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count, bitorder="little"))
