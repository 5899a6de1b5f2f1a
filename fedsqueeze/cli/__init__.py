"""The ``fedsqueeze`` command: a thin layer over the programmatic API.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``main(args) -> int``. User errors (a :class:`~fedsqueeze.errors.FedsqueezeError`, a
missing file) end with a one-line message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from fedsqueeze import __version__
from fedsqueeze.errors import FedsqueezeError

# name → (module, one-line help); modules are imported lazily so `--help` stays fast.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "simulate": (
        "fedsqueeze.cli.simulate_cmd",
        "run one federated configuration on Flower's simulation engine",
    ),
    "sweep": (
        "fedsqueeze.cli.sweep_cmd",
        "run several strategies side by side: results.csv, summary, plots (`make demo` runs this)",
    ),
    "codec": ("fedsqueeze.cli.codec_cmd", "encode, decode and inspect model files"),
    "coordinator": (
        "fedsqueeze.cli.coordinator_cmd",
        "run the coordinator on Flower's Deployment Engine (SuperLink + run)",
    ),
    "edge": ("fedsqueeze.cli.edge_cmd", "run an edge: a Flower SuperNode with the edge ClientApp"),
    "bench": ("fedsqueeze.cli.bench_cmd", "benchmarks: codec, transport"),
    "distill": (
        "fedsqueeze.cli.distill_cmd",
        "distil a saved model into the task's smaller student (optionally compressed)",
    ),
    "demo": (
        "fedsqueeze.cli.demo_cmd",
        "compress the digits CNN with Deep Compression and show where the bytes went",
    ),
}

EXIT_USER_ERROR = 2


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser.

    Only ``command``'s module is imported and asked for its arguments: the others are
    listed by name and help line, so ``fedsqueeze edge`` does not pay for importing
    torch-heavy modules it never uses.
    """
    parser = argparse.ArgumentParser(
        prog="fedsqueeze",
        description=(
            "fedsqueeze makes federated learning cheap on the wire: it prunes, quantizes, "
            "delta- and entropy-codes models and updates, and streams them over a "
            "resumable, verified gRPC data plane beside Flower."
        ),
    )
    parser.add_argument("--version", action="version", version=f"fedsqueeze {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v INFO, -vv DEBUG)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=module.__doc__)
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        module.add_arguments(p)
        p.set_defaults(_handler=module.main)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is one)."""
    return next((a for a in argv if a in SUBCOMMANDS), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_of(args_list))
    args = parser.parse_args(args_list)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "_handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return handler(args)
    except (FedsqueezeError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever the library said
        print(f"fedsqueeze {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"fedsqueeze {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
