"""Transport benchmark: the data plane against a bare gRPC stream, resume, fan-out, framing.

Six parts, measured in one run against one server process (plaintext on 127.0.0.1,
like the bare stream it is compared with), printed as a table (and JSON with --json):

  throughput  a model of --payload-mb MB streamed in --chunk-kib chunks from a server in
              another process, the median of --runs runs, alternating: a bare gRPC stream
              of the same bytes (received and dropped); the same segments through
              StreamSegments, received and dropped (the protocol's own cost); a fetch,
              whose every segment is also SHA-256-verified and kept, and the same fetch
              with BLAKE3 segment digests (where the blake3 package is installed); and
              the whole fetch (+ parsing the payload). For each stream, the CPU time
              per MiB of the client process and of the server process (getrusage),
              and what that allows: a
              stream that needs C ms of CPU per MiB in all cannot beat C / cores ms per
              MiB of wall time.
  digests     SHA-256 and BLAKE3 (where installed) over the same bytes in segments
              of --chunk-kib, one thread: MB/s and ms per MiB.
  resume      the same fetch with its stream cut after half the segments: the extra
              bytes a resumed fetch costs, against one segment's size.
  fan-out     --clients clients, each on its own connection, fetch the same int8 delta at
              once: wall time, errors, and how many encodes the server performed.
  framing     the bytes besides the payload of one fetch and one push of the digits CNN
              as a sparse delta, as an edge sends them in a round
              (fedsqueeze.bench.framing).
  flower      models of --flower-mb MB (default 64 and 512) sent from a ServerApp to a
              ClientApp through Flower's own path (a SuperLink, a SuperNode and
              `flwr run` on loopback: arrays as 5 MiB SHA-256-addressed objects over
              three hops) and through the data plane (raw, every segment verified), side
              by side: send to receipt, CPU ms per MiB of each process, bytes
              (fedsqueeze.bench.flowerpath).

GB/s is 10^9 bytes per second. Nothing here asserts a time: machines are shared.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

import grpc
import torch
from rich.console import Console
from rich.table import Table

from fedsqueeze.bench.flags import add_transport_arguments as add_arguments
from fedsqueeze.bench.flags import check_transport_flags, flower_sizes
from fedsqueeze.bench.framing import measure_framing
from fedsqueeze.codec import CodecSpec, QuantSpec
from fedsqueeze.transport import (
    FaultInjector,
    FetchState,
    InMemoryModelSource,
    RetryPolicy,
    ServerConfig,
    TokenTable,
    TransferClient,
    TransferServer,
    UpdateStore,
)
from fedsqueeze.transport.accounting import serialize_message
from fedsqueeze.transport.cache import CacheKey
from fedsqueeze.transport.prepare import prepare_model
from fedsqueeze.transport.server import SERVICE_NAME, message_size_options
from fedsqueeze.wire.convert import (
    segment_from_message,
    segment_request_to_proto,
    segment_view_from_message,
)
from fedsqueeze.wire.digests import SegmentDigest, blake3_available, digest_function
from fedsqueeze.wire.types import ManifestRequest, SegmentRequest

__all__ = ["TransportBenchOptions", "add_arguments", "main", "register", "run_transport_bench"]

Json = dict[str, Any]
State = dict[str, torch.Tensor]
#: What streaming segments should reach, as a fraction of the bare stream.
TARGET_RATIO = 0.8
#: The throughput model is sent as is (random floats do not compress).
STREAM_SPEC = CodecSpec(entropy_level=0)
#: The fan-out delta: int8 everywhere, no entropy stage.
FANOUT_SPEC = CodecSpec(quant=QuantSpec(8), targets=("*",), min_ndim=1, entropy_level=0)
_BARE_METHOD = "/fedsqueeze.bench.BareStream/Stream"
_GB = 1e9
_MIB = 1 << 20


def _cpu_s() -> float:
    """CPU seconds (user + system, all threads) this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class TransportBenchOptions:
    """What :func:`run_transport_bench` measures (sizes in MB of 10^6 bytes).

    Attributes
    ----------
    payload_mb, chunk_bytes : float, int
        Size of the streamed model; segment (and bare chunk) size in bytes.
    flower_mb : tuple of float
        Sizes sent through Flower's own path and the data plane (empty: no such part).
    flower_only : bool
        Only that part.
    runs : int
        Timed runs of each stream (the median is reported), after one warm-up each.
    clients, fanout_mb : int, float
        Concurrent clients of the fan-out part, and the size of its model.
    """

    payload_mb: float = 64.0
    chunk_bytes: int = 1 << 20
    runs: int = 5
    clients: int = 100
    fanout_mb: float = 2.0
    flower_mb: tuple[float, ...] = (64.0, 512.0)
    flower_only: bool = False

    def __post_init__(self) -> None:
        if not (self.payload_mb > 0 and self.fanout_mb > 0):
            raise ValueError("payload_mb and fanout_mb must be > 0")
        if not all(mb > 0 for mb in self.flower_mb):
            raise ValueError("flower_mb sizes must be > 0")
        if self.flower_only and not self.flower_mb:
            raise ValueError("flower_only needs flower_mb sizes")
        if self.runs < 1 or self.clients < 1 or self.chunk_bytes < 1024:
            raise ValueError("runs and clients must be >= 1, chunk_bytes >= 1024")


