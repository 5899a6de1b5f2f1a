"""Run one strategy of an experiment on Flower's simulation engine.

The experiment (task, clients, Dirichlet or IID partitions, link profiles, deadline,
budgets) comes from a TOML file in simulations/configs/ or your own; --set overrides any
key. Model bytes travel over fedsqueeze's gRPC data plane on loopback and are counted
on the wire; time is counted on a simulated clock from each client's link. Nothing
sleeps unless you ask: with --set realtime=true the fedsqueeze data plane's transfers
(fetch and push) really wait for each client's link (one RTT per call, the bandwidth
held by a token bucket), so the run gets as slow as the links say; the simulated clock
and the figures stay the same. Flower's own messages, and so plain Flower arms such as
fedavg-fp32, are never slowed.

Writes results.csv, clients.csv, summary.json, summary.md, run.json, two PNG plots and
state/ (the coordinator's state) into the output folder and prints the arm's accuracy,
bytes and time. Ratios and the time to a target accuracy need the baseline arm beside
it: to compare strategies, use `fedsqueeze sweep`.

examples:
  fedsqueeze simulate --arm adaptive
  fedsqueeze simulate --config simulations/configs/default.toml --arm int8 --set num-rounds=5
  fedsqueeze simulate --config smoke --set links=2g --set deadline-s=30
  fedsqueeze simulate --config smoke --set links=4g --set realtime=true
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from fedsqueeze.errors import ConfigError

if TYPE_CHECKING:
    from simulations.config import SimulationConfig
    from simulations.runner import SweepOutcome

__all__ = [
    "add_arguments",
    "add_config_arguments",
    "load_from_args",
    "main",
    "quiet_engines",
    "run_line",
]

_MIN_WIDTH = 150  # tables stay readable in logs and pipes


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, --set, --out and --no-plots (shared with `fedsqueeze sweep`)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "environment:\n"
        "  RAY_ADDRESS=host:port  run the clients on that running Ray cluster (say, one\n"
        "                         started by `ray start --head`) instead of starting a\n"
        "                         Ray node for each run; the cluster's CPUs and GPUs apply"
    )
    parser.add_argument(
        "--config",
        default="default",
        metavar="FILE|NAME",
        help="experiment TOML file, or the name of one in simulations/configs/ (default: default)",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable): num-rounds=5, links=4g, "
        "arm.adaptive.down-budget=3000",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default simulations/outputs/NAME)"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the simulate command's flags."""
    add_config_arguments(parser)
    parser.add_argument(
        "--arm",
        default=None,
        metavar="NAME",
        help="which strategy of the config to run (default: its last, the fedsqueeze one "
        "in the shipped configs)",
    )


def resolve_config_path(text: str) -> Path:
    """A file path, or a name in simulations/configs/."""
    import simulations

    configs = Path(simulations.__file__).parent / "configs"
    path = Path(text)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"no config file {path}")
        return path
    named = configs / f"{text}.toml"
    if not named.is_file():
        known = ", ".join(sorted(p.stem for p in configs.glob("*.toml")))
        raise ConfigError(f"no config {text!r}: give a .toml file or one of: {known}")
    return named


def load_from_args(args: argparse.Namespace) -> SimulationConfig:
    """The :class:`simulations.config.SimulationConfig` the flags describe."""
    from simulations.config import load_config

    config = load_config(resolve_config_path(args.config), args.sets)
    if args.out is not None:
        config = replace(config, output_dir=str(args.out))
    return config


def quiet_engines(verbose: bool) -> None:
    """Keep Flower's, Ray's and gRPC's start-up chatter out of the terminal."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import flwr.common.logger  # noqa: F401  (configures Flower's logger; we override it)

    flower = logging.getLogger("flwr")
    flower.setLevel(logging.INFO if verbose else logging.ERROR)
    flower.propagate = False


def console() -> Console:
    """stdout, with a usable width when it is not a terminal."""
    return Console(width=None if sys.stdout.isatty() else _MIN_WIDTH)


def main(args: argparse.Namespace) -> int:
    """Run one arm; returns 0."""
    from simulations.report import SweepProgress, make_progress, summary_table
    from simulations.runner import run_sweep

    config = load_from_args(args)
    arm = config.arm(args.arm) if args.arm else config.arms[-1]
    config = replace(config, arms=(arm,))
    quiet_engines(getattr(args, "verbose", 0) > 0)
    out = console()
    with make_progress(out) as progress:
        tracker = SweepProgress(progress, config)
        outcome = run_sweep(config, progress=tracker.update, plots=not args.no_plots)
    out.print(summary_table(outcome.summary, outcome.out_dir))
    out.print(run_line(outcome, config.realtime))
    return 0


def run_line(outcome: SweepOutcome, realtime: bool = False) -> str:
    """Wall time and peak memory of a run, in one line."""
    line = f"{outcome.wall_s:.0f} s wall time"
    if realtime:
        line += " (realtime: the fedsqueeze data plane waited for the links)"
    if outcome.peak_memory and outcome.peak_process_memory:
        line += (
            f", peak memory {outcome.peak_memory / 2**30:.2f} GiB in all processes "
            f"(largest {outcome.peak_process_memory / 2**30:.2f} GiB)"
        )
    return line
