"""``bench codec``'s block-wise section: quantization that survives outliers, on MiniLM.

For each spec, applied to every floating tensor of all-MiniLM-L6-v2 (``targets=*,
min-ndim=1``: matrices, biases and norms):
the relative L2 error of every tensor (max, median, how many above 1%, the worst one)
and the bytes per parameter, scales and record headers included, with the spec's zstd
and without it (``entropy=0``). Beside them, bitsandbytes' own NF4 (blocks of 64, fp32
absmax, and with its double quantization) when the package imports; its bytes count the
packed codes, the absmax values and, nested, the second-level absmax and code table.
Nothing here asserts a figure: they are for BENCHMARKS.md.
"""

from __future__ import annotations

import importlib.util
import statistics
from collections.abc import Mapping
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fedsqueeze.codec import decode_state, encode_state
from fedsqueeze.codec.spec_text import parse_spec

__all__ = ["BLOCKWISE_SPECS", "run_blockwise_section", "tensor_errors"]

State = Mapping[str, torch.Tensor]
Json = dict[str, Any]

#: Per-tensor and per-channel references, then block-wise and NF4 specs.
BLOCKWISE_SPECS = (
    "quant=8",
    "quant=8:channel",
    "quant=8:block64",
    "quant=8:block32",
    "quant=8:symmetric:block64",
    "quant=8:block128:dq",
    "quant=8:block4096",
    "quant=4:channel",
    "quant=4:block64",
    "quant=4:nf4:block64:fp32",
    "quant=4:nf4:block64",
    "quant=4:nf4:block64:dq",
    "quant=3:block64",
    "quant=2:block32",
)
_NF4_SPEC = "quant=4:nf4:block64:fp32"  # what bitsandbytes' nf4 stores: fp32 absmax


def tensor_errors(state: State, decoded: State) -> dict[str, float]:
    """Relative L2 error ``‖x̂ − x‖ / ‖x‖`` of every tensor of ``state`` with a norm."""
    out = {}
    for name, t in state.items():
        ref = t.to(torch.float64)
        norm = float(ref.norm())
        if norm > 0:
            out[name] = float((decoded[name].to(torch.float64) - ref).norm()) / norm
    return out


#: Every floating tensor, as the issue's per-tensor figures count them.
_ALL = ",targets=*,min-ndim=1"


def _targets(state: State) -> dict[str, torch.Tensor]:
    spec = parse_spec("lossless" + _ALL)
    return {k: v for k, v in state.items() if spec.is_target(k, v.ndim, v.is_floating_point())}


def _row(label: str, errors: dict[str, float], nbytes: int, raw_bytes: int, n: int) -> Json:
    worst = max(errors, key=errors.__getitem__)
    return {
        "spec": label,
        "bytes_per_param": nbytes / n,
        "raw_bytes_per_param": raw_bytes / n,
        "max_rel_err": errors[worst],
        "median_rel_err": statistics.median(errors.values()),
        "above_1pct": sum(1 for e in errors.values() if e > 0.01),
        "worst": worst,
        "errors": errors,
    }


def _ours(state: dict[str, torch.Tensor], text: str, n: int) -> Json:
    spec = parse_spec(text + _ALL)
    encoded = encode_state(state, spec, seed=0)
    raw = encode_state(state, spec.with_changes(entropy_level=0), seed=0).nbytes
    errors = tensor_errors(state, decode_state(encoded))
    return _row(text, errors, encoded.nbytes, raw, n)


def _bitsandbytes(state: dict[str, torch.Tensor], nested: bool, n: int) -> Json | None:
    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    import bitsandbytes.functional as bnbf

    errors: dict[str, float] = {}
    nbytes = 0
    for name, t in state.items():
        q, qs = bnbf.quantize_4bit(
            t.float(), blocksize=64, quant_type="nf4", compress_statistics=nested
        )
        y = bnbf.dequantize_4bit(q, qs, blocksize=64, quant_type="nf4")
        errors.update(tensor_errors({name: t}, {name: y}))
        nbytes += q.numel() * q.element_size() + qs.absmax.numel() * qs.absmax.element_size()
        if nested and qs.state2 is not None:
            s2 = qs.state2
            nbytes += s2.absmax.numel() * s2.absmax.element_size() + s2.code.numel() * 4 + 4
    label = "bitsandbytes nf4 block64" + (" + double quant" if nested else "")
    return _row(label, errors, nbytes, nbytes, n)


def run_blockwise_section(state: State, out: Console) -> Json:
    """Measure :data:`BLOCKWISE_SPECS` (and bitsandbytes) on ``state``'s target tensors."""
    targets = _targets(state)
    n = sum(t.numel() for t in targets.values())
    rows = [_ours(targets, text, n) for text in BLOCKWISE_SPECS]
    bnb = [_bitsandbytes(targets, nested, n) for nested in (False, True)]
    rows += [r for r in bnb if r is not None]
    table = Table(
        title=f"block-wise quantization, all-MiniLM-L6-v2, every float tensor ({n:,} values)"
    )
    for col in ("spec", "B/param", "B/param raw", "max rel. err", "median", ">1%", "worst"):
        table.add_column(col, justify="left" if col in ("spec", "worst") else "right")
    for r in rows:
        table.add_row(
            r["spec"], f"{r['bytes_per_param']:.4f}", f"{r['raw_bytes_per_param']:.4f}",
            f"{r['max_rel_err']:.4%}", f"{r['median_rel_err']:.4%}",
            f"{r['above_1pct']}/{len(r['errors'])}", r["worst"],
        )  # fmt: skip
    out.print(table)
    report: Json = {"values": n, "specs": rows}
    if bnb[0] is None:
        out.print("bitsandbytes: not installed (pip install bitsandbytes), no comparison")
        return report
    ours = next(r for r in rows if r["spec"] == _NF4_SPEC)["errors"]
    theirs = bnb[0]["errors"]
    ratios = {k: ours[k] / theirs[k] for k in ours if theirs[k] > 0}
    worst = max(ratios, key=ratios.__getitem__)
    no_worse = sum(1 for k in ours if ours[k] <= theirs[k] * (1 + 1e-6))
    report["nf4_vs_bitsandbytes"] = {
        "no_worse": no_worse,
        "tensors": len(ours),
        "max_ratio": ratios[worst],
        "worst": worst,
    }
    out.print(
        f"{_NF4_SPEC} vs bitsandbytes nf4 block64: no worse on {no_worse}/{len(ours)} "
        f"tensors; largest error ratio {ratios[worst]:.6f} ({worst})"
    )
    return report