def random_state(megabytes: float, seed: int, tensors: int = 8) -> State:
    """``tensors`` random float32 matrices of ``megabytes`` MB in all."""
    g = torch.Generator().manual_seed(seed)
    cols = 1024
    rows = max(1, round(megabytes * 1e6 / 4 / cols / tensors))
    return {f"layer{i}.weight": torch.randn(rows, cols, generator=g) for i in range(tensors)}


# --------------------------------------------------------------------------- server process
def _serve(
    conn: Connection,
    payload_mb: float,
    chunk_bytes: int,
    fanout: tuple[State, State],
    tokens: Mapping[str, str],
    max_workers: int,
) -> None:
    """The server process: the transfer service and a bare stream of the same bytes."""
    source = InMemoryModelSource(keep=4)
    target = source.publish(random_state(payload_mb, seed=1), track="bench")
    source.publish(fanout[0], track="fanout-base")
    source.publish(fanout[1], track="fanout")
    faults = FaultInjector()
    config = ServerConfig(segment_bytes=chunk_bytes, max_workers=max_workers)
    server = TransferServer(
        source, UpdateStore(), TokenTable(tokens), config=config, plaintext=True, faults=faults
    )
    key = CacheKey(target, None, STREAM_SPEC, None)
    prepared = server.cache.get_or_build(key, lambda: prepare_model(source, key, chunk_bytes))
    payloads = [segment_from_message(m).payload for m in prepared.messages]

    def bare(request: bytes, context: grpc.ServicerContext) -> Any:
        yield from payloads

    bare_server = grpc.server(ThreadPoolExecutor(4), options=message_size_options(4 << 20))
    handler = {"Stream": grpc.unary_stream_rpc_method_handler(bare)}
    bare_server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("fedsqueeze.bench.BareStream", handler),)
    )
    bare_port = bare_server.add_insecure_port("127.0.0.1:0")
    bare_server.start()
    server.start()
    conn.send((server.port, bare_port, sum(len(p) for p in payloads), len(payloads)))
    try:
        while True:
            command, arg = conn.recv()
            if command == "stats":
                conn.send(asdict(server.stats()))
            elif command == "cpu":
                conn.send(_cpu_s())
            elif command == "cut":
                faults.cut_streams_after(arg, times=1)
                conn.send(None)
            else:
                break
    finally:
        bare_server.stop(0).wait()
        server.stop(grace=0)


# --------------------------------------------------------------------------- measurements
@dataclass(frozen=True)
class _Sample:
    """One timed stream: throughput, and CPU per MiB of each process."""

    gb_s: float
    client_ms: float
    server_ms: float


def _medians(samples: list[_Sample]) -> Json:
    return {
        "gb_s": statistics.median(s.gb_s for s in samples),
        "client_cpu_ms_per_mib": statistics.median(s.client_ms for s in samples),
        "server_cpu_ms_per_mib": statistics.median(s.server_ms for s in samples),
    }


