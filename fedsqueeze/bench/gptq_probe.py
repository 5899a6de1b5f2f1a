"""Probe: how far data-aware rounding (GPTQ) and per-tensor bits take a MiniLM first level.

Fake quantization (the weights are quantized and decoded in memory, no stream is
written), to measure what a first level of a progressive stream could reach at a byte
budget before building it into the codec. Every ≥2-D tensor is rotated as the codec's
``hadamard`` does (:mod:`fedsqueeze.codec.rotation`, the same seeds), quantized to a
symmetric grid of ``2^k`` levels with one scale per 384 values of a row (``block384``),
and its levels re-fitted per tensor (the codec's bucket-mean table); two roundings:

* ``rtn``: nearest grid point, levels = ``scale²``-weighted bucket means (the codec's
  first level today);
* ``gptq``: :func:`fedsqueeze.codec.gptq.gptq_codes` with each Linear's input moments
  ``H = Σ x xᵀ`` from forward passes over the *calibration* sentences
  (:func:`fedsqueeze.bench.sensitivity.calibration_sentences`, disjoint from the test
  sentences), levels re-fitted in the ``H`` metric; the embeddings (no ``H``) and the
  pooler round to nearest.

Bytes are counted as a stream would carry them: the codes at their empirical (order-0)
entropy times :data:`CODER_OVERHEAD` (zstd's measured excess over that entropy on the
rotated planes, ``plane_entropy``), 2 bytes per scale, ``2^k`` float16 levels per
tensor, and every 1-D tensor (biases, norms) as fp32. Bits per tensor are either one
plan for all (``2``: every tensor at 2 bits; ``1/3``: word embeddings at 1 bit, every
other matrix at 3) or allocated to a byte budget by a Lagrangian over the predicted
cosine loss ``F_t · e_t(k)`` (``F_t``: the tensor's Fisher weight from
:mod:`fedsqueeze.bench.sensitivity`; ``e_t``: its squared error, in the ``H`` metric
rescaled to weight units for a Linear). The cosine is the bench's: the mean cosine of
the normalised sentence embeddings of the test sentences, decoded against fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedsqueeze.codec.gptq import (
    Grid,
    gptq_codes,
    nearest_codes,
    output_error,
    refit_levels,
    uniform_grid,
)
from fedsqueeze.codec.rotation import rotate, rotation_seed, unrotate

__all__ = [
    "CODER_OVERHEAD",
    "Choice",
    "allocate",
    "input_moments",
    "quantize_tensor",
    "run_probe",
]

#: zstd's size over the order-0 entropy of the rotated 2-bit planes (1.609 / 1.564).
CODER_OVERHEAD = 1.03
#: Clip fractions tried for a tensor's grid (the one with least error is kept).
CLIPS = (1.0, 0.85, 0.7, 0.55, 0.45, 0.35)
GROUP = 384


@dataclass(frozen=True)
class Choice:
    """One tensor at one bit width and rounding: what it costs and what it loses.

    Attributes
    ----------
    bits
        Grid bits ``k``.
    nbytes
        Bytes a stream would carry (codes entropy-coded, scales, levels).
    error
        Squared error in weight units (``H``-metric error rescaled for a Linear).
    decoded
        The decoded tensor (float32, the original shape).
    """

    bits: int
    nbytes: float
    error: float
    decoded: Tensor


def _entropy_bits(codes: Tensor, count: int) -> float:
    freq = torch.bincount(codes.reshape(-1), minlength=count).to(torch.float64)
    p = freq[freq > 0] / freq.sum()
    return float(-(p * p.log2()).sum()) * codes.numel()


def _rotation_matrix(n: int, seed: int) -> Tensor:
    """``M`` with ``rotate(x) = M x`` per row (float64)."""
    return rotate(torch.eye(n), seed).to(torch.float64).T


def quantize_tensor(
    name: str, value: Tensor, bits: int, hessian: Tensor | None, gptq: bool
) -> Choice:
    """``value`` (≥2-D) rotated, rounded to a ``bits``-bit grid and decoded.

    ``hessian`` (``[cols, cols]``, unrotated) makes the error the ``H`` metric's and,
    with ``gptq``, the rounding GPTQ's."""
    seed = rotation_seed(name)
    shape = tuple(value.shape)
    w = rotate(value, seed).reshape(shape[0], -1).to(torch.float64)
    h = None
    if hessian is not None:
        m = _rotation_matrix(w.shape[1], seed)
        h = m @ hessian.to(torch.float64) @ m.T
    best: tuple[float, Grid, Tensor] | None = None
    for clip in CLIPS:
        grid = uniform_grid(w, bits, GROUP, clip)
        codes = nearest_codes(w, grid)
        fitted = refit_levels(w, codes, grid)
        approx = fitted.decode(codes)
        err = output_error(w, approx, h) if h is not None else float((w - approx).square().sum())
        if best is None or err < best[0]:
            best = (err, grid, codes)
    if best is None:
        raise RuntimeError("no clip fraction to try")
    _, grid, codes = best
    if gptq and h is not None:
        codes = gptq_codes(w, h, grid)
        fitted = refit_levels(w, codes, grid, h)
    else:
        fitted = refit_levels(w, codes, grid)
    approx = fitted.decode(codes)
    if h is not None:
        error = output_error(w, approx, h) * w.shape[1] / float(torch.diagonal(h).sum())
    else:
        error = float((w - approx).square().sum())
    count = grid.levels.numel()
    nbytes = (
        _entropy_bits(codes, count) / 8 * CODER_OVERHEAD + 2 * grid.scale.numel() + 2 * count
    )
    decoded = unrotate(approx.to(torch.float32), seed, shape)
    return Choice(bits=bits, nbytes=nbytes, error=error, decoded=decoded)


