"""Per-round records and per-arm summaries of a sweep, and the files they are written to.

``results.csv`` has one row per arm and round (round 0 is the initial model: no bytes,
no time); its times are on the simulated clock, except ``round_wall_s``: the wall-clock
seconds the round really took here (with ``realtime`` on, as slow as the links say for
the fedsqueeze arms). ``summary.json`` and ``summary.md`` have one entry per arm:

* final and best accuracy, total bytes (down + up, all planes), total simulated time;
* the **target**: the baseline arm's final accuracy minus ``target_drop``; the bytes,
  simulated time and rounds each arm needed to first reach it (empty when it never did);
* ratios against the baseline: its bytes to the target divided by the arm's (how many
  times fewer bytes it needed to get there), the same for total bytes and for time.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from simulations.server import ArmRun

__all__ = ["ArmSummary", "RoundRecord", "SweepSummary", "round_records", "summarize", "write_all"]


@dataclass(frozen=True)
class RoundRecord:
    """One row of ``results.csv``."""

    arm: str
    round: int
    accuracy: float
    loss: float
    bytes_down: int
    bytes_up: int
    control_bytes_down: int
    control_bytes_up: int
    data_bytes_down: int
    data_bytes_up: int
    cumulative_bytes: int
    round_time_s: float
    sim_time_s: float
    clients_sampled: int
    clients_skipped: int
    clients_dropped: int
    clients_failed: int
    round_wall_s: float = 0.0


@dataclass(frozen=True)
class ArmSummary:
    """One arm, summed up (``None``: the arm never reached the target)."""

    arm: str
    description: str
    final_accuracy: float
    best_accuracy: float
    total_bytes: int
    total_bytes_down: int
    total_bytes_up: int
    sim_time_s: float
    rounds_to_target: int | None
    bytes_to_target: int | None
    time_to_target_s: float | None
    ratio_bytes_to_target: float | None
    ratio_total_bytes: float | None
    ratio_time_to_target: float | None
    clients_dropped: int
    clients_skipped: int
    wall_s: float = 0.0


@dataclass(frozen=True)
class SweepSummary:
    """All arms of one run."""

    config: str
    seed: int
    baseline: str
    target_accuracy: float | None
    arms: tuple[ArmSummary, ...]


def round_records(runs: Sequence[ArmRun]) -> list[RoundRecord]:
    """Rows for every arm and round, round 0 included."""
    rows: list[RoundRecord] = []
    for run in runs:
        cumulative, clock = 0, 0.0
        for r in sorted(run.accuracy):
            t = run.traffic.get(r)
            down = t.bytes_down if t else 0
            up = t.bytes_up if t else 0
            seconds = t.time.seconds if t else 0.0
            cumulative += down + up
            clock += seconds
            rows.append(
                RoundRecord(
                    arm=run.arm.name,
                    round=r,
                    accuracy=run.accuracy[r],
                    loss=run.loss.get(r, math.nan),
                    bytes_down=down,
                    bytes_up=up,
                    control_bytes_down=t.control_down if t else 0,
                    control_bytes_up=t.control_up if t else 0,
                    data_bytes_down=t.data_down if t else 0,
                    data_bytes_up=t.data_up if t else 0,
                    cumulative_bytes=cumulative,
                    round_time_s=seconds,
                    sim_time_s=clock,
                    clients_sampled=len(t.sampled) if t else 0,
                    clients_skipped=len(t.skipped) if t else 0,
                    clients_dropped=len(t.dropped) if t else 0,
                    clients_failed=len(t.failed) if t else 0,
                    round_wall_s=t.wall_s if t else 0.0,
                )
            )
    return rows


def summarize(
    rows: Sequence[RoundRecord],
    *,
    config: str,
    seed: int,
    baseline: str,
    target_drop: float,
    descriptions: Mapping[str, str] | None = None,
    wall_s: Mapping[str, float] | None = None,
) -> SweepSummary:
    """The per-arm summary; ratios need the baseline arm among the rows."""
    by_arm: dict[str, list[RoundRecord]] = {}
    for row in rows:
        by_arm.setdefault(row.arm, []).append(row)
    base_rows = by_arm.get(baseline)
    target = base_rows[-1].accuracy - target_drop if base_rows else None
    base = _reach(base_rows, target) if base_rows and target is not None else None
    base_total = _total(base_rows) if base_rows else None
    arms = []
    for name, arm_rows in by_arm.items():
        reached = _reach(arm_rows, target) if target is not None else None
        total = _total(arm_rows)
        arms.append(
            ArmSummary(
                arm=name,
                description=(descriptions or {}).get(name, ""),
                final_accuracy=arm_rows[-1].accuracy,
                best_accuracy=max(r.accuracy for r in arm_rows),
                total_bytes=total,
                total_bytes_down=sum(r.bytes_down for r in arm_rows),
                total_bytes_up=sum(r.bytes_up for r in arm_rows),
                sim_time_s=arm_rows[-1].sim_time_s,
                rounds_to_target=reached.round if reached else None,
                bytes_to_target=reached.cumulative_bytes if reached else None,
                time_to_target_s=reached.sim_time_s if reached else None,
                ratio_bytes_to_target=_ratio(_bytes(base), _bytes(reached)),
                ratio_total_bytes=_ratio(base_total, total),
                ratio_time_to_target=_ratio(_time(base), _time(reached)),
                clients_dropped=sum(r.clients_dropped for r in arm_rows),
                clients_skipped=sum(r.clients_skipped for r in arm_rows),
                wall_s=(wall_s or {}).get(name, 0.0),
            )
        )
    return SweepSummary(config, seed, baseline, target, tuple(arms))


def reaches(server_round: int, accuracy: float, target: float) -> bool:
    """Whether a round's accuracy counts as reaching ``target``.

    Round 0 is the untrained model: reaching the target there would mean nothing.
    """
    return server_round > 0 and accuracy >= target - 1e-12


def _reach(rows: Sequence[RoundRecord], target: float | None) -> RoundRecord | None:
    if target is None:
        return None
    return next((r for r in rows if reaches(r.round, r.accuracy, target)), None)


def _bytes(row: RoundRecord | None) -> float | None:
    return float(row.cumulative_bytes) if row is not None else None


def _time(row: RoundRecord | None) -> float | None:
    return row.sim_time_s if row is not None else None


def _total(rows: Sequence[RoundRecord]) -> int:
    return sum(r.bytes_down + r.bytes_up for r in rows)


def _ratio(base: float | None, value: float | None) -> float | None:
    if base is None or value is None or not value > 0:
        return None
    return float(base) / float(value)


# ---------------------------------------------------------------------- files
def write_csv(path: Path, rows: Sequence[RoundRecord]) -> None:
    """``results.csv``."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([f.name for f in fields(RoundRecord)])
        for row in rows:
            writer.writerow(
                [f"{v:.6g}" if isinstance(v, float) else v for v in asdict(row).values()]
            )


