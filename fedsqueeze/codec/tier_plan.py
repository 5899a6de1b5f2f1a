"""The encoder's side of row tiers (:mod:`fedsqueeze.codec.row_tiers`): which tables of a
state to split, and what their parts weigh in the rate-distortion order."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fedsqueeze.codec.row_tiers import (
    RowSplit,
    check_row_weights,
    deferred_parts,
    split_state,
    tier_rows,
)

if TYPE_CHECKING:
    from fedsqueeze.codec.tensor_encode import ScoredLevel

__all__ = ["DEFERRED_TIERS", "TierPlan", "plan_tiers"]

#: Into how many deferred tiers (base-level records) a table's lightest band is cut
#: (with :data:`~fedsqueeze.codec.row_tiers.BANDS` bands, at most 15 tiers in all).
DEFERRED_TIERS = 8


@dataclass(frozen=True)
class TierPlan:
    """The tables an encoder splits, and what their parts weigh in the order."""

    splits: tuple[RowSplit, ...] = ()
    #: part name -> (table name, the tier's mean row weight over the table's)
    parts: Mapping[str, tuple[str, float]] = field(default_factory=dict)
    #: deferred part name -> (unread, fill) costs (``Calibration.tier_costs``)
    costs: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def deferred(self) -> frozenset[str]:
        """The parts whose base level the order places (deferred tiers)."""
        return deferred_parts(self.splits)

    @property
    def origins(self) -> dict[str, str]:
        """Part name -> table name."""
        return {p: table for p, (table, _ratio) in self.parts.items()}

    def apply(self, state: Mapping[str, Tensor] | None) -> Mapping[str, Tensor] | None:
        """``state`` with the split tables in parts (``None`` stays ``None``)."""
        if state is None or not self.splits:
            return state
        return split_state(state, self.splits)

    def apply_parts(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``state`` with the split tables in parts, each deferred tier's fill row taken
        off its rows (:meth:`RowSplit.center`: what a full model's encoder codes)."""
        out = split_state(state, self.splits)
        for split in self.splits:
            if split.deferred and split.parts()[0] in out:
                out.update(split.center({p: out[p] for p in split.parts()}))
        return out

    def weigh(
        self, levels: Mapping[str, Sequence[ScoredLevel]], weights: Mapping[str, float] | None
    ) -> tuple[dict[str, list[ScoredLevel]], Mapping[str, float] | None]:
        """The encoder's scored levels and the order's weights with each part's gains
        row-weighted (times its tier's ratio), its energy the whole table's, and its
        weight the table's. A deferred part codes its rows less their fill row, so its
        base level's gain is what it removes beyond the fill; with measured
        :attr:`costs` ``(unread, fill)`` every gain of it is multiplied by ``unread``
        and its base level's gain counts the fill's squared error (the part's own
        energy) ``fill`` times."""
        out = {name: list(lv) for name, lv in levels.items()}
        if not self.splits:
            return out, weights
        for p, (unread, fill) in self.costs.items():
            if p in out:
                first, *rest = out[p]
                first = replace(first, gain=first.gain + (fill - 1.0) * first.energy)
                out[p] = [replace(s, gain=s.gain * unread) for s in (first, *rest)]
        energy: dict[str, float] = {}
        for p, (table, _ratio) in self.parts.items():
            if p in out:
                energy[table] = energy.get(table, 0.0) + out[p][0].energy
        for p, (table, ratio) in self.parts.items():
            if p in out:
                out[p] = [replace(s, gain=s.gain * ratio, energy=energy[table]) for s in out[p]]
        if weights is None:
            return out, None
        weighted = dict(weights)
        for p, (table, _ratio) in self.parts.items():
            if table in weights:
                weighted[p] = weights[table]
        return out, weighted


