"""What a simulation costs: a plain Flower app beside the sweep's arms, at several scales.

For every number of virtual clients (100, 1,000 and 10,000 by default) it runs, side by
side and in turn, the same experiment (``--config``, default ``scale``: digits-cnn, IID,
10 rounds of 10 sampled clients, 2 local epochs) three ways:

* ``flower``: a plain Flower 1.42 app, FedAvg with the model in Flower's messages
  (:mod:`simulations.plain_flower`), started with ``run_simulation`` like the others;
* ``fedavg-fp32`` and ``adaptive``: the sweep's arms (``fedsqueeze sweep`` with that
  one arm).

Each run is its own process (its own Ray node, even where ``RAY_ADDRESS`` names a
running cluster), so its wall time (Flower's ``run_simulation``,
Ray's start-up included) and peak resident memory (the whole process tree: driver and
Ray, :mod:`simulations.memory`) are its own. Runs are interleaved (all arms at one scale,
then the next scale, then the next repeat) so that a change in the machine's load falls
on all of them alike. The table gives the median over repeats and two ratios: wall time
against ``flower`` at the same scale, and peak memory against the same arm at the
smallest scale.

``--quick`` is a smoke test (20 clients, 2 rounds of 2, 1 epoch, one repeat).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from fedsqueeze.bench.flags import add_simulate_arguments

__all__ = ["SimRun", "add_arguments", "main", "run_one"]

#: The reference arm: the plain Flower app.
FLOWER = "flower"
ARMS = (FLOWER, "fedavg-fp32", "adaptive")
QUICK_SETS = ("num-rounds=2", "clients-per-round=2", "epochs=1")
_RESULT = "SIMBENCH-RESULT "

add_arguments = add_simulate_arguments


@dataclass(frozen=True)
class SimRun:
    """One simulation: which arm, how many clients, what it cost."""

    arm: str
    clients: int
    repeat: int
    wall_s: float
    peak_memory: int | None
    peak_process_memory: int | None


def run_one(arm: str, config_path: str, sets: Sequence[str]) -> SimRun:
    """Run one arm in this process (the child's body) and measure it."""
    from simulations.config import load_config

    if arm == FLOWER:
        from simulations.plain_flower import run_plain

        config = load_config(config_path, [*sets, "arms=fedavg-fp32"])
        plain = run_plain(config)
        return SimRun(
            arm, config.num_clients, 0, plain.wall_s, plain.peak_memory, plain.peak_process_memory
        )
    from simulations.runner import run_sweep

    config = load_config(config_path, [*sets, f"arms={arm}"])
    with tempfile.TemporaryDirectory(prefix="simbench-") as out:
        outcome = run_sweep(config, out_dir=Path(out), plots=False)
    return SimRun(
        arm,
        config.num_clients,
        0,
        outcome.wall_s,
        outcome.peak_memory,
        outcome.peak_process_memory,
    )


def _child(argv: Sequence[str]) -> int:
    arm, config_path, *sets = argv
    run = run_one(arm, config_path, sets)
    print(_RESULT + json.dumps(asdict(run)), flush=True)
    return 0


def _spawn(arm: str, config_path: str, sets: Sequence[str], timeout_s: float) -> SimRun:
    """Run one arm in a child process; on timeout its whole process group (Ray) is killed."""
    cmd = [sys.executable, "-m", "fedsqueeze.bench.simulate", arm, config_path, *sets]
    # Each run starts its own Ray node, even where RAY_ADDRESS names a running cluster:
    # the node's start-up and its processes' memory are part of what is measured.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"{arm} with {' '.join(sets)} took over {timeout_s:.0f} s") from None
    finally:
        # Ray's processes may outlive a finished driver: end the group either way.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    lines = [line for line in out.splitlines() if line.startswith(_RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{arm} failed (exit {proc.returncode}): {err[-2000:]}")
    return SimRun(**json.loads(lines[-1].removeprefix(_RESULT)))


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def table(runs: Sequence[SimRun]) -> list[dict[str, object]]:
    """Per (clients, arm): median wall and memory over repeats and their ratios."""
    sizes = sorted({r.clients for r in runs})
    arms = [a for a in ARMS if any(r.arm == a for r in runs)]
    rows: list[dict[str, object]] = []

    def of(arm: str, n: int) -> list[SimRun]:
        return [r for r in runs if r.arm == arm and r.clients == n]

    for n in sizes:
        for arm in arms:
            mine = of(arm, n)
            if not mine:
                continue
            wall = _median([r.wall_s for r in mine])
            flower = of(FLOWER, n)
            mem = [r.peak_memory for r in mine if r.peak_memory is not None]
            base = [r.peak_memory for r in of(arm, sizes[0]) if r.peak_memory is not None]
            rows.append(
                {
                    "clients": n,
                    "arm": arm,
                    "runs": len(mine),
                    "wall_s": wall,
                    "wall_min_s": min(r.wall_s for r in mine),
                    "wall_max_s": max(r.wall_s for r in mine),
                    "wall_vs_flower": wall / _median([r.wall_s for r in flower])
                    if flower
                    else None,
                    "peak_gib": _median(mem) / 2**30 if mem else None,
                    "peak_vs_smallest": _median(mem) / _median(base) if mem and base else None,
                }
            )
    return rows


def format_table(rows: Sequence[dict[str, object]]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| clients | arm | wall s (median; min–max) | × flower's wall | peak GiB, all processes "
        "| × peak at fewest clients |",
        "|---:|---|---:|---:|---:|---:|",
    ]

    def ratio(v: object) -> str:
        return "–" if v is None else f"{float(v):.2f}×"  # type: ignore[arg-type]

    for r in rows:
        peak = r["peak_gib"]
        lines.append(
            f"| {r['clients']:,} | {r['arm']} | {r['wall_s']:.1f} "
            f"({r['wall_min_s']:.1f}–{r['wall_max_s']:.1f}) | {ratio(r['wall_vs_flower'])} "
            f"| {'–' if peak is None else f'{peak:.2f}'} | {ratio(r['peak_vs_smallest'])} |"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark and print the table."""
    from fedsqueeze.cli.simulate_cmd import resolve_config_path
    from fedsqueeze.errors import ConfigError

    sizes = [20] if args.quick else list(args.clients)
    if not sizes or min(sizes) < 1 or args.repeats < 1:
        raise ConfigError("--clients must be positive and --repeats >= 1")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ConfigError(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    config_path = str(resolve_config_path(args.config))
    extra = [*(QUICK_SETS if args.quick else ()), *args.sets]
    repeats = 1 if args.quick else args.repeats
    runs: list[SimRun] = []
    total = repeats * len(sizes) * len(arms)
    for rep in range(repeats):
        for n in sizes:
            for arm in arms:
                sets = [f"num-clients={n}", *extra]
                run = _spawn(arm, config_path, sets, args.timeout_s)
                runs.append(SimRun(**{**asdict(run), "repeat": rep}))
                print(
                    f"[{len(runs)}/{total}] {arm:<12} {n:>6} clients: {run.wall_s:6.1f} s, "
                    f"peak {(run.peak_memory or 0) / 2**30:.2f} GiB",
                    flush=True,
                )
    rows = table(runs)
    print()
    print(format_table(rows))
    if args.json is not None:
        doc = {"runs": [asdict(r) for r in runs], "table": rows, "load": os.getloadavg()}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
