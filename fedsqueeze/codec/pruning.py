"""Magnitude pruning masks, equal to ``torch.nn.utils.prune``'s (ties aside).

Every function returns a bool mask (``True`` = kept) of the input's shape on the input's
device and leaves its arguments alone.

Exact selection of the ``k`` smallest magnitudes is what PyTorch does with ``torch.topk``,
but ``topk`` with ``k`` near ``n/2`` costs seconds for 25M values on a CPU. For tensors
above :data:`_SAMPLE_ABOVE` values we therefore estimate the cut-off from a fixed-seed
random sample, take a band around it wide enough to contain the exact cut-off with
overwhelming probability, count what lies below and above the band, and run ``topk``
only inside the band. The result is exact: if the band misses the cut-off (it should
essentially never), we fall back to ``topk`` on everything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = [
    "channel_mask",
    "count_to_prune",
    "global_magnitude_masks",
    "magnitude_mask",
    "threshold_mask",
]

#: Tensors with more values than this use sampled selection (exact, see module doc).
_SAMPLE_ABOVE = 1 << 20
_SAMPLE_SIZE = 1 << 16
_SAMPLE_SEED = 0x5EED


def count_to_prune(numel: int, sparsity: float) -> int:
    """How many of ``numel`` values ``sparsity`` drops: ``round(sparsity · numel)``.

    This is ``torch.nn.utils.prune._compute_nparams_toprune`` for a float amount
    (Python's round, half to even).
    """
    _check_sparsity(sparsity)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return round(sparsity * numel)


def magnitude_mask(t: Tensor, sparsity: float) -> Tensor:
    """Keep the ``numel − round(sparsity·numel)`` values of largest ``|w|``.

    Parameters
    ----------
    t
        Floating tensor of any shape.
    sparsity
        Fraction dropped, in ``[0, 1]``.

    Returns
    -------
    Tensor
        bool, ``t.shape``; equal to ``prune.l1_unstructured(amount=sparsity)``'s mask.
    """
    _check_floating(t)
    prune = count_to_prune(t.numel(), sparsity)
    return _drop_smallest(t.detach().abs().reshape(-1), prune).view(t.shape)


def threshold_mask(t: Tensor, threshold: float) -> Tensor:
    """Keep the values with ``|w| > threshold``: bool, ``t.shape``."""
    _check_floating(t)
    if not threshold >= 0.0:  # also rejects NaN
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    return t.detach().abs() > threshold


def global_magnitude_masks(tensors: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Masks from one magnitude cut-off across all ``tensors``.

    Drops ``round(sparsity · N)`` values of smallest ``|w|`` among all ``N`` values, as
    ``prune.global_unstructured(..., pruning_method=prune.L1Unstructured, amount=sparsity)``.

    Parameters
    ----------
    tensors
        Floating tensors, all on one device (dtypes may differ: compared in their
        promoted dtype).
    sparsity
        Fraction dropped, in ``[0, 1]``.

    Returns
    -------
    dict[str, Tensor]
        bool masks of each tensor's shape, same keys and order.
    """
    _check_sparsity(sparsity)
    if not tensors:
        return {}
    items = list(tensors.items())
    for _, t in items:
        _check_floating(t)
    devices = {t.device for _, t in items}
    if len(devices) > 1:
        raise ValueError(f"tensors must share a device, got {sorted(map(str, devices))}")
    dtype = items[0][1].dtype
    for _, t in items[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    flat = torch.cat([t.detach().reshape(-1).to(dtype) for _, t in items]).abs_()
    keep = _drop_smallest(flat, count_to_prune(flat.numel(), sparsity))
    sizes = [t.numel() for _, t in items]
    return {
        name: part.view(t.shape)
        for (name, t), part in zip(items, torch.split(keep, sizes), strict=True)
    }


def channel_mask(t: Tensor, sparsity: float) -> Tensor:
    """Drop the ``round(sparsity · C)`` output channels (dim 0) of smallest L2 norm.

    Parameters
    ----------
    t
        Floating tensor ``[C, ...]`` with at least one dimension (a 1-D tensor's
        channels are its single values).
    sparsity
        Fraction of channels dropped, in ``[0, 1]``.

    Returns
    -------
    Tensor
        bool, ``t.shape``; equal to ``prune.ln_structured(n=2, dim=0, amount=sparsity)``'s
        mask.
    """
    _check_floating(t)
    if t.dim() < 1:
        raise ValueError("channel pruning needs a tensor with at least one dimension")
    channels = t.shape[0]
    prune = count_to_prune(channels, sparsity)
    dims = tuple(range(1, t.dim()))
    norms = torch.linalg.vector_norm(t.detach(), ord=2, dim=dims) if dims else t.detach().abs()
    keep_channel = torch.zeros(channels, dtype=torch.bool, device=t.device)
    # Same call as PyTorch (largest, k = channels kept), so even ties agree with it.
    keep_channel[torch.topk(norms, k=channels - prune, largest=True).indices] = True
    return keep_channel.view((channels,) + (1,) * (t.dim() - 1)).expand(t.shape).clone()


# ---------------------------------------------------------------------- helpers
def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity <= 1.0:  # also rejects NaN
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")


def _check_floating(t: Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"pruning needs a floating tensor, got {t.dtype}")


def _drop_smallest(mags: Tensor, prune: int) -> Tensor:
    """Bool mask over 1-D ``mags`` with its ``prune`` smallest entries ``False``."""
    n = mags.numel()
    if prune <= 0:
        return torch.ones(n, dtype=torch.bool, device=mags.device)
    if prune >= n:
        return torch.zeros(n, dtype=torch.bool, device=mags.device)
    if n > _SAMPLE_ABOVE:
        keep = _drop_smallest_sampled(mags, prune)
        if keep is not None:
            return keep
    return _drop_smallest_topk(mags, prune)


def _drop_smallest_topk(mags: Tensor, prune: int) -> Tensor:
    # The call prune.l1_unstructured makes, so ties are broken the same way.
    keep = torch.ones(mags.numel(), dtype=torch.bool, device=mags.device)
    keep[torch.topk(mags, k=prune, largest=False).indices] = False
    return keep


def _drop_smallest_sampled(mags: Tensor, prune: int) -> Tensor | None:
    """Exact selection via a sampled cut-off band; ``None`` when the band misses."""
    n = mags.numel()
    gen = torch.Generator(device=mags.device).manual_seed(_SAMPLE_SEED)
    picks = torch.randint(n, (_SAMPLE_SIZE,), generator=gen, device=mags.device)
    sample = torch.sort(mags[picks]).values
    # The cut-off's rank in the sample is Binomial(m, q): 6 standard deviations either
    # side (plus slack for small q) make missing it a ~1e-9 event.
    q = prune / n
    centre = q * _SAMPLE_SIZE
    half = 6.0 * math.sqrt(_SAMPLE_SIZE * q * (1.0 - q)) + 8.0
    lo_rank = max(0, math.floor(centre - half))
    hi_rank = min(_SAMPLE_SIZE - 1, math.ceil(centre + half))
    below = mags < sample[lo_rank] if lo_rank > 0 else torch.zeros_like(mags, dtype=torch.bool)
    above = (
        mags > sample[hi_rank]
        if hi_rank < _SAMPLE_SIZE - 1
        else torch.zeros_like(mags, dtype=torch.bool)
    )
    n_below = int(torch.count_nonzero(below))  # far faster than a bool sum()
    n_above = int(torch.count_nonzero(above))
    if n_below > prune or n_above > n - prune:
        return None
    band = torch.nonzero(~(below | above)).view(-1)
    keep = ~below
    still = prune - n_below
    if still:
        keep[band[torch.topk(mags[band], k=still, largest=False).indices]] = False
    return keep
