"""Kept positions decoded a chunk at a time, for part-by-part decoding.

:func:`~fedsqueeze.codec.positions.decode_positions` returns every kept index of a tensor
at once: 8 bytes per kept value plus temporaries the size of the tensor (the unpacked
bitmap or unary stream, one byte per bit). For the 11.7M-value word embeddings of
all-MiniLM-L6-v2 pruned to 10% that is over 50 MB, which :func:`~fedsqueeze.codec.
streaming.decode_into` exists to avoid. :func:`iter_positions` reads the same payloads
(same format: nothing on the wire changes) and yields the indices ``chunk`` at a time,
touching ``O(chunk)`` bytes of payload per step: the bitmap and the Rice remainders are
sliced at byte boundaries (``chunk`` is a multiple of 8), the unary quotients are
scanned forwards from where the previous chunk stopped.

Every check of :func:`decode_positions` is made, but a payload that breaks one is found
only when the decoding reaches it: the chunks yielded before are valid positions of the
tensor, and the caller (which writes them as they come) must treat its tensor as lost.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from fedsqueeze.codec.bitpack import SUPPORTED_BITS, packed_size, unpack_bits
from fedsqueeze.codec.positions import MAX_RICE_K, PositionCoding, check_position_header
from fedsqueeze.errors import FormatError

__all__ = ["iter_positions"]


def iter_positions(
    coding: PositionCoding, count: int, rice_k: int, payload: Tensor, numel: int, chunk: int
) -> Iterator[Tensor]:
    """Yield the kept indices of a tensor, ``chunk`` at a time (the last chunk shorter).

    Parameters
    ----------
    coding, count, rice_k, payload, numel
        As for :func:`~fedsqueeze.codec.positions.decode_positions` (all but ``numel``
        hostile).
    chunk
        Indices per piece, a positive multiple of 8.

    Yields
    ------
    Tensor
        int64 ``[≤ chunk]``, increasing across pieces, in ``[0, numel)``; ``count`` in all.

    Raises
    ------
    FormatError
        Any inconsistency, when the decoding reaches it.
    """
    if chunk <= 0 or chunk % 8:
        raise ValueError(f"chunk must be a positive multiple of 8, got {chunk}")
    if check_position_header(payload, coding, count, rice_k, numel) is PositionCoding.BITMAP:
        return _bitmap(payload, count, numel, chunk)
    return _rice(payload, count, rice_k, numel, chunk)


def _rechunk(pieces: Iterator[Tensor], count: int, chunk: int) -> Iterator[Tensor]:
    """Pieces of at most ``chunk`` values regrouped into ``chunk``-long ones (the last
    shorter); exactly ``count`` in all. At most a chunk and a piece are held."""
    held: list[Tensor] = []
    have = sent = 0
    for piece in pieces:
        if sent + have + piece.numel() > count:
            raise FormatError(f"the positions hold more than the {count} announced")
        if have + piece.numel() < chunk:
            held.append(piece)
            have += piece.numel()
            continue
        cut = chunk - have
        yield torch.cat([*held, piece[:cut]])
        sent += chunk
        rest = piece[cut:].clone()
        held, have = ([rest] if rest.numel() else []), rest.numel()
    if sent + have != count:
        raise FormatError(f"the positions hold {sent + have}, not the {count} announced")
    if have:
        yield torch.cat(held)


def _bitmap(payload: Tensor, count: int, numel: int, chunk: int) -> Iterator[Tensor]:
    if payload.numel() != packed_size(numel, 1):
        raise FormatError(f"bitmap of {numel} elements needs {packed_size(numel, 1)} bytes")

    step = max(1, chunk // 8)  # bytes: at most a chunk of positions

    def pieces() -> Iterator[Tensor]:
        for start in range(0, payload.numel(), step):
            stop = min(payload.numel(), start + step)
            bits = min(8 * (stop - start), numel - 8 * start)
            part = unpack_bits(payload[start:stop], 1, bits)  # rejects set padding bits
            yield torch.nonzero(part).view(-1) + 8 * start

    return _rechunk(pieces(), count, chunk)


def _remainders(packed: Tensor, k: int, n: int) -> Tensor:
    """``n`` values of ``k`` bits from a bit stream (as positions' fixed-width packing)."""
    if k == 0:
        return torch.zeros(n, dtype=torch.int64, device=packed.device)
    if k in SUPPORTED_BITS:
        return unpack_bits(packed, k, n).to(torch.int64)
    bits = unpack_bits(packed, 1, n * k).view(n, k).to(torch.int64)
    weights = torch.ones(k, dtype=torch.int64, device=packed.device) << torch.arange(
        k, device=packed.device
    )
    return (bits * weights).sum(dim=1)


def _rice(payload: Tensor, count: int, k: int, numel: int, chunk: int) -> Iterator[Tensor]:
    if not 0 <= k <= MAX_RICE_K:
        raise FormatError(f"Rice parameter {k} out of range 0..{MAX_RICE_K}")
    if count == 0:
        if payload.numel():
            raise FormatError("positions payload for zero positions")
        return iter(())
    rem_size = packed_size(count, k)
    if payload.numel() < rem_size or count > 8 * (payload.numel() - rem_size):
        raise FormatError(f"positions payload too short for {count} positions")
    return _rice_chunks(payload, rem_size, count, k, numel, chunk)


def _rice_chunks(
    payload: Tensor, rem_size: int, count: int, k: int, numel: int, chunk: int
) -> Iterator[Tensor]:
    unary = payload[rem_size:]
    quotients = _rechunk(_quotients(unary, max(1, chunk // 8)), count, chunk)
    last = -1  # the index before the chunk
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        q = next(quotients, None)
        if q is None or q.numel() != n:
            raise FormatError("unary stream does not hold one terminator per position")
        lo = start * k // 8  # start is a multiple of 8: a byte boundary
        r = _remainders(payload[lo : lo + packed_size(n, k)], k, n)
        # Bound with Python ints before int64 arithmetic can overflow.
        if last + (int(q.sum()) << k) + int(r.sum()) + n >= numel:
            raise FormatError(f"a position beyond the {numel} elements")
        # In place: one chunk of int64 beside q and r at the peak.
        indices = q.bitwise_left_shift_(k).bitwise_or_(r).add_(1)
        del r
        torch.cumsum(indices, 0, out=indices)
        indices.add_(last)
        last = int(indices[-1])
        yield indices
    if next(quotients, None) is not None:
        raise FormatError("unary stream does not hold one terminator per position")


def _quotients(unary: Tensor, step: int) -> Iterator[Tensor]:
    """The unary stream's quotients (one-bits before each zero-bit), ``step`` bytes (at
    most ``8·step`` quotients) at a time.

    Checks that the stream ends within a byte of its last terminator (the padding is
    one-bits; an all-one last byte would be a trailing byte).
    """
    previous_zero = -1
    for start in range(0, unary.numel(), step):
        part = unary[start : start + step]
        zeros = torch.nonzero(unpack_bits(part, 1, 8 * part.numel()) == 0).view(-1) + 8 * start
        if zeros.numel():
            yield torch.diff(zeros, prepend=zeros.new_full((1,), previous_zero)) - 1
            previous_zero = int(zeros[-1])
    if previous_zero < 8 * unary.numel() - 8:
        raise FormatError("trailing bytes after the unary stream")
