"""How much an entropy coder could take off the progressive planes, against zstd.

For each level of a progressive spec this measures, over the target tensors of a state,
the bits per value that the codec's records hold (zstd, as sent: the planes and their
bucket tables, 2·2^c bytes per tensor; scales travel in the record heads and are left
out), and two bounds for a coder of the same planes: the empirical order-0 entropy of
each tensor's plane, and its entropy given the bits the receiver already holds (the
plane's symbol conditioned on the coarse bucket, what an adaptive arithmetic coder with
one context per bucket approaches).

Run by ``fedsqueeze bench progressive`` (MiniLM designs part).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedsqueeze.codec import encode_state
from fedsqueeze.codec.level_order import LevelOrder
from fedsqueeze.codec.progressive import plane, top_codes
from fedsqueeze.codec.quantization import choose_qparams, quantize
from fedsqueeze.codec.spec import CodecSpec, Granularity, Rounding

__all__ = ["plane_entropy"]


def _entropy_bits(counts: torch.Tensor) -> float:
    """Total bits of an order-0 code of symbols with these counts."""
    counts = counts[counts > 0].to(torch.float64)
    total = float(counts.sum())
    if total == 0:
        return 0.0
    return float(-(counts * torch.log2(counts / total)).sum())


def plane_entropy(state: Mapping[str, torch.Tensor], spec: CodecSpec) -> list[dict[str, Any]]:
    """Per level: bits per value as sent (zstd), order-0 and conditional entropy bounds.

    Only dense per-tensor or per-channel specs (what the MiniLM curves use).

    Raises
    ------
    ValueError
        A spec without levels, or with pruning, top-k or blocks.
    """
    if spec.levels is None or spec.quant is None:
        raise ValueError("plane_entropy needs a progressive spec (levels and quant)")
    q = spec.quant
    if spec.prune.sparsity or spec.topk or q.granularity is Granularity.PER_BLOCK:
        raise ValueError("plane_entropy measures dense per-tensor or per-channel specs")
    levels = spec.levels
    records = encode_state(state, spec, seed=0, order=LevelOrder.BY_LEVEL).records
    bases = [r for r in records if r.level == 0]
    sent = [0.0] * len(levels)
    order0 = [0.0] * len(levels)
    conditional = [0.0] * len(levels)
    values = 0
    for index, record in enumerate(bases):
        if not record.levels or record.name is None:
            continue
        sent[0] += 8 * len(record.body)
        for r in records:
            if r.level > 0 and r.index == index:
                sent[r.level] += 8 * len(r.body)
        x = state[record.name].detach().to(torch.float32)
        flat = x.reshape(-1)
        rows = x.shape[0] if x.dim() else 1
        channels_of = None
        if q.granularity is Granularity.PER_CHANNEL:  # as the encoder: rows of the tensor
            channels_of = torch.arange(flat.numel()) // max(1, flat.numel() // max(1, rows))
        qp = choose_qparams(flat, q.bits, q.scheme, q.granularity, channels_of, rows)
        codes = quantize(flat, qp, Rounding.NEAREST, channels_of)
        values += flat.numel()
        held = 0
        for level, bits in enumerate(levels):
            symbols = plane(codes, levels, level).to(torch.int64)
            alone = _entropy_bits(torch.bincount(symbols, minlength=1 << bits))
            order0[level] += alone
            if held:
                context = top_codes(codes, q.bits, held)
                joint = _entropy_bits(torch.bincount((context << bits) | symbols))
                conditional[level] += joint - _entropy_bits(torch.bincount(context))
            else:
                conditional[level] += alone
            held += bits
    return [
        {
            "level": level,
            "bits": bits,
            "sent_bits_per_value": sent[level] / max(1, values),
            "order0_bits_per_value": order0[level] / max(1, values),
            "conditional_bits_per_value": conditional[level] / max(1, values),
        }
        for level, bits in enumerate(levels)
    ]
