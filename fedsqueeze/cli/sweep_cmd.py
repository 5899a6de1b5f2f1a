"""Compare strategies side by side on the same seed, partitions, sampling and links.

Runs every arm of an experiment, one after the other on one Flower simulation: by default
plain Flower FedAvg with fp32 weights (no fedsqueeze code in the loop), fp16, int8, top-k
with error feedback, and fedsqueeze's adaptive budget policy, on 20 digits clients with
Dirichlet(0.5) partitions and mixed link profiles. Every ratio is against the FedAvg fp32
baseline; the target accuracy is its final accuracy minus one point.

Writes results.csv (per round and arm), clients.csv (per client and round), summary.json,
summary.md, run.json, accuracy_vs_mb.png, accuracy_vs_time.png and state/ (each
fedsqueeze arm's coordinator state) into the output folder, and prints the summary
table. With several
--seeds, each seed gets its own folder and medians.json / medians.md sum them up.

Nothing sleeps by default: times are on a simulated clock. --set realtime=true makes the
fedsqueeze arms' data-plane transfers really wait for each client's link (results.csv's
round_wall_s shows it); Flower's own messages, and so the fedavg-fp32 baseline, are
never slowed, and the simulated figures stay the same.

On a GPU machine, --set client-gpus=0.25 trains each client on a quarter of a GPU (Ray's
num_gpus per client actor) and --set coordinator-device=cuda decodes and merges the
updates there; both need CUDA (refused with a one-line error without it).

examples:
  fedsqueeze sweep                                  # the default sweep (make demo)
  fedsqueeze sweep --seeds 0,1,2                    # medians over three seeds
  fedsqueeze sweep --config smoke --set arms=fedavg-fp32,int8
  fedsqueeze sweep --set deadline-s=20 --set links=mobile
  fedsqueeze sweep --config smoke --set client-gpus=0.25 --set coordinator-device=cuda
  fedsqueeze sweep --config smoke --set links=wifi --set realtime=true
  fedsqueeze sweep --config text                    # MiniLM on docstrings (the text extra)
  fedsqueeze sweep --config text --set arms=fedavg-adapters,adaptive-head   # an extra arm
  fedsqueeze sweep --set arms=mine --set arm.mine.base=adaptive --set arm.mine.optimizer=adam

A config file's [arm.NAME] table may start from another arm (base = "OTHER") and its
extra-arms = [...] lists arms it defines that run only when --set arms=... names them.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from fedsqueeze.cli.simulate_cmd import (
    add_config_arguments,
    console,
    load_from_args,
    quiet_engines,
    run_line,
)
from fedsqueeze.errors import ConfigError

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the sweep command's flags."""
    add_config_arguments(parser)
    parser.add_argument(
        "--seeds",
        default=None,
        metavar="S1,S2,...",
        help="run once per seed and report medians (default: the config's seed)",
    )


def _seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds expects integers separated by commas, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError("--seeds needs distinct integers")
    return seeds


def main(args: argparse.Namespace) -> int:
    """Run the sweep; returns 0."""
    from simulations.report import SweepProgress, make_progress, medians_table, summary_table
    from simulations.runner import run_seeds, run_sweep

    config = load_from_args(args)
    seeds = _seeds(args.seeds)
    quiet_engines(getattr(args, "verbose", 0) > 0)
    out = console()
    if seeds is None:
        with make_progress(out) as progress:
            tracker = SweepProgress(progress, config)
            outcome = run_sweep(config, progress=tracker.update, plots=not args.no_plots)
        out.print(summary_table(outcome.summary, outcome.out_dir))
        out.print(run_line(outcome, config.realtime))
        return 0
    with make_progress(out) as progress:

        def tracker_for(seed: int):  # type: ignore[no-untyped-def]
            return SweepProgress(progress, replace(config, seed=seed), f"seed {seed}").update

        outcomes, medians = run_seeds(config, seeds, progress=tracker_for, plots=not args.no_plots)
    for outcome in outcomes:
        out.print(summary_table(outcome.summary, outcome.out_dir))
    out.print(medians_table(config.name, seeds, medians))
    out.print(f"medians written to {config.out_dir() if args.out is None else args.out}")
    return 0
