"""Run an experiment on Flower's simulation engine and write its outputs.

:func:`run_sweep` starts one Flower simulation (Ray once) with ``num_clients`` virtual
clients, runs every arm of the config on it one after the other, and writes
``results.csv``, ``clients.csv``, ``summary.json``, ``summary.md``, ``run.json``, the PNG
plots, the prefix curve (``prefix_curve.csv`` / ``.png``, :mod:`simulations.prefix_curve`)
and ``state/`` (each fedsqueeze arm's coordinator state) into the output folder.
:func:`run_seeds` repeats that for several seeds and adds ``medians.json`` /
``medians.md``. Resources follow the machine: one CPU per client actor, as many actors
as CPUs, unless the config says otherwise; a misconfiguration is a :class:`ConfigError`
before anything starts, and an engine failure or a silent client is a
:class:`~simulations.grid.SimulationError`, not a hang.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsqueeze.errors import FedsqueezeError
from simulations.client import make_sim_client_app
from simulations.config import SimulationConfig
from simulations.grid import SimulationError
from simulations.links import assign_links, link_profile
from simulations.memory import PeakMemory
from simulations.plots import write_plots
from simulations.prefix_curve import prefix_curve, write_prefix_curve
from simulations.results import (
    RoundRecord,
    SweepSummary,
    round_records,
    summarize,
    write_all,
    write_clients_csv,
)
from simulations.server import ProgressFn, SweepServer

log = logging.getLogger(__name__)

__all__ = ["SweepOutcome", "run_seeds", "run_sweep"]


@dataclass(frozen=True)
class SweepOutcome:
    """One finished run of a config.

    Attributes
    ----------
    out_dir
        Where its files are.
    rows, summary
        What ``results.csv`` and ``summary.json`` hold.
    wall_s
        Wall-clock seconds, start-up included.
    peak_memory, peak_process_memory
        Peak resident bytes of the whole process tree (driver and Ray) and of its
        largest process (``None`` without ``/proc``).
    """

    out_dir: Path
    rows: tuple[RoundRecord, ...]
    summary: SweepSummary
    wall_s: float
    peak_memory: int | None
    peak_process_memory: int | None


def backend_config(config: SimulationConfig) -> dict[str, object]:
    """Flower's Ray backend settings for this machine: CPUs, and with ``client-gpus``
    each actor's share of the GPUs (Ray's ``num_gpus``, all of the machine's offered)."""
    gpus = 0
    if config.client_gpus > 0:
        import torch  # deferred: only a GPU run needs it here

        gpus = torch.cuda.device_count()
    return {
        "client_resources": {"num_cpus": config.client_cpus, "num_gpus": config.client_gpus},
        "init_args": {
            "num_cpus": config.total_cpus,
            "num_gpus": gpus,
            "logging_level": logging.ERROR,
            "log_to_driver": False,
        },
    }


def set_train_device(config: SimulationConfig) -> None:
    """Name the clients' training device in the environment Ray's workers inherit
    (:data:`fedsqueeze.tasks.training.DEVICE_ENV`): ``cuda`` with ``client-gpus > 0``,
    unset otherwise."""
    from fedsqueeze.tasks.training import DEVICE_ENV

    if config.client_gpus > 0:
        os.environ[DEVICE_ENV] = "cuda"
    else:
        os.environ.pop(DEVICE_ENV, None)


def run_sweep(
    config: SimulationConfig,
    *,
    out_dir: Path | None = None,
    progress: ProgressFn | None = None,
    plots: bool = True,
) -> SweepOutcome:
    """Run every arm of ``config`` on one simulation and write the outputs.

    Parameters
    ----------
    config
        The experiment.
    out_dir
        Output folder (default ``config.out_dir()``).
    progress
        Called as ``progress(arm, round, accuracy)`` after every evaluated round.
    plots
        Whether to write the PNGs.
    """
    from simulations.engine import run_simulation  # deferred: imports Ray

    out = out_dir or config.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    link_names = assign_links(config.link_mix(), config.num_clients, config.seed)
    links = tuple(link_profile(n) for n in link_names)
    abort = threading.Event()
    server = SweepServer(config, out / "state", links, abort, progress)
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        server.main(grid)

    client_app = make_sim_client_app(
        config.run_settings(config.arms[0], ""),
        threads=max(1, int(config.client_cpus)),
        links=links,
        realtime=config.realtime,
        arm_settings={a.name: config.run_settings(a, "") for a in config.arms},
    )
    # Ray's workers read the thread count at start-up; results depend on it.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, int(config.client_cpus))))
    # ...and where to train: the GPU share Ray gives each actor (CUDA_VISIBLE_DEVICES).
    set_train_device(config)
    log.info(
        "simulating %d clients (%d per round) on %d CPUs: %s",
        config.num_clients,
        config.clients_per_round,
        config.total_cpus,
        ", ".join(a.name for a in config.arms),
    )
    if config.realtime:
        log.info(
            "realtime is on: the fedsqueeze arms' data-plane transfers really wait for their "
            "links (plain Flower arms and control messages are not slowed)"
        )
    started = time.perf_counter()
    with PeakMemory() as memory:
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=config.num_clients,
                backend_config=backend_config(config),
            )
        except FedsqueezeError:
            abort.set()
            raise
        except Exception as exc:
            abort.set()
            raise SimulationError(f"the Flower simulation failed: {exc}") from exc
    wall = time.perf_counter() - started
    missing = [a.name for a in config.arms if a.name not in {r.arm.name for r in server.runs}]
    if missing or any(len(r.accuracy) < config.num_rounds + 1 for r in server.runs):
        raise SimulationError(f"the simulation ended early (arms not finished: {missing})")
    rows = round_records(server.runs)
    summary = summarize(
        rows,
        config=config.name,
        seed=config.seed,
        baseline=config.baseline,
        target_drop=config.target_drop,
        descriptions={a.name: a.description for a in config.arms},
        wall_s={r.arm.name: r.wall_s for r in server.runs},
    )
    write_all(out, rows, summary)
    write_clients_csv(out / "clients.csv", server.runs, link_names)
    if plots:
        write_plots(out, rows, summary.target_accuracy, f"{config.name}, seed {config.seed}")
    curve = [
        point
        for run in server.runs
        if run.final_state is not None and config.prefix_points
        for point in prefix_curve(
            run.arm.name,
            config.arm_task(run.arm),
            config.seed,
            run.final_state,
            points=config.prefix_points,
        )
    ]
    write_prefix_curve(out, curve, f"{config.name}, seed {config.seed}: prefix curve", plots)
    outcome = SweepOutcome(out, tuple(rows), summary, wall, memory.peak_total, memory.peak_process)
    write_run_info(out, config, outcome)
    return outcome