def input_moments(
    module: torch.nn.Module, run: Callable[[], Any], mask: Tensor
) -> dict[str, Tensor]:
    """``Σ x xᵀ`` (float64) of every Linear's input over the unpadded tokens of one
    forward pass ``run()``; keyed by the Linear's weight name. ``mask``: ``[batch, seq]``
    1 for a real token."""
    sums: dict[str, Tensor] = {}
    keep = mask.reshape(-1).bool()
    handles = []
    for mod_name, mod in module.named_modules():
        if isinstance(mod, torch.nn.Linear):
            key = f"{mod_name}.weight"

            def hook(_m: torch.nn.Module, args: tuple[Tensor, ...], key: str = key) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                if x.shape[0] == keep.numel():
                    x = x[keep]
                x = x.to(torch.float64)
                sums[key] = sums.get(key, 0) + x.T @ x

            handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return sums


def allocate(
    options: dict[str, list[Choice]], weights: dict[str, float], budget: float
) -> dict[str, Choice] | None:
    """One choice per tensor with total bytes ≤ ``budget`` minimising Σ weight · error
    (Lagrangian bisection over the multiplier); ``None`` if even the cheapest exceeds it."""

    def pick(lam: float) -> dict[str, Choice]:
        return {
            k: min(cs, key=lambda c: weights.get(k, 0.0) * c.error + lam * c.nbytes)
            for k, cs in options.items()
        }

    cheapest = {k: min(cs, key=lambda c: c.nbytes) for k, cs in options.items()}
    if sum(c.nbytes for c in cheapest.values()) > budget:
        return None
    lo, hi = 0.0, 1.0
    while sum(c.nbytes for c in pick(hi).values()) > budget:
        hi *= 4
        if hi > 1e30:
            return cheapest
    for _ in range(60):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
        if sum(c.nbytes for c in pick(mid).values()) > budget:
            lo = mid
        else:
            hi = mid
    return pick(hi)


def run_probe(
    state: dict[str, Tensor],
    cosine: Callable[[dict[str, Tensor]], float],
    moments: dict[str, Tensor],
    weights: dict[str, float],
    budgets: Iterable[int],
    bit_options: tuple[int, ...] = (1, 2, 3, 4),
    out: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Measure the plans (``2``, ``1/3``, and allocations at each of ``budgets`` bytes)
    with each rounding; returns one row per (plan, rounding)."""
    matrices = [k for k, v in state.items() if v.ndim >= 2]
    fixed = sum(4.0 * v.numel() for k, v in state.items() if v.ndim < 2)
    options: dict[str, dict[str, list[Choice]]] = {"rtn": {}, "gptq": {}}
    for name in matrices:
        h = moments.get(name)
        for method in ("rtn", "gptq"):
            if method == "gptq" and h is None:
                options[method][name] = options["rtn"][name]
                continue
            options[method][name] = [
                quantize_tensor(name, state[name], k, h, method == "gptq") for k in bit_options
            ]
    rows: list[dict[str, Any]] = []

    def measure(plan: str, method: str, chosen: dict[str, Choice]) -> None:
        decoded = dict(state)
        decoded.update({k: c.decoded for k, c in chosen.items()})
        total = fixed + sum(c.nbytes for c in chosen.values())
        cos = cosine(decoded)
        bits = {k: c.bits for k, c in chosen.items()}
        rows.append({"plan": plan, "method": method, "bytes": total, "cosine": cos, "bits": bits})
        spread = sorted(bits.values())
        out(
            f"{plan:>12} {method:>5}  {total / 1e6:6.2f} MB  cosine {cos:.4f}  "
            f"bits min/median/max {spread[0]}/{spread[len(spread) // 2]}/{spread[-1]}"
        )

    for method, opts in options.items():
        by_bits = {k: {c.bits: c for c in cs} for k, cs in opts.items()}
        if 2 in bit_options:
            measure("2", method, {k: b[2] for k, b in by_bits.items()})
        if 1 in bit_options and 3 in bit_options:
            plan = {k: b[1 if "word_embeddings" in k else 3] for k, b in by_bits.items()}
            measure("1/3", method, plan)
        for budget in budgets:
            chosen = allocate(opts, weights, budget - fixed)
            if chosen is not None:
                measure(f"<= {budget / 1e6:.2f} MB", method, chosen)
    return rows
