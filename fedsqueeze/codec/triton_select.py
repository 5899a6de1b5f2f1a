"""The sampled band selection of :mod:`fedsqueeze.codec.fused_select` in two Triton
kernels, for CUDA tensors where Triton is installed.

The torch form reads the values once (both masks), then compacts a 1-byte mask twice
(``nonzero_static``): on the H200 at 1.024B values 2.2 + 2.3 + 2.4 ms of the selection's
~12, against 1.9 ms for a copy of the values. Here:

1. **count** (one read of the values): per block of :data:`BLOCK` values, how many lie
   above the band (kept whatever the cut) and in it; each block reserves room for its
   band entries with one atomic add and writes their positions and magnitudes there (in
   no particular order across blocks).
2. On the band alone (about 0.7% of the values): put in position order, then the
   torch form's own :func:`~fedsqueeze.codec.fused_select.band_cut` and
   :func:`~fedsqueeze.codec.fused_select.past_cut` (the reference's tie rule) give the
   cut, the position of the last value dropped, and each block's kept count.
3. **write** (one read of the values): each block writes its kept indices, in order, at
   its offset (an exclusive prefix sum of the kept counts).

No value goes back to the host until the one check the torch form also makes (whether
the band held the cut). The result is the same indices, bit for bit; a band that
overflows its room, or misses the cut, returns ``None`` (the caller falls back).

Off unless asked (``FEDSQUEEZE_TRITON_SELECT=1`` or :func:`set_enabled`): on an H200 it
took twice the compiled torch form's time (22 against 10 ms at 1B values, ``make
gpu-check`` prints both; BENCHMARKS.md, "GPU"). Triton is optional,
and :func:`usable` says whether this path runs. A kernel that fails to build or run
turns the path off for the process (one warning) and the torch form answers. With
``TRITON_INTERPRET=1`` set before Triton is first imported, Triton's interpreter runs
the same kernels on CPU tensors, which is how the tests check them where there is no GPU
(in a process of their own; they skip where Triton is absent).
"""

from __future__ import annotations

import logging
import math
import os
from types import ModuleType

import torch
from torch import Tensor

__all__ = ["BLOCK", "ENV", "available", "enabled", "indices", "set_enabled", "usable"]

log = logging.getLogger(__name__)

#: Environment variable that turns this path on ("1").
ENV = "FEDSQUEEZE_TRITON_SELECT"
#: Values per program of both kernels.
BLOCK = 4096
_kernels: ModuleType | None = None
_missing = False
_override: bool | None = None
_broken = False  # a kernel failed to build or run: off for the process


def enabled() -> bool:
    """Whether the Triton selection is asked for: :func:`set_enabled`'s choice, else
    ``FEDSQUEEZE_TRITON_SELECT=1``; off for good after a failure."""
    if _broken:
        return False
    return _override if _override is not None else os.environ.get(ENV, "") == "1"


def set_enabled(value: bool | None) -> None:
    """Turn the Triton selection on or off for this process (``None``: back to the
    environment variable); also forgets an earlier failure."""
    global _override, _broken
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"value must be a bool or None, got {value!r}")
    _override, _broken = value, False


def usable(flat: Tensor) -> bool:
    """Whether :func:`indices` runs on ``flat``: asked for (:func:`enabled`), a CUDA
    tensor (or a CPU tensor under ``TRITON_INTERPRET=1``), and Triton imports."""
    if not enabled():
        return False
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if flat.device.type != "cuda" and not (interpreted and flat.device.type == "cpu"):
        return False
    return available()


def available() -> bool:
    """Whether Triton is installed (its kernels then load on first use)."""
    return _load() is not None


def _load() -> ModuleType | None:
    """:mod:`fedsqueeze.codec.triton_kernels`, imported on first use; ``None`` without
    Triton."""
    global _kernels, _missing
    if _kernels is None and not _missing:
        try:
            from fedsqueeze.codec import triton_kernels
        except ImportError:
            _missing = True
        else:
            _kernels = triton_kernels
    return _kernels


def indices(flat: Tensor, prune: int, lo: Tensor, hi: Tensor, cap: int) -> Tensor | None:
    """:func:`_indices`; a kernel that fails turns this path off (one warning) and
    returns ``None``, so the caller's torch form answers."""
    global _broken
    try:
        return _indices(flat, prune, lo, hi, cap)
    except Exception as exc:  # a Triton or driver failure: the torch form takes over
        _broken = True
        log.warning(
            "the Triton selection failed (%s: %s); the torch form runs", type(exc).__name__, exc
        )
        return None


def _indices(flat: Tensor, prune: int, lo: Tensor, hi: Tensor, cap: int) -> Tensor | None:
    """:func:`~fedsqueeze.codec.fused_select.magnitude_indices`' kept indices of
    contiguous 1-D ``flat`` (``prune`` of its values dropped) with the band
    ``[lo, hi]`` and room for ``cap`` band entries; ``None`` when the band misses the
    cut or overflows its room (one scalar read, at the end)."""
    from fedsqueeze.codec.fused_select import band_cut, past_cut  # (imports this module)

    kernels = _load()
    if kernels is None:
        raise RuntimeError("Triton is not installed")
    n = flat.numel()
    keep_count = n - prune
    device = flat.device
    blocks = math.ceil(n / BLOCK)
    bounds = torch.stack((lo, hi)).to(torch.float32)
    counts = torch.empty((blocks, 2), dtype=torch.int32, device=device)
    pos = torch.full((cap,), n, dtype=torch.int64, device=device)  # n: no entry
    mag = torch.full((cap,), math.inf, dtype=torch.float32, device=device)
    fill = torch.zeros(1, dtype=torch.int64, device=device)
    kernels.count[(blocks,)](flat, bounds, counts, pos, mag, fill, cap, n, BLOCK=BLOCK)
    n_above, n_band = counts[:, 0].sum(), fill[0]
    n_below = n - n_above - n_band
    still = prune - n_below  # how many of the band go
    by_pos = torch.sort(pos).indices  # the band's entries in position order (padding last)
    pos, mag = pos[by_pos], mag[by_pos]
    cut, last = band_cut(mag, pos, still, cap)
    in_band = still > 0
    valid = pos < n
    kept_band = valid & past_cut(mag, pos, cut, last)
    per_block = torch.zeros(blocks, dtype=torch.int64, device=device)
    per_block.scatter_add_(0, torch.where(valid, pos, 0) // BLOCK, kept_band.to(torch.int64))
    kept = counts[:, 0].to(torch.int64) + torch.where(in_band, per_block, counts[:, 1])
    offsets = torch.cumsum(kept, 0) - kept
    cuts = torch.stack((bounds[0], cut, in_band.to(torch.float32)))
    out = torch.empty(keep_count, dtype=torch.int64, device=device)
    kernels.write[(blocks,)](flat, cuts, last.reshape(1), offsets, out, keep_count, n, BLOCK=BLOCK)
    ok = (
        (n_band <= cap)
        & (n_below <= prune)
        & (still <= n_band)
        & (kept.sum() == keep_count)
        & (~in_band | (torch.isfinite(cut) & ~torch.isnan(cut)))
    )
    return out if bool(ok) else None
