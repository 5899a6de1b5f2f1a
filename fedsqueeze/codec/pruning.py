"""Magnitude pruning masks, equal to ``torch.nn.utils.prune``'s (ties aside).

Every function returns a bool mask (``True`` = kept) of the input's shape on the input's
device and leaves its arguments alone.

**Ties at the cut.** When several values share the magnitude at the cut and only some
of them are to go, the ones at the **lowest flat indices go first**: the mask is that of
a stable sort of the magnitudes (NaN largest), the first ``k`` dropped. PyTorch's
``prune`` leaves that choice to ``torch.topk``, which makes it differently on different
inputs, devices and versions; one written rule lets every path here (small and large
tensors, compiled or not, CPU or GPU) keep exactly the same set, and lets the large
tensors' fast selection handle ties itself instead of falling back to a slow path.
Where no tie straddles the cut, the masks are PyTorch's.

Exact selection of the ``k`` smallest magnitudes is what PyTorch does with ``torch.topk``,
but ``topk`` with ``k`` near ``n/2`` costs seconds for 25M values on a CPU. For tensors
above :data:`_SAMPLE_ABOVE` values we therefore estimate the cut-off from a fixed-seed
random sample, take a band around it wide enough to contain the exact cut-off with
overwhelming probability, count what lies below and above the band, and select the cut
only inside the band. The result is exact: if the band misses the cut-off (it should
essentially never), we fall back to a selection over everything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from fedsqueeze.codec import jit
from fedsqueeze.codec.chunks import CPU_CHUNK, chunk_bounds, np_scratch, run_chunks, scratch
from fedsqueeze.codec.kernels import float32_arrays
from fedsqueeze.codec.threshold_select import FirstPass, finish, first_pass, tie_rule

__all__ = [
    "TWO_PASS",
    "channel_mask",
    "count_to_prune",
    "global_magnitude_masks",
    "magnitude_indices",
    "magnitude_mask",
    "magnitude_selection",
    "prepare_selection",
    "prepare_selection_of_sum",
    "threshold_mask",
]

#: Tensors with more values than this use sampled selection (exact, see module doc). It
#: was 2^20: from 2^17 the sampled selection (with the quantizer in its second pass,
#: :mod:`fedsqueeze.codec.select_quantize`) encodes faster than the exact one
#: (all-MiniLM-L6-v2 with topk10-int4: 441 → 347 ms, the same bytes).
_SAMPLE_ABOVE = 1 << 17
#: The sample's size for the largest tensors; from :data:`_SAMPLE_ABOVE` up it grows
#: with the tensor (:func:`_sample_size`): a fixed 65,536 random reads and a sort cost
#: a millisecond, as much as the selection of a 589,824-value matrix itself.
_SAMPLE_SIZE = 1 << 16
_MIN_SAMPLE = 1 << 12
_SAMPLE_SEED = 0x5EED
_NUMPY_SORTABLE = (torch.float16, torch.float32, torch.float64)
_CHUNK = CPU_CHUNK
#: Whether large float32 CPU tensors go through the two-pass selection of
#: :mod:`fedsqueeze.codec.threshold_select` (off: the single pass and concatenation
#: before it, for the benchmark's side-by-side rows; the same indices and values).
TWO_PASS = True


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
        bool, ``t.shape``; equal to ``prune.l1_unstructured(amount=sparsity)``'s mask
        where no tie straddles the cut (ties: lowest indices dropped first, see the
        module's docstring).
    """
    _check_floating(t)
    prune = count_to_prune(t.numel(), sparsity)
    return _drop_smallest(t.detach().abs().reshape(-1), prune).view(t.shape)


