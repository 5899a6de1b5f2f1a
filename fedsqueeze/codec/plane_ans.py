"""Context-coded refinement planes (the ``entropy=ans`` refinements of format version 9).

A refinement record of a progressive tensor carries the next plane of every value's
code (:mod:`fedsqueeze.codec.progressive`); zstd codes such a plane at about its
order-0 entropy. But the receiver already holds each value's coarser bits, and the next
bits depend on them: in a 4-bit symmetric code cut ``1+1+2`` the first bit is the sign
and the second, given the sign, says whether the magnitude is in the upper half, which
for a pruned tensor (only the largest weights kept) is nearly always the same answer
per sign. So with the spec's ``entropy=ans`` each refinement plane is also coded with
:func:`fedsqueeze.codec.ans.encode_context_codes`, the context of a value being its top
``cumulative_bits(levels, level − 1)`` code bits (for a support-level group, the bits
its own values hold), and the record keeps whichever of the two is smaller. A group's
first plane, sent with its positions, has no coarser bits: it is coded with one
context (the adaptive order-0 coder) when that pays.

Body of an ANS refinement (flagged by the ENTROPY flag with a raw length of 0, as v8's
ANS records)::

    [positions payload (a group's first plane)] · [bucket table] · rANS bytes

the table (``2 · 2^cum`` bytes, known from the plan) before the rANS bytes, which are
not self-delimiting and run to the end of the body. The positions and the table are
stored as they are (Rice-coded gaps and float16 entries: zstd gains little on them).

Planes of more than :data:`fedsqueeze.codec.ans.MAX_CODES` values keep zstandard (the
coder is plain Python, about a microsecond a code each way).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fedsqueeze.codec import ans
from fedsqueeze.errors import FormatError

__all__ = ["decode_plane", "encode_plane", "fits"]


def fits(count: int) -> bool:
    """Whether a plane of ``count`` values may be ANS-coded."""
    return 0 < count <= ans.MAX_CODES


def _contexts(held: Tensor | None, count: int) -> np.ndarray:
    if held is None:
        return np.zeros(count, dtype=np.int64)
    if held.numel() != count:
        raise ValueError(f"{held.numel()} contexts for a plane of {count} values")
    return held.reshape(-1).to(device="cpu", dtype=torch.int64).numpy()


def encode_plane(plane: Tensor, bits: int, held: Tensor | None) -> bytes | None:
    """The rANS bytes of a plane (``bits``-bit codes, any integer dtype ``[n]``) with
    each value's coarser code bits ``held`` (``[n]``, ``< 2^8``) as its context;
    ``held=None``: one context. ``None`` when the plane is too large (or empty)."""
    count = plane.numel()
    if not fits(count):
        return None
    codes = plane.reshape(-1).to(device="cpu", dtype=torch.int64).numpy()
    return ans.encode_context_codes(codes, _contexts(held, count), bits)


def decode_plane(
    data: bytes | memoryview, bits: int, held: Tensor | None, count: int, device: torch.device
) -> Tensor:
    """Inverse of :func:`encode_plane`: uint8 ``[count]`` on ``device``.

    Raises
    ------
    FormatError
        A plane too large for the coder (checked before any work), or a body that is
        not exactly its coding.
    """
    if not fits(count):
        raise FormatError(f"an ANS-coded plane of {count} values (1..{ans.MAX_CODES})")
    codes = ans.decode_context_codes(data, _contexts(held, count), bits)
    return torch.from_numpy(codes.copy()).to(device)
