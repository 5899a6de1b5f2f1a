"""Run one edge of a real federation on Flower's Deployment Engine.

It starts a Flower SuperNode that connects to the coordinator's SuperLink (--superlink,
printed by `fedsqueeze coordinator`) and waits for work. In each round Flower starts
the fedsqueeze ClientApp beside it: the ClientApp fetches the global model from the
coordinator's data plane, trains on this edge's partition of the task's data
(--partition-id of --num-partitions), and pushes back a compressed update.

The edge only dials out: to the SuperLink and to the data plane. It keeps running,
ready for the next run, until you press Ctrl-C, which stops everything it started.

Examples::

    fedsqueeze edge --superlink 127.0.0.1:8000 --partition-id 0 --num-partitions 2
    fedsqueeze edge --superlink coord.example.org:8000 --partition-id 3 \\
        --num-partitions 10 --flower-ca flower-ca.pem --data-plane-ca data-plane-ca.pem

See docs/deployment.md for a walkthrough.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

from fedsqueeze.deploy.federation import flower_env
from fedsqueeze.deploy.processes import Supervisor, free_port, interrupt_on_signals
from fedsqueeze.deploy.supernode import RUNTIME_HOST, SuperNodeOptions, start_supernode
from fedsqueeze.errors import ConfigError

__all__ = ["CA_ENV", "add_arguments", "main"]

#: The variable edge/dataplane.py reads for the data plane's CA (its ``CA_ENV``).
CA_ENV = "FEDSQUEEZE_DATA_PLANE_CA"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the edge's flags."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--superlink",
        required=True,
        metavar="HOST:PORT",
        help="the coordinator's SuperLink, e.g. 127.0.0.1:8000",
    )
    parser.add_argument(
        "--partition-id",
        type=int,
        required=True,
        metavar="I",
        help="which share of the task's training data this edge holds (0..N-1)",
    )
    parser.add_argument(
        "--num-partitions",
        type=int,
        required=True,
        metavar="N",
        help="how many shares the data is split into (usually the number of edges)",
    )
    parser.add_argument(
        "--data-plane-ca",
        metavar="FILE",
        help="PEM CA certificate that signed the data plane's certificate (when the "
        "coordinator runs it with --tls-cert)",
    )
    parser.add_argument(
        "--flower-ca",
        metavar="FILE",
        help="PEM CA certificate that signed the SuperLink's certificate (when the "
        "coordinator runs it with --flower-cert); without it the connection is plaintext",
    )
    parser.add_argument(
        "--runtime-port",
        type=int,
        default=0,
        metavar="PORT",
        help=f"local port ({RUNTIME_HOST} only) the SuperNode serves its ClientApps on "
        "(default 0: any free port, so several edges fit on one machine)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads each training process may use (default: PyTorch's choice)",
    )
    parser.add_argument(
        "--work-dir",
        metavar="DIR",
        help="where Flower unpacks the app and the edge keeps its model between rounds "
        "(default: a temporary directory, removed on exit)",
    )
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where the edge keeps the model it holds and its error-feedback residual, "
        "so that a restarted edge downloads only a delta (default: WORK-DIR/cache)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the edge until Ctrl-C or until its SuperNode exits; returns the exit status."""
    extra: dict[str, str] = {}
    data_plane_ca = _existing(args.data_plane_ca)
    if data_plane_ca is not None:
        extra[CA_ENV] = str(data_plane_ca)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        extra.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    flower_ca = _existing(args.flower_ca)
    with contextlib.ExitStack() as stack:
        if args.work_dir:
            work = Path(args.work_dir).expanduser().resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fsq-edge-")))
        cache = Path(args.cache_dir).expanduser().resolve() if args.cache_dir else work / "cache"
        try:
            options = SuperNodeOptions(
                superlink=args.superlink,
                partition_id=args.partition_id,
                num_partitions=args.num_partitions,
                runtime_port=args.runtime_port or free_port(RUNTIME_HOST),
                root_certificates=flower_ca,
                cache_dir=cache,
            )
        except ValueError as exc:
            raise ConfigError(str(exc).replace("_", "-")) from exc
        cache.mkdir(parents=True, exist_ok=True)
        env = flower_env(work / "flwr-home", extra)
        stack.enter_context(interrupt_on_signals())
        supervisor = stack.enter_context(Supervisor(adopt_orphans=True))
        label = f"edge {options.partition_id}/{options.num_partitions}"
        node = start_supernode(supervisor, options, env)
        print(
            f"{label}: SuperNode running; it connects to the SuperLink at {options.superlink} "
            "and trains when the coordinator asks. Ctrl-C stops it.",
            flush=True,
        )
        status = node.wait()
    print(f"{label}: SuperNode exited with status {status}", file=sys.stderr)
    return 0 if status == 0 else 1


def _existing(name: str | None) -> Path | None:
    if not name:
        return None
    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {name}")
    return path
