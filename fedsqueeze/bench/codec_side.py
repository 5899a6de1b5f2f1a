"""The big tensor's encode (and decode) timed side by side with the previous paths,
interleaved.

Issue 14's "faster codec" work changes how some specs encode without changing their
bytes: magnitude selection in two passes that write only the kept values
(:mod:`fedsqueeze.codec.threshold_select`), positions Rice-coded in chunks on every core
(:mod:`fedsqueeze.codec.rice_encode`), block-wise parameters chosen inside the
quantization pass (:mod:`fedsqueeze.codec.fused_blocks`). Each spec here is encoded
``runs`` times with the current paths and ``runs`` times with the previous ones, the
two alternating (which goes first alternates too), each call right after a
``clone()`` of the tensor: on a machine shared with other work, both sides then see
the same load. Reported: medians of the per-call ``clone() time / encode time`` in wall
and CPU time (all threads), and the median wall and CPU milliseconds.

The decode of the dense specs whose bodies are literal pieces is timed the same way
against the previous schedule (:func:`decode_writers`): one writer with helpers that
decode pieces, against every worker decoding pieces and writing their values
(``dense_decode.ALL_WRITE``).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fedsqueeze.codec import (
    CodecSpec,
    EncodedModel,
    decode_state,
    dense_decode,
    dense_encode,
    encode_state,
    positions,
    pruning,
)
from fedsqueeze.codec.spec_text import parse_spec

__all__ = [
    "DECODE_SPECS",
    "SIDE_SPECS",
    "all_write",
    "decode_writers",
    "fused_scales",
    "previous_paths",
    "side_by_side",
]

#: Specs whose encode is timed against the previous paths: pruning and top-k with the
#: defaults against :func:`previous_paths`; block-wise specs with the fused block
#: parameters switched on (``dense_encode.FUSED_SCALES``, off by default) against off.
SIDE_SPECS = ("prune90-int4", "topk10-int4", "quant=4:block64", "quant=4:nf4:block64")
#: Specs whose decode (literal pieces) is timed with one writer against every thread
#: writing (:func:`decode_writers`).
DECODE_SPECS = ("int8", "quant=8:channel", "quant=4:block64")
_KEYS = ("vs_clone", "cpu_vs_clone", "wall_ms", "cpu_ms")

Json = dict[str, Any]


@contextlib.contextmanager
def _switched(module: object, name: str, value: object) -> Iterator[None]:
    """``module.name`` set to ``value`` for the block, then restored."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def fused_scales() -> contextlib.AbstractContextManager[None]:
    """Block-wise parameters chosen inside the quantization pass (opt-in)."""
    return _switched(dense_encode, "FUSED_SCALES", True)


@contextlib.contextmanager
def previous_paths() -> Iterator[None]:
    """The encode paths before the two-pass selection, the chunked Rice coder and the
    fused block parameters (the same bytes; stochastic rounding aside)."""
    saved = pruning.TWO_PASS, positions._CHUNKED_ABOVE, dense_encode.FUSED_SCALES
    pruning.TWO_PASS, positions._CHUNKED_ABOVE, dense_encode.FUSED_SCALES = False, 1 << 62, False
    try:
        yield
    finally:
        pruning.TWO_PASS, positions._CHUNKED_ABOVE, dense_encode.FUSED_SCALES = saved


def side_by_side(x: torch.Tensor, runs: int, out: Console) -> list[Json]:
    """Time every spec of :data:`SIDE_SPECS` on ``{"tensor.weight": x}``; print a table
    and return its rows (``spec``, then ``now`` and ``previous``, each with
    ``vs_clone``, ``cpu_vs_clone``, ``wall_ms``, ``cpu_ms``, and ``same_bytes``)."""
    state = {"tensor.weight": x}
    rows: list[Json] = []
    for name in SIDE_SPECS:
        spec = parse_spec(name)
        encode = partial(_encode, state, spec)
        # "now": the new path (for block-wise specs the opt-in fused parameters).
        new_path = fused_scales if spec.quant and spec.quant.block_size else contextlib.nullcontext
        with new_path():
            now_bytes = encode()  # warm-up of both paths, not timed
        with previous_paths():
            before_bytes = encode()
        row: Json = {"spec": name, "same_bytes": now_bytes == before_bytes}
        row |= _interleaved(encode, x, runs, new_path, previous_paths)
        rows.append(row)
    _print(rows, f"encode side by side with the previous paths, interleaved ({runs} each)",
           "enc/clone now", "same_bytes", out)  # fmt: skip
    return rows


