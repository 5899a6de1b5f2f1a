"""Run `fedsqueeze simulate` or `fedsqueeze sweep` in this process (for subprocess tests).

Usage: python -m tests.simulations.cli_run {simulate|sweep} [flags...]

The commands' own modules are driven through a parser of their own, so the tests do not
depend on how the top-level command registers them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from tests.subproc import arm_watchdog

arm_watchdog()


def main(argv: list[str]) -> int:
    warnings.simplefilter("ignore")
    level = logging.INFO if "-v" in argv else logging.WARNING
    logging.basicConfig(level=level, format="%(relativeCreated)7.0f %(name)s: %(message)s")
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(f"fedsqueeze.cli.{name}_cmd")
    parser = argparse.ArgumentParser(prog=f"fedsqueeze {name}")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(module.main(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
