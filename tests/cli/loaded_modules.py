"""Run the ``fedsqueeze`` command line, then report which heavy libraries it imported.

Usage: python -m tests.cli.loaded_modules ARGS...

The command's own output comes first; the last line of stdout is ``LOADED: a,b,...``
(the heavy top-level packages found in ``sys.modules``, empty when none was).
"""

from __future__ import annotations

import sys

from fedsqueeze.cli import main

HEAVY = (
    "torch",
    "flwr",
    "ray",
    "grpc",
    "sklearn",
    "matplotlib",
    "numpy",
    "zstandard",
    "transformers",
    "peft",
)


def run(argv: list[str]) -> int:
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's --help
        status = exc.code if isinstance(exc.code, int) else 0
    loaded = [name for name in HEAVY if name in sys.modules]
    print(f"LOADED: {','.join(loaded)}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
