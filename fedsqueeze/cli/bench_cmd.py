"""Benchmarks that print figures and ratios measured side by side in one run.

    fedsqueeze bench codec        compression ratios, errors and throughput vs clone()/zstd
    fedsqueeze bench transport    segment streaming vs a bare gRPC stream, resume, fan-out

Results go to stdout as tables (and as JSON with --json). No benchmark asserts a time:
the machines are shared, so the numbers are for BENCHMARKS.md, not for pass/fail.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "codec": ("fedsqueeze.bench.codec", "codec ratios, errors and throughput"),
    "transport": ("fedsqueeze.bench.transport", "data-plane throughput, resume and fan-out"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register one sub-parser per benchmark (imported when run)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="bench_name", metavar="BENCH", required=True)
    for name, (module_name, help_text) in BENCHES.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=module.__doc__)
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        module.add_arguments(p)
        p.set_defaults(_bench_main=module.main)


def main(args: argparse.Namespace) -> int:
    """Run the chosen benchmark."""
    result: int = args._bench_main(args)
    return result
