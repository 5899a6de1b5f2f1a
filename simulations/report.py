"""What the ``simulate`` and ``sweep`` commands show: a progress display and summary tables.

These build rich renderables; printing them is the command line's job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from simulations.config import SimulationConfig
from simulations.results import SweepSummary

__all__ = ["SweepProgress", "medians_table", "summary_table"]


class SweepProgress:
    """One bar per arm (its rounds), plus a start-up line until the first round is in.

    Use ``progress.update`` as the runner's ``progress`` callback; it is thread-safe.
    """

    def __init__(self, progress: Progress, config: SimulationConfig, label: str = "") -> None:
        self.progress = progress
        self.config = config
        prefix = f"{label} " if label else ""
        self._startup: TaskID | None = progress.add_task(
            f"{prefix}starting Flower's simulation engine ({config.num_clients} clients)",
            total=None,
        )
        self._tasks = {
            arm.name: progress.add_task(f"{prefix}{arm.name}", total=config.num_rounds)
            for arm in config.arms
        }
        self._prefix = prefix

    def update(self, arm: str, server_round: int, accuracy: float) -> None:
        """A round of ``arm`` was evaluated (round 0: the initial model)."""
        if self._startup is not None:
            self.progress.update(self._startup, total=1, completed=1, visible=False)
            self._startup = None
        task = self._tasks[arm]
        self.progress.update(
            task,
            completed=server_round,
            description=f"{self._prefix}{arm} · accuracy {accuracy:.3f}",
        )


def make_progress(console: object | None = None) -> Progress:
    """The progress display the commands use."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}", justify="left"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rounds"),
        TimeElapsedColumn(),
        console=console,  # type: ignore[arg-type]
    )


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}×"


def _mb(value: float | None) -> str:
    return "never" if value is None else f"{value / 1e6:.3f}"


def summary_table(summary: SweepSummary, out_dir: Path | None = None) -> Table:
    """The per-arm summary of one run.

    Without the baseline arm (``simulate`` of one fedsqueeze arm) there is no target and
    no ratio: the table then shows what the arms measured on their own.
    """
    if summary.target_accuracy is None:
        return _standalone_table(summary, out_dir)
    target = f"{summary.target_accuracy:.4f}" if summary.target_accuracy is not None else "n/a"
    table = Table(
        title=f"{summary.config}, seed {summary.seed}: target accuracy {target} "
        f"({summary.baseline}'s final − drop)",
        caption=f"written to {out_dir}" if out_dir else None,
    )
    for name, justify in (
        ("arm", "left"),
        ("final acc", "right"),
        ("best acc", "right"),
        ("total MB", "right"),
        ("MB to target", "right"),
        ("sim. s to target", "right"),
        ("× fewer bytes\nto target", "right"),
        ("× fewer bytes\nin all", "right"),
        ("× less time\nto target", "right"),
        ("dropped", "right"),
        ("skipped", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for a in summary.arms:
        table.add_row(
            a.arm,
            f"{a.final_accuracy:.4f}",
            f"{a.best_accuracy:.4f}",
            f"{a.total_bytes / 1e6:.3f}",
            _mb(a.bytes_to_target),
            "never" if a.time_to_target_s is None else f"{a.time_to_target_s:.1f}",
            _x(a.ratio_bytes_to_target),
            _x(a.ratio_total_bytes),
            _x(a.ratio_time_to_target),
            str(a.clients_dropped),
            str(a.clients_skipped),
        )
    return table


def _standalone_table(summary: SweepSummary, out_dir: Path | None) -> Table:
    """Accuracy, bytes and time of arms run without the baseline."""
    table = Table(
        title=f"{summary.config}, seed {summary.seed}: without {summary.baseline}, so no "
        "target or ratios (`fedsqueeze sweep` compares)",
        caption=f"written to {out_dir}" if out_dir else None,
    )
    for name in (
        "arm",
        "final acc",
        "best acc",
        "MB down",
        "MB up",
        "total MB",
        "sim. s",
        "wall s",
        "dropped",
        "skipped",
    ):
        table.add_column(name, justify="left" if name == "arm" else "right")
    for a in summary.arms:
        table.add_row(
            a.arm,
            f"{a.final_accuracy:.4f}",
            f"{a.best_accuracy:.4f}",
            f"{a.total_bytes_down / 1e6:.3f}",
            f"{a.total_bytes_up / 1e6:.3f}",
            f"{a.total_bytes / 1e6:.3f}",
            f"{a.sim_time_s:.1f}",
            f"{a.wall_s:.1f}",
            str(a.clients_dropped),
            str(a.clients_skipped),
        )
    return table


def medians_table(
    name: str, seeds: Sequence[int], medians: Mapping[str, Mapping[str, float | None]]
) -> Table:
    """Per-arm medians over seeds."""
    table = Table(title=f"{name}: medians over seeds {', '.join(map(str, seeds))}")
    for col in (
        "arm",
        "final acc",
        "total MB",
        "MB to target",
        "× fewer bytes\nto target",
        "× fewer bytes\nin all",
        "× less time\nto target",
        "seeds at\ntarget",
    ):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for arm, m in medians.items():
        acc = m.get("final_accuracy")
        table.add_row(
            arm,
            "–" if acc is None else f"{acc:.4f}",
            _mb(m.get("total_bytes")),
            _mb(m.get("bytes_to_target")),
            _x(m.get("ratio_bytes_to_target")),
            _x(m.get("ratio_total_bytes")),
            _x(m.get("ratio_time_to_target")),
            f"{int(m.get('seeds_reaching_target') or 0)}/{len(seeds)}",
        )
    return table
