"""The sweep's two plots: accuracy against cumulative MB and against simulated time.

One line per arm, log x axes (the arms differ by orders of magnitude), the target
accuracy as a dashed line. Round 0 (no bytes, no time yet) is left out: a log axis has
no zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt

from simulations.results import RoundRecord

__all__ = ["ACCURACY_VS_MB", "ACCURACY_VS_TIME", "write_plots"]

ACCURACY_VS_MB = "accuracy_vs_mb.png"
ACCURACY_VS_TIME = "accuracy_vs_time.png"


def write_plots(
    out: Path, rows: Sequence[RoundRecord], target: float | None, title: str
) -> list[Path]:
    """Write both PNGs into ``out``; returns their paths."""
    arms: dict[str, list[RoundRecord]] = {}
    for row in rows:
        if row.round > 0:
            arms.setdefault(row.arm, []).append(row)
    paths = []
    for filename, xlabel, x_of in (
        (ACCURACY_VS_MB, "cumulative MB on the wire (down + up, log scale)", _mb),
        (ACCURACY_VS_TIME, "simulated time, s (log scale)", _seconds),
    ):
        fig, ax = plt.subplots(figsize=(7.0, 4.5), dpi=120)
        for arm, arm_rows in arms.items():
            xs = [max(x_of(r), 1e-9) for r in arm_rows]
            ax.plot(xs, [r.accuracy for r in arm_rows], marker="o", markersize=3, label=arm)
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
        fig.tight_layout()
        path = out / filename
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def _mb(row: RoundRecord) -> float:
    return row.cumulative_bytes / 1e6


def _seconds(row: RoundRecord) -> float:
    return row.sim_time_s
