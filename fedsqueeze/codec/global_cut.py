"""One magnitude cut-off across a whole model, found without holding the model.

:func:`~fedsqueeze.codec.pruning.global_magnitude_masks` concatenates every tensor's
magnitudes (4 bytes a value) and selects among them: a copy of the model. A model read
one tensor at a time finds the same cut-off by radix selection on the magnitudes' bit
patterns (non-negative float32 values order like their int32 bits): a 32,768-bin
histogram of the high 16 bits over every tensor, then a 65,536-bin histogram of the low
16 bits inside the bin that holds the cut-off. The memory is the histograms and one
tensor's magnitudes at a time.

The values dropped are exactly those of the in-memory masks: the ``round(sparsity · N)``
of smallest magnitude, and among values tied at the cut-off the first ones in state
order (:mod:`~fedsqueeze.codec.pruning`'s tie rule).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from fedsqueeze.codec.pruning import count_to_prune

__all__ = ["GlobalCut", "find_global_cut"]

_HIGH_BINS = 1 << 15  # the sign bit of a magnitude is 0
_LOW_BINS = 1 << 16


@dataclass(frozen=True)
class GlobalCut:
    """Where one magnitude cut-off falls in a model.

    Attributes
    ----------
    threshold_bits
        int32 bits of the float32 magnitude at the cut-off (``-1``: nothing dropped).
    tied_drops
        For each tensor with values tied at the cut-off, how many of them (the first ones)
        are dropped; the ties of a tensor not named here are kept.
    """

    threshold_bits: int
    tied_drops: dict[str, int]

    def mask(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The kept mask (bool, ``x``'s shape) of float32 values ``x`` of tensor ``name``."""
        if self.threshold_bits < 0:
            return torch.ones_like(x, dtype=torch.bool)
        bits = _magnitude_bits(x)
        keep = bits > self.threshold_bits
        tied = torch.nonzero((bits == self.threshold_bits).view(-1)).view(-1)
        if tied.numel():  # the first tied_drops[name] of them are dropped, the rest kept
            keep.view(-1)[tied[self.tied_drops.get(name, 0) :]] = True
        return keep


def find_global_cut(
    names: Iterable[str],
    values: Callable[[str], torch.Tensor],
    sparsity: float,
) -> GlobalCut:
    """The cut-off that drops ``round(sparsity · N)`` values of smallest magnitude.

    Parameters
    ----------
    names
        The tensors pruned together, in state order.
    values
        The float32 values the masks apply to (what the lossy stages see), one tensor at a
        time; called two or three times per name.
    sparsity
        Fraction dropped, in ``[0, 1]``.
    """
    order = list(names)
    total = 0
    high = torch.zeros(_HIGH_BINS, dtype=torch.int64)
    for name in order:
        bits = _magnitude_bits(values(name)).view(-1)
        total += bits.numel()
        high += torch.bincount(bits >> 16, minlength=_HIGH_BINS)
    prune = count_to_prune(total, sparsity)
    if prune == 0:
        return GlobalCut(-1, {})
    top, below_top = _bin_of(high, prune)
    low = torch.zeros(_LOW_BINS, dtype=torch.int64)
    for name in order:
        bits = _magnitude_bits(values(name)).view(-1)
        inside = bits[(bits >> 16) == top]
        low += torch.bincount(inside & 0xFFFF, minlength=_LOW_BINS)
    bottom, below = _bin_of(low, prune - below_top)
    threshold = (top << 16) | bottom
    ties = int(low[bottom])
    drop = prune - below_top - below  # of the ties, 1..ties
    if drop == ties:
        return GlobalCut(threshold, {name: 1 << 62 for name in order})
    tied_drops: dict[str, int] = {}
    for name in order:
        if drop <= 0:
            break
        count = int(torch.count_nonzero(_magnitude_bits(values(name)) == threshold))
        if count:
            tied_drops[name] = min(count, drop)
            drop -= tied_drops[name]
    return GlobalCut(threshold, tied_drops)


def _bin_of(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the ``rank``-th smallest value (1-based) and the count below it."""
    cumulative = torch.cumsum(hist, 0)
    index = int(torch.searchsorted(cumulative, torch.tensor(rank, dtype=torch.int64)))
    below = int(cumulative[index - 1]) if index else 0
    return index, below


def _magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """int32 bits of ``|x|`` in float32 (ordered like the magnitudes; -0.0 is 0.0)."""
    return x.detach().to(torch.float32).abs().view(torch.int32)
