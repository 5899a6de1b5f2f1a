"""Lossless section of ``fedsqueeze bench codec``: our byte-grouped coding beside ZipNN.

Four cases on one state (all-MiniLM-L6-v2 in the full benchmark): the model in fp32, a
bf16 copy, and a delta of each (the model against itself plus a small fine-tuning-like
perturbation: 10% of values moved by ~1% relative). For each: ratio, and
compression and decompression throughput in MB (10^6 bytes) of raw model per second
and CPU milliseconds (all threads), ours and ZipNN's (PyPI ``zipnn``, when installed)
side by side in one process: medians of ``runs`` rounds in which the two coders take
turns, and our throughput ÷ ZipNN's as the median of the rounds' ratios (each pair
timed back to back).

Ours is ``encode_state(..., PRESETS["lossless"]).to_bytes()`` and back through
``EncodedModel.from_bytes`` and ``decode_state`` (everything: headers, checksum, the
delta's base digest given). ZipNN compresses the concatenated tensor bytes (its best
case: one call); for a delta it gets the bits XOR the base's, as ZipNN's own delta
compression does. Its ``compress`` reorders its input in place, so every run gets a
fresh copy, made outside the timed region.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from rich.console import Console
from rich.table import Table

from fedsqueeze.codec import PRESETS, EncodedModel, decode_state, encode_state, state_digest

__all__ = ["perturbed", "run_lossless_section"]

State = Mapping[str, torch.Tensor]
Json = dict[str, Any]
_MB = 1e6
_ZIPNN_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def perturbed(state: State, fraction: float = 0.1, scale: float = 1e-2, seed: int = 0) -> State:
    """A fine-tuning-like next version of ``state``: ``fraction`` of each float tensor's
    values moved by ``scale`` relative (normal noise), the rest bit-identical."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        if not t.is_floating_point():
            out[name] = t
            continue
        x = t.to(torch.float32)
        mask = torch.rand(x.shape, generator=gen) < fraction
        noise = torch.randn(x.shape, generator=gen) * scale * x.abs()
        out[name] = torch.where(mask, x + noise, x).to(t.dtype)
    return out


Call = tuple[Callable[[Any], Any], Callable[[], Any]]  # fn, and what makes its argument


class _Coder(NamedTuple):
    """One coder on one case: its output, whether it decodes exactly, its two calls."""

    blob: bytes
    exact: bool
    compress: Call
    decompress: Call


def _alternated(calls: list[Call], runs: int) -> list[list[tuple[float, float]]]:
    """Wall and CPU seconds (all the process's threads) of ``runs`` calls of each
    ``fn(prepare())``, the coders taking turns: round by round, in reversed order every
    other round, after one untimed warm-up round; ``prepare`` runs outside the timed
    region. A slow phase of a shared machine then falls on every coder alike, where
    timing one coder's runs and then the other's put it on one side (session 34's runs:
    the same code's fp32 decompression at 0.55 and 1.2 of ZipNN's). CPU time is what a
    call costs whatever else shares the cores; wall time also counts the waits."""
    times: list[list[tuple[float, float]]] = [[] for _ in calls]
    for round_ in range(runs + 1):
        order = list(range(len(calls)))
        if round_ % 2:
            order.reverse()
        for i in order:
            fn, prepare = calls[i]
            arg = prepare()
            cpu = time.process_time()
            started = time.perf_counter()
            fn(arg)
            if round_:
                times[i].append((time.perf_counter() - started, time.process_time() - cpu))
    return times


