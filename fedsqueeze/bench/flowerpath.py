"""The data plane against Flower's own transfer: the same models through both, side by side.

Flower's path: a real Deployment Engine on loopback (``flower-superlink`` and one
``flower-supernode``, insecure, runtime dependency installation off), a run submitted
with ``flwr run`` whose ServerApp (:mod:`fedsqueeze.bench.flowerapp`) sends each model as
an ``ArrayRecord`` in a message; Flower 1.42 cuts its arrays into 5 MiB objects
addressed by their SHA-256, which travel ServerApp → SuperLink → SuperNode → ClientApp
(three hops, each an HTTP transfer of every object). Two tiny messages go first: the
first warms everything up, the second measures what any message costs (polling, a
fresh ClientApp process). Each big message is timed from the ServerApp's send (its
``ArrayRecord(state)``, then ``push_messages``) to the moment the ClientApp process
holds the whole message (:mod:`fedsqueeze.bench.flowerapp`), and to its tensors.

The data plane: a :class:`~fedsqueeze.transport.TransferServer` in another process
publishes the same state (same bytes, checked by digest) and prepares it (raw, no
compression: ``CodecSpec(entropy_level=0)``, every 1 MiB segment with its digest);
this process fetches it with a verified ``Fetch`` (bytes held once the last segment is
verified, tensors once decoded and the model digest checked). Its send → receipt is the
preparation plus the fetch.

CPU per MiB is given for each process (Flower's: ServerApp, SuperLink with its
SuperExec, SuperNode with its SuperExec, ClientApp; ours: server and client), Flower's
less what the tiny message cost each process (so per MiB means per MiB moved).
"""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import resource
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fedsqueeze.codec import CodecSpec

__all__ = ["FlowerPathOptions", "run_flower_path"]

Json = dict[str, Any]
#: The tiny message (8 tensors of 1,024 fp32 values) that measures a message's fixed cost.
TINY_MB = 0.032
#: Raw: the bytes sent are the model's bytes, as in Flower's ArrayRecord.
PLANE_SPEC = CodecSpec(entropy_level=0)
_MIB = 1 << 20
_APP = "fedsqueeze.bench.flowerapp"
#: Flower's hops: ServerApp → SuperLink → SuperNode → ClientApp.
FLOWER_HOPS = 3


@dataclass(frozen=True)
class FlowerPathOptions:
    """What :func:`run_flower_path` moves.

    Attributes
    ----------
    sizes_mb
        Model sizes in MB (10^6 bytes), fp32.
    seed
        Seed of the random models (the same state on both paths).
    runs
        Fetches per size through the data plane (the median is reported); Flower sends
        each model once (a message costs seconds).
    timeout_s
        Longest the Flower run may take in all.
    """

    sizes_mb: tuple[float, ...] = (64.0, 512.0)
    seed: int = 3
    runs: int = 3
    timeout_s: float = 900.0

    def __post_init__(self) -> None:
        if not self.sizes_mb or not all(mb > 0 for mb in self.sizes_mb):
            raise ValueError("sizes_mb must hold sizes > 0")
        if self.runs < 1 or not self.timeout_s > 0:
            raise ValueError("runs must be >= 1 and timeout_s > 0")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- Flower's path
