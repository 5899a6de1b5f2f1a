"""Encode, decode and inspect model files with the fedsqueeze codec.

Examples::

    fedsqueeze codec encode model.pt model.fsq --spec prune=global:0.9,quant=4
    fedsqueeze codec encode new.pt delta.fsq --base old.pt --spec int8
    fedsqueeze codec decode model.fsq restored.pt
    fedsqueeze codec inspect model.fsq --original model.pt

Specs are a preset name (see --list-presets) or comma-separated key=value pairs:
prune=none|l1:S|global:S|channel:S|threshold:T, topk=F, rank=R (low-rank factors of
matrices, for updates), quant=none|BITS[:affine|
symmetric|pow2|kmeans][:tensor|channel][:nearest|stochastic], float=fp32|fp16|bf16,
entropy=LEVEL (0 off), targets=PATTERN|PATTERN, min-ndim=N.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fedsqueeze.cli.console import make_console
from fedsqueeze.codec import PRESETS, EncodedModel, decode_state, encode_state
from fedsqueeze.codec.inspect import describe
from fedsqueeze.codec.spec_text import format_spec, parse_spec
from fedsqueeze.statefile import load_state, save_state, write_atomic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``encode``, ``decode`` and ``inspect``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="codec_command", metavar="ACTION", required=True)
    enc = sub.add_parser("encode", help="compress a state_dict (.pt) or .safetensors file")
    enc.add_argument("input", type=Path, help="PyTorch state_dict file or .safetensors file")
    enc.add_argument("output", type=Path, help="where to write the encoded model (.fsq)")
    enc.add_argument(
        "--spec", default="lossless", help="preset name or key=value list (default: lossless)"
    )
    enc.add_argument("--base", type=Path, help="encode as a delta against this model file")
    enc.add_argument("--seed", type=int, default=0, help="seed for stochastic rounding")
    enc.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    dec = sub.add_parser("decode", help="decompress an .fsq file into a state_dict file")
    dec.add_argument("input", type=Path, help="encoded model (.fsq)")
    dec.add_argument("output", type=Path, help=".pt or .safetensors file to write")
    dec.add_argument("--base", type=Path, help="the base model, for a delta")
    ins = sub.add_parser("inspect", help="per-tensor table of stages, sizes and errors")
    ins.add_argument("input", type=Path, help="encoded model (.fsq)")
    ins.add_argument("--original", type=Path, help="the uncompressed model, for max error")
    ins.add_argument("--base", type=Path, help="the base model, for a delta")


def main(args: argparse.Namespace) -> int:
    """Run one codec action."""
    console = make_console()
    if args.codec_command == "encode":
        if args.list_presets:
            for name, spec in PRESETS.items():
                console.print(f"[bold]{name}[/bold]: {format_spec(spec)}")
            return 0
        spec = parse_spec(args.spec)
        state = load_state(args.input)
        base = load_state(args.base) if args.base else None
        encoded = encode_state(state, spec, base, seed=args.seed)
        data = encoded.to_bytes()
        write_atomic(args.output, data)
        raw = sum(t.numel() * t.element_size() for t in state.values())
        console.print(
            f"{args.input} → {args.output}: {raw:,} → {len(data):,} bytes "
            f"({raw / max(1, len(data)):.1f}× smaller), spec {format_spec(spec)}"
        )
        return 0
    encoded = EncodedModel.from_bytes(Path(args.input).read_bytes())
    base = load_state(args.base) if args.base else None
    if args.codec_command == "decode":
        state = decode_state(encoded, base)
        save_state(state, args.output)
        console.print(f"{args.input} → {args.output}: {len(state)} tensors")
        return 0
    original = load_state(args.original) if args.original else None
    decoded = decode_state(encoded, base) if (original is not None) else None
    _print_inspect(console, encoded, base, original, decoded)
    return 0


def _print_inspect(
    console: Console,
    encoded: EncodedModel,
    base: dict[str, torch.Tensor] | None,
    original: dict[str, torch.Tensor] | None,
    decoded: dict[str, torch.Tensor] | None,
) -> None:
    rows = describe(encoded, base)
    table = Table(title=f"{len(rows)} tensors · spec {format_spec(encoded.spec)}")
    for col in ("tensor", "shape", "stages", "bytes before", "bytes after", "ratio", "max error"):
        table.add_column(col, justify="right" if col.startswith(("bytes", "ratio")) else "left")
    for row in rows:
        err = "n/a (pass --original)"
        if original is not None and decoded is not None and row.name in original:
            diff = decoded[row.name].double() - original[row.name].double()
            err = f"{diff.abs().max().item():.3g}" if diff.numel() else "0"
        table.add_row(
            row.name,
            "×".join(map(str, row.shape)) or "scalar",
            row.stages,
            f"{row.raw_bytes:,}",
            f"{row.encoded_bytes:,}",
            f"{row.raw_bytes / max(1, row.encoded_bytes):.1f}×",
            err,
        )
    console.print(table)
    total_raw = sum(r.raw_bytes for r in rows)
    total = encoded.nbytes
    console.print(
        f"total: {total_raw:,} → {total:,} bytes ({total_raw / max(1, total):.1f}×); "
        f"headers and metadata {total - sum(r.payload_bytes for r in rows):,} bytes"
    )