def _median(times: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def _per_round(ours: list[tuple[float, float]], theirs: list[tuple[float, float]]) -> float:
    """The median over rounds of our throughput ÷ ZipNN's (its wall time ÷ ours, each
    pair timed back to back)."""
    return statistics.median(t[0] / o[0] for o, t in zip(ours, theirs, strict=True))


def _ours(state: State, base: State | None) -> _Coder:
    """Our blob, whether it decodes bit-exact, and our compress and decompress calls."""
    spec = PRESETS["lossless"]
    digest = state_digest(base) if base is not None else None
    blob = encode_state(state, spec, base, base_digest=digest).to_bytes()
    decoded = decode_state(EncodedModel.from_bytes(blob), base, base_digest=digest)
    exact = all(
        torch.equal(decoded[n].view(torch.uint8), t.contiguous().view(torch.uint8))
        for n, t in state.items()
    )
    enc: Call = (
        lambda _: encode_state(state, spec, base, base_digest=digest).to_bytes(),
        lambda: None,
    )
    dec: Call = (
        lambda _: decode_state(EncodedModel.from_bytes(blob), base, base_digest=digest),
        lambda: None,
    )
    return _Coder(blob, exact, enc, dec)


def _zipnn(data: bytes, dtype: torch.dtype) -> _Coder | None:
    """ZipNN's blob, whether it decodes exactly, and its calls (``None``: not installed,
    or a dtype it does not take)."""
    if importlib.util.find_spec("zipnn") is None or dtype not in _ZIPNN_DTYPES:
        return None
    with warnings.catch_warnings():  # zipnn 0.5.4 uses torch.jit.script at import
        warnings.simplefilter("ignore", DeprecationWarning)
        from zipnn import ZipNN

    coder = ZipNN(input_format="byte", bytearray_dtype=_ZIPNN_DTYPES[dtype])
    packed = bytes(coder.compress(bytearray(data)))
    exact = bytes(coder.decompress(packed)) == data
    # compress reorders its input in place: a fresh copy each call, made untimed.
    enc: Call = (coder.compress, lambda: bytearray(data))
    dec: Call = (lambda _: coder.decompress(packed), lambda: None)
    return _Coder(packed, exact, enc, dec)


def _row(
    coder: str,
    raw: int,
    size: int,
    enc: tuple[float, float],
    dec: tuple[float, float],
    exact: bool,
) -> Json:
    """One coder's figures: ``raw`` bytes coded into ``size`` in ``enc`` (wall, CPU)
    seconds, back in ``dec``."""
    return {
        "coder": coder,
        "bytes": size,
        "ratio": raw / size,
        "compress_mb_s": raw / _MB / enc[0],
        "decompress_mb_s": raw / _MB / dec[0],
        "compress_cpu_ms": enc[1] * 1e3,
        "decompress_cpu_ms": dec[1] * 1e3,
        "bit_exact": exact,
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(width)


def _case(name: str, state: State, base: State | None, runs: int) -> Json:
    dtype = next(iter(state.values())).dtype
    if base is None:
        parts = [t.contiguous().view(torch.uint8).reshape(-1) for t in state.values()]
    else:
        parts = [
            (_bits(t) ^ _bits(base[n])).view(torch.uint8).reshape(-1) for n, t in state.items()
        ]
    data = torch.cat(parts).numpy().tobytes()
    raw = len(data)
    coders = [("fedsqueeze", _ours(state, base))]
    theirs = _zipnn(data, dtype)
    if theirs is not None:
        coders.append(("zipnn", theirs))
    enc = _alternated([c.compress for _, c in coders], runs)
    dec = _alternated([c.decompress for _, c in coders], runs)
    rows = [
        _row(label, raw, len(c.blob), _median(enc[i]), _median(dec[i]), c.exact)
        for i, (label, c) in enumerate(coders)
    ]
    rows[0]["version"] = coders[0][1].blob[3]
    if theirs is not None:
        rows[0]["compress_vs_zipnn"] = _per_round(enc[0], enc[1])
        rows[0]["decompress_vs_zipnn"] = _per_round(dec[0], dec[1])
    return {"case": name, "raw_bytes": raw, "rows": rows}


def run_lossless_section(state: State, out: Console, runs: int) -> Json:
    """Measure the four cases on ``state`` (float tensors only) and print one table."""
    floats = {n: t for n, t in state.items() if t.is_floating_point()}
    fp32 = {n: t.to(torch.float32) for n, t in floats.items()}
    bf16 = {n: t.to(torch.bfloat16) for n, t in floats.items()}
    cases = []
    with out.status("lossless: fedsqueeze and ZipNN…"):
        cases.append(_case("fp32", fp32, None, runs))
        cases.append(_case("bf16", bf16, None, runs))
        cases.append(_case("fp32 delta", perturbed(fp32), fp32, runs))
        cases.append(_case("bf16 delta", perturbed(bf16), bf16, runs))
    table = Table(title=f"Lossless, {torch.get_num_threads()} threads (MB/s of raw model)")
    columns = (
        "case", "coder", "bytes", "ratio", "compress MB/s", "decompress MB/s",
        "compress CPU ms", "decompress CPU ms", "exact", "÷ ZipNN (comp / decomp)",
    )  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col in ("case", "coder") else "right")
    for case in cases:
        for r in case["rows"]:
            table.add_row(
                case["case"], r["coder"], f"{r['bytes']:,}", f"{r['ratio']:.4f}×",
                f"{r['compress_mb_s']:,.0f}", f"{r['decompress_mb_s']:,.0f}",
                f"{r['compress_cpu_ms']:,.0f}", f"{r['decompress_cpu_ms']:,.0f}",
                "yes" if r["bit_exact"] else "NO", _versus(r),
            )  # fmt: skip
    out.print(table)
    if not any(len(c["rows"]) > 1 for c in cases):
        out.print("ZipNN: not installed (pip install -e '.[bench]'), ours alone", markup=False)
    return {"cases": cases}


def _versus(row: Json) -> str:
    """Our throughput ÷ ZipNN's, compressing and decompressing (medians of the rounds'
    ratios); blank on ZipNN's own row."""
    if "compress_vs_zipnn" not in row:
        return ""
    return f"{row['compress_vs_zipnn']:.2f} / {row['decompress_vs_zipnn']:.2f}"
