"""The data plane in bounded memory: a large model served and fetched between processes.

``fedsqueeze bench bigmodel --dataplane`` runs this for each size and spec, on a
synthetic model file written as :mod:`fedsqueeze.bench.bigmodel` writes them:

* a **server** process publishes the safetensors file mapped, not copied
  (:meth:`~fedsqueeze.transport.source.InMemoryModelSource.publish_file`), starts a
  :class:`~fedsqueeze.transport.server.TransferServer` on 127.0.0.1 (port 0, plaintext)
  and prepares the encoding (a ``GetManifest`` call of its own: encode, spool, segment
  digests, the decoded model's digest), then serves until told to stop;
* a **client** process fetches it with
  :meth:`~fedsqueeze.transport.client.TransferClient.fetch_into`: every segment verified
  into a file-backed buffer, then decoded part by part into a mapped safetensors output
  and the decoded model's digest checked.

Memory is each process's peak anonymous memory beyond its baseline after imports
(:mod:`fedsqueeze.bench.memprobe`, polled every 2 ms from the parent), which leaves out
the mapped input, the spool files and the mapped output. Times are the server's
preparation and the client's whole call. Lossless rows check the output bit for bit.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["measure"]

_MB = 1e6


# ------------------------------------------------------------------------- children
def _server(args: argparse.Namespace) -> int:
    from fedsqueeze.bench.memprobe import settled_baseline
    from fedsqueeze.codec.spec_text import parse_spec
    from fedsqueeze.transport import (
        InMemoryModelSource,
        RetryPolicy,
        ServerConfig,
        TokenTable,
        TransferServer,
    )
    from fedsqueeze.transport.client import TransferClient
    from fedsqueeze.transport.spool import SpoolPolicy
    from fedsqueeze.transport.updates import UpdateStore
    from fedsqueeze.wire.types import ManifestRequest

    baseline = settled_baseline()
    started = time.perf_counter()
    source = InMemoryModelSource()
    source.publish_file(args.model)
    published = time.perf_counter() - started
    tokens, handed = TokenTable.generate(["bench"])
    config = ServerConfig(spool=SpoolPolicy(directory=args.spool))
    server = TransferServer(source, UpdateStore(), tokens, config=config, plaintext=True)
    server.start()
    started = time.perf_counter()
    patient = RetryPolicy(deadline_s=7200.0)  # preparing 1B parameters takes minutes
    with TransferClient(
        server.address, edge_id="bench", token=handed["bench"], plaintext=True, retry=patient
    ) as local:
        manifest = local.get_manifest(
            ManifestRequest("global", None, parse_spec(args.spec), None, (), local.segment_digest)
        )
    prepared = time.perf_counter() - started
    partial = args.ready.with_suffix(".partial")
    partial.write_text(json.dumps({"address": server.address, "token": handed["bench"]}))
    partial.replace(args.ready)  # whole or not there
    while not args.stop.exists():
        time.sleep(0.05)
    server.stop(grace=5)
    left = [p for p in args.spool.rglob("*") if p.is_file()]
    report = {
        "baseline_anon": baseline,
        "publish_seconds": published,
        "prepare_seconds": prepared,
        "encoded_bytes": manifest.encoded_bytes,
        "segments": len(manifest.segments),
        "spooled": server.stats().cache.nbytes == 0,
        "spool_files_left": len(left),
    }
    print(json.dumps(report))
    return 0


def _client(args: argparse.Namespace) -> int:
    from fedsqueeze.bench.memprobe import settled_baseline
    from fedsqueeze.codec.spec_text import parse_spec
    from fedsqueeze.transport import RetryPolicy
    from fedsqueeze.transport.client import TransferClient
    from fedsqueeze.transport.spool import SpoolPolicy

    baseline = settled_baseline()
    spec = parse_spec(args.spec)
    started = time.perf_counter()
    patient = RetryPolicy(deadline_s=7200.0)
    with TransferClient(
        args.address, edge_id="bench", token=args.token, plaintext=True, retry=patient
    ) as c:
        done = c.fetch_into(
            spec=spec, output=args.output, overwrite=True, spool=SpoolPolicy(directory=args.spool)
        )
    seconds = time.perf_counter() - started
    if done.stats is None:
        raise RuntimeError("no stats")
    report = {
        "baseline_anon": baseline,
        "seconds": seconds,
        "stream_seconds": done.stats.stream_s,
        "spooled": done.spooled,
        "received": done.stats.wire.received,
        "out_bytes": done.nbytes,
    }
    print(json.dumps(report))
    return 0


def _child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("model", type=Path)
    s.add_argument("--spec", required=True)
    s.add_argument("--spool", type=Path, required=True)
    s.add_argument("--ready", type=Path, required=True)
    s.add_argument("--stop", type=Path, required=True)
    c = sub.add_parser("client")
    c.add_argument("address")
    c.add_argument("token")
    c.add_argument("output", type=Path)
    c.add_argument("--spec", required=True)
    c.add_argument("--spool", type=Path, required=True)
    args = parser.parse_args(argv)
    return _server(args) if args.role == "server" else _client(args)


# ------------------------------------------------------------------------- parent
def measure(model: Path, spec: str, folder: Path) -> dict[str, Any]:
    """Serve ``model`` encoded with ``spec`` from one process and fetch it into a file in
    another, the spool files and the output in ``folder``; returns both reports with
    their extra memory. The output is deleted."""
    from fedsqueeze.bench.memprobe import Measured, run_measured

    folder.mkdir(parents=True, exist_ok=True)
    spool_server, spool_client = folder / "spool-server", folder / "spool-client"
    spool_server.mkdir(exist_ok=True)
    spool_client.mkdir(exist_ok=True)
    ready, stop = folder / "ready.json", folder / "stop"
    ready.unlink(missing_ok=True)
    stop.unlink(missing_ok=True)
    output = folder / "fetched.safetensors"
    me = ["-m", "fedsqueeze.bench.bigfetch", "--child"]
    served: list[Measured] = []
    server_args = [*me, "server", str(model), "--spec", spec, "--spool", str(spool_server)]
    server_args += ["--ready", str(ready), "--stop", str(stop)]
    thread = threading.Thread(target=lambda: served.append(run_measured(server_args)))
    thread.start()
    try:
        while not ready.exists():
            if not thread.is_alive():
                break
            time.sleep(0.05)
        if not ready.exists():
            thread.join()
            raise RuntimeError(f"the server failed: {_last_line(served[0].stderr)}")
        info = json.loads(ready.read_text())
        client = run_measured(
            [
                *me,
                "client",
                "--spec",
                spec,
                "--spool",
                str(spool_client),
                "--",  # tokens made elsewhere may start with "-"
                info["address"],
                info["token"],
                str(output),
            ]
        )
    finally:
        stop.touch()
        thread.join()
    server = served[0]
    if server.returncode != 0:
        raise RuntimeError(f"the server failed: {_last_line(server.stderr)}")
    if client.returncode != 0:
        raise RuntimeError(f"the client failed: {_last_line(client.stderr)}")
    exact = None
    if spec == "lossless":
        from fedsqueeze.bench.bigmodel import _identical

        exact = _identical(model, output)
    output.unlink(missing_ok=True)
    return {
        "server": {**server.report, "extra": server.extra, "peak_anon": server.peak_anon},
        "client": {**client.report, "extra": client.extra, "peak_anon": client.peak_anon},
        "exact": exact,
    }


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or ["(no message)"])[-1]


def table(rows: list[dict[str, Any]]) -> None:
    """Print the data plane rows."""
    from rich.console import Console
    from rich.table import Table

    out = Table(title="data plane: peak anonymous memory beyond the mapped files, per process")
    for col in (
        "params",
        "spec",
        "ratio",
        "prepare s",
        "server extra",
        "fetch+decode s",
        "MB/s",
        "client extra",
        "spooled",
        "exact",
    ):
        out.add_column(col, justify="left" if col in ("spec", "spooled", "exact") else "right")
    for r in rows:
        raw, s, c = r["raw_bytes"], r["server"], r["client"]
        out.add_row(
            f"{r['params'] / 1e6:,.0f}M",
            r["spec"],
            f"{raw / s['encoded_bytes']:.2f}×",
            f"{s['prepare_seconds']:.1f}",
            f"{100 * s['extra'] / raw:.1f}% ({s['extra'] / _MB:,.0f} MB)",
            f"{c['seconds']:.1f}",
            f"{raw / _MB / c['seconds']:,.0f}",
            f"{100 * c['extra'] / raw:.1f}% ({c['extra'] / _MB:,.0f} MB)",
            f"{'yes' if s['spooled'] else 'NO'} / {'yes' if c['spooled'] else 'NO'}",
            "" if r["exact"] is None else ("yes" if r["exact"] else "NO"),
        )
    Console(width=160).print(out)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2:]))
    sys.exit("run it as: fedsqueeze bench bigmodel --dataplane")
