"""Byte planes of float words: split out of the words and joined back, block by block.

A *plane* is byte ``k`` of every value, the most significant first. For the formats with
an 8-bit exponent (fp32, bf16) the sign bit and the exponent's lowest bit trade places,
so plane 0 holds the whole exponent and plane 1 the sign and the 7 highest mantissa
bits (the layout :mod:`fedsqueeze.codec.grouping` writes).

Both directions work on the words as unsigned integers, in blocks of :data:`BLOCK`
values, with scratch arrays that stay in the core's cache: a shift and an OR per plane
over a block is a few vectorized passes over L2, where writing a plane as a strided
column of a ``[n, width]`` byte array (or reading one) costs a pass over main memory
per plane. NumPy releases the GIL in these loops, so blocks run on all cores.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedsqueeze.codec import jit, jit_bytes

#: Values per block: a block's words, scratch and planes stay in cache (L2 or L3),
#: and each NumPy call covers enough values that threads rarely wait on the GIL.
BLOCK = 1 << 18

_UINTS: dict[int, type[np.unsignedinteger]] = {
    1: np.uint8,
    2: np.uint16,
    4: np.uint32,
    8: np.uint64,
}
_local = threading.local()

Words = npt.NDArray[np.unsignedinteger]
Plane = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class PlaneLayout:
    """How a float's bytes map to planes.

    Attributes
    ----------
    width
        Bytes per value (planes per value): 2, 4 or 8.
    swapped
        Whether the sign bit and the exponent's lowest bit trade places (8-bit
        exponents: fp32, bf16), so that plane 0 is the whole exponent.
    """

    width: int
    swapped: bool

    def __post_init__(self) -> None:
        if self.width not in (2, 4, 8):
            raise ValueError(f"planes of {self.width}-byte values")

    @property
    def uint(self) -> type[np.unsignedinteger]:
        """The unsigned integer type of one value's word."""
        return _UINTS[self.width]

    def shift(self, k: int) -> int:
        """Where plane ``k``'s byte starts in the word (unswapped planes)."""
        return 8 * (self.width - 1 - k)


def _scratch(dtype: type[np.unsignedinteger], count: int, use: str = "scratch") -> Words:
    """A per-thread scratch array of ``count`` values (reused: never hand it out); each
    ``use`` has its own (the XOR of a block is read while the shifts use theirs)."""
    key = f"{use}_{np.dtype(dtype).name}"
    buf: Words | None = getattr(_local, key, None)
    if buf is None or buf.shape[0] < count:
        buf = np.empty(max(count, BLOCK), dtype=dtype)
        setattr(_local, key, buf)
    return buf[:count]


def split_planes(
    words: Words, planes: dict[int, Plane], layout: PlaneLayout, base: Words | None = None
) -> None:
    """Write planes ``k`` of ``words`` (1-D, ``layout.uint``) into ``planes[k]`` (each as
    long as ``words``), reading the words once: block by block, every plane.

    With ``base`` (as long as ``words``, same type) the planes are those of
    ``words ^ base``, XORed a block at a time in a per-thread scratch array: a lossless
    delta never holds its whole XOR.
    """
    if base is not None and base.shape != words.shape:
        raise ValueError(f"XOR of {words.shape[0]} words with {base.shape[0]}")
    compiled = jit.use(words.shape[0])
    every = sorted(planes) == list(range(layout.width))
    if compiled and layout.width in (2, 4) and every:
        _split_whole(words, planes, layout, base)
        return
    for start in range(0, words.shape[0], BLOCK):
        block = words[start : start + BLOCK]
        if base is not None and compiled:  # the XOR inside the plane's one pass
            for k, out in planes.items():
                _split_compiled(
                    block, base[start : start + BLOCK], k, layout, out[start : start + BLOCK]
                )
            continue
        if base is not None:
            xored = _scratch(words.dtype.type, block.shape[0], "xor")
            np.bitwise_xor(block, base[start : start + BLOCK], out=xored)
            block = xored
        for k, out in planes.items():
            _split_block(block, k, layout, out[start : start + BLOCK], compiled)


