"""Benchmarks that print figures and ratios measured side by side in one run.

    fedsqueeze bench codec        compression ratios, errors and throughput vs clone()/zstd
    fedsqueeze bench transport    segment streaming vs a bare gRPC stream, resume, fan-out,
                                  and vs Flower's own transfer on the Deployment Engine
    fedsqueeze bench progressive  progressive level designs and prefix curves
    fedsqueeze bench simulate     a plain Flower app beside the sweep's arms, 100 to 10,000 clients
    fedsqueeze bench bigmodel     model files of 25M to 1B parameters coded in bounded memory

Results go to stdout as tables (and as JSON with --json). No benchmark asserts a time:
the machines are shared, so the numbers are for BENCHMARKS.md, not for pass/fail.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

from fedsqueeze.bench.flags import (
    add_bigmodel_arguments,
    add_codec_arguments,
    add_progressive_arguments,
    add_simulate_arguments,
    add_transport_arguments,
    module_docstring,
)

# name → (module, help line, its flags). The module (torch, grpc) is imported only to run
# the benchmark: `fedsqueeze bench transport --help` reads its flags and docstring alone.
BENCHES: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None]]] = {
    "codec": ("fedsqueeze.bench.codec", "codec ratios, errors and throughput", add_codec_arguments),
    "transport": (
        "fedsqueeze.bench.transport",
        "data-plane throughput, resume, fan-out, and against Flower's own transfer",
        add_transport_arguments,
    ),
    "progressive": (
        "fedsqueeze.bench.progressive",
        "progressive levels: designs side by side, prefix curves",
        add_progressive_arguments,
    ),
    "simulate": (
        "fedsqueeze.bench.simulate",
        "simulation cost: a plain Flower app beside the sweep's arms",
        add_simulate_arguments,
    ),
    "bigmodel": (
        "fedsqueeze.bench.bigmodel",
        "large model files in bounded memory: peak memory and throughput against clone()",
        add_bigmodel_arguments,
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register one sub-parser per benchmark."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="bench_name", metavar="BENCH", required=True)
    for name, (module_name, help_text, add_flags) in BENCHES.items():
        p = sub.add_parser(name, help=help_text, description=module_docstring(module_name))
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        add_flags(p)
        p.set_defaults(_bench_module=module_name)


def main(args: argparse.Namespace) -> int:
    """Run the chosen benchmark."""
    module = importlib.import_module(args._bench_module)
    result: int = module.main(args)
    return result