def _flower_side(options: FlowerPathOptions, workdir: Path) -> list[tuple[Json, Json]]:
    """Run the Flower app; ``(server record, client record)`` per message sent."""
    from fedsqueeze.deploy import (
        LinkConnection,
        Output,
        SuperLinkOptions,
        SuperNodeOptions,
        Supervisor,
        flower_env,
        free_port,
        start_superlink,
        start_supernode,
        write_app,
        write_flower_config,
        write_run_config,
    )
    from fedsqueeze.deploy.runs import RunLog, RunStatus, flwr_run_spec, wait_for_outcome

    link = SuperLinkOptions(port=free_port())
    home = workdir / "home"
    write_flower_config(home, LinkConnection(link.local_address))
    env = flower_env(home)
    out_dir = workdir / "out"
    out_dir.mkdir(parents=True)
    sizes = (TINY_MB, TINY_MB, *options.sizes_mb)
    with Supervisor(grace=5.0) as supervisor:
        superlink = start_superlink(supervisor, link, env, workdir / "superlink.log")
        node = SuperNodeOptions(link.local_address, 0, 1, runtime_port=free_port())
        log_file = workdir / "supernode.log"
        supernode = start_supernode(supervisor, node, env, output=Output.FILE, log_file=log_file)
        config: dict[str, str | int | float | bool] = {
            "sizes-mb": ",".join(repr(mb) for mb in sizes),
            "seed": options.seed,
            "out-dir": str(out_dir),
            "timeout-s": options.timeout_s,
            "watch-pids": f"superlink={superlink.pid},supernode={supernode.pid}",
        }
        app_dir = write_app(
            workdir / "app",
            config,
            name="fedsqueeze-flower-path",
            server_app=f"{_APP}:server_app",
            client_app=f"{_APP}:client_app",
        )
        run_config = write_run_config(workdir / "run-config.toml", config)
        runner = supervisor.start(flwr_run_spec(app_dir, run_config, env))
        # flwr run follows the run until it ends; past the timeout, stop following.
        watchdog = threading.Timer(options.timeout_s, runner.popen.kill)
        watchdog.start()
        try:
            with (workdir / "flwr-run.log").open("w", encoding="utf-8") as sink:
                run_id = RunLog(sink, color=False).follow(runner)
        finally:
            watchdog.cancel()
        outcome = wait_for_outcome(run_id, env) if run_id is not None else None
    if outcome is None or outcome.status is not RunStatus.COMPLETED:
        logs = "".join(
            f"\n--- {name}:\n" + _tail(workdir / name)
            for name in ("flwr-run.log", "superlink.log", "supernode.log")
        )
        status = "no run started" if outcome is None else outcome.status.value
        details = outcome.details if outcome is not None else ""
        raise RuntimeError(f"the Flower run failed ({status}) {details}{logs}")
    return [
        (_read_json(out_dir / f"server-{i}.json"), _read_json(out_dir / f"client-{i}.json"))
        for i in range(len(sizes))
    ]


def _read_json(path: Path) -> Json:
    value: Json = json.loads(path.read_text(encoding="utf-8"))
    return value


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _flower_costs(server: Json, client: Json) -> Json:
    """Seconds and CPU seconds of one message, per stage and per process."""
    daemons = server["daemon_cpu_s"]
    return {
        "bytes": server["array_bytes"],
        "objects": server["objects"],
        "object_bytes": server["object_bytes"],
        "to_push_s": server["pushed"] - server["sent"],
        "to_bytes_s": client["loaded"] - server["sent"],
        "to_tensors_s": client["tensors"] - server["sent"],
        "cpu_s": {
            "serverapp": server["serverapp_cpu_s"],
            "superlink": daemons["superlink"],
            "supernode": daemons["supernode"],
            "clientapp": client["clientapp_cpu_s_tensors"],
        },
        "model_digest": client["model_digest"],
    }


def _flower_rows(records: list[tuple[Json, Json]]) -> tuple[Json, list[Json]]:
    """The tiny message's costs and each model's, with the tiny message's taken off."""
    tiny = _flower_costs(*records[1])
    rows = []
    for server, client in records[2:]:
        costs = _flower_costs(server, client)
        mib = costs["bytes"] / _MIB
        costs["cpu_ms_per_mib"] = {
            name: (seconds - tiny["cpu_s"][name]) / mib * 1e3
            for name, seconds in costs["cpu_s"].items()
        }
        costs["beyond_tiny_s"] = costs["to_bytes_s"] - tiny["to_bytes_s"]
        rows.append(costs)
    return tiny, rows


