"""The order of a progressive stream's records: which refinement the next bytes buy.

Every base-level record comes first (a full model needs them all before anything
decodes; the header counts them). What follows is chosen by :class:`LevelOrder`:

* :attr:`LevelOrder.BY_LEVEL`: all of level 1, then all of level 2, …; within a level by
  falling squared error removed per byte (the order of format versions 2-4).
* :attr:`LevelOrder.SQUARED` and :attr:`LevelOrder.RELATIVE` (the default): one greedy
  rate-distortion order over every tensor's refinements together, so a sensitive small
  tensor gets its last level before a large one gets its second. Each tensor's levels
  are its points ``(bytes, distortion removed)``, cumulated; their upper concave hull
  cuts them into runs whose slopes fall (a level that buys little, followed by one that
  buys much, travels as one run at their joint slope: the greedy choice would otherwise
  stop before the cheap level and never see the good one behind it). All runs of all
  tensors are then sorted by falling slope; a tensor's own runs already fall, so its
  levels stay in order. A budget cut anywhere is, up to the last run, the prefix of
  that size with the least distortion among prefixes of whole runs (the convex-hull
  rule of rate-distortion allocation, Shoham & Gersho 1988).

Why a global order, when the issue asked for "by level, then by score": the levels are
only a unit of coding; what a receiver with ``B`` bytes wants is the best model ``B``
bytes buy, and a stream sorted by level makes every tensor pay for level ``k`` before
any gets level ``k+1``: the 11.7M-value word embeddings of all-MiniLM-L6-v2 (half the
model) hold back every finer level of the attention matrices. The manifest carries
each segment's level and each refinement names its tensor, so nothing else in the
format changes; streams whose refinements are not in level order are written as format
version 5, which older readers refuse cleanly.

Distortion. :attr:`LevelOrder.SQUARED` counts the squared error a level removes
(``‖x − x̂_{k−1}‖² − ‖x − x̂_k‖²``, :func:`~fedsqueeze.codec.progressive.level_gain`).
That treats an error in an embedding row like one in a projection that every token
goes through. :attr:`LevelOrder.RELATIVE` divides it by the tensor's energy
``‖W‖²`` (the model's tensor, base plus delta for a delta): for a linear map
``y = W·u`` whose input has isotropic covariance, ``E‖ΔW·u‖² / E‖W·u‖² =
‖ΔW‖² / ‖W‖²``, so the weighted gain is the noise-to-signal ratio the level removes
from that layer's output. In a residual network with normalisation every layer's
relative output noise adds up roughly independently, so the sum of these terms is a
data-free proxy for the perturbation of the model's output. It needs no calibration
data and no gradients (which an encoder of a federated update does not have); it is
a proxy, and the benchmark measures it beside plain squared error.

:attr:`LevelOrder.WEIGHTED` multiplies the squared error by a per-tensor weight the
caller gives: a measured sensitivity, e.g. the mean diagonal Fisher information of the
model's output on calibration data (:mod:`fedsqueeze.bench.sensitivity`), which is the
cost per unit of squared error when the noise is spread evenly over the tensor's
elements (as the Hadamard rotation of :mod:`fedsqueeze.codec.rotation` spreads it). On
all-MiniLM-L6-v2 the cost per unit of noise-to-signal ratio they give spans 128× across
the matrices, so the relative order's assumption (every tensor's noise-to-signal ratio
costs the same) is far off: the later layers' value and FFN matrices cost far more than
the first layers' queries and keys. Weight 0 (a tensor the output never reads)
sends a tensor's refinements last.

Measured (``fedsqueeze bench progressive``, BENCHMARKS.md): on the trained digits CNN
(90%- and 94%-sparse, 1+1+2 bits) level order lets accuracy fall by 7.5 and 8.6 points
while the last level of each tensor arrives; the relative order holds the largest fall
to 0.8 and 3.1 points and reaches 96.4% at 1/64 of fp32 where level order has 83.6%.
On all-MiniLM-L6-v2 it lifts the middle of the curve (2+2+4 at 1/11.4 of fp32: cosine
0.885 against 0.287; 4+1+1+2 reaches 0.99 at 1/6.9 instead of 1/6.0) but little at 1/8,
where the base levels alone take 10.2 of the 11.4 MB. Squared error gave level order
again on MiniLM and a 1.7-point fall on digits.

Neither tracks a classifier's accuracy step by step: an encoder that holds data can
re-sequence the refinements by a loss it measures
(:func:`fedsqueeze.codec.loss_order.reorder_by_loss`, the same records in another
order); on the digits CNN with support levels that order lowers the largest fall of
test accuracy along the stream (1.94 to 1.11 and 2.22 to 0.56 points on seeds 0 and 1)
and is what meets 1/64 of fp32 on every seed (BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

__all__ = ["LevelOrder", "LevelScore", "order_weight", "refinement_order"]


class LevelOrder(Enum):
    """How a progressive stream orders its refinements (see the module docstring)."""

    BY_LEVEL = "by-level"
    SQUARED = "squared"
    RELATIVE = "relative"
    #: squared error times a per-tensor weight the caller gives (a sensitivity, e.g. the
    #: mean diagonal Fisher information of the tensor on calibration data).
    WEIGHTED = "weighted"


@dataclass(frozen=True)
class LevelScore:
    """One refinement of one tensor, for ordering.

    Attributes
    ----------
    tensor
        Index of the tensor's base-level record in the stream.
    level
        Its level (1 or more).
    gain
        Squared error it removes.
    nbytes
        Bytes of its record.
    energy
        ``‖W‖²`` of the tensor it refines (1.0 where that is zero).
    weight
        The tensor's sensitivity per unit of squared error (:attr:`LevelOrder.WEIGHTED`
        only), finite and at least 0.
    """

    tensor: int
    level: int
    gain: float
    nbytes: int
    energy: float
    weight: float = 1.0


def refinement_order(scores: Sequence[LevelScore], order: LevelOrder) -> list[int]:
    """Indices into ``scores`` in the order their records are to be sent.

    Each tensor's levels keep their order whatever ``order`` is. Ties keep the earlier
    tensor (then the lower level) first, so the order is deterministic.

    Raises
    ------
    ValueError
        A tensor's levels are not ``1, 2, …`` in ``scores``' order, or a record has no
        bytes.
    """
    if not isinstance(order, LevelOrder):
        raise TypeError(f"order must be a LevelOrder, got {type(order).__name__}")
    by_tensor: dict[int, list[int]] = {}
    for i, s in enumerate(scores):
        chain = by_tensor.setdefault(s.tensor, [])
        if s.level != len(chain) + 1:
            raise ValueError(f"tensor #{s.tensor}: level {s.level} after {len(chain)} levels")
        if s.nbytes <= 0:
            raise ValueError(f"tensor #{s.tensor} level {s.level}: a record has bytes")
        chain.append(i)
    if order is LevelOrder.BY_LEVEL:
        keyed = [(s.level, -s.gain / s.nbytes, s.tensor, i) for i, s in enumerate(scores)]
        return [k[-1] for k in sorted(keyed)]
    slope: dict[int, float] = {}
    for chain in by_tensor.values():
        weight = order_weight(order, scores[chain[0]].energy, scores[chain[0]].weight)
        points = [(scores[i].nbytes, weight * scores[i].gain) for i in chain]
        for run, run_slope in _hull_runs(points):
            for j in run:
                slope[chain[j]] = run_slope
    keyed2 = [(-slope[i], s.tensor, s.level, i) for i, s in enumerate(scores)]
    return [k[-1] for k in sorted(keyed2)]


def order_weight(order: LevelOrder, energy: float, weight: float) -> float:
    """What ``order`` multiplies a tensor's squared-error gains by: 1 (``SQUARED``,
    ``BY_LEVEL``), ``1/energy`` (``RELATIVE``) or the given ``weight`` (``WEIGHTED``)."""
    if order is LevelOrder.RELATIVE:
        return 1.0 / energy
    if order is LevelOrder.WEIGHTED:
        return weight
    return 1.0


def _hull_runs(points: Sequence[tuple[int, float]]) -> list[tuple[list[int], float]]:
    """Consecutive levels grouped so that the runs' slopes (gain per byte) strictly fall,
    with each run's slope.

    ``points`` are each level's ``(bytes, gain)``; merging a run into the one before it
    while its slope is not lower gives the upper concave hull of the cumulative curve.
    """
    runs: list[tuple[list[int], int, float]] = []  # (levels, bytes, gain)
    for j, (nbytes, gain) in enumerate(points):
        run, b, g = [j], nbytes, gain
        while runs and runs[-1][2] * b <= g * runs[-1][1]:  # previous slope <= this one
            prev, pb, pg = runs.pop()
            run, b, g = prev + run, pb + b, pg + g
        runs.append((run, b, g))
    return [(run, g / b) for run, b, g in runs]