def write_run_info(out: Path, config: SimulationConfig, outcome: SweepOutcome) -> None:
    """``run.json``: the resolved config, wall time and peak memory of this run."""
    import json
    from dataclasses import asdict

    doc = {
        "config": json.loads(
            json.dumps(asdict(config), default=lambda v: getattr(v, "value", str(v)))
        ),
        "wall_s": outcome.wall_s,
        "peak_memory_bytes": outcome.peak_memory,
        "peak_process_memory_bytes": outcome.peak_process_memory,
        "cpus": config.total_cpus,
    }
    (out / "run.json").write_text(json.dumps(doc, indent=2) + "\n")


def run_seeds(
    config: SimulationConfig,
    seeds: Sequence[int],
    *,
    out_dir: Path | None = None,
    progress: Callable[[int], ProgressFn | None] | None = None,
    plots: bool = True,
) -> tuple[list[SweepOutcome], dict[str, dict[str, float | None]]]:
    """Run the config once per seed (``out/seed-N``); returns the runs and per-arm medians.

    ``plots``: each seed's PNG plots (as :func:`run_sweep`'s)."""
    out = out_dir or config.out_dir()
    outcomes = []
    for seed in seeds:
        seeded = replace(config, seed=seed)
        outcomes.append(
            run_sweep(
                seeded,
                out_dir=out / f"seed-{seed}",
                progress=progress(seed) if progress else None,
                plots=plots,
            )
        )
    medians = median_summary([o.summary for o in outcomes])
    write_medians(out, medians, seeds, config)
    return outcomes, medians


_MEDIAN_FIELDS = (
    "final_accuracy",
    "best_accuracy",
    "total_bytes",
    "bytes_to_target",
    "time_to_target_s",
    "ratio_bytes_to_target",
    "ratio_total_bytes",
    "ratio_time_to_target",
)


def median_summary(summaries: Sequence[SweepSummary]) -> dict[str, dict[str, float | None]]:
    """Per arm, the median over seeds of each summary figure (``None`` if any seed missed)."""
    out: dict[str, dict[str, float | None]] = {}
    arms = [a.arm for a in summaries[0].arms]
    for arm in arms:
        entries = [a for s in summaries for a in s.arms if a.arm == arm]
        figures: dict[str, float | None] = {}
        for name in _MEDIAN_FIELDS:
            values = [getattr(e, name) for e in entries]
            figures[name] = (
                None if any(v is None for v in values) else float(statistics.median(values))
            )
        figures["seeds_reaching_target"] = float(
            sum(e.bytes_to_target is not None for e in entries)
        )
        out[arm] = figures
    return out


def write_medians(
    out: Path,
    medians: dict[str, dict[str, float | None]],
    seeds: Sequence[int],
    config: SimulationConfig,
) -> None:
    """``medians.json`` and ``medians.md``."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    doc = {"config": config.name, "seeds": list(seeds), "arms": medians}
    (out / "medians.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        f"# {config.name}: medians over seeds {', '.join(map(str, seeds))}",
        "",
        "| arm | final acc | total MB | MB to target | × fewer bytes to target "
        "| × fewer bytes in all | × less time to target | seeds reaching target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(v: float | None, scale: float = 1.0, suffix: str = "", digits: int = 3) -> str:
        return "–" if v is None else f"{v / scale:.{digits}f}{suffix}"

    for arm, m in medians.items():
        lines.append(
            f"| {arm} | {fmt(m['final_accuracy'], digits=4)} | {fmt(m['total_bytes'], 1e6)} "
            f"| {fmt(m['bytes_to_target'], 1e6)} "
            f"| {fmt(m['ratio_bytes_to_target'], suffix='×', digits=1)} "
            f"| {fmt(m['ratio_total_bytes'], suffix='×', digits=1)} "
            f"| {fmt(m['ratio_time_to_target'], suffix='×', digits=1)} "
            f"| {int(m['seeds_reaching_target'] or 0)}/{len(seeds)} |"
        )
    (out / "medians.md").write_text("\n".join(lines) + "\n")
