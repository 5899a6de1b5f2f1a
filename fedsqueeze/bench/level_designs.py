"""The two designs of progressive levels side by side: nested bit planes against residual
quantization (``fedsqueeze bench progressive``, designs part).

Nested bit planes as the codec sends them (the top bits of the full codes, coarse
buckets at their scale-weighted mean), plain nested planes (bucket midpoints) and
residual quantization (each level quantizes what the earlier left, with its own
scales), per tensor and per channel: bits per value after zstd (scales and tables
included) and relative L2 error after each level.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["compare_designs", "print_designs"]

State = Mapping[str, torch.Tensor]
Json = dict[str, Any]


def _affine(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lo = x.amin(1, keepdim=True).clamp_max(0)
    hi = x.amax(1, keepdim=True).clamp_min(0)
    scale = (hi - lo).clamp_min(1e-12) / (2**bits - 1)
    zp = torch.round(-lo / scale)
    return torch.clamp(torch.round(x / scale) + zp, 0, 2**bits - 1), scale, zp


def _zbytes(codes: torch.Tensor, bits: int) -> float:
    import zstandard

    raw = codes.to(torch.uint8).numpy().tobytes()
    return min(codes.numel() * bits / 8, len(zstandard.ZstdCompressor(3).compress(raw)))


def _design_errors(
    x: torch.Tensor, levels: tuple[int, ...], design: str
) -> list[tuple[float, float]]:
    """(bytes, squared error) after each level, for one ``[channels, n]`` matrix."""
    total_bits = sum(levels)
    out: list[tuple[float, float]] = []
    if design == "residual":
        approx = torch.zeros_like(x)
        size = 0.0
        for bits in levels:
            q, s, zp = _affine(x - approx, bits)
            approx = approx + (q - zp) * s
            size += s.numel() * 5 + _zbytes(q, bits)
            out.append((size, float((x - approx).square().sum())))
        return out
    q, s, zp = _affine(x, total_bits)
    size = s.numel() * 5.0
    held = 0
    for level, bits in enumerate(levels):
        held += bits
        shift = total_bits - held
        top = torch.div(q, 2**shift, rounding_mode="floor")
        size += _zbytes(top - torch.div(top, 2**bits, rounding_mode="floor") * 2**bits, bits)
        if shift == 0:
            rec = top
        elif design == "nested-midpoint":
            rec = top * 2**shift + (2**shift - 1) / 2
        else:  # bucket means, weighted by scale² (one table of 2^held entries per tensor)
            w = s.expand_as(q).square().reshape(-1).double()
            t = top.reshape(-1).long()
            low = (q - top * 2**shift).reshape(-1).double()
            sums = torch.zeros(2**held, dtype=torch.float64).index_add_(0, t, low * w)
            counts = torch.zeros(2**held, dtype=torch.float64).index_add_(0, t, w)
            mid = torch.full_like(sums, (2**shift - 1) / 2)
            table = torch.where(counts > 0, sums / counts.clamp_min(1e-300), mid).half().float()
            rec = top * 2**shift + table[t].reshape(q.shape)
            size += 2 * 2**held
        del level
        out.append((size, float(((rec - zp) * s - x).square().sum())))
    return out


def compare_designs(state: State, levels: tuple[int, ...] = (2, 2, 4)) -> Json:
    """Bits per value and relative L2 error after each level, per design and granularity."""
    tensors = {k: v.float() for k, v in state.items() if v.ndim >= 2}
    norm2 = sum(float(t.square().sum()) for t in tensors.values())
    count = sum(t.numel() for t in tensors.values())
    result: Json = {}
    for granularity in ("tensor", "channel"):
        for design in ("nested-means", "nested-midpoint", "residual"):
            sizes = [0.0] * len(levels)
            errors = [0.0] * len(levels)
            for t in tensors.values():
                x = t.reshape(t.shape[0], -1) if granularity == "channel" else t.reshape(1, -1)
                for i, (b, e) in enumerate(_design_errors(x, levels, design)):
                    sizes[i] += b
                    errors[i] += e
            result[f"{design}/{granularity}"] = [
                {"bits_per_value": 8 * b / count, "rel_l2": math.sqrt(e / norm2)}
                for b, e in zip(sizes, errors, strict=True)
            ]
    return result


def print_designs(out: Callable[[str], None], title: str, designs: Json) -> None:
    out(f"\n{title}: level designs at 2+2+4 bits (bits/value after zstd · relative L2 error)")
    for name, levels in designs.items():
        cells = "  ".join(f"{r['bits_per_value']:.2f}b·{r['rel_l2']:.4f}" for r in levels)
        out(f"  {name:<24} {cells}")