def _split_whole(
    words: Words, planes: dict[int, Plane], layout: PlaneLayout, base: Words | None
) -> None:
    """Every plane of 16- or 32-bit words in one compiled pass per block (the shifts
    are constants there, so it vectorizes: :func:`fedsqueeze.codec.jit_bytes.split_words2`)."""
    xor = base is not None
    for start in range(0, words.shape[0], BLOCK):
        stop = start + BLOCK
        block = words[start:stop]
        other = base[start:stop] if base is not None else block
        outs = [planes[k][start:stop] for k in range(layout.width)]
        if layout.width == 2:
            jit_bytes.split_words2(block, other, xor, layout.swapped, *outs)
        else:
            jit_bytes.split_words4(block, other, xor, layout.swapped, *outs)


def _split_block(v: Words, k: int, layout: PlaneLayout, out: Plane, compiled: bool) -> None:
    top = 8 * layout.width
    if compiled:
        _split_compiled(v, None, k, layout, out)
        return
    if layout.swapped and k == 0:
        # The exponent sits just below the sign: the cast to a byte drops the sign.
        _narrow(v, top - 9, out)
    elif layout.swapped and k == 1:
        # The sign from the top byte, the mantissa's 7 bits from the next one.
        _narrow(v, top - 16, out)
        hi = _scratch(np.uint8, v.shape[0])
        _narrow(v, top - 8, hi)
        np.bitwise_and(out, 0x7F, out=out)
        np.bitwise_and(hi, 0x80, out=hi)
        np.bitwise_or(out, hi, out=out)
    else:
        _narrow(v, layout.shift(k), out)


def _split_compiled(v: Words, base: Words | None, k: int, layout: PlaneLayout, out: Plane) -> None:
    """:func:`_split_block` (of ``v ^ base`` with ``base``) by one compiled pass."""
    top = 8 * layout.width
    if layout.swapped and k == 0:
        s1, m1, s2, m2 = top - 9, 0xFF, 0, 0
    elif layout.swapped and k == 1:
        s1, m1, s2, m2 = top - 16, 0x7F, top - 8, 0x80
    else:
        s1, m1, s2, m2 = layout.shift(k), 0xFF, 0, 0
    xor = base is not None
    jit_bytes.split_plane(v, base if base is not None else v, xor, s1, m1, s2, m2, out)


def _narrow(v: Words, shift: int, out: Plane) -> None:
    """``out = (v >> shift) & 0xFF`` (the cast to uint8 keeps the low byte)."""
    if shift:
        t = _scratch(v.dtype.type, v.shape[0])
        np.right_shift(v, shift, out=t)
        np.copyto(out, t, casting="unsafe")
    else:
        np.copyto(out, v, casting="unsafe")


def join_planes(planes: list[Plane], layout: PlaneLayout, out: Words) -> None:
    """Inverse of :func:`split_planes` for every plane: ``out`` (1-D, ``layout.uint``)
    from ``planes`` (``layout.width`` planes of ``len(out)`` bytes each)."""
    compiled = jit.use(out.shape[0])
    for start in range(0, out.shape[0], BLOCK):
        end = start + BLOCK
        _join_block([p[start:end] for p in planes], layout, out[start:end], compiled)


def _join_block(planes: list[Plane], layout: PlaneLayout, o: Words, compiled: bool) -> None:
    if compiled and layout.width == 2:
        jit_bytes.join_planes2(planes[0], planes[1], layout.swapped, o)
        return
    if compiled and layout.width == 4:
        jit_bytes.join_planes4(planes[0], planes[1], planes[2], planes[3], layout.swapped, o)
        return
    uint = layout.uint
    top = 8 * layout.width
    t = _scratch(uint, o.shape[0])
    first = top - 9 if layout.swapped else top - 8
    np.left_shift(planes[0], first, out=o, dtype=uint)
    for k in range(1, layout.width):
        plane = planes[k]
        if layout.swapped and k == 1:
            np.bitwise_and(plane, 0x80, out=t, dtype=uint)
            np.left_shift(t, top - 8, out=t)
            np.bitwise_or(o, t, out=o)
            np.bitwise_and(plane, 0x7F, out=t, dtype=uint)
            if top - 16:
                np.left_shift(t, top - 16, out=t)
            np.bitwise_or(o, t, out=o)
        elif layout.shift(k):
            np.left_shift(plane, layout.shift(k), out=t, dtype=uint)
            np.bitwise_or(o, t, out=o)
        else:
            np.bitwise_or(o, plane, out=o)


__all__ = ["BLOCK", "PlaneLayout", "join_planes", "split_planes"]
