"""One-dimensional k-means weight sharing (Deep Compression's "trained quantization").

The codebook travels as float16, so :func:`kmeans_codebook` returns centroids that are
exactly fp16-representable and :func:`assign` maps values to the nearest centroid of
that rounded codebook.

In one dimension Lloyd's algorithm needs no per-point distance computations: with the
data sorted, every cluster is a contiguous run between consecutive centroid midpoints,
so an iteration is a ``searchsorted`` of ``2^bits − 1`` midpoints and differences of a
prefix sum. The fit runs on at most :data:`MAX_FIT_VALUES` values (a fixed-seed random
sample of larger inputs), which makes it deterministic and cheap.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MAX_FIT_VALUES", "assign", "assign_stochastic", "kmeans_codebook"]

#: Inputs longer than this are fitted on a random sample of this many values.
MAX_FIT_VALUES = 1 << 20
_SAMPLE_SEED = 0xC0DE
_FP16_MAX = 65504.0
_ASSIGN_CHUNK = 1 << 20


def _existing_codebook(x: Tensor, k: int) -> Tensor | None:
    """The values themselves when they already take at most ``k`` fp16-exact values.

    Weights produced by trained quantization (k-means, then centroid fine-tuning,
    rounded to fp16) are already shared; refitting would move the fine-tuned centroids.
    """
    distinct = torch.unique(x.to(torch.float32))
    if distinct.numel() > k or not bool(torch.isfinite(distinct).all()):
        return None
    if not torch.equal(distinct.to(torch.float16).to(torch.float32), distinct):
        return None
    pad = distinct[-1:].expand(k - distinct.numel())
    return torch.cat([distinct, pad])


def kmeans_codebook(
    values: Tensor, bits: int, iters: int = 25, generator: torch.Generator | None = None
) -> Tensor:
    """Fit ``2^bits`` centroids to ``values`` by 1-D k-means.

    Parameters
    ----------
    values
        Floating ``[n]``, finite. May be empty.
    bits
        1..8; the codebook has ``2^bits`` entries.
    iters
        Maximum Lloyd iterations (stops early once the centroids stop moving).
    generator
        Draws the fitting sample of inputs longer than :data:`MAX_FIT_VALUES`; by default
        a fixed-seed generator, so equal inputs give equal codebooks.

    Returns
    -------
    Tensor
        float32 ``[2^bits]`` on ``values``' device, sorted ascending, every entry exactly
        representable in float16 (clamped to ±65504). Initialised linearly between
        the minimum and maximum (as in Deep Compression); a centroid whose cluster empties
        stays where it was. Entries may repeat when the data has few distinct values.

    Raises
    ------
    ValueError
        ``values`` not 1-D floating or not finite, ``bits`` outside 1..8, ``iters < 0``.
    """
    if values.dim() != 1 or not values.is_floating_point():
        raise ValueError(f"values must be 1-D floating, got {values.dtype} {tuple(values.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    k = 1 << bits
    device = values.device
    if values.numel() == 0:
        return torch.zeros(k, dtype=torch.float32, device=device)
    x = values.detach()
    if x.numel() <= MAX_FIT_VALUES:
        shared = _existing_codebook(x, k)
        if shared is not None:
            return shared
    if x.numel() > MAX_FIT_VALUES:
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(_SAMPLE_SEED)
        picks = torch.randint(x.numel(), (MAX_FIT_VALUES,), generator=generator, device=device)
        x = x[picks]
    # float64 prefix sums keep cluster means exact enough over a million values.
    x = torch.sort(x.to(torch.float64)).values
    lo, hi = x[0], x[-1]
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError("values must be finite")
    prefix = torch.cat([x.new_zeros(1), torch.cumsum(x, 0)])
    steps = torch.arange(k, dtype=torch.float64, device=device) / (k - 1)
    centroids = lo + (hi - lo) * steps
    for _ in range(iters):
        mids = (centroids[:-1] + centroids[1:]) / 2
        # Cluster j holds sorted x[edges[j]:edges[j+1]]; ties at a midpoint go low,
        # as in :func:`assign`.
        inner = torch.searchsorted(x, mids, right=True)
        edges = torch.cat([inner.new_zeros(1), inner, inner.new_full((1,), x.numel())])
        counts = edges[1:] - edges[:-1]
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        means = sums / counts.clamp(min=1)
        updated = torch.where(counts > 0, means, centroids)
        updated = torch.sort(updated).values
        if bool(torch.equal(updated, centroids)):
            break
        centroids = updated
    rounded = centroids.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).to(torch.float32)
    # Rounding is monotone, so the codebook stays sorted (ties possible).
    return rounded


def assign(values: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest centroid for every value.

    Parameters
    ----------
    values
        Floating ``[n]``.
    codebook
        Floating ``[K]``, sorted ascending, ``1 <= K <= 256``.

    Returns
    -------
    Tensor
        uint8 ``[n]`` on ``values``' device. A value exactly halfway between two
        centroids goes to the lower one.
    """
    if values.dim() != 1 or codebook.dim() != 1:
        raise ValueError("values and codebook must be 1-D")
    if not 1 <= codebook.numel() <= 256:
        raise ValueError(f"codebook must have 1..256 entries, got {codebook.numel()}")
    cb = codebook.to(device=values.device, dtype=torch.float32)
    mids = (cb[:-1] + cb[1:]) / 2
    out = torch.empty(values.numel(), dtype=torch.uint8, device=values.device)
    for start in range(0, values.numel(), _ASSIGN_CHUNK):
        chunk = values[start : start + _ASSIGN_CHUNK].to(torch.float32)
        # bucketize's int32 output halves the temporary; chunks keep it in cache.
        idx = torch.bucketize(chunk, mids, out_int32=True)
        out[start : start + idx.numel()] = idx
    return out


def assign_stochastic(
    values: Tensor, codebook: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Unbiased stochastic rounding to one of the two centroids around each value.

    A value ``v`` between adjacent centroids ``a < b`` gets ``b`` with probability
    ``(v − a)/(b − a)``, so ``E[codebook[q]] = v`` between the first and last centroid;
    values outside that span go to the nearer end.

    Parameters
    ----------
    values
        Floating ``[n]``.
    codebook
        float32 ``[K]``, sorted ascending, ``2 <= K <= 256``, on ``values``' device.
    generator
        Source of the uniform draws (on ``values``' device); the global RNG when ``None``.

    Returns
    -------
    Tensor
        uint8 ``[n]``.
    """
    if values.dim() != 1 or codebook.dim() != 1 or not 2 <= codebook.numel() <= 256:
        raise ValueError("values must be 1-D and codebook 1-D with 2..256 entries")
    k = codebook.numel()
    out = torch.empty(values.numel(), dtype=torch.uint8, device=values.device)
    for start in range(0, values.numel(), _ASSIGN_CHUNK):
        v = values[start : start + _ASSIGN_CHUNK].to(torch.float32)
        # j: the lower centroid, codebook[j] <= v < codebook[j + 1], kept in 0..k-2.
        j = (torch.bucketize(v, codebook, right=True) - 1).clamp_(0, k - 2)
        left = codebook[j]
        gap = codebook[j + 1] - left
        up = torch.where(gap > 0, (v - left) / gap, (v > left).to(v.dtype))
        u = torch.rand(v.shape, generator=generator, device=values.device)
        out[start : start + v.numel()] = j + (u < up)
    return out
