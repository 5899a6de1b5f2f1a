"""A large model between the coordinator's and the edge's own code, in bounded memory.

``fedsqueeze bench bigmodel --dataplane --via-edge`` runs this for each size and spec
(and ``tests/edge/test_edge_bounded.py`` at a small size):

* a **coordinator** process keeps the model file (mapped) as a version of its
  :class:`~coordinator.version_store.VersionStore`, and a next version with its first
  tensor changed, then starts a :class:`~coordinator.dataplane.CoordinatorDataPlane` on
  127.0.0.1 (plaintext, port 0): its model source encodes a large model with
  ``encode_to`` (bodies spooled) and keeps the model the edge will decode. That is its
  setup (left out of its figure: :mod:`fedsqueeze.bench.memprobe`'s ``phase_file``);
  serving is measured.
* an **edge** process fetches with :class:`edge.dataplane.GrpcConnector` (what the
  fedsqueeze mod and ``fedsqueeze edge`` use): the first version in full, then the next as
  a delta from the model it holds.

Memory is each process's peak anonymous memory beyond its baseline (the coordinator's
taken after its setup), polled every 2 ms from the parent; mapped models, spool files
and mapped decoded models are page cache and left out.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["measure_edge"]


def _coordinator(args: argparse.Namespace) -> int:
    import gc

    from coordinator.dataplane import CoordinatorDataPlane
    from coordinator.version_store import VersionStore
    from fedsqueeze.bench.memprobe import anon_bytes, settled_baseline
    from fedsqueeze.modelfile import map_model
    from fedsqueeze.transport.spool import SpoolPolicy

    settled_baseline()
    started = time.perf_counter()
    store = VersionStore(args.spool / "state", keep=8, cache_size=8, stream_bytes=args.threshold)
    first_state = map_model(args.model)
    first = store.publish(first_state)
    name = next(iter(first_state))
    changed = first_state[name] + 0.01
    second = store.publish({**first_state, name: changed}, track="next")
    del changed
    policy = SpoolPolicy(threshold_bytes=args.threshold, directory=args.spool)
    plane = CoordinatorDataPlane(store, spool=policy)
    setup = time.perf_counter() - started
    gc.collect()
    baseline = anon_bytes()
    args.phase.touch()
    partial = args.ready.with_suffix(".partial")
    partial.write_text(
        json.dumps(
            {
                "address": plane.address,
                "token": plane.tokens.token_for("1"),
                "first": first,
                "second": second,
            }
        )
    )
    partial.replace(args.ready)
    while not args.stop.exists():
        time.sleep(0.05)
    spool_dir = plane.server.spool.path if plane.server.spool is not None else None
    plane.close()
    left = [p for p in spool_dir.rglob("*") if p.is_file()] if spool_dir is not None else []
    report = {
        "baseline_anon": baseline,
        "setup_seconds": setup,
        "spooled": spool_dir is not None,
        "spool_dir_left": spool_dir is not None and spool_dir.exists(),
        "spool_files_left": len(left),
    }
    print(json.dumps(report))
    return 0


def _edge(args: argparse.Namespace) -> int:
    from edge.dataplane import GrpcConnector
    from fedsqueeze.bench.memprobe import settled_baseline
    from fedsqueeze.control import RoundInstruction
    from fedsqueeze.transport.retry import RetryPolicy
    from fedsqueeze.transport.spool import SpoolPolicy

    baseline = settled_baseline()
    info = json.loads(args.ready.read_text())
    patient = RetryPolicy(deadline_s=7200.0)  # the server encodes 1B parameters for minutes
    policy = SpoolPolicy(threshold_bytes=args.threshold, directory=args.spool)
    plane = GrpcConnector(spool=policy, retry=patient)
    held, digest = None, None
    rows = []
    for target in (info["first"], info["second"]):
        instruction = RoundInstruction(
            server_round=1,
            address=info["address"],
            target=target,
            down_spec=args.spec,
            up_spec="lossless",
            task="",
            init_seed=-1,
            init_digest="",
            token=info["token"],
            tls=False,
        )
        started = time.perf_counter()
        fetched = plane.fetch(instruction, "1", digest, held)
        rows.append((time.perf_counter() - started, fetched.bytes_down, fetched.spooled))
        held, digest = fetched.state, fetched.digest
    report = {
        "baseline_anon": baseline,
        "seconds": [r[0] for r in rows],
        "received": [r[1] for r in rows],
        "spooled": [r[2] for r in rows],
    }
    print(json.dumps(report))
    return 0


def _child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    c = sub.add_parser("coordinator")
    c.add_argument("model", type=Path)
    for name in ("--spool", "--ready", "--stop", "--phase"):
        c.add_argument(name, type=Path, required=True)
    c.add_argument("--threshold", type=int, required=True)
    e = sub.add_parser("edge")
    e.add_argument("--ready", type=Path, required=True)
    e.add_argument("--spool", type=Path, required=True)
    e.add_argument("--spec", required=True)
    e.add_argument("--threshold", type=int, required=True)
    args = parser.parse_args(argv)
    return _coordinator(args) if args.role == "coordinator" else _edge(args)


def measure_edge(
    model: Path,
    spec: str,
    folder: Path,
    *,
    threshold: int = 256 << 20,
    edge_threshold: int | None = None,
    timeout: float = 7200,
) -> dict[str, Any]:
    """Serve ``model`` from the coordinator's data plane and fetch it (then its next
    version as a delta) with the edge's connector, each in a measured process; spool
    files in ``folder``. Returns both reports with their extra memory.

    ``threshold`` is both sides' spool threshold, unless ``edge_threshold`` gives the
    edge's (a value above the model's size measures the edge's in-memory path).

    Raises
    ------
    RuntimeError
        Either process failed (its last stderr line).
    """
    from fedsqueeze.bench.memprobe import Measured, run_measured

    folder.mkdir(parents=True, exist_ok=True)
    spool_c, spool_e = folder / "spool-coordinator", folder / "spool-edge"
    spool_c.mkdir(exist_ok=True)
    spool_e.mkdir(exist_ok=True)
    ready, stop, phase = folder / "ready.json", folder / "stop", folder / "phase"
    for p in (ready, stop, phase):
        p.unlink(missing_ok=True)
    me = ["-m", "fedsqueeze.bench.edgefetch", "--child"]
    coordinator_args = [*me, "coordinator", str(model), "--spool", str(spool_c)]
    coordinator_args += ["--ready", str(ready), "--stop", str(stop), "--phase", str(phase)]
    coordinator_args += ["--threshold", str(threshold)]
    served: list[Measured] = []

    def serve() -> None:
        served.append(run_measured(coordinator_args, timeout=timeout, phase_file=phase))

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        while not ready.exists() and thread.is_alive():
            time.sleep(0.05)
        if not ready.exists():
            thread.join()
            raise RuntimeError(f"the coordinator failed: {_last_line(served[0].stderr)}")
        edge = run_measured(
            [
                *me,
                "edge",
                "--ready",
                str(ready),
                "--spool",
                str(spool_e),
                "--spec",
                spec,
                "--threshold",
                str(threshold if edge_threshold is None else edge_threshold),
            ],
            timeout=timeout,
        )
    finally:
        stop.touch()
        thread.join()
    coordinator = served[0]
    if coordinator.returncode != 0:
        raise RuntimeError(f"the coordinator failed: {_last_line(coordinator.stderr)}")
    if edge.returncode != 0:
        raise RuntimeError(f"the edge failed: {_last_line(edge.stderr)}")
    return {
        "coordinator": {
            **coordinator.report,
            "extra": coordinator.extra,
            "peak_anon": coordinator.peak_anon,
            "setup_peak": coordinator.setup_peak,
        },
        "edge": {**edge.report, "extra": edge.extra, "peak_anon": edge.peak_anon},
    }


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or ["(no message)"])[-1]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2:]))
    sys.exit("run it as: fedsqueeze bench bigmodel --dataplane --via-edge")
