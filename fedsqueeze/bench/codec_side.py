"""The big tensor's encode timed side by side with the previous paths, interleaved.

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

from fedsqueeze.codec import CodecSpec, dense_encode, encode_state, positions, pruning
from fedsqueeze.codec.spec_text import parse_spec

__all__ = ["SIDE_SPECS", "fused_scales", "previous_paths", "side_by_side"]

#: Specs whose encode is timed against the previous paths: pruning and top-k with the
#: defaults against :func:`previous_paths`; block-wise specs with the fused block
#: parameters switched on (``dense_encode.FUSED_SCALES``, off by default) against off.
SIDE_SPECS = ("prune90-int4", "topk10-int4", "quant=4:block64", "quant=4:nf4:block64")

Json = dict[str, Any]


@contextlib.contextmanager
def fused_scales() -> Iterator[None]:
    """Block-wise parameters chosen inside the quantization pass (opt-in)."""
    saved = dense_encode.FUSED_SCALES
    dense_encode.FUSED_SCALES = True
    try:
        yield
    finally:
        dense_encode.FUSED_SCALES = saved


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
    ``enc_vs_clone``, ``cpu_vs_clone``, ``wall_ms``, ``cpu_ms``, and ``same_bytes``)."""
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
        timed: dict[str, list[tuple[float, float, float, float]]] = {"now": [], "previous": []}
        for i in range(runs):
            order = ("now", "previous") if i % 2 == 0 else ("previous", "now")
            for which in order:
                ctx = previous_paths() if which == "previous" else new_path()
                with ctx:
                    timed[which].append(_beside_clone(encode, x))
        row: Json = {"spec": name, "same_bytes": now_bytes == before_bytes}
        for which, samples in timed.items():
            row[which] = {
                key: statistics.median(s[j] for s in samples)
                for j, key in enumerate(("enc_vs_clone", "cpu_vs_clone", "wall_ms", "cpu_ms"))
            }
        rows.append(row)
    table = Table(title=f"encode side by side with the previous paths, interleaved ({runs} each)")
    for col in ("spec", "enc/clone now", "previous", "CPU/clone now", "previous",
                "wall ms now", "previous", "CPU ms now", "previous", "same bytes"):  # fmt: skip
        table.add_column(col, justify="left" if col == "spec" else "right")
    for row in rows:
        now, prev = row["now"], row["previous"]
        table.add_row(
            str(row["spec"]),
            *(f"{d['enc_vs_clone']:.2f}" for d in (now, prev)),
            *(f"{d['cpu_vs_clone']:.2f}" for d in (now, prev)),
            *(f"{d['wall_ms']:.0f}" for d in (now, prev)),
            *(f"{d['cpu_ms']:.0f}" for d in (now, prev)),
            "yes" if row["same_bytes"] else "no",
        )
    out.print(table)
    return rows


def _encode(state: Mapping[str, torch.Tensor], spec: CodecSpec) -> bytes:
    return encode_state(state, spec).to_bytes()


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
