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

Measured (BENCHMARKS.md, "Calibrated codes"): at 1/16 of fp32 the best allocation gives
0.785 with nearest rounding and 0.853 with GPTQ (0.856 layer by layer); every tensor at 2
bits 0.543 / 0.810. The word embeddings (half the values, no input moments: a lookup)
cost most: the rest at the GPTQ allocation with them in fp32 gives 0.963 on its own,
they alone at 1 bit 0.896. The issue's 0.95 at 1/16 is out of reach of scalar codes
with data-aware rounding and per-tensor bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from fedsqueeze.calibrate import input_moments, row_counts, summed_moments
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
    "minilm_moments",
    "minilm_probe",
    "quantize_tensor",
    "row_counts",
    "run_probe",
    "summed_moments",
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
    name: str,
    value: Tensor,
    bits: int,
    hessian: Tensor | None,
    gptq: bool,
    act_order: bool = False,
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
        codes = gptq_codes(w, h, grid, act_order=act_order)
        fitted = refit_levels(w, codes, grid, h)
    else:
        fitted = refit_levels(w, codes, grid)
    approx = fitted.decode(codes)
    if h is not None:
        error = output_error(w, approx, h) * w.shape[1] / float(torch.diagonal(h).sum())
    else:
        error = float((w - approx).square().sum())
    count = grid.levels.numel()
    nbytes = _entropy_bits(codes, count) / 8 * CODER_OVERHEAD + 2 * grid.scale.numel() + 2 * count
    decoded = unrotate(approx.to(torch.float32), seed, shape)
    return Choice(bits=bits, nbytes=nbytes, error=error, decoded=decoded)


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


