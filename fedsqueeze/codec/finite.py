"""What the encoder does with values it cannot encode as asked: :class:`NonFinite`.

NaN and ±Inf have no place in a quantization grid, a top-k ranking, a low-rank
factorization or a magnitude threshold, and a cast to fp16/bf16 turns large finite
values into ±Inf. Rather than let each stage fail its own way (or pass the values on
silently), the encoder checks every floating tensor once, before any stage runs, against
what its path will do to it:

* the lossless path: the tensor itself must be finite;
* the cast path (fp16/bf16): the values sent (tensor, or its difference to the base) must
  stay finite in the narrower format;
* the lossy paths (prune, top-k, low-rank, quantization, k-means): the values the stages
  see (difference to the base plus residual) must be finite, within ``±2^126`` when
  quantized, and finite in the float format when cast.

A tensor that fails is refused (:attr:`NonFinite.REFUSE`, the default: a
:class:`~fedsqueeze.errors.NonFiniteError` naming it) or carried bit-exactly as a lossless
record (:attr:`NonFinite.CARRY`), which every decoder already reads.
"""

from __future__ import annotations

from enum import Enum

import numpy as np
import torch

from fedsqueeze.codec import jit, jit_bytes
from fedsqueeze.codec.chunks import CPU_CHUNK, chunk_bounds, run_chunks
from fedsqueeze.codec.quantization import MAX_MAGNITUDE


class NonFinite(Enum):
    """The policy for tensors with NaN/Inf, or values the spec's number format cannot hold."""

    #: Raise :class:`~fedsqueeze.errors.NonFiniteError` naming the first such tensor.
    REFUSE = 1
    #: Send such tensors losslessly (raw bits, or bits XOR the base's for a delta).
    CARRY = 2


_FLOAT_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# Per width: the integer view, the mask clearing the sign, and the smallest non-finite
# magnitude's bits (exponent all ones).
_INF_BITS = {
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}


def all_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` has no NaN or Inf: on the CPU, one pass over its bits
    (``torch.isfinite(x).all()`` costs ~30× more on these machines, ``torch.aminmax``
    of bf16 values 5×): a compiled kernel on the worker threads for a large tensor, else
    NumPy."""
    found = _INF_BITS.get(x.dtype)
    if found is None or x.device.type != "cpu" or x.numel() == 0:
        return bool(torch.isfinite(x).all())
    view, mask, inf = found
    ints = x.detach().contiguous().view(view).numpy().reshape(-1)
    if jit.use(ints.shape[0]):
        words = ints.view(f"u{ints.itemsize}")  # unsigned: the kernel's max of masked bits
        masks = np.array([mask], dtype=words.dtype)
        bounds = chunk_bounds(words.shape[0])
        tops = np.zeros(len(bounds), dtype=words.dtype)

        def chunk(start: int, stop: int) -> None:
            tops[start // CPU_CHUNK] = jit_bytes.top_bits(words[start:stop], masks)

        run_chunks(chunk, bounds)
        return int(tops.max()) < inf
    # Block by block through one cache-sized scratch array: a whole-tensor temporary
    # is fresh memory, and its page faults cost more than the test.
    scratch = np.empty(min(ints.shape[0], _FINITE_BLOCK), dtype=ints.dtype)
    for start in range(0, ints.shape[0], _FINITE_BLOCK):
        block = ints[start : start + _FINITE_BLOCK]
        part = scratch[: block.shape[0]]
        np.bitwise_and(block, mask, out=part)
        if part.max() >= inf:
            return False
    return True


_FINITE_BLOCK = 1 << 16


def count_nonfinite(x: torch.Tensor) -> str | None:
    """``"2 NaN and 1 Inf values"`` (or ``"1 NaN value"``) for a floating tensor that
    has some, else ``None``."""
    if not x.is_floating_point():
        return None
    if all_finite(x):
        return None
    nan = int(torch.isnan(x).sum())
    inf = int(torch.isinf(x).sum())
    parts = [f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else ""]
    return " and ".join(p for p in parts if p) + (" value" if nan + inf == 1 else " values")


def unrepresentable(
    name: str,
    t: torch.Tensor,
    sent: torch.Tensor,
    *,
    quantized: bool,
    cast: torch.dtype | None,
) -> str | None:
    """Why tensor ``name`` cannot be encoded as asked, or ``None`` when it can.

    Parameters
    ----------
    name
        The tensor's name, for the message.
    t
        The tensor itself (floating, any shape).
    sent
        What the encoding stages see: ``t``, or its difference to the base (plus residual),
        in float32, same shape as ``t``.
    quantized
        Whether the values are quantized (they must then lie within ``±2^126``).
    cast
        The narrower float format the values are stored in, or ``None``.
    """
    own = count_nonfinite(t)
    if own is not None:
        return f"tensor {name!r} has {own}"
    if sent is not t and count_nonfinite(sent) is not None:
        return (
            f"tensor {name!r} is finite but its difference to the base (plus the "
            f"error-feedback residual) is not: the base has NaN/Inf or the difference overflows"
        )
    if quantized and bool((sent.abs() > MAX_MAGNITUDE).any()):
        return f"tensor {name!r} has values beyond ±2^126, too large to quantize"
    if cast is not None and cast != torch.float32 and not bool(torch.isfinite(sent.to(cast)).all()):
        return (
            f"tensor {name!r} has values beyond the range of {_FLOAT_NAMES.get(cast, cast)} "
            f"(they would decode as Inf)"
        )
    return None


__all__ = ["NonFinite", "count_nonfinite", "unrepresentable"]
