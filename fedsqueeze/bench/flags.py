"""The flags of each ``fedsqueeze bench`` benchmark, kept apart from the benchmarks.

``fedsqueeze bench transport --help`` needs the flags and the benchmark's docstring, not
torch or grpc: both come from here (the docstring read from the module's source without
importing it), and the benchmark module itself is imported only to run it. Each
benchmark module re-exports its ``add_arguments`` from here.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
from pathlib import Path

from fedsqueeze.errors import ConfigError

__all__ = [
    "add_codec_arguments",
    "add_simulate_arguments",
    "add_transport_arguments",
    "check_transport_flags",
    "module_docstring",
]


def add_codec_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``bench codec``'s flags."""
    parser.add_argument("--seeds", type=int, default=3, help="recipe seeds (default 3)")
    parser.add_argument(
        "--quick", action="store_true", help="short schedule, 1 seed, 2 runs (smoke test)"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    parser.add_argument("--skip-minilm", action="store_true", help="leave out the MiniLM part")
    parser.add_argument(
        "--tensor-mb", type=float, default=100.0, help="size of the timed tensor (default 100)"
    )
    parser.add_argument("--runs", type=int, default=5, help="timing runs per figure (default 5)")
    parser.add_argument(
        "--blockwise-only",
        action="store_true",
        help="only the block-wise/NF4 section on MiniLM (per-tensor errors, bytes/param)",
    )
    parser.add_argument(
        "--tensor-only",
        action="store_true",
        help="only the big-tensor section: encode/decode throughput of each spec on one "
        "random fp32 tensor of --tensor-mb MB, beside clone() and plain zstd",
    )
    parser.add_argument(
        "--lossless-only",
        action="store_true",
        help="only the lossless section: fedsqueeze beside ZipNN on MiniLM in fp32 and bf16, "
        "full models and deltas (ratio, compress/decompress MB/s)",
    )


def add_progressive_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fedsqueeze bench progressive``."""
    parser.add_argument(
        "--skip-minilm", action="store_true", help="leave out the all-MiniLM-L6-v2 part"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")


def _client_counts(text: str) -> list[int]:
    try:
        return [int(v.replace("_", "")) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 100,1000, got {text!r}") from None


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``bench simulate``'s flags."""
    parser.add_argument(
        "--clients",
        type=_client_counts,
        default=[100, 1000, 10000],
        metavar="N,N,...",
        help="numbers of virtual clients (default 100,1000,10000)",
    )
    parser.add_argument(
        "--arms",
        default="flower,fedavg-fp32,adaptive",
        help="what to run: flower (plain Flower app), fedavg-fp32, adaptive (default: all)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs of each (default 2)")
    parser.add_argument(
        "--config",
        default="scale",
        metavar="FILE|NAME",
        help="experiment TOML, or a name in simulations/configs/ (default: scale)",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key for every run (repeatable)",
    )
    parser.add_argument(
        "--timeout-s", type=float, default=900.0, help="limit per simulation (default 900)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="20 clients, 2 rounds of 2, 1 epoch, once (smoke test)"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")


def add_transport_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``bench transport``'s flags."""
    parser.add_argument(
        "--payload-mb",
        type=float,
        default=64.0,
        help="size of the streamed model in MB (default 64)",
    )
    parser.add_argument(
        "--chunk-kib",
        type=int,
        default=1024,
        help="segment and bare chunk size in KiB (default 1024)",
    )
    parser.add_argument("--runs", type=int, default=5, help="timed runs per stream (default 5)")
    parser.add_argument(
        "--clients", type=int, default=100, help="concurrent clients of the fan-out (default 100)"
    )
    parser.add_argument(
        "--fanout-mb", type=float, default=2.0, help="size of the fan-out model in MB (default 2)"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")


def check_transport_flags(args: argparse.Namespace) -> None:
    """Refuse values the transport benchmark cannot use, naming the flag.

    Raises
    ------
    ConfigError
        A size that is not positive, fewer than one run or client, chunks under 1 KiB.
    """
    for flag, value in (("--payload-mb", args.payload_mb), ("--fanout-mb", args.fanout_mb)):
        if not value > 0:  # also refuses nan
            raise ConfigError(f"{flag} must be > 0, got {value}")
    for flag, value, least in (
        ("--runs", args.runs, 1),
        ("--clients", args.clients, 1),
        ("--chunk-kib", args.chunk_kib, 1),
    ):
        if value < least:
            raise ConfigError(f"{flag} must be >= {least}, got {value}")


def module_docstring(module_name: str) -> str | None:
    """A module's docstring, read from its source file without importing the module."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        return None
    source = Path(spec.origin).read_text(encoding="utf-8")
    return ast.get_docstring(ast.parse(source), clean=False)
