"""The encoder's side of row tiers (:mod:`fedsqueeze.codec.row_tiers`): which tables of a
state to split, and what their parts weigh in the rate-distortion order."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from torch import Tensor

from fedsqueeze.codec.row_tiers import RowSplit, check_row_weights, split_state, tier_rows

if TYPE_CHECKING:
    from fedsqueeze.codec.tensor_encode import ScoredLevel

__all__ = ["TierPlan", "plan_tiers"]


@dataclass(frozen=True)
class TierPlan:
    """The tables an encoder splits, and what their parts weigh in the order."""

    splits: tuple[RowSplit, ...] = ()
    #: part name -> (table name, the tier's mean row weight over the table's)
    parts: Mapping[str, tuple[str, float]] = field(default_factory=dict)

    @property
    def origins(self) -> dict[str, str]:
        """Part name -> table name."""
        return {p: table for p, (table, _ratio) in self.parts.items()}

    def apply(self, state: Mapping[str, Tensor] | None) -> Mapping[str, Tensor] | None:
        """``state`` with the split tables in parts (``None`` stays ``None``)."""
        if state is None or not self.splits:
            return state
        return split_state(state, self.splits)

    def weigh(
        self, levels: Mapping[str, Sequence[ScoredLevel]], weights: Mapping[str, float] | None
    ) -> tuple[dict[str, list[ScoredLevel]], Mapping[str, float] | None]:
        """The encoder's scored levels and the order's weights with each part's gains
        row-weighted (times its tier's ratio), its energy the whole table's, and its
        weight the table's."""
        out = {name: list(lv) for name, lv in levels.items()}
        if not self.splits:
            return out, weights
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
) -> TierPlan:
    """Which tables of ``state`` to split, by ``rows`` (name -> per-row weights).

    Only with a progressive spec (``levels``), for the tables ``is_target`` accepts (a
    spec's targets); names ``state`` lacks are ignored (a frozen table the base holds is
    not sent at all), and so are tables whose rows all fall in one band.

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
        split = RowSplit(name, tiers.numpy().tobytes(), int(tiers.max()) + 1)
        for p in split.parts():
            if p in state:
                raise ValueError(f"the state has a tensor named {p!r}, the name of a row tier")
        splits.append(split)
        for p, ratio in zip(split.parts(), split.weight_ratios(checked), strict=True):
            parts[p] = (name, ratio)
    return TierPlan(tuple(splits), parts)