def _throughput(
    options: TransportBenchOptions,
    client: TransferClient,
    token: str,
    bare_port: int,
    payload_bytes: int,
    command: Callable[[str, Any], Any],
) -> Json:
    size_limits = message_size_options(4 << 20)
    bare_channel = grpc.insecure_channel(f"127.0.0.1:{bare_port}", options=size_limits)
    bare_call = bare_channel.unary_stream(_BARE_METHOD)
    # The same segments with nothing verified or kept: the protocol's own cost.
    manifest = client.get_manifest(ManifestRequest("bench", None, STREAM_SPEC))
    request = segment_request_to_proto(SegmentRequest(manifest.manifest_key, frozenset()))
    raw_call = client.channel.unary_stream(
        f"/{SERVICE_NAME}/StreamSegments",
        request_serializer=serialize_message,
        response_deserializer=segment_view_from_message,
    )
    mib = payload_bytes / _MIB

    def timed(run: Callable[[], Any]) -> tuple[float, float, float, Any]:
        server_before, client_before = command("cpu", None), _cpu_s()
        started = time.perf_counter()
        outcome = run()
        seconds = time.perf_counter() - started
        return seconds, _cpu_s() - client_before, command("cpu", None) - server_before, outcome

    def sample(seconds: float, client_s: float, server_s: float) -> _Sample:
        return _Sample(payload_bytes / seconds / _GB, client_s / mib * 1e3, server_s / mib * 1e3)

    def run_bare() -> _Sample:
        seconds, client_s, server_s, _ = timed(
            lambda: sum(len(chunk) for chunk in bare_call(b"", timeout=120))
        )
        return sample(seconds, client_s, server_s)

    def run_unverified() -> _Sample:
        seconds, client_s, server_s, _ = timed(
            lambda: sum(
                len(s.payload) for s in raw_call(request, timeout=120, metadata=client.metadata)
            )
        )
        return sample(seconds, client_s, server_s)

    def run_fetch(client: TransferClient) -> tuple[_Sample, _Sample, int]:
        stream_end: list[float] = []

        def at_the_end(held: int, total: int) -> None:
            if held == total:  # the last segment is verified: the stream's work is done
                stream_end.append(_cpu_s())

        client_before = _cpu_s()
        seconds, client_s, server_s, result = timed(
            lambda: client.fetch("bench", spec=STREAM_SPEC, decode=False, progress=at_the_end)
        )
        stream_client_s = stream_end[0] - client_before if stream_end else client_s
        verified = sample(result.stats.stream_s, stream_client_s, server_s)
        return verified, sample(seconds, client_s, server_s), result.stats.wire.received

    # The same fetch with each segment digest this machine has, alternating in one run.
    fetchers = {"": client}
    if blake3_available():
        fetchers["_blake3"] = TransferClient(
            client.target,
            edge_id=client.edge_id,
            token=token,
            plaintext=True,
            segment_digest=SegmentDigest.BLAKE3,
        )
    names = ["bare", "unverified"] + [f"{k}{s}" for s in fetchers for k in ("verified", "fetch")]
    runs: dict[str, list[_Sample]] = {name: [] for name in names}
    wire_down = 0
    try:
        for run in range(options.runs + 1):  # run 0 warms everything up
            samples = [run_bare(), run_unverified()]
            for fetcher in fetchers.values():
                verified, fetch, wire_down = run_fetch(fetcher)
                samples += [verified, fetch]
            if run > 0:
                for name, value in zip(runs, samples, strict=True):
                    runs[name].append(value)
    finally:
        bare_channel.close()
        for suffix, fetcher in fetchers.items():
            if suffix:
                fetcher.close()
    medians = {name: _medians(samples) for name, samples in runs.items()}
    bare_gb_s, segments_gb_s = medians["bare"]["gb_s"], medians["verified"]["gb_s"]
    cpus = os.cpu_count() or 1

    def cpu_total(name: str) -> float:
        return float(
            medians[name]["client_cpu_ms_per_mib"] + medians[name]["server_cpu_ms_per_mib"]
        )

    # Wall time per MiB cannot be below the CPU time per MiB spread over every core.
    verified_ceiling_gb_s = _MIB / _GB / (cpu_total("verified") / cpus / 1e3)

    def paired_ratio(name: str) -> float:
        """Median over runs of (this stream / the bare stream of the same run)."""
        pairs = zip(runs[name], runs["bare"], strict=True)
        return float(statistics.median(s.gb_s / b.gb_s for s, b in pairs))

    blake3: Json = {}
    if "verified_blake3" in medians:
        fast_gb_s = medians["verified_blake3"]["gb_s"]
        fast_ceiling = _MIB / _GB / (cpu_total("verified_blake3") / cpus / 1e3)
        blake3 = {
            "segments_blake3_gb_s": fast_gb_s,
            "fetch_blake3_gb_s": medians["fetch_blake3"]["gb_s"],
            "ratio_blake3": fast_gb_s / bare_gb_s,
            "paired_ratio_blake3": paired_ratio("verified_blake3"),
            "verified_blake3_ceiling_gb_s": fast_ceiling,
        }
    return {
        "payload_bytes": payload_bytes,
        "chunk_bytes": options.chunk_bytes,
        "runs": options.runs,
        "cpus": cpus,
        "bare_gb_s": bare_gb_s,
        "unverified_gb_s": medians["unverified"]["gb_s"],
        "segments_gb_s": segments_gb_s,
        "fetch_gb_s": medians["fetch"]["gb_s"],
        "ratio": segments_gb_s / bare_gb_s,
        "paired_ratio": paired_ratio("verified"),
        "target_ratio": TARGET_RATIO,
        **blake3,
        "bytes_down": wire_down,
        "cpu_ms_per_mib": {
            name: {k: v for k, v in m.items() if k != "gb_s"} for name, m in medians.items()
        },
        "bare_cores_busy": cpu_total("bare") / (_MIB / _GB / bare_gb_s * 1e3),
        "verified_ceiling_gb_s": verified_ceiling_gb_s,
        "ceiling_ratio": min(1.0, verified_ceiling_gb_s / bare_gb_s),
        **{f"{name}_runs_gb_s": [s.gb_s for s in samples] for name, samples in runs.items()},
    }


