"""``python -m tests.deploy.cli_shim``: the ``fedsqueeze`` command with the deployment
subcommands registered, for as long as ``fedsqueeze.cli.SUBCOMMANDS`` lacks them."""

from __future__ import annotations

import sys

from fedsqueeze.cli import SUBCOMMANDS, main

SUBCOMMANDS.setdefault(
    "coordinator", ("fedsqueeze.cli.coordinator_cmd", "run a federation's coordinator")
)
SUBCOMMANDS.setdefault("edge", ("fedsqueeze.cli.edge_cmd", "run one edge of a federation"))

if __name__ == "__main__":
    sys.exit(main())