def magnitude_indices(t: Tensor, sparsity: float) -> Tensor:
    """The flat indices :func:`magnitude_mask` keeps, without building the mask.

    Parameters
    ----------
    t
        Floating tensor of any shape, finite.
    sparsity
        Fraction dropped, in ``[0, 1]``.

    Returns
    -------
    Tensor
        int64 ``[numel − round(sparsity·numel)]``, increasing: exactly
        ``nonzero(magnitude_mask(t, sparsity))``, ties included. Large tensors go
        through the sampled band of :func:`_drop_smallest_sampled` (the same sample,
        band and tie rule), but in chunks on the worker threads and with the kept
        indices collected as they are found: no magnitude, mask or band mask as large
        as the tensor.
    """
    return magnitude_selection(t, sparsity)[0]


def magnitude_selection(
    t: Tensor, sparsity: float, prepared: FirstPass | None = None
) -> tuple[Tensor, Tensor | None]:
    """:func:`magnitude_indices`, and the values at them (``t.reshape(-1)[indices]``)
    when the selection gathered them on the way (float32 on the CPU, large tensors: each
    chunk's kept values are taken while the chunk is in cache), else ``None``.
    ``prepared``: :func:`prepare_selection`'s first pass over the same values (``t``
    may be another tensor holding them), which is then not done again."""
    _check_floating(t)
    flat = t.detach().reshape(-1)
    n = flat.numel()
    prune = count_to_prune(n, sparsity)
    if n <= _SAMPLE_ABOVE or prune <= 0 or prune >= n:
        return torch.nonzero(_drop_smallest(flat.abs(), prune)).view(-1), None
    flat = flat.contiguous()
    found: tuple[Tensor, Tensor | None] | None
    if _two_pass(flat, prune):
        first = prepared or first_pass(flat.numpy(), *_band(flat, prune))
        picked = finish(flat.numpy(), prune, first)
        found = (
            None if picked is None else (torch.from_numpy(picked[0]), torch.from_numpy(picked[1]))
        )
    else:
        found = _indices_sampled(flat, prune)
    if found is not None:
        return found
    # The band missed the cut (about one tensor in a billion): a selection over all.
    return torch.nonzero(_drop_smallest_exact(flat.abs(), prune)).view(-1), None


def prepare_selection(t: Tensor, sparsity: float) -> FirstPass | None:
    """The sample and the first pass of :func:`magnitude_selection` for a tensor that
    takes the two-pass path (float32 on the CPU, more than :data:`_SAMPLE_ABOVE` values,
    something to drop and something to keep), else ``None``. Its ``top`` tells whether
    every value is finite and how large, so a caller that must check that first (the
    encoder) reads the tensor once for both; ``magnitude_selection(t, sparsity, it)``
    then runs the second pass only."""
    _check_floating(t)
    flat = t.detach().reshape(-1)
    prune = count_to_prune(flat.numel(), sparsity)
    if not _two_pass(flat, prune):
        return None
    flat = flat.contiguous()
    return first_pass(flat.numpy(), *_band(flat, prune))


def prepare_selection_of_sum(
    t: Tensor, base: Tensor | None, residual: Tensor | None, sparsity: float
) -> FirstPass | None:
    """:func:`prepare_selection` of ``t − base + residual`` (float32 on the CPU, as the
    encoder sums them), without the sum ever made whole: its sample from the same
    positions of the three, its first pass over each chunk's sum in cache. ``None``
    where it does not apply (as :func:`prepare_selection`, and without the compiled
    kernels)."""
    _check_floating(t)
    flat = t.detach().reshape(-1)
    n = flat.numel()
    prune = count_to_prune(n, sparsity)
    arrays = float32_arrays(t, base, residual)
    if not _two_pass(flat, prune) or not jit.use(n) or arrays is None:
        return None
    tn, bn, rn = arrays
    picks = _picks(n, flat.device).numpy()
    values = tn[picks]
    if bn.size:
        values = values - bn[picks]
    if rn.size:
        values = values + rn[picks]
    sample = torch.from_numpy(np.sort(np.abs(values)))
    return first_pass(tn, *_band_of(sample, n, prune), terms=(bn, rn))


