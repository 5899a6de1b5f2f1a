"""Stochastic rounding's draws: a counter-based generator, keyed once per tensor.

Stochastic rounding adds one draw ``u ~ U[0, 1)`` to each scaled value before the floor.
The draws came from a torch generator, ``uniform_`` chunk after chunk: about 4 ns a
draw on these machines, on one thread and in one fixed order (a generator's stream is
sequential), so on a 25M-value tensor at 10% kept the 2.5M draws of top-k's codes took
a tenth of its encode, and a dense stochastic spec spent most of its time there. They
also kept the draws out of any pass that runs chunks on several threads.

Here the generator is asked for one 63-bit key per quantized tensor (:func:`key`), and
the draw of the value at position ``i`` is a hash of ``(key, i)``: SplitMix64's output
function (Steele, Lea and Flood, "Fast splittable pseudorandom number generators",
OOPSLA 2014; the generator Java's ``SplittableRandom`` uses) of ``key + (i + 1) ·
γ``, ``γ`` the golden-ratio constant, its top 24 bits scaled to ``[0, 1 − 2^−24]``: the
resolution of a float32 ``uniform_``. Any position's draw costs a few integer
operations, in any order, on any thread: a compiled kernel makes them inline
(:func:`fedsqueeze.codec.jit_select.unit_draw`), NumPy in vectors
(:func:`uniform_np`), torch's int64 operations on a GPU (:func:`uniform_torch`). All
three give the same numbers (``tests/codec/test_select_quantize.py``).

The encoder's ``seed`` still decides every draw, and the same seed gives the same bytes;
they are not the bytes the torch generator's draws gave (stochastic codes are not part
of any golden vector: rounding is not in the format).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from fedsqueeze.codec import jit, jit_select

__all__ = ["GAMMA", "MIX1", "MIX2", "key", "uniform", "uniform_np", "uniform_torch"]

#: SplitMix64's increment (2^64 / φ, odd) and its two multipliers.
GAMMA = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
#: float32's resolution of a unit draw: the hash's top 24 bits times 2^−24.
_UNIT = 2.0**-24
_MASK64 = (1 << 64) - 1


def key(generator: torch.Generator | None) -> int:
    """One draw from ``generator`` (the global CPU generator when ``None``): the key of one
    tensor's draws, in ``[0, 2^63)``."""
    device = generator.device if generator is not None else torch.device("cpu")
    drawn = torch.randint(0, 2**63 - 1, (1,), generator=generator, device=device)
    return int(drawn.item())


def uniform_np(k: int, start: int, n: int) -> npt.NDArray[np.float32]:
    """float32 ``[n]``: the draws of positions ``start … start + n − 1`` under key ``k``."""
    with np.errstate(over="ignore"):
        z = np.arange(start + 1, start + n + 1, dtype=np.uint64)
        z *= np.uint64(GAMMA)
        z += np.uint64(k)
        z ^= z >> np.uint64(30)
        z *= np.uint64(MIX1)
        z ^= z >> np.uint64(27)
        z *= np.uint64(MIX2)
        z ^= z >> np.uint64(31)
        z >>= np.uint64(40)
    out = z.astype(np.float32)
    out *= np.float32(_UNIT)
    return out


def uniform(k: int, start: int, n: int, device: torch.device) -> Tensor:
    """:func:`uniform_np` as a float32 tensor on ``device``: on the CPU by the compiled
    kernel for many values, off it by :func:`uniform_torch`."""
    if device.type != "cpu":
        return uniform_torch(k, start, n, device)
    if jit.use(n):
        out = np.empty(n, dtype=np.float32)
        jit_select.unit_draws(np.uint64(k), start, out)
        return torch.from_numpy(out)
    return torch.from_numpy(uniform_np(k, start, n))


def uniform_torch(k: int, start: int, n: int, device: torch.device) -> Tensor:
    """:func:`uniform_np` computed by torch on ``device``, in int64: two's complement
    products wrap like uint64 ones, and right shifts are masked to be logical."""
    z = torch.arange(start + 1, start + n + 1, dtype=torch.int64, device=device)
    z.mul_(_signed(GAMMA)).add_(_signed(k))
    z.bitwise_xor_(_shr(z, 30)).mul_(_signed(MIX1))
    z.bitwise_xor_(_shr(z, 27)).mul_(_signed(MIX2))
    z.bitwise_xor_(_shr(z, 31))
    return _shr(z, 40).to(torch.float32).mul_(_UNIT)


def _signed(value: int) -> int:
    """A uint64 constant as the int64 with its bits."""
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


def _shr(z: Tensor, s: int) -> Tensor:
    """A logical right shift of int64 ``z`` (torch's is arithmetic)."""
    return torch.bitwise_and(torch.bitwise_right_shift(z, s), (1 << (64 - s)) - 1)
