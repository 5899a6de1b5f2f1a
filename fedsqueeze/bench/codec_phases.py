"""Where the time of a dense spec goes on the big tensor: its stages timed one by one.

Part of ``fedsqueeze bench codec``'s tensor section. Each stage is called on its own,
in the order the codec runs it, and timed in wall and CPU time (all threads; medians of
the runs):

  encode  range (the finiteness check's min/max, reused as the quantizer's range per
          tensor), choose (parameters; per-block ranges), quantize, pack, zstd, the
          rest of ``encode_state(...).to_bytes()`` (headers, copies, CRC; computed as if
          the stages ran in turn), and the pipelined path that replaces quantize, pack
          and zstd for large records (``dense_encode``: zstd fed each chunk of codes as
          the workers make it)
  decode  parse (CRC and headers), then the sequential stages (zstd, unpack,
          dequantize) and the pipelined path that replaces them for large records
          (``dense_decode``: zstd on the calling thread, the codes dequantized on the
          workers as they arrive)

and the stages of a sparse spec (:func:`sparse_phase_table`: top-k, unstructured
pruning), beside two references timed in the same table:

  encode  clone() (the ratios' reference), a fresh write of the tensor's size on one
          thread (what a residual or an output costs before any work), the first pass
          (the finiteness check, the sample, the band and the counts), the second pass
          (the kept values selected and quantized), the same with error feedback's
          residual (``x`` less what the receiver decodes: a fresh tensor of ``x``'s
          size), the kept positions' coding, the rest of
          ``encode_state(...).to_bytes()``, and that call whole

The stage sums differ from the whole call's time by what the stages share (threads
warming up, caches); nothing here asserts a time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fedsqueeze.codec import (
    EncodedModel,
    decode_state,
    dense_encode,
    encode_state,
    entropy,
    literal_frames,
    pruning,
)
from fedsqueeze.codec.bitpack import pack_bits, unpack_bits
from fedsqueeze.codec.blockwise import num_blocks
from fedsqueeze.codec.dense_decode import decode_dense
from fedsqueeze.codec.digest import tensor_bytes
from fedsqueeze.codec.kernels import value_range
from fedsqueeze.codec.positions import encode_positions
from fedsqueeze.codec.pruning import count_to_prune, prepare_selection
from fedsqueeze.codec.quantization import Runs, choose_qparams, dequantize, quantize
from fedsqueeze.codec.select_quantize import select_quantized
from fedsqueeze.codec.spec import CodecSpec, Granularity
from fedsqueeze.codec.tensor_encode import selection_sparsity

__all__ = ["phase_table", "sparse_phase_table"]

Json = dict[str, Any]


def phase_table(name: str, spec: CodecSpec, x: torch.Tensor, runs: int, out: Console) -> Json:
    """Time the stages of dense spec ``spec`` on tensor ``x``; print and return them
    (``{"spec", "encode": {stage: {"wall_ms", "cpu_ms"}}, "decode": {...}}``)."""
    q = spec.quant
    if q is None or spec.prune.active or spec.topk is not None:
        raise ValueError(f"{name}: phases are timed for dense quantization specs only")
    flat = x.reshape(-1)
    n = flat.numel()
    channels: Runs | None = None
    sets = 1
    if q.granularity is Granularity.PER_BLOCK and q.block_size is not None:
        channels, sets = Runs(q.block_size), num_blocks(n, q.block_size)
    elif q.granularity is Granularity.PER_CHANNEL:
        channels, sets = Runs(max(1, n // x.shape[0])), x.shape[0]
    per_tensor = q.granularity is Granularity.PER_TENSOR
    level = spec.entropy_level
    state = {"tensor.weight": x}

    known = value_range(flat, None)
    qp = choose_qparams(
        flat, q.bits, q.scheme, q.granularity, channels, sets, q.scales,
        known_range=known if per_tensor else None,
    )  # fmt: skip
    codes = quantize(flat, qp, q.rounding, channels)
    packed = pack_bits(codes, q.bits)
    body = tensor_bytes(packed)
    compressed = entropy.compress(body, level)
    blob = encode_state(state, spec).to_bytes()

    def choose() -> object:
        return choose_qparams(
            flat, q.bits, q.scheme, q.granularity, channels, sets, q.scales,
            known_range=known if per_tensor else None,
        )  # fmt: skip

    encode: dict[str, Callable[[], object]] = {
        "range": lambda: value_range(flat, None),
        "choose": choose,
        "quantize": lambda: quantize(flat, qp, q.rounding, channels),
        "pack": lambda: pack_bits(codes, q.bits),
        "zstd": lambda: entropy.compress(body, level),
    }
    enc = {stage: _time(fn, runs) for stage, fn in encode.items()}
    enc_total = _time(lambda: encode_state(state, spec).to_bytes(), runs)
    enc["rest"] = _rest(enc_total, enc.values())
    if level > 0 and dense_encode.pipelines(flat, qp, q.rounding, channels):
        enc["pipelined (replaces the 3 above)"] = _time(
            lambda: dense_encode.encode_dense(flat, qp, channels, level), runs
        )
    enc["encode total"] = enc_total

    dec: dict[str, dict[str, float]] = {"parse": _time(lambda: EncodedModel.from_bytes(blob), runs)}
    raw = bytes(body)
    if compressed is not None:
        dec["zstd"] = _time(lambda: entropy.decompress(compressed, len(raw)), runs)
    held = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    dec["unpack"] = _time(lambda: unpack_bits(held, q.bits, n), runs)
    dec["dequantize"] = _time(lambda: dequantize(codes, qp, channels), runs)
    if compressed is not None:
        dec["pipelined (replaces the 3 above)"] = _time(
            lambda: decode_dense(compressed, len(raw), n, qp, channels), runs
        )
    dec["decode total"] = _time(lambda: decode_state(EncodedModel.from_bytes(blob)), runs)

    table = Table(title=f"{name}: stages on the {n * 4 / 1e6:.0f} MB tensor (ms, medians)")
    for col in ("stage", "encode wall", "encode CPU", "stage ", "decode wall", "decode CPU"):
        table.add_column(col.strip(), justify="left" if col.startswith("stage") else "right")
    rows_e, rows_d = list(enc.items()), list(dec.items())
    for i in range(max(len(rows_e), len(rows_d))):
        cells: list[str] = []
        for rows in (rows_e, rows_d):
            if i < len(rows):
                stage, t = rows[i]
                cells += [stage, f"{t['wall_ms']:.1f}", f"{t['cpu_ms']:.1f}"]
            else:
                cells += ["", "", ""]
        table.add_row(*cells)
    out.print(table)
    return {"spec": name, "encode": enc, "decode": dec}


def sparse_phase_table(
    name: str, spec: CodecSpec, x: torch.Tensor, runs: int, out: Console
) -> Json:
    """Time the stages of sparse spec ``spec`` (top-k or unstructured magnitude pruning,
    per-tensor linear codes) on float32 tensor ``x``; print and return them (``{"spec",
    "encode": {stage: {"wall_ms", "cpu_ms"}}, "body": {part: {"raw", "coded"}}}``: the
    record's positions and codes, bytes before and after zstd's literal-only coding,
    ``coded`` ``None`` where it is not smaller), or print why not and return ``{"spec",
    "skipped": why}`` where the encode takes other paths (a tensor too small for the
    two-pass selection, or one whose kept values' range the first pass does not give)."""
    sparsity = selection_sparsity(spec)
    q = spec.quant
    if sparsity is None or q is None:
        raise ValueError(f"{name}: sparse phases are timed for top-k or l1 pruning with codes")
    flat = x.detach().reshape(-1).contiguous()
    n = flat.numel()
    prune = count_to_prune(n, sparsity)
    first = prepare_selection(flat, sparsity)
    picked = None
    if first is not None:
        picked = select_quantized(flat, prune, first, q, torch.Generator().manual_seed(0), False)
    if first is None or picked is None:
        least = pruning._SAMPLE_ABOVE  # the two-pass selection's threshold
        why = (
            f"{n:,} values: the selection takes two passes above {least:,} "
            f"({least * 4 / 1e6:.2f} MB)"
            if first is None
            else "the quantizer does not run in the selection's second pass for these values"
        )
        out.print(f"{name}: stages not timed on this tensor ({why})", markup=False)
        return {"spec": name, "skipped": why}
    state = {"tensor.weight": x}

    def second(residual: bool) -> object:
        gen = torch.Generator().manual_seed(0)
        return select_quantized(flat, prune, first, q, gen, residual)

    def fresh_write() -> object:
        copy = np.empty(n, dtype=np.float32)
        np.copyto(copy, flat.numpy())
        return copy

    enc: dict[str, dict[str, float]] = {
        "clone() (reference)": _time(flat.clone, runs),
        "fresh write, one thread (reference)": _time(fresh_write, runs),
        "first pass (check, sample, band)": _time(lambda: prepare_selection(flat, sparsity), runs),
        "second pass (select, quantize)": _time(lambda: second(False), runs),
    }
    # The second pass the encode runs: with error feedback's residual, where it has one.
    ran = "second pass (select, quantize)"
    if spec.feedback:
        ran = "second pass with the residual"
        enc[ran] = _time(lambda: second(True), runs)
    enc["positions"] = _time(lambda: encode_positions(picked.indices, n), runs)
    total = _time(lambda: encode_state(state, spec).to_bytes(), runs)
    done = ("first pass (check, sample, band)", ran, "positions")
    enc["rest"] = _rest(total, [enc[stage] for stage in done])
    enc["encode total"] = total
    clone_ms = enc["clone() (reference)"]["wall_ms"]

    table = Table(title=f"{name}: stages on the {n * 4 / 1e6:.0f} MB tensor (ms, medians)")
    for col in ("stage", "wall", "CPU", "wall ÷ clone()"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage, t in enc.items():
        table.add_row(
            stage, f"{t['wall_ms']:.1f}", f"{t['cpu_ms']:.1f}", f"{t['wall_ms'] / clone_ms:.2f}"
        )
    out.print(table)
    payloads = {
        "positions": bytes(encode_positions(picked.indices, n).payload.numpy()),
        "codes": bytes(pack_bits(picked.codes, q.bits).numpy()),
    }
    body: Json = {}
    for part, raw in payloads.items():
        coded = literal_frames.compress_spliced(raw)
        body[part] = {"raw": len(raw), "coded": None if coded is None else len(coded)}
        after = "not smaller" if coded is None else f"{len(coded):,} B"
        out.print(f"{name}: the record's {part}: {len(raw):,} B, after zstd's literal coding "
                  f"{after}", markup=False)  # fmt: skip
    return {"spec": name, "encode": enc, "body": body}


def _time(fn: Callable[[], object], runs: int) -> dict[str, float]:
    fn()  # warm-up, not timed
    walls, cpus = [], []
    for _ in range(runs):
        started, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - cpu)
        del result
    return {"wall_ms": statistics.median(walls) * 1e3, "cpu_ms": statistics.median(cpus) * 1e3}


def _rest(total: dict[str, float], parts: Any) -> dict[str, float]:
    parts = list(parts)
    return {key: max(0.0, total[key] - sum(p[key] for p in parts)) for key in ("wall_ms", "cpu_ms")}
