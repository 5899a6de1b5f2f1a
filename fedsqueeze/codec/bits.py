"""Tensors' bits as integers for the lossless paths: XOR against a base, zero tests.

The lossless delta of a tensor is its bits XOR its base's (bit-exact for every value,
NaN payloads and ``-0.0`` included). On the CPU every step runs in NumPy: the XOR lands
in NumPy memory (huge pages for large buffers: torch's fresh allocations page-fault
4 KiB at a time, which costs more than the XOR itself on these machines), torch's
OpenMP threads are kept out of it (their barriers stall when cores are shared), and the
zero test counts nonzero words with SIMD and stops early on the usual delta, where a
changed value turns up within the first few thousand.
"""

from __future__ import annotations

import numpy as np
import torch

_SIGNED = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
#: Leading values checked on their own first: a delta with anything in it shows it here.
_PROBE = 4096


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bits as an integer tensor of the same width (``bool`` as ``uint8``)."""
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    if not t.is_floating_point():
        return t
    return t.contiguous().view(_SIGNED[t.element_size()])


def xor_bits(t: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``as_bits(t) ^ as_bits(base)`` (same shape and dtype, same device)."""
    a, b = as_bits(t), as_bits(base)
    if a.device.type != "cpu" or b.device.type != "cpu" or a.dtype != b.dtype:
        return a ^ b
    a, b = a.contiguous(), b.contiguous()
    out = np.empty(a.shape, dtype=a.numpy().dtype)
    np.bitwise_xor(a.numpy(), b.numpy(), out=out)
    return torch.from_numpy(out)


def xor_into(values: torch.Tensor, base: torch.Tensor) -> None:
    """``values``' bits ^= ``base``'s, in place (float tensors of one dtype and shape)."""
    if not values.is_floating_point() or values.dtype != base.dtype:
        raise TypeError(f"xor_into takes floats of one dtype, got {values.dtype}, {base.dtype}")
    if not values.is_contiguous():
        raise ValueError("xor_into writes into a contiguous tensor")
    mine = values.view(_SIGNED[values.element_size()])
    theirs = as_bits(base).reshape(mine.shape)
    if mine.device.type != "cpu" or theirs.device.type != "cpu":
        mine ^= theirs
        return
    # NumPy's XOR, not torch's: torch splits it over OpenMP threads, whose barrier
    # waits cost 30 ms a tensor on a loaded machine (NumPy: one pass, no threads).
    np.bitwise_xor(mine.numpy(), theirs.contiguous().numpy(), out=mine.numpy())


def all_zero_bits(bits: torch.Tensor) -> bool:
    """Whether every element of the integer tensor ``bits`` is 0."""
    if bits.is_floating_point() or bits.is_complex():
        raise TypeError(f"all_zero_bits takes integer bits, got {bits.dtype}")
    if bits.device.type != "cpu":
        return not bool(bits.any())
    flat = bits.contiguous().reshape(-1).numpy()
    if np.count_nonzero(flat[:_PROBE]):
        return False
    return not np.count_nonzero(flat)


__all__ = ["all_zero_bits", "as_bits", "xor_bits", "xor_into"]