CLIENT_COLUMNS = (
    "arm",
    "round",
    "partition",
    "link",
    "bytes_down",
    "bytes_up",
    "data_bytes_down",
    "data_bytes_up",
    "compute_s",
    "time_s",
    "dropped",
    "down_spec",
    "up_spec",
)


def write_clients_csv(path: Path, runs: Sequence[ArmRun], links: Sequence[str]) -> None:
    """``clients.csv``: one row per arm, round and replying client."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CLIENT_COLUMNS)
        for run in runs:
            for r, traffic in sorted(run.traffic.items()):
                for pid, t in sorted(traffic.per_client.items()):
                    down_spec, up_spec = traffic.specs.get(pid, ("", ""))
                    writer.writerow(
                        [
                            run.arm.name,
                            r,
                            pid,
                            links[pid],
                            t.bytes_down,
                            t.bytes_up,
                            t.data_down,
                            t.data_up,
                            f"{t.compute_s:.4f}",
                            f"{traffic.time.client_seconds.get(pid, 0.0):.4f}",
                            int(pid in traffic.dropped),
                            down_spec,
                            up_spec,
                        ]
                    )


def write_summary(out: Path, summary: SweepSummary) -> None:
    """``summary.json`` and ``summary.md``."""
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))


def summary_markdown(summary: SweepSummary) -> str:
    """The summary as a Markdown table (what ``summary.md`` holds)."""
    target = f"{summary.target_accuracy:.4f}" if summary.target_accuracy is not None else "n/a"
    lines = [
        f"# {summary.config} (seed {summary.seed})",
        "",
        f"Target accuracy: {target} ({summary.baseline}'s final accuracy minus the target "
        "drop). Bytes are down + up on the wire, Flower messages and data plane together; "
        "times are on the simulated clock.",
        "",
        "| arm | final acc | best acc | total MB | MB to target | time to target (s) "
        "| × fewer bytes to target | × fewer bytes in all | × less time to target "
        "| dropped | skipped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in summary.arms:
        lines.append(
            f"| {a.arm} | {a.final_accuracy:.4f} | {a.best_accuracy:.4f} "
            f"| {a.total_bytes / 1e6:.3f} | {_mb(a.bytes_to_target)} | {_num(a.time_to_target_s)} "
            f"| {_x(a.ratio_bytes_to_target)} | {_x(a.ratio_total_bytes)} "
            f"| {_x(a.ratio_time_to_target)} | {a.clients_dropped} | {a.clients_skipped} |"
        )
    return "\n".join(lines) + "\n"


def _mb(value: int | None) -> str:
    return "never" if value is None else f"{value / 1e6:.3f}"


def _num(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f}"


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}×"


def write_all(out: Path, rows: Sequence[RoundRecord], summary: SweepSummary) -> None:
    """``results.csv``, ``summary.json`` and ``summary.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows)
    write_summary(out, summary)