def _two_pass(flat: Tensor, prune: int) -> bool:
    """Whether :func:`magnitude_selection` of 1-D ``flat`` dropping ``prune`` values
    takes the two-pass selection (:mod:`fedsqueeze.codec.threshold_select`)."""
    n = flat.numel()
    return (
        TWO_PASS
        and n > _SAMPLE_ABOVE
        and 0 < prune < n
        and flat.device.type == "cpu"
        and flat.dtype == torch.float32
    )


def _band(flat: Tensor, prune: int) -> tuple[float, float]:
    """The band ``[lo, hi]`` around the cut-off from the fixed-seed sample of ``|flat|``
    (``±inf``: no bound that side)."""
    return _band_of(_sorted_sample(flat, flat.numel(), magnitudes=True), flat.numel(), prune)


def _band_of(sample: Tensor, n: int, prune: int) -> tuple[float, float]:
    """The band ``[lo, hi]`` from the sorted sample of a tensor of ``n`` magnitudes."""
    lo_rank, hi_rank = _band_ranks(n, prune)
    # "below" is |x| < lo, "above" |x| > hi; an absent bound is ±inf (nothing beyond).
    lo = float(sample[lo_rank]) if lo_rank > 0 else -math.inf
    hi = float(sample[hi_rank]) if hi_rank < _sample_size(n) - 1 else math.inf
    return lo, hi


def threshold_mask(t: Tensor, threshold: float) -> Tensor:
    """Keep the values with ``|w| > threshold``: bool, ``t.shape``."""
    _check_floating(t)
    if not threshold >= 0.0:  # also rejects NaN
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    return t.detach().abs() > threshold


