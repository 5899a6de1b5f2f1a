"""Bytes to two targets, per seed and arm, from a multi-seed sweep's ``results.csv`` files.

``python -m simulations.target_ratios OUT [--baseline fedavg-fp32] [--baseline-from DIR]``:
``OUT`` holds one ``seed-N/results.csv`` per seed (``fedsqueeze sweep --seeds ... --out
OUT``, or several sweeps of different seeds into the same ``OUT``). The baseline's curve
comes from the same file, or with ``--baseline-from DIR`` from ``DIR/seed-N/results.csv``:
``fedavg-fp32`` is deterministic per seed, so a sweep of new arms need not run it again.

For every seed and arm it prints the round and the cumulative bytes (both directions,
every plane) at which the arm first reaches

* the sweep's target: the baseline's final accuracy minus ``--drop`` (1 point), and
* a steadier target: the baseline's mean accuracy over its last ``--last`` (5) rounds
  minus the same drop, less at the mercy of the baseline's last round;

and the baseline's bytes to the same target divided by the arm's ("never": not reached),
then the median of each column over the seeds (an arm that misses a target on some seed
has no median there).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from simulations.results import reaches


@dataclass(frozen=True)
class Curve:
    """One arm's accuracy and cumulative bytes per round (round order; ``rounds``: their
    numbers, from 0 when the initial model was evaluated)."""

    accuracy: tuple[float, ...]
    cumulative: tuple[int, ...]
    rounds: tuple[int, ...] = ()

    def reach(self, target: float) -> tuple[int, int] | None:
        """The first round that reaches ``target`` (as the sweep's summary counts it:
        :func:`simulations.results.reaches`) and the bytes up to it."""
        for i, acc in enumerate(self.accuracy):
            server_round = self.rounds[i] if self.rounds else i + 1
            if reaches(server_round, acc, target):
                return server_round, self.cumulative[i]
        return None


def read_curves(results: Path) -> dict[str, Curve]:
    """Every arm's curve in one ``results.csv``."""
    rows: dict[str, list[tuple[int, float, int]]] = {}
    with results.open() as fh:
        for r in csv.DictReader(fh):
            rows.setdefault(r["arm"], []).append(
                (int(r["round"]), float(r["accuracy"]), int(r["cumulative_bytes"]))
            )
    out = {}
    for arm, got in rows.items():
        got.sort()
        out[arm] = Curve(
            tuple(a for _, a, _ in got), tuple(b for _, _, b in got), tuple(r for r, _, _ in got)
        )
    return out


def targets(baseline: Curve, drop: float, last: int) -> tuple[float, float]:
    """The sweep's target and the steadier one."""
    if len(baseline.accuracy) < last:
        raise SystemExit(f"the baseline has fewer than {last} rounds")
    final = baseline.accuracy[-1] - drop
    steady = statistics.fmean(baseline.accuracy[-last:]) - drop
    return final, steady


def main(argv: Sequence[str] | None = None) -> int:
    """Print the per-seed table and medians (markdown)."""
    parser = argparse.ArgumentParser(prog="python -m simulations.target_ratios")
    parser.add_argument("out", type=Path, help="folder with seed-N/results.csv")
    parser.add_argument("--baseline", default="fedavg-fp32")
    parser.add_argument(
        "--baseline-from",
        type=Path,
        default=None,
        help="folder with seed-N/results.csv holding the baseline arm (default: OUT)",
    )
    parser.add_argument("--drop", type=float, default=0.01, help="target drop (accuracy)")
    parser.add_argument("--last", type=int, default=5, help="rounds of the steadier mean")
    args = parser.parse_args(argv)
    seeds = sorted(args.out.glob("seed-*/results.csv"), key=lambda p: int(p.parent.name[5:]))
    if not seeds:
        raise SystemExit(f"{args.out}: no seed-N/results.csv")
    w = sys.stdout.write
    w(
        "| seed | arm | target / steady target | × fewer bytes to target (round / "
        "baseline's) | × fewer bytes to steady target |\n|---|---|---:|---:|---:|\n"
    )
    ratios: dict[str, tuple[list[float | None], list[float | None]]] = {}
    for path in seeds:
        curves = read_curves(path)
        base_path = path
        if args.baseline_from is not None:
            base_path = args.baseline_from / path.parent.name / "results.csv"
            if not base_path.is_file():
                raise SystemExit(f"{base_path}: no such file")
            curves.pop(args.baseline, None)
        base = read_curves(base_path).get(args.baseline)
        if base is None:
            raise SystemExit(f"{base_path}: no {args.baseline} arm")
        final, steady = targets(base, args.drop, args.last)
        base_final, base_steady = base.reach(final), base.reach(steady)
        for arm, curve in curves.items():
            if arm == args.baseline:
                continue
            got: list[tuple[float | None, str]] = []
            for reached, baseline_reached in (
                (curve.reach(final), base_final),
                (curve.reach(steady), base_steady),
            ):
                if reached is None or baseline_reached is None:
                    got.append((None, "never"))
                else:
                    ratio = baseline_reached[1] / reached[1]
                    got.append(
                        (ratio, f"{ratio:.1f}× (round {reached[0]} / {baseline_reached[0]})")
                    )
            lists = ratios.setdefault(arm, ([], []))
            lists[0].append(got[0][0])
            lists[1].append(got[1][0])
            w(
                f"| {path.parent.name[5:]} | {arm} | {final:.4f} / {steady:.4f} | "
                f"{got[0][1]} | {got[1][1]} |\n"
            )
    for arm, (to_final, to_steady) in ratios.items():
        cells = []
        for values in (to_final, to_steady):
            if any(v is None for v in values):
                cells.append(f"– ({sum(v is None for v in values)} seeds never)")
            else:
                known = [v for v in values if v is not None]
                cells.append(f"**{statistics.median(known):.1f}×** (min {min(known):.1f}×)")
        w(f"| median | {arm} | | {cells[0]} | {cells[1]} |\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
