"""Magnitude selection on the tensor's device: exactly the kept set of
:func:`fedsqueeze.codec.pruning.magnitude_indices`.

A threshold band from a fixed-seed sample of the magnitudes, one pass that counts what
lies below it and marks the band, the band's values sorted on the device, the cut at the
still-missing rank, then ``nonzero_static`` of the kept mask with the kept count (known on
the host) as its size: no host round trip sizes a tensor, and one scalar read at the end
says whether the band held the cut without a tie across it. When it did not, the
reference decides on a host copy (its tie rule: of the tied values, the lowest indices
go; rare enough on real weights not to be worth a device pass of its own). The two
passes over the tensor are compilable kernels (:mod:`fedsqueeze.codec.fused_compile`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedsqueeze.codec import pruning
from fedsqueeze.codec.fused_compile import kernel

__all__ = ["HOST_BELOW", "SAMPLE_ABOVE", "band_ranks", "magnitude_indices"]

#: CPU tensors up to this many values select with the reference (one ``topk``: cheap there).
SAMPLE_ABOVE = 1 << 20
#: Device tensors up to this many values select on a host copy (the reference itself),
#: which costs little at this size.
HOST_BELOW = 1 << 16
_SAMPLE_SIZE = 1 << 18
_SAMPLE_SEED = 0x5EED
#: Slack of the band's capacity over its expected size (the count is nearly exact).
_BAND_SLACK = 1.25


def magnitude_indices(t: Tensor, sparsity: float) -> Tensor:
    """:func:`~fedsqueeze.codec.pruning.magnitude_indices` on ``t``'s device.

    Parameters
    ----------
    t
        Floating tensor of any shape.
    sparsity
        Fraction dropped, in ``[0, 1]``.

    Returns
    -------
    Tensor
        int64 ``[numel − round(sparsity·numel)]``, increasing: exactly the reference's
        indices. Large tensors select through a sampled band on the device and one
        scalar read at the end (whether the band held the cut without a tie across it);
        CPU tensors of up to :data:`SAMPLE_ABOVE` values through the reference; device
        tensors of up to :data:`HOST_BELOW` values, a band that misses and a tie across
        the cut through the reference on a host copy (the same bytes as a CPU encode).
    """
    if not t.is_floating_point():
        raise ValueError(f"pruning needs a floating tensor, got {t.dtype}")
    flat = t.detach().reshape(-1)
    n = flat.numel()
    prune = pruning.count_to_prune(n, sparsity)
    if prune <= 0 or prune >= n or (t.device.type == "cpu" and n <= SAMPLE_ABOVE):
        return pruning.magnitude_indices(t, sparsity)  # all, none, or one topk on the CPU
    if n <= HOST_BELOW:  # a few copies' worth: the reference on the host
        return pruning.magnitude_indices(t.detach().cpu(), sparsity).to(t.device)
    found = _sampled_indices(flat, prune)
    if found is not None:
        return found
    # The band missed, or ties straddle the cut: the reference decides (its tie rule),
    # on a host copy: rare, and as slow as the reference.
    return pruning.magnitude_indices(t.detach().cpu(), sparsity).to(t.device)


def band_ranks(n: int, prune: int, sample: int = _SAMPLE_SIZE) -> tuple[int, int]:
    """Ranks in the sorted sample of the band's ends (0 and ``sample − 1``: no bound that
    side), six standard deviations of the cut-off's rank either side, as the reference."""
    q = prune / n
    centre = q * sample
    half = 6.0 * math.sqrt(sample * q * (1.0 - q)) + 8.0
    return max(0, math.floor(centre - half)), min(sample - 1, math.ceil(centre + half))


@kernel
def _band_pass(flat: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """How many ``|x| >= lo``, how many of them ``<= hi`` (the band), and the band's mask:
    one read of ``flat`` when compiled."""
    mags = flat.abs()
    at_least = mags >= lo
    band = at_least & (mags <= hi)
    return at_least.sum(), band.sum(), band


@kernel
def _keep_mask(flat: Tensor, lo: Tensor, cut: Tensor, cut_in_band: Tensor) -> Tensor:
    """Kept: ``|x| >= lo`` and, when the cut lies in the band, ``|x| > cut``."""
    mags = flat.abs()
    at_least = mags >= lo
    return torch.where(cut_in_band, at_least & (mags > cut), at_least)


def _sampled_indices(flat: Tensor, prune: int) -> Tensor | None:
    """The kept indices, or ``None`` when the band misses the cut or a tie straddles it."""
    n = flat.numel()
    keep_count = n - prune
    device = flat.device
    gen = torch.Generator(device=device)
    gen.manual_seed(_SAMPLE_SEED)
    picks = torch.randint(n, (_SAMPLE_SIZE,), generator=gen, device=device)
    sample = torch.sort(flat[picks].abs()).values
    lo_rank, hi_rank = band_ranks(n, prune)
    inf = torch.full((), math.inf, dtype=flat.dtype, device=device)
    lo = sample[lo_rank] if lo_rank > 0 else -inf
    hi = sample[hi_rank] if hi_rank < _SAMPLE_SIZE - 1 else inf
    # As the reference's band path: "below" is everything not >= lo, NaN included (a
    # tensor with NaN never gets this far in the encoder: it is refused first).
    n_at_least, n_band, band = _band_pass(flat, lo, hi)
    n_below = n - n_at_least
    expected = (hi_rank - lo_rank + 1) / _SAMPLE_SIZE
    cap = min(n, math.ceil(n * expected * _BAND_SLACK) + 4096)
    at = _nonzero_static(band, cap)
    band_mags = torch.where(at >= 0, flat[at.clamp(min=0)].abs(), inf)
    ordered = torch.sort(band_mags).values
    still = prune - n_below
    cut = ordered[(still - 1).clamp(0, cap - 1)]
    # The values dropped from the band are those <= cut: exactly ``still`` of them unless
    # ties straddle the cut (then the reference's tie rule decides which go).
    at_most = torch.searchsorted(ordered, cut.reshape(1), right=True)[0]
    ok = (
        (n_below <= prune)
        & (still <= n_band)
        & (n_band <= cap)
        & ((still == 0) | ((at_most == still) & ~torch.isnan(cut) & ~torch.isinf(cut)))
    )
    indices = _nonzero_static(_keep_mask(flat, lo, cut, still > 0), keep_count)
    if not bool(ok):
        return None
    return indices


def _nonzero_static(mask: Tensor, size: int) -> Tensor:
    """int64 ``[size]``: the first ``size`` indices of ``True`` entries (``-1`` beyond
    them), without a host read where the device supports it."""
    try:
        return torch.nonzero_static(mask, size=size, fill_value=-1).reshape(-1)
    except (NotImplementedError, RuntimeError):  # a device without it: one host read
        found = torch.nonzero(mask).reshape(-1)[:size]
        if found.numel() < size:
            found = torch.cat((found, found.new_full((size - found.numel(),), -1)))
        return found