def global_magnitude_masks(tensors: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Masks from one magnitude cut-off across all ``tensors``.

    Drops ``round(sparsity · N)`` values of smallest ``|w|`` among all ``N`` values, as
    ``prune.global_unstructured(..., pruning_method=prune.L1Unstructured, amount=sparsity)``
    (ties at the cut: the lowest indices of the tensors flattened and concatenated in
    order go first).

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
    return _drop_smallest_exact(mags, prune)


def _drop_smallest_exact(mags: Tensor, prune: int) -> Tensor:
    """:func:`_drop_smallest` over everything (``0 < prune < n``): the ``prune``-th
    smallest magnitude is the cut, everything below it goes, and of the values equal
    to it the lowest indices (:func:`_band_drop` with the whole tensor as the band)."""
    keep = torch.ones(mags.numel(), dtype=torch.bool, device=mags.device)
    keep[_band_drop(mags, prune)] = False
    return keep


def _band_drop(band: Tensor, still: int) -> Tensor:
    """Positions (into 1-D ``band``, increasing) of its ``still`` smallest values, ties
    at the cut dropped lowest position first, NaN largest (``0 < still <= len``)."""
    if band.device.type == "cpu" and band.dtype in _NUMPY_SORTABLE:
        return torch.from_numpy(tie_rule(band.numpy(), still))
    cut = torch.kthvalue(band, still).values
    if bool(torch.isnan(cut)):
        below, tied = ~torch.isnan(band), torch.isnan(band)
    else:
        below, tied = band < cut, band == cut
    need = still - int(torch.count_nonzero(below))
    below[torch.nonzero(tied).view(-1)[:need]] = True
    return torch.nonzero(below).view(-1)


def _band_ranks(n: int, prune: int) -> tuple[int, int]:
    """Ranks in the sorted sample of the band's ends (0 and m − 1: no bound that side)."""
    # The cut-off's rank in the sample is Binomial(m, q): 6 standard deviations either
    # side (plus slack for small q) make missing it a ~1e-9 event.
    q = prune / n
    m = _sample_size(n)
    centre = q * m
    half = 6.0 * math.sqrt(m * q * (1.0 - q)) + 8.0
    lo_rank = max(0, math.floor(centre - half))
    hi_rank = min(m - 1, math.ceil(centre + half))
    return lo_rank, hi_rank


def _sample_size(n: int) -> int:
    """Values in the sample of a tensor of ``n``: a sixteenth of them, from
    :data:`_MIN_SAMPLE` up to :data:`_SAMPLE_SIZE` (reached at 2^20 values)."""
    return min(_SAMPLE_SIZE, max(_MIN_SAMPLE, n >> 4))


def _picks(n: int, device: torch.device) -> Tensor:
    """The sample's positions in a tensor of ``n`` values: fixed-seed, with repeats."""
    gen = torch.Generator(device=device).manual_seed(_SAMPLE_SEED)
    return torch.randint(n, (_sample_size(n),), generator=gen, device=device)


def _sorted_sample(flat: Tensor, n: int, magnitudes: bool) -> Tensor:
    """The fixed-seed sample of ``|flat|`` (or of ``flat``, already magnitudes), sorted."""
    picks = _picks(n, flat.device)
    if flat.device.type == "cpu" and flat.dtype in _NUMPY_SORTABLE and TWO_PASS:
        # NumPy's gather, abs and sort on one thread: torch's two threads cost ~2x the
        # CPU time here for 65,536 random reads (the same values).
        sample = flat.contiguous().numpy()[picks.numpy()]
        return torch.from_numpy(np.sort(np.abs(sample) if magnitudes else sample))
    picked = flat[picks]
    if magnitudes:
        picked = picked.abs()
    if picked.device.type == "cpu" and picked.dtype in _NUMPY_SORTABLE:
        # numpy sorts 65,536 floats ~3-8x faster than torch.sort on these machines.
        return torch.from_numpy(np.sort(picked.numpy()))
    return torch.sort(picked).values


def _indices_sampled(flat: Tensor, prune: int) -> tuple[Tensor, Tensor | None] | None:
    """:func:`_drop_smallest_sampled` as kept indices (and, on the NumPy path, the kept
    values), from chunks of ``flat`` (values, not magnitudes); ``None`` when the band
    misses. (Large float32 CPU tensors take the two passes of
    :mod:`fedsqueeze.codec.threshold_select` instead, unless :data:`TWO_PASS` is off.)

    One pass over ``flat`` on the worker threads finds, per chunk, the indices with
    ``|x| >= lo`` (kept unless dropped below) and, among them, the band ``|x| <= hi``.
    The exact correction then drops the ``still`` smallest of the band, ties at the cut
    lowest index first (:func:`_band_drop`), as :func:`_drop_smallest_sampled`.
    """
    n = flat.numel()
    gathered = flat.device.type == "cpu" and flat.dtype == torch.float32
    lo, hi = _band(flat, prune)
    bounds = chunk_bounds(n, _CHUNK)
    kept: list[Tensor] = [flat.new_empty(0, dtype=torch.int64)] * len(bounds)
    band_at: list[Tensor] = list(kept)  # where in the chunk's kept list the band lies
    band_mags: list[Tensor] = [flat.new_empty(0)] * len(bounds)
    kept_values: list[Tensor] = list(band_mags)  # NumPy path only
    slot = {start: i for i, (start, _) in enumerate(bounds)}

    def chunk(start: int, stop: int) -> None:
        piece = flat[start:stop]
        if piece.device.type == "cpu":
            mags = torch.abs(piece, out=scratch("a", stop - start, flat.dtype))
        else:
            mags = piece.abs()
        ge = _nonzero(mags >= lo)
        ge_mags = mags[ge]
        in_band = _nonzero(ge_mags <= hi)
        i = slot[start]
        band_at[i] = in_band
        band_mags[i] = ge_mags[in_band]
        kept[i] = ge.add_(start)

    def chunk_np(start: int, stop: int) -> None:
        # The same selection in NumPy operations (float32 on the CPU): single-threaded in
        # the worker, no allocation but the results, about a microsecond a call (torch's
        # abs, comparison and gathers cost 2-3x the CPU time in the workers here).
        piece = values_np[start:stop]
        size = stop - start
        mags = np_scratch("mags", size, np.float32)
        mask = np_scratch("mask", size, np.bool_)
        np.abs(piece, out=mags)
        np.greater_equal(mags, lo32, out=mask)
        ge = np.flatnonzero(mask)
        ge_mags = mags[ge]
        in_band = np.flatnonzero(ge_mags <= hi32)
        i = slot[start]
        band_at[i] = torch.from_numpy(in_band)
        band_mags[i] = torch.from_numpy(ge_mags[in_band])
        kept_values[i] = torch.from_numpy(piece[ge])
        ge += start
        kept[i] = torch.from_numpy(ge)

    if gathered:
        values_np = flat.numpy()
        lo32, hi32 = np.float32(lo), np.float32(hi)  # sample values: exact in float32
        run_chunks(chunk_np, bounds)
    elif flat.device.type == "cpu":
        run_chunks(chunk, bounds)
    else:
        for start, stop in bounds:
            chunk(start, stop)
    n_kept_or_band = sum(k.numel() for k in kept)
    n_band = sum(b.numel() for b in band_at)
    n_below = n - n_kept_or_band
    n_above = n_kept_or_band - n_band
    if n_below > prune or n_above > n - prune:
        return None
    if flat.device.type == "cpu":  # NumPy memory: huge pages for 20 MB of indices
        keep = torch.from_numpy(np.concatenate([k.numpy() for k in kept]))
    else:
        keep = torch.cat(kept)
    values = (
        torch.from_numpy(np.concatenate([v.numpy() for v in kept_values])) if gathered else None
    )
    still = prune - n_below
    if not still:
        return keep, values
    # The band's positions in ``keep``: each chunk's list starts where the earlier end.
    offsets = [0]
    for k in kept[:-1]:
        offsets.append(offsets[-1] + k.numel())
    band_pos = torch.cat([b.add_(o) for b, o in zip(band_at, offsets, strict=True)])
    # Band positions increase, so the tie rule's lowest band position first is its
    # lowest index first.
    dropped = band_pos[_band_drop(torch.cat(band_mags), still)]
    if keep.device.type == "cpu":
        # NumPy's boolean compress: torch's bool-mask indexing of 2.5M indices cost ~10x.
        survive_np = np.ones(keep.numel(), dtype=np.bool_)
        survive_np[dropped.numpy()] = False
        kept_np = torch.from_numpy(keep.numpy()[survive_np])
        return kept_np, None if values is None else torch.from_numpy(values.numpy()[survive_np])
    survive = torch.ones(keep.numel(), dtype=torch.bool, device=keep.device)
    survive[dropped] = False
    return keep[survive], None


def _nonzero(mask: Tensor) -> Tensor:
    """int64 indices of the ``True`` entries of a 1-D bool tensor, increasing."""
    if mask.device.type == "cpu":
        # numpy's flatnonzero is ~2x faster than torch.nonzero here.
        return torch.from_numpy(np.flatnonzero(mask.numpy()).astype(np.int64, copy=False))
    return torch.nonzero(mask).view(-1)


def _drop_smallest_sampled(mags: Tensor, prune: int) -> Tensor | None:
    """Exact selection via a sampled cut-off band; ``None`` when the band misses."""
    n = mags.numel()
    sample = _sorted_sample(mags, n, magnitudes=False)
    lo_rank, hi_rank = _band_ranks(n, prune)
    below = mags < sample[lo_rank] if lo_rank > 0 else torch.zeros_like(mags, dtype=torch.bool)
    above = (
        mags > sample[hi_rank]
        if hi_rank < _sample_size(n) - 1
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
        keep[band[_band_drop(mags[band], still)]] = False
    return keep
