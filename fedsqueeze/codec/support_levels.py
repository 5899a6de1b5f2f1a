"""Support levels (progressive sparsity): a pruned tensor's positions arrive in groups.

With ``levels`` alone a pruned tensor's positions travel whole with its first level, so
the smallest decodable prefix holds every kept weight's position (about a byte each at
90% sparsity on the digits CNN): a stream cannot start sparser than it ends. With
``grow=s_1+…+s_m`` (sparsities falling towards the pruning's ``s``) the kept weights
are split by magnitude into nested support levels: group 0 holds the weights kept at
sparsity ``s_1`` (the same cut as ``prune`` at that sparsity: global or per tensor),
group ``j`` those kept at ``s_{j+1}`` (or ``s``) but not at ``s_j``. Each group is a
progressive sub-tensor of the tensor's one quantizer (one set of scales, chosen on all
kept values, so no value's code depends on when it arrives):

* group 0's first plane is the tensor's base-level record, with group 0's positions;
* group ``j ≥ 1``'s first plane is a refinement that carries the group's positions,
  **coded against the complement** of the positions already held: the ``i``-th free
  position is rank ``i``, and the ranks are Rice-coded gaps or a bitmap as usual
  (:mod:`fedsqueeze.codec.positions`) over the ``numel − held`` free positions;
* each group's later planes are refinements of that group alone, with a bucket table
  of its own (the coarse buckets of small weights have small means: a 1-bit first plane
  of a late group is its sign and the group's mean magnitude).

Every refinement names its group and plane (format version 7,
:mod:`fedsqueeze.codec.container`), and its level is its step in the tensor's chain.
A group's planes come in order and group ``j`` opens after group ``j−1``; otherwise a
tensor's records may interleave (plane 2 of group 0 after the positions of group 1).
:func:`chain` picks that interleaving per tensor, by falling squared error removed per
byte among the records whose predecessors are placed (the gains of distinct groups
add, since they hold distinct positions); :mod:`fedsqueeze.codec.level_order` then
orders all tensors' chains as before.

Why the distance to the full decode never rises: a position outside every group held
decodes to 0 (to the base in a delta); a new group's first plane puts each of its
values at its bucket's mean of the final values, which is at least as close to them
as 0 is (0 is one constant, the mean the best one); later planes refine as in
:mod:`fedsqueeze.codec.progressive`. Up to the float16 rounding of the tables.

What the nesting costs: coding ``S_1`` among ``n`` and then ``S_2 \\ S_1`` among the
rest takes ``log C(n, |S_2|) + log C(|S_2|, |S_1|)`` bits, the positions of ``S_2`` plus
which of them are in ``S_1``: at most one bit per weight of ``S_2``. That bit is also
magnitude information: a later group's values lie in a narrow band, so their first
planes cost little and remove much; but zstd wins back little of it from packed
planes. The context-coded planes of ``entropy=ans`` (format version 9,
:mod:`fedsqueeze.codec.plane_ans`: each plane coded given the coarser bits of its own
group's values) win most of it back. Measured on digits-cnn (BENCHMARKS.md,
"Progressive levels"; ``prune=global:0.88,quant=4:symmetric,levels=1+1+2,float=fp16,
grow=0.94``): with zstd the whole stream is 5.75 kB against 5.0 kB without ``grow`` and
4.66 kB one-shot (1.23×; a three-way split, ``grow=0.96+0.93``, 1.31×); with
``entropy=ans`` it is 4.80-4.93 kB on seeds 0-4, 1.03-1.06× one-shot (the stream
without ``grow`` 0.93×). In exchange one stream starts at 2.1 kB (1/71 of fp32) and is
within 5 points of the full model at 1/64 and within 2 at 1/32 on seeds 0-4, where
positions sent whole took two streams.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fedsqueeze.codec.pruning import magnitude_indices

if TYPE_CHECKING:
    from fedsqueeze.codec.tensor_encode import ScoredLevel

__all__ = ["Node", "chain", "free_ranks", "group_ids"]


@dataclass(frozen=True)
class Node:
    """One record of a grown tensor before ordering: its group, plane and score."""

    group: int
    plane: int
    scored: ScoredLevel


def group_ids(
    x: Tensor,
    indices: Tensor,
    grow: Sequence[float],
    masks: Sequence[Tensor] | None,
) -> Tensor:
    """The support level (0 … ``len(grow)``) of each kept value ``x.flatten()[indices]``.

    ``masks``: for global pruning, the kept masks of the global cut at each ``grow``
    sparsity (the same cut as the pruning's, at that sparsity); ``None`` cuts the
    tensor alone (``l1`` pruning). A value is in the first level whose cut keeps it.
    """
    out = torch.full((indices.numel(),), len(grow), dtype=torch.int64, device=indices.device)
    for j in reversed(range(len(grow))):
        if masks is not None:
            kept = masks[j].reshape(-1)[indices]
        else:
            mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
            mask[magnitude_indices(x, grow[j])] = True
            kept = mask[indices]
        out[kept] = j
    return out


def free_ranks(indices: Tensor, held: Tensor) -> Tensor:
    """Ranks of ``indices`` among the positions not in ``held`` (both increasing, disjoint):
    what a new group's positions are coded as."""
    if held.numel() == 0:
        return indices
    return indices - torch.searchsorted(held, indices)


def chain(nodes: Sequence[Node]) -> list[ScoredLevel]:
    """One tensor's records in sending order, each refinement's level its step (1, 2, …).

    The first node must be group 0's plane 0 (the base-level record). Then, greedily,
    the available record (a group's next plane; the next group's first plane once the
    group before it opened) that removes the most squared error per byte; ties go to
    the lower group, then the lower plane.

    Raises
    ------
    ValueError
        The nodes are not each group's planes ``0 … L−1`` with group 0's plane 0 first.
    """
    if not nodes or (nodes[0].group, nodes[0].plane) != (0, 0):
        raise ValueError("a grown tensor's records start with group 0's first plane")
    by_group: dict[int, list[Node]] = {}
    for node in nodes:
        planes = by_group.setdefault(node.group, [])
        if node.plane != len(planes):
            raise ValueError(f"group {node.group}: plane {node.plane} after {len(planes)}")
        planes.append(node)
    if sorted(by_group) != list(range(len(by_group))):
        raise ValueError("groups must be numbered 0, 1, … without gaps")
    next_plane = {0: 1}
    out = [nodes[0].scored]
    while True:
        best: tuple[float, int, int] | None = None
        for group, plane in _available(next_plane, by_group):
            scored = by_group[group][plane].scored
            key = (-scored.score, group, plane)
            if best is None or key < best:
                best = key
        if best is None:
            return out
        _neg, group, plane = best
        scored = by_group[group][plane].scored
        record = replace(scored.record, level=len(out))
        out.append(replace(scored, record=record, nbytes=None))
        next_plane[group] = plane + 1


def _available(
    next_plane: Mapping[int, int], by_group: Mapping[int, list[Node]]
) -> list[tuple[int, int]]:
    out = [(g, p) for g, p in next_plane.items() if p < len(by_group[g])]
    opened = len(next_plane)
    if opened < len(by_group):
        out.append((opened, 0))
    return out