def all_write() -> contextlib.AbstractContextManager[None]:
    """The previous schedule: every worker decodes pieces and writes their values."""
    return _switched(dense_decode, "ALL_WRITE", True)


def decode_writers(x: torch.Tensor, runs: int, out: Console) -> list[Json]:
    """Time the decode of every spec of :data:`DECODE_SPECS` with one writer ("now")
    and with every thread writing (:func:`all_write`, "previous"), interleaved as
    :func:`side_by_side` does; print a table and return its rows (``same_values``:
    both decodes equal, bit for bit)."""
    rows: list[Json] = []
    for name in DECODE_SPECS:
        blob = encode_state({"tensor.weight": x}, parse_spec(name)).to_bytes()
        decode = partial(_decode, blob)
        now = decode()["tensor.weight"]  # warm-up of both schedules, not timed
        with all_write():
            before = decode()["tensor.weight"]
        same = torch.equal(now.view(torch.int32), before.view(torch.int32))
        del now, before
        row: Json = {"spec": name, "same_values": same}
        row |= _interleaved(decode, x, runs, contextlib.nullcontext, all_write)
        rows.append(row)
    _print(rows, f"decode: one writer against every thread writing, interleaved ({runs} each)",
           "dec/clone now", "same_values", out)  # fmt: skip
    return rows


def _interleaved(
    fn: Callable[[], object],
    x: torch.Tensor,
    runs: int,
    now: Callable[[], contextlib.AbstractContextManager[None]],
    previous: Callable[[], contextlib.AbstractContextManager[None]],
) -> Json:
    """``fn`` timed ``runs`` times under ``now()`` and under ``previous()``, alternating
    (which goes first alternates too): the medians of :func:`_beside_clone`'s figures."""
    timed: dict[str, list[tuple[float, float, float, float]]] = {"now": [], "previous": []}
    for i in range(runs):
        for which in ("now", "previous") if i % 2 == 0 else ("previous", "now"):
            with (now if which == "now" else previous)():
                timed[which].append(_beside_clone(fn, x))
    return {
        which: {key: statistics.median(s[j] for s in samples) for j, key in enumerate(_KEYS)}
        for which, samples in timed.items()
    }


def _print(rows: list[Json], title: str, first: str, same: str, out: Console) -> None:
    """The rows as a table: ``first`` heads the ratio's column, ``same`` is the rows'
    key saying whether both sides gave the same output."""
    table = Table(title=title)
    for col in ("spec", first, "previous", "CPU/clone now", "previous",
                "wall ms now", "previous", "CPU ms now", "previous",
                same.replace("_", " ")):  # fmt: skip
        table.add_column(col, justify="left" if col == "spec" else "right")
    for row in rows:
        now, prev = row["now"], row["previous"]
        table.add_row(
            str(row["spec"]),
            *(f"{d['vs_clone']:.2f}" for d in (now, prev)),
            *(f"{d['cpu_vs_clone']:.2f}" for d in (now, prev)),
            *(f"{d['wall_ms']:.0f}" for d in (now, prev)),
            *(f"{d['cpu_ms']:.0f}" for d in (now, prev)),
            "yes" if row[same] else "no",
        )
    out.print(table)


def _encode(state: Mapping[str, torch.Tensor], spec: CodecSpec) -> bytes:
    return encode_state(state, spec).to_bytes()


def _decode(blob: bytes) -> dict[str, torch.Tensor]:
    return decode_state(EncodedModel.from_bytes(blob))


def _beside_clone(fn: Callable[[], object], x: torch.Tensor) -> tuple[float, float, float, float]:
    """``clone() / fn`` in wall and CPU time, and ``fn``'s wall and CPU milliseconds."""
    started, cpu = time.perf_counter(), time.process_time()
    copy = x.clone()
    clone_s, clone_cpu = time.perf_counter() - started, time.process_time() - cpu
    del copy
    started, cpu = time.perf_counter(), time.process_time()
    fn()
    wall, used = time.perf_counter() - started, time.process_time() - cpu
    return clone_s / wall, clone_cpu / max(used, 1e-9), wall * 1e3, used * 1e3