# --------------------------------------------------------------------------- the data plane
def _serve(conn: Connection, seed: int) -> None:
    """The data plane's server process: publishes and prepares models when told."""
    from fedsqueeze.bench.transport import random_state
    from fedsqueeze.transport import (
        InMemoryModelSource,
        ServerConfig,
        TokenTable,
        TransferServer,
        UpdateStore,
    )
    from fedsqueeze.transport.cache import CacheKey
    from fedsqueeze.transport.prepare import prepare_model
    from fedsqueeze.wire.digests import preferred_digest, supported_digest

    tokens = dict(conn.recv())
    source = InMemoryModelSource(keep=2)
    config = ServerConfig(cache_bytes=2 << 30, cache_entries=2)
    server = TransferServer(
        source, UpdateStore(), TokenTable(tokens), config=config, plaintext=True
    )
    server.start()
    conn.send(server.port)
    try:
        while True:
            command, arg = conn.recv()
            if command == "publish":
                state = random_state(arg, seed)
                cpu, sent = _cpu_s(), time.time()
                digest = source.publish(state, track=f"model-{arg}")
                # Prepared with the digest the client asks for (the preferred one here).
                algorithm = supported_digest(preferred_digest())
                key = CacheKey(digest, None, PLANE_SPEC, None, segment_digest=algorithm)
                server.cache.get_or_build(
                    key, functools.partial(prepare_model, source, key, config.segment_bytes)
                )
                conn.send((sent, time.time(), _cpu_s() - cpu, digest))
            elif command == "cpu":
                conn.send(_cpu_s())
            else:
                break
    finally:
        server.stop(grace=0)


def _plane_side(options: FlowerPathOptions) -> list[Json]:
    """Publish, prepare and fetch each size through the data plane; one row per size."""
    from fedsqueeze.transport import TokenTable, TransferClient
    from fedsqueeze.wire.digests import preferred_digest

    _, tokens = TokenTable.generate(["bench"])
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_serve, args=(child, options.seed), daemon=True)
    process.start()

    def command(name: str, arg: Any = None) -> Any:
        parent.send((name, arg))
        if not parent.poll(options.timeout_s):
            raise RuntimeError(f"the data plane's server did not answer {name!r}")
        return parent.recv()

    rows = []
    try:
        parent.send(tokens)
        if not parent.poll(120):
            raise RuntimeError("the data plane's server process did not start")
        port = parent.recv()
        with TransferClient(
            f"127.0.0.1:{port}",
            edge_id="bench",
            token=tokens["bench"],
            plaintext=True,
            segment_digest=preferred_digest(),
        ) as client:
            for megabytes in options.sizes_mb:
                rows.append(_plane_size(client, command, megabytes, options.runs))
    finally:
        parent.send(("stop", None))
        process.join(30)
        if process.is_alive():
            process.terminate()
    return rows


def _plane_size(client: Any, command: Callable[..., Any], megabytes: float, runs: int) -> Json:
    sent, prepared, prepare_cpu, digest = command("publish", megabytes)
    fetches = [_timed_fetch(client, command, megabytes) for _ in range(runs)]
    mib = fetches[0]["raw_bytes"] / _MIB

    def median(key: str) -> float:
        return float(statistics.median(f[key] for f in fetches))

    prepare_s = prepared - sent
    return {
        "megabytes": megabytes,
        "prepare_s": prepare_s,
        "fetch_bytes_s": median("bytes_s"),
        "fetch_tensors_s": median("tensors_s"),
        "to_bytes_s": prepare_s + median("bytes_s"),
        "to_tensors_s": prepare_s + median("tensors_s"),
        "wire_bytes": fetches[0]["wire_bytes"],
        "bytes": fetches[0]["raw_bytes"],
        "segment_digest": fetches[0]["segment_digest"],
        "model_digest": digest,
        "fetched_digest": fetches[0]["model_digest"],
        "cpu_ms_per_mib": {
            "server (prepare)": prepare_cpu / mib * 1e3,
            "server (serve)": median("server_cpu_s") / mib * 1e3,
            "client": median("client_cpu_s") / mib * 1e3,
        },
        "runs": runs,
    }


def _timed_fetch(client: Any, command: Callable[..., Any], megabytes: float) -> Json:
    """One verified fetch of the model of ``megabytes``: seconds, CPU, bytes."""
    verified_at: list[float] = []

    def at_the_end(held: int, total: int) -> None:
        if held == total:  # the last segment is verified: the model's bytes are held
            verified_at.append(time.perf_counter())

    server_before, client_before = command("cpu"), _cpu_s()
    started = time.perf_counter()
    result = client.fetch(f"model-{megabytes}", spec=PLANE_SPEC, decode=True, progress=at_the_end)
    seconds = time.perf_counter() - started
    return {
        "bytes_s": (verified_at[0] if verified_at else started + seconds) - started,
        "tensors_s": seconds,
        "client_cpu_s": _cpu_s() - client_before,
        "server_cpu_s": command("cpu") - server_before,
        "wire_bytes": result.stats.wire.total,
        "raw_bytes": result.manifest.raw_bytes,
        "segment_digest": result.manifest.segment_digest.value,
        "model_digest": result.manifest.model_digest.hex(),
    }