def _digest_rates(payload_bytes: int, chunk_bytes: int, runs: int) -> Json:
    """MB/s of each segment digest over the model's bytes in segments, on one thread.

    Random bytes (digests do not care what they are), the median of ``runs`` passes,
    the algorithms alternating so that both see the same load.
    """
    data = os.urandom(payload_bytes)
    view = memoryview(data)
    algorithms = [SegmentDigest.SHA256] + ([SegmentDigest.BLAKE3] if blake3_available() else [])
    seconds: dict[str, list[float]] = {a.value: [] for a in algorithms}
    for _ in range(runs):
        for algorithm in algorithms:
            digest = digest_function(algorithm)
            started = time.perf_counter()
            for start in range(0, payload_bytes, chunk_bytes):
                digest(view[start : start + chunk_bytes])
            seconds[algorithm.value].append(time.perf_counter() - started)
    rates = {name: payload_bytes / statistics.median(s) / 1e6 for name, s in seconds.items()}
    return {
        "mb_s": rates,
        "ms_per_mib": {name: _MIB / 1e6 / rate * 1e3 for name, rate in rates.items()},
    }


def _resume(client: TransferClient, command: Callable[[str, Any], Any], segments: int) -> Json:
    full = client.fetch("bench", spec=STREAM_SPEC, decode=False).stats
    cut_after = max(1, segments // 2)
    command("cut", cut_after)
    resumed = client.fetch("bench", spec=STREAM_SPEC, decode=False, state=FetchState()).stats
    overhead = resumed.wire.total - full.wire.total
    return {
        "cut_after_segments": cut_after,
        "full_bytes": full.wire.total,
        "resumed_bytes": resumed.wire.total,
        "overhead_bytes": overhead,
        "calls": resumed.calls,
        "resumed_segments": resumed.resumed_segments,
    }


def _fanout(
    options: TransportBenchOptions,
    port: int,
    tokens: Mapping[str, str],
    base: State,
    command: Callable[[str, Any], Any],
) -> Json:
    encodes_before = command("stats", None)["cache"]["encodes"]
    retry = RetryPolicy(deadline_s=300.0)
    clients = [
        TransferClient(f"127.0.0.1:{port}", edge_id=e, token=t, plaintext=True, retry=retry)
        for e, t in tokens.items()
    ]
    barrier = threading.Barrier(len(clients) + 1)

    def fetch(client: TransferClient) -> int:
        barrier.wait(60)
        result = client.fetch("fanout", spec=FANOUT_SPEC, base=base)
        return result.stats.wire.received

    try:
        with ThreadPoolExecutor(len(clients)) as pool:
            futures = [pool.submit(fetch, c) for c in clients]
            barrier.wait(60)
            started = time.perf_counter()
            outcomes = [f.exception() or f.result() for f in futures]
            seconds = time.perf_counter() - started
    finally:
        for client in clients:
            client.close()
    received = [o for o in outcomes if isinstance(o, int)]
    errors = [repr(o) for o in outcomes if not isinstance(o, int)]
    return {
        "clients": len(clients),
        "seconds": seconds,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "encodes": command("stats", None)["cache"]["encodes"] - encodes_before,
        "bytes_down_per_client": statistics.median(received) if received else 0,
        "aggregate_gb_s": sum(received) / seconds / _GB,
    }


def run_transport_bench(
    options: TransportBenchOptions | None = None, console: Console | None = None
) -> Json:
    """Measure everything; print tables to ``console`` when given.

    Returns
    -------
    dict
        JSON-ready: ``{"machine", "throughput", "digests", "resume", "fanout", "framing",
        "flower"}``
        (``flower`` only with sizes in ``flower_mb``; only it with ``flower_only``).
    """
    options = options or TransportBenchOptions()
    out = console or Console(quiet=True)
    report: Json = {"machine": {"cpus": os.cpu_count(), "load_average_start": os.getloadavg()[0]}}
    if not options.flower_only:
        report.update(_data_plane_parts(options, out))
        out.print(_table(report))
    if options.flower_mb:
        from fedsqueeze.bench.flowerpath import FlowerPathOptions, flower_table, run_flower_path

        sizes = ", ".join(f"{mb:g}" for mb in options.flower_mb)
        out.print(
            f"Flower's own path and the data plane: {sizes} MB (a SuperLink, a SuperNode "
            "and `flwr run` on loopback; a minute or more)"
        )
        report["flower"] = run_flower_path(
            FlowerPathOptions(sizes_mb=options.flower_mb, runs=options.runs)
        )
        out.print(flower_table(report["flower"]))
    report["machine"]["load_average_end"] = os.getloadavg()[0]
    return report


def _data_plane_parts(options: TransportBenchOptions, out: Console) -> Json:
    """Throughput, resume, fan-out and framing against one server process."""
    report: Json = {}
    fan_base = random_state(options.fanout_mb, seed=2, tensors=4)
    fan_target = {k: v + 0.01 * torch.randn_like(v) for k, v in fan_base.items()}
    _, tokens = TokenTable.generate(["bench", *(f"bench-{i}" for i in range(options.clients))])
    fan_tokens = {e: t for e, t in tokens.items() if e != "bench"}
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    max_workers = min(options.clients + 8, 128)
    process = ctx.Process(
        target=_serve,
        args=(child, options.payload_mb, options.chunk_bytes, (fan_base, fan_target), tokens,
              max_workers),
        daemon=True,
    )  # fmt: skip
    process.start()

    def command(name: str, arg: Any) -> Any:
        parent.send((name, arg))
        return parent.recv()

    try:
        deadline = time.monotonic() + 300
        while not parent.poll(0.5):
            if not process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the benchmark server process did not start")
        port, bare_port, payload_bytes, segments = parent.recv()
        out.print(
            f"[bold]fedsqueeze bench transport[/bold]: {payload_bytes / 1e6:.1f} MB in "
            f"{segments} segments of {options.chunk_bytes} B, {os.cpu_count()} CPUs"
        )
        with TransferClient(
            f"127.0.0.1:{port}",
            edge_id="bench",
            token=tokens["bench"],
            plaintext=True,
            segment_digest=SegmentDigest.SHA256,
        ) as client:
            report["throughput"] = _throughput(
                options, client, tokens["bench"], bare_port, payload_bytes, command
            )
            report["digests"] = _digest_rates(payload_bytes, options.chunk_bytes, options.runs)
            report["resume"] = _resume(client, command, segments)
            report["resume"]["segment_bytes"] = payload_bytes // segments
        report["fanout"] = _fanout(options, port, fan_tokens, fan_base, command)
        framing = measure_framing()
        report["framing"] = {
            **asdict(framing),
            "fetch_framing_bytes": framing.fetch_framing_bytes,
            "push_framing_bytes": framing.push_framing_bytes,
        }
    finally:
        parent.send(("stop", None))
        process.join(30)
        if process.is_alive():
            process.terminate()
    return report


def _table(report: Json) -> Table:
    t, r, f, w = report["throughput"], report["resume"], report["fanout"], report["framing"]
    cpu = t["cpu_ms_per_mib"]

    def cpu_note(name: str) -> str:
        c = cpu[name]
        return (
            f"CPU ms/MiB: client {c['client_cpu_ms_per_mib']:.2f}, "
            f"server {c['server_cpu_ms_per_mib']:.2f}"
        )

    table = Table("measure", "value", "note", title="data plane (loopback, 2 processes)")
    table.columns[1].justify = "right"
    table.add_row("bare gRPC stream", f"{t['bare_gb_s']:.3f} GB/s",
                  f"median; {cpu_note('bare')}; {t['bare_cores_busy']:.1f} cores busy")  # fmt: skip
    table.add_row("StreamSegments, dropped", f"{t['unverified_gb_s']:.3f} GB/s",
                  cpu_note("unverified"))  # fmt: skip
    goal = f"{t['ratio']:.0%} of bare, {t['paired_ratio']:.0%} run by run (goal {TARGET_RATIO:.0%})"
    table.add_row("Fetch, verified (SHA-256) and kept", f"{t['segments_gb_s']:.3f} GB/s",
                  f"{goal}; {cpu_note('verified')}")  # fmt: skip
    if "segments_blake3_gb_s" in t:
        fast = f"{t['ratio_blake3']:.0%} of bare, {t['paired_ratio_blake3']:.0%} run by run"
        table.add_row("Fetch, verified (BLAKE3) and kept", f"{t['segments_blake3_gb_s']:.3f} GB/s",
                      f"{fast}; {cpu_note('verified_blake3')}")  # fmt: skip
    ceiling = f"{t['ceiling_ratio']:.0%} of bare: its CPU/MiB over {t['cpus']} cores"
    table.add_row("  SHA-256's CPU-bound ceiling", f"{t['verified_ceiling_gb_s']:.3f} GB/s",
                  ceiling)  # fmt: skip
    if "verified_blake3_ceiling_gb_s" in t:
        fast_ceiling = t["verified_blake3_ceiling_gb_s"]
        table.add_row("  BLAKE3's CPU-bound ceiling", f"{fast_ceiling:.3f} GB/s",
                      f"{min(1.0, fast_ceiling / t['bare_gb_s']):.0%} of bare")  # fmt: skip
    table.add_row("whole fetch (SHA-256)", f"{t['fetch_gb_s']:.3f} GB/s",
                  f"+ parsing the payload; {cpu_note('fetch')}")  # fmt: skip
    if "fetch_blake3_gb_s" in t:
        table.add_row("whole fetch (BLAKE3)", f"{t['fetch_blake3_gb_s']:.3f} GB/s",
                      f"+ parsing the payload; {cpu_note('fetch_blake3')}")  # fmt: skip
    rates = report["digests"]
    speeds = " / ".join(f"{v:,.0f}" for v in rates["mb_s"].values()) + " MB/s"
    costs = " / ".join(f"{k} {v:.2f} ms/MiB" for k, v in rates["ms_per_mib"].items())
    table.add_row("segment digests, one thread", speeds, costs)
    table.add_row("resume overhead", f"{r['overhead_bytes']} B",
                  f"cut after {r['cut_after_segments']} segments; "
                  f"one segment is {r['segment_bytes']} B")  # fmt: skip
    table.add_row(f"fan-out to {f['clients']} clients", f"{f['seconds']:.2f} s",
                  f"{f['errors']} errors, {f['encodes']} encode(s), "
                  f"{f['bytes_down_per_client']} B each")  # fmt: skip
    table.add_row("framing per fetch", f"{w['fetch_framing_bytes']} B",
                  f"{w['fetch_framing_down']} down, {w['fetch_framing_up']} up, "
                  f"{w['fetch_calls']} call; payload {w['fetch_payload_bytes']} B")  # fmt: skip
    table.add_row("framing per push", f"{w['push_framing_bytes']} B",
                  f"{w['push_framing_up']} up, {w['push_framing_down']} down; "
                  f"payload {w['push_payload_bytes']} B")  # fmt: skip
    return table


# --------------------------------------------------------------------------- CLI
def main(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed flags, print the table, write JSON if asked."""
    check_transport_flags(args)
    options = TransportBenchOptions(
        payload_mb=args.payload_mb,
        chunk_bytes=args.chunk_kib * 1024,
        runs=args.runs,
        clients=args.clients,
        fanout_mb=args.fanout_mb,
        flower_mb=flower_sizes(args),
        flower_only=args.flower_only,
    )
    report = run_transport_bench(options, Console(width=None if sys.stdout.isatty() else 120))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def register(subparsers: Any) -> None:
    """Add ``transport`` to a ``fedsqueeze bench`` sub-command parser set."""
    parser = subparsers.add_parser(
        "transport",
        help="data-plane throughput, resume, fan-out, and against Flower's own transfer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(_bench_main=main)