def _group(name: str) -> str:
    """The sequential step of a tensor: its name up to the first numeric component
    (``encoder.layer.3.``), or the name itself."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1]) + "."
    return name


def sequential_gptq(
    state: dict[str, Tensor],
    bits: dict[str, int],
    moments_of: Callable[[dict[str, Tensor]], dict[str, Tensor]],
) -> dict[str, Choice]:
    """GPTQ layer by layer: the tensors without input moments (embeddings) first, by
    nearest rounding; then each group (:func:`_group`, in state-dict order) with the
    moments of its inputs in the model whose earlier groups are already quantized, so
    each layer compensates what the earlier ones lost on the calibration inputs."""
    moments = moments_of(state)
    chosen: dict[str, Choice] = {}
    for name, k in bits.items():
        if name not in moments:
            chosen[name] = quantize_tensor(name, state[name], k, None, False)
    order: list[str] = []
    for name in state:
        if name in bits and name in moments and _group(name) not in order:
            order.append(_group(name))
    for group in order:
        current = dict(state)
        current.update({k: c.decoded for k, c in chosen.items()})
        moments = moments_of(current)
        for name, k in bits.items():
            if name in moments and _group(name) == group:
                chosen[name] = quantize_tensor(name, state[name], k, moments[name], True)
    return chosen


def run_probe(
    state: dict[str, Tensor],
    cosine: Callable[[dict[str, Tensor]], float],
    moments_of: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    weights: dict[str, float],
    budgets: Iterable[int],
    bit_options: tuple[int, ...] = (1, 2, 3, 4, 5, 6),
    out: Callable[[str], None] = print,
    ablate_at: int | None = None,
) -> list[dict[str, Any]]:
    """Measure the plans with each rounding; returns one row per (plan, rounding).

    Plans: ``2`` (every tensor at 2 bits), ``1/3`` (the largest tensor at 1 bit, the
    rest at 3), and an allocation at each of ``budgets`` (bytes, everything counted);
    at the budget ``ablate_at`` (default: the middle one) also GPTQ layer by layer
    (:func:`sequential_gptq`) and two ablations: the largest tensor kept in fp32, and
    the largest tensor alone quantized.
    ``moments_of(state)`` runs the calibration inputs through the model holding
    ``state`` and returns its Linears' input moments (:func:`input_moments`)."""
    budgets = sorted(budgets)
    matrices = [k for k, v in state.items() if v.ndim >= 2]
    largest = max(matrices, key=lambda k: state[k].numel())
    fixed = sum(4.0 * v.numel() for k, v in state.items() if v.ndim < 2)
    moments = moments_of(state)
    options: dict[str, dict[str, list[Choice]]] = {"rtn": {}, "gptq": {}}
    for name in matrices:
        h = moments.get(name)
        options["rtn"][name] = [
            quantize_tensor(name, state[name], k, h, False) for k in bit_options
        ]
        options["gptq"][name] = (
            [quantize_tensor(name, state[name], k, h, True) for k in bit_options]
            if h is not None
            else options["rtn"][name]
        )
    rows: list[dict[str, Any]] = []

    def measure(plan: str, method: str, chosen: dict[str, Choice | None]) -> None:
        decoded = dict(state)
        total = fixed
        for k, c in chosen.items():
            if c is None:
                total += 4.0 * state[k].numel()
            else:
                decoded[k] = c.decoded
                total += c.nbytes
        cos = cosine(decoded)
        bits = {k: (32 if c is None else c.bits) for k, c in chosen.items()}
        rows.append({"plan": plan, "method": method, "bytes": total, "cosine": cos, "bits": bits})
        out(f"{plan:>34} {method:>10}  {total / 1e6:7.2f} MB  cosine {cos:.4f}")

    middle = ablate_at if ablate_at is not None else budgets[len(budgets) // 2] if budgets else None
    for method, opts in options.items():
        by_bits = {k: {c.bits: c for c in cs} for k, cs in opts.items()}
        if 2 in bit_options:
            measure("2 bits", method, {k: b[2] for k, b in by_bits.items()})
        if 1 in bit_options and 3 in bit_options:
            plan = {k: b[1 if k == largest else 3] for k, b in by_bits.items()}
            measure(f"{largest} 1, others 3", method, dict(plan))
        for budget in budgets:
            chosen = allocate(opts, weights, budget - fixed)
            if chosen is None:
                continue
            measure(f"allocated <= {budget / 1e6:.2f} MB", method, dict(chosen))
            if method != "gptq" or budget != middle:
                continue
            alloc = {k: c.bits for k, c in chosen.items()}
            measure(
                "  same, layer by layer", "gptq-seq",
                dict(sequential_gptq(state, alloc, moments_of)),
            )  # fmt: skip
            restored: dict[str, Choice | None] = dict(chosen)
            restored[largest] = None
            measure(f"  same, {largest} fp32", method, restored)
            alone: dict[str, Choice | None] = {k: None for k in matrices}
            alone[largest] = chosen[largest]
            measure(f"  {largest} alone at {chosen[largest].bits}", method, alone)
    return rows


def minilm_probe(out: Callable[[str], None] = print) -> list[dict[str, Any]] | None:
    """:func:`run_probe` on all-MiniLM-L6-v2: calibration sentences for the moments and
    the Fisher weights, the bench's test sentences for the cosine; budgets 1/24, 1/20,
    1/16, 1/12, 1/10 and 1/8 of fp32. ``None`` without the bench extra."""
    from fedsqueeze.bench.codec import minilm_sentence_model
    from fedsqueeze.bench.progressive import minilm, stdlib_sentences
    from fedsqueeze.bench.sensitivity import calibration_sentences, minilm_fisher

    loaded = minilm(stdlib_sentences())
    probe_model = minilm_sentence_model()
    calibration = calibration_sentences()
    fisher = minilm_fisher(calibration)
    if loaded is None or probe_model is None or fisher is None:
        return None
    state, cosine = loaded
    model, inner = probe_model
    features = model.tokenize(calibration)

    def moments_of(s: dict[str, Tensor]) -> dict[str, Tensor]:
        inner.load_state_dict(s)
        return input_moments(inner, lambda: model(dict(features)), features["attention_mask"])

    fp32 = sum(4 * v.numel() for v in state.values())
    budgets = [fp32 // d for d in (24, 20, 16, 12, 10, 8)]
    return run_probe(
        dict(state), cosine, moments_of, fisher, budgets, out=out, ablate_at=budgets[2]
    )


def minilm_moments(out: Callable[[str], None] = print, batch: int = 128) -> dict[str, Tensor]:
    """:func:`input_moments` of every Linear of all-MiniLM-L6-v2 on the calibration text
    (:func:`fedsqueeze.bench.sensitivity.calibration_text`, about 79,000 tokens), summed
    over batches of ``batch`` lines.

    Why the whole text, not the 128 calibration sentences (about 4,700 tokens) the Fisher
    weights use: a 1536-column ``H`` from 4,700 tokens is barely full rank, and GPTQ fits
    its rounding to those few inputs; with 17× the tokens the codes generalise better to
    the test sentences (at 1/16 of fp32, the cosine with only the Linears from the
    prefix rises from 0.9400 to 0.9445; BENCHMARKS.md, "Row weights from the clients'
    own text"). About 80 s on one core.

    Raises
    ------
    RuntimeError
        Without the bench extra (the MiniLM weights).
    """
    from fedsqueeze.bench.codec import require_minilm
    from fedsqueeze.bench.sensitivity import calibration_text

    model, inner = require_minilm("GPTQ codes")
    lines = calibration_text()
    batches = [model.tokenize(lines[i : i + batch]) for i in range(0, len(lines), batch)]
    tokens = sum(int(f["attention_mask"].sum()) for f in batches)
    with torch.no_grad():
        moments = summed_moments(
            inner, ((partial(model, dict(f)), f["attention_mask"]) for f in batches)
        )
    out(
        f"\nInput moments of {len(moments)} Linears on the calibration text ({len(lines)} lines, "
        f"{tokens} tokens; GPTQ codes)"
    )
    return moments