# --------------------------------------------------------------------------- both
def run_flower_path(options: FlowerPathOptions | None = None) -> Json:
    """Move each model through Flower's path and through the data plane.

    Returns
    -------
    dict
        JSON-ready: ``{"tiny": ..., "sizes": [{"megabytes", "flower", "plane",
        "speedup"}...]}``; times in seconds, CPU in ms per MiB.

    Raises
    ------
    RuntimeError
        The Flower run failed or timed out (the message holds the ends of its logs), or
        the two paths did not move the same model.
    """
    options = options or FlowerPathOptions()
    with tempfile.TemporaryDirectory(prefix="fedsqueeze-flowerpath-") as tmp:
        records = _flower_side(options, Path(tmp))
    tiny, flower_rows = _flower_rows(records)
    plane_rows = _plane_side(options)
    sizes = []
    for flower, plane in zip(flower_rows, plane_rows, strict=True):
        if not flower["model_digest"] == plane["model_digest"] == plane["fetched_digest"]:
            raise RuntimeError(f"the two paths moved different {plane['megabytes']} MB models")
        sizes.append(
            {
                "megabytes": plane["megabytes"],
                "flower": flower,
                "plane": plane,
                "speedup_bytes": flower["to_bytes_s"] / plane["to_bytes_s"],
                "speedup_beyond_tiny": flower["beyond_tiny_s"] / plane["to_bytes_s"],
                "speedup_tensors": flower["to_tensors_s"] / plane["to_tensors_s"],
            }
        )
    return {"hops": FLOWER_HOPS, "tiny": tiny, "sizes": sizes, "spec": "raw (entropy_level=0)"}


def flower_table(report: Json) -> Any:
    """A rich table of :func:`run_flower_path`'s report."""
    from rich.table import Table

    tiny = report["tiny"]
    table = Table(
        "MB",
        "path",
        "send → bytes held",
        "send → tensors",
        "CPU ms/MiB by process",
        "bytes on the wire",
        title=(
            f"Flower's own transfer and the data plane (loopback). A tiny message through "
            f"Flower took {tiny['to_bytes_s']:.2f} s; Flower's CPU per MiB is beyond its CPU"
        ),
    )
    for column in (2, 3, 5):
        table.columns[column].justify = "right"
    for row in report["sizes"]:
        flower, plane = row["flower"], row["plane"]

        def cpu(values: dict[str, float]) -> str:
            return ", ".join(f"{name} {v:.2f}" for name, v in values.items())

        table.add_row(
            f"{row['megabytes']:g}",
            "Flower (ArrayRecord in a Message)",
            f"{flower['to_bytes_s']:.2f} s",
            f"{flower['to_tensors_s']:.2f} s",
            cpu(flower["cpu_ms_per_mib"]),
            f"{flower['object_bytes']:,} × {report['hops']} hops",
        )
        table.add_row(
            "",
            "  beyond the tiny message",
            f"{flower['beyond_tiny_s']:.2f} s",
            "",
            "",
            f"{flower['objects']} objects",
        )
        table.add_row(
            "",
            f"data plane (prepare + Fetch, raw, {plane['segment_digest']})",
            f"{plane['to_bytes_s']:.2f} s",
            f"{plane['to_tensors_s']:.2f} s",
            cpu(plane["cpu_ms_per_mib"]),
            f"{plane['wire_bytes']:,} × 1 hop",
        )
        table.add_row(
            "",
            "  Flower / data plane",
            f"{row['speedup_bytes']:.1f}×",
            f"{row['speedup_tensors']:.1f}×",
            f"beyond the tiny message: {row['speedup_beyond_tiny']:.1f}×",
            "",
        )
    return table