def plan_tiers(
    state: Mapping[str, Tensor],
    levels: bool,
    rows: Mapping[str, Tensor],
    is_target: Callable[[str, Tensor], bool],
    defer: bool = False,
    tier_costs: Mapping[str, tuple[float, float]] | None = None,
) -> TierPlan:
    """Which tables of ``state`` to split, by ``rows`` (name -> per-row weights).

    Only with a progressive spec (``levels``), for the tables ``is_target`` accepts (a
    spec's targets); names ``state`` lacks are ignored (a frozen table the base holds is
    not sent at all), and so are tables whose rows all fall in one band. ``defer`` (a
    full model of a dense spec): the lightest band is deferred, in up to
    :data:`DEFERRED_TIERS` tiers, each with its rows' mean as its fill row, so the
    rate-distortion order decides when each base level travels, its gains corrected by
    the table's ``tier_costs`` (:attr:`TierPlan.costs`).

    Raises
    ------
    ValueError
        Weights for a tensor that is not a table of at least two dimensions, or whose
        count is not its row count.
    """
    if not levels or not rows:
        return TierPlan()
    splits: list[RowSplit] = []
    parts: dict[str, tuple[str, float]] = {}
    costs: dict[str, tuple[float, float]] = {}
    for name, w in rows.items():
        t = state.get(name)
        if t is None:
            continue
        if t.ndim < 2:
            raise ValueError(f"row weights for {name!r}, which is not a table ({t.ndim}-D)")
        if w.numel() != t.shape[0]:
            raise ValueError(f"{w.numel()} row weights for {name!r}, which has {t.shape[0]} rows")
        if not is_target(name, t):
            continue
        checked = check_row_weights(w)
        tiers = tier_rows(checked)
        if tiers is None:
            continue
        count = int(tiers.max()) + 1
        split = RowSplit(name, tiers.numpy().tobytes(), count)
        if defer:
            split = _deferred(split, t, checked)
            if tier_costs and name in tier_costs:
                for p in split.deferred_parts():
                    costs[p] = tier_costs[name]
        for p in split.parts():
            if p in state:
                raise ValueError(f"the state has a tensor named {p!r}, the name of a row tier")
        splits.append(split)
        for p, ratio in zip(split.parts(), split.weight_ratios(checked), strict=True):
            parts[p] = (name, ratio)
    return TierPlan(tuple(splits), parts, costs)


def _deferred(split: RowSplit, table: Tensor, weights: Tensor) -> RowSplit:
    """``split`` with its lightest band deferred: its rows, heaviest first (ties in row
    order), cut into up to :data:`DEFERRED_TIERS` tiers by :func:`_cuts` (of as many
    rows where the weights are even), each filled with its rows' mean row (a table of
    more than :data:`~fedsqueeze.codec.row_tiers.BANDS` tiers is format version 14).

    Why the lightest band only: on all-MiniLM-L6-v2 (BENCHMARKS.md, "Deferred tiers")
    deferring every tier but tier 0 gave the same cosines at 1/16 and 1/8 of fp32 and
    lower ones at 1/32 (0.68 against 0.75 with the clients' text as row weights): the
    middle tiers' rows are read, and their base levels belong in the first prefix.
    Why in several tiers: one deferred part is one base-level record (1.3 MB on
    MiniLM), and a prefix that ends inside it gets nothing of it (1/16 of MiniLM fell
    inside it: 0.926 with the clients' text). Cut in eight, the order can stop between
    records of 160 kB (0.949). Where the weights back off to other text
    (:func:`~fedsqueeze.codec.row_tiers.smoothed_counts`) the rows it reads weigh more,
    and :func:`_cuts` puts them in smaller records of their own, sent first.
    """
    tiers = split.tier_of().to(torch.int64)
    first = split.count - 1
    light = torch.nonzero(tiers == first).flatten()
    w, order = torch.sort(weights[light], descending=True, stable=True)
    light = light[order]
    chunks = torch.tensor_split(light, _cuts(w, DEFERRED_TIERS))
    fills: list[bytes] = []
    for j, chunk in enumerate(chunks):
        tiers[chunk] = first + j
        rows = table.index_select(0, chunk.sort().values.to(table.device)).detach()
        mean = rows.to(torch.float64).mean(dim=0).flatten().to("cpu", torch.float32)
        if not bool(torch.isfinite(mean).all()):
            return split  # non-finite rows: the encoder's non-finite policy decides, undeferred
        fills.append(mean.contiguous().numpy().tobytes())
    raw = tiers.to(torch.uint8).numpy().tobytes()
    return RowSplit(split.name, raw, first + len(chunks), len(chunks), tuple(fills))


def _cuts(w: Tensor, parts: int) -> list[int]:
    """Where to cut rows of weights ``w`` (heaviest first) into up to ``parts`` runs, each
    of an equal share of the mean of each row's share of the weight and of the rows
    (equal counts where the weights are even or all 0): heavy rows go in small runs, and
    no run holds more than ``2 / parts`` of the rows, however the weight is spread;
    every run holds a row."""
    n = w.numel()
    total = float(w.sum())
    rows = torch.full_like(w, 1.0 / n)
    share = torch.cumsum((w / total + rows) / 2 if total > 0 else rows, 0)
    marks = (torch.arange(1, parts, dtype=share.dtype) / parts + 1e-9) * float(share[-1])
    found = torch.searchsorted(share, marks, right=True).tolist()  # 1e-9: rounding
    return sorted({b for b in found if 0 < b < n})
