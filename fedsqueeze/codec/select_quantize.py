"""Magnitude selection with the quantizer and the error-feedback residual in its second
pass: the sparse specs' encode of a large tensor in two passes over it instead of four.

A top-k (or unstructured pruning) spec with per-tensor linear codes used to read a
large float32 tensor four times: the selection's two passes
(:mod:`fedsqueeze.codec.threshold_select`), the quantization of the kept values
(small, but in several torch passes over them, with one random draw each for
stochastic rounding), and for error feedback the residual ``x − decoded``: a copy of
the tensor with the kept values' corrections put in
(:func:`fedsqueeze.codec.kernels.copy_scatter`). On 25M values at 10% kept that made
top-k's encode take four times a ``clone()`` (BENCHMARKS.md, "A 100 MB fp32 tensor").

Here the quantizer runs on each chunk as soon as the second pass has selected it, while
the chunk is in cache: the codes of its kept values, and the residual's chunk (a copy,
then the corrections). What makes that possible is knowing the quantizer's parameters
before the second pass. Per tensor they depend only on the smallest and the largest
kept value, and the first pass already finds the largest magnitude on each side of
zero (:attr:`~fedsqueeze.codec.threshold_select.FirstPass.top_neg` and ``top_pos``).
When both lie above the band that holds the cut-off, both are kept, so they *are* the
kept values' range. A tensor whose extreme on one side is not kept (all values of one
sign, or nearly), one whose cut-off may be zero (exact zeros would be kept), and every
other spec take the separate passes, which give the same bytes.

The output is exactly the separate passes': the same kept set, the same float32
operations in the same order for the codes and the residual
(:func:`fedsqueeze.codec.jit_select.quantize_kept`), and for stochastic rounding the
same draws: one key from the generator, and each kept value's draw a hash of its
ordinal (:mod:`fedsqueeze.codec.draws`), made inline on the worker threads.
``tests/codec/test_select_quantize.py`` compares both paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedsqueeze.codec import draws, jit, jit_select
from fedsqueeze.codec.kernels import empty_numpy_backed
from fedsqueeze.codec.quantization import QuantParams, choose_qparams, linear_bounds
from fedsqueeze.codec.spec import Granularity, QuantScheme, QuantSpec, Rounding
from fedsqueeze.codec.threshold_select import F32, I64, FirstPass, finish

__all__ = ["ENABLED", "Selected", "applies", "select_quantized"]

#: Whether the fused pass may run (the tests switch it off to compare the two paths).
ENABLED = True

#: Schemes whose codes are ``clamp(round(x / scale) + zp)`` with one scale per tensor.
_LINEAR = (QuantScheme.AFFINE, QuantScheme.SYMMETRIC, QuantScheme.POW2)


@dataclass(frozen=True)
class Selected:
    """What :func:`select_quantized` found."""

    #: int64 ``[k]``, increasing: the kept positions of the flat tensor.
    indices: Tensor
    #: uint8 ``[k]``: their codes.
    codes: Tensor
    #: The per-tensor quantization parameters of the codes.
    qp: QuantParams
    #: float32 ``[n]``: ``x`` less what the receiver decodes, when asked for.
    residual: Tensor | None


def applies(quant: QuantSpec | None) -> bool:
    """Whether ``quant`` is a quantizer the fused pass runs: linear codes, one scale per
    tensor."""
    return (
        ENABLED
        and quant is not None
        and quant.granularity is Granularity.PER_TENSOR
        and quant.scheme in _LINEAR
    )


def select_quantized(
    flat: Tensor,
    prune: int,
    first: FirstPass,
    quant: QuantSpec,
    generator: torch.Generator | None,
    residual: bool,
    in_place: bool = False,
) -> Selected | None:
    """The magnitude selection of ``flat`` (float32, 1-D, contiguous, on the CPU) that
    drops its ``prune`` smallest magnitudes, given its first pass, with the kept values
    quantized by ``quant`` (:func:`applies`) and, when ``residual``, ``flat`` less what
    the receiver decodes (written into ``flat`` itself when ``in_place``: the caller's
    own temporary). ``generator``: stochastic rounding's draws, as
    :func:`~fedsqueeze.codec.quantization.quantize` takes them.

    ``None`` where the separate passes must run instead (see the module's docstring);
    nothing has been drawn from ``generator`` then, and ``flat`` is unchanged."""
    n = flat.numel()
    if not (applies(quant) and jit.use(n)) or first.n != n or not 0 < prune < n:
        return None
    if flat.dtype != torch.float32 or flat.device.type != "cpu" or not flat.is_contiguous():
        return None
    ends = first.extremes()
    hi = float(first.hi)
    # Both extremes above the band (so kept), and a band above zero (no zero kept).
    if ends is None or not (float(first.lo) > 0.0 and -ends[0] > hi and ends[1] > hi):
        return None
    lo_t = torch.tensor(ends[0], dtype=torch.float32)
    hi_t = torch.tensor(ends[1], dtype=torch.float32)
    # Per tensor the parameters depend on the range alone: its two ends stand for the
    # kept values.
    qp = choose_qparams(
        torch.stack([lo_t, hi_t]), quant.bits, quant.scheme, Granularity.PER_TENSOR,
        known_range=(lo_t, hi_t),
    )  # fmt: skip
    kept = n - prune
    stochastic = quant.rounding is Rounding.STOCHASTIC
    saved = _rng_state(generator) if stochastic else None
    key = np.uint64(draws.key(generator) if stochastic else 0)
    inv, zp, qmin, qmax, scale = linear_bounds(qp)
    x = flat.numpy()
    codes = np.empty(kept, dtype=np.uint8)
    out: F32 = x if in_place else _empty(n) if residual else np.empty(0, dtype=np.float32)

    def then(start: int, stop: int, o0: int, o1: int, indices: I64, values: F32) -> None:
        jit_select.quantize_kept(
            values, indices, o0, o1, inv, zp, qmin, qmax, scale, stochastic, key, codes, out
        )

    picked = finish(x, prune, first, then, out if residual and not in_place else None)
    if picked is None:  # the band missed the cut-off: nothing written that counts
        if saved is not None:
            _set_rng_state(generator, saved)
        return None
    indices, _ = picked
    if indices.size != kept:  # cannot happen: finish keeps n − prune values
        raise RuntimeError(f"magnitude selection kept {indices.size} values, not {kept}")
    return Selected(
        torch.from_numpy(indices),
        torch.from_numpy(codes),
        qp,
        torch.from_numpy(out) if residual else None,
    )


def _empty(n: int) -> F32:
    array: F32 = empty_numpy_backed(n, torch.float32).numpy()
    return array


def _rng_state(generator: torch.Generator | None) -> Tensor:
    return torch.get_rng_state() if generator is None else generator.get_state()


def _set_rng_state(generator: torch.Generator | None, state: Tensor) -> None:
    if generator is None:
        torch.set_rng_state(state)
    else:
        generator.set_state(state)
