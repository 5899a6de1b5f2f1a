"""Train a small CNN on handwritten digits, compress it about 60×, and show where the bytes went.

The demo runs Deep Compression (Han et al., 2016) end to end on one seed, on the CPU:

  1. train the 38,282-parameter digits CNN (153 KB in fp32);
  2. prune it step by step to 95% zeros, fine-tuning with the pruned weights held at zero;
  3. share weights: each layer keeps only 8 distinct values (3-bit codes), which are trained;
  4. encode it with the fedsqueeze codec (positions + bit-packed codes + zstd), decode the
     bytes again and measure the decoded model's test accuracy.

It prints one row per tensor (shape, stages applied, bytes before and after, ratio, largest
change against the dense model) and the accuracy before and after. The default schedule
takes well under a minute on 2 cores; --full runs the longer one from BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from fedsqueeze.cli.argtypes import count

if TYPE_CHECKING:  # the heavy modules load only when the demo runs, not for --help
    import torch
    from rich.table import Table

    from fedsqueeze.recipes import CompressionResult

__all__ = ["add_arguments", "main"]

_MIN_WIDTH = 120  # when stdout is not a terminal (a log, a pipe), don't wrap tables at 80


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the demo's flags."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--seed",
        type=count(0),
        default=0,
        help="seed of the model and the training (default 0)",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="the full schedule (4 pruning steps, longer fine-tuning): about 30-60 s more",
    )
    parser.add_argument(
        "--threads",
        type=count(1),
        default=1,
        help="torch threads while training (default 1: results depend on it)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the demo; returns 0."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from fedsqueeze.recipes import QUICK_CONFIG, DeepCompressionConfig, Stage, compress_task
    from fedsqueeze.tasks import get_task

    base = DeepCompressionConfig() if args.full else QUICK_CONFIG
    config = replace(base, num_threads=args.threads)
    console = Console(width=None if sys.stdout.isatty() else _MIN_WIDTH)
    task = get_task("digits-cnn")
    console.print(
        f"[bold]fedsqueeze demo[/bold]: Deep Compression of the {task.name} model, seed "
        f"{args.seed}, {'full' if args.full else 'quick'} schedule, {args.threads} thread(s)"
    )
    with Progress(
        TextColumn("{task.description:<20}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=not console.is_terminal,
    ) as progress:
        bar = progress.add_task(Stage.DENSE.value, total=config.total_units)

        def report(stage: Stage, done: int, total: int) -> None:
            progress.update(bar, description=stage.value, completed=done, total=total)

        result = compress_task(task, config, seed=args.seed, progress=report)
    console.print(_history_table(result))
    console.print(_tensor_table(result))
    points = 100 * result.accuracy_loss
    console.print(
        f"[bold]Total[/bold]: {result.fp32_bytes:,} bytes in fp32 → {result.encoded_bytes:,} "
        f"bytes encoded ([bold]{result.ratio:.1f}× smaller[/bold]); test accuracy "
        f"{result.dense_accuracy:.2%} → {result.final_accuracy:.2%} "
        f"({'−' if points >= 0 else '+'}{abs(points):.2f} points, measured on the decoded model; "
        f"1 point = 3.6 of the 360 test images)."
    )
    exact = "yes" if result.decoded_matches else "NO (see the log)"
    console.print(
        f"Decoded weights equal the fine-tuned model exactly: {exact}. Took {result.seconds:.0f} s."
    )
    return 0


def _history_table(result: CompressionResult) -> Table:
    from rich.table import Table

    table = Table(title="What each step did")
    for col in ("step", "zeros in weights", "test accuracy", "seconds"):
        table.add_column(col, justify="left" if col == "step" else "right")
    for step in result.history:
        table.add_row(
            step.stage.value, f"{step.sparsity:.0%}", f"{step.accuracy:.2%}", f"{step.seconds:.1f}"
        )
    return table


def _tensor_table(result: CompressionResult) -> Table:
    from rich.table import Table

    from fedsqueeze.codec import decode_state
    from fedsqueeze.codec.inspect import describe

    decoded = decode_state(result.encoded)
    table = Table(title="Where the bytes went (one row per tensor)")
    for col in ("tensor", "shape", "stages", "fp32 B", "encoded B", "ratio", "max |Δ| vs dense"):
        table.add_column(col, justify="left" if col in ("tensor", "stages") else "right")
    for row in describe(result.encoded):
        fp32 = 4 * _numel(row.shape)
        table.add_row(
            row.name,
            "×".join(map(str, row.shape)),
            row.stages,
            f"{fp32:,}",
            f"{row.encoded_bytes:,}",
            f"{fp32 / row.encoded_bytes:.1f}×",
            f"{_max_abs(decoded[row.name], result.dense_state[row.name]):.3g}",
        )
    overhead = result.encoded_bytes - sum(len(r.to_bytes()) for r in result.encoded.records)
    table.add_row("(header + checksum)", "", "", "", f"{overhead:,}", "", "", style="dim")
    return table


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
