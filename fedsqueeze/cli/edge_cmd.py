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
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedsqueeze.deploy.processes import ManagedProcess, Supervisor
    from fedsqueeze.deploy.supernode import SuperNodeOptions

__all__ = ["CA_ENV", "add_arguments", "main"]

#: The variable edge/dataplane.py reads for the data plane's CA (its ``CA_ENV``).
CA_ENV = "FEDSQUEEZE_DATA_PLANE_CA"
#: The variables edge/dataplane.py reads for spooling and the fetch deadline (its
#: ``SPOOL_DIR_ENV``, ``SPOOL_MB_ENV``, ``FETCH_TIMEOUT_ENV``).
SPOOL_DIR_ENV = "FEDSQUEEZE_SPOOL_DIR"
SPOOL_MB_ENV = "FEDSQUEEZE_SPOOL_MB"
FETCH_TIMEOUT_ENV = "FEDSQUEEZE_FETCH_TIMEOUT_S"
#: The SuperNode's Runtime API host (``supernode.RUNTIME_HOST``; not imported, so that
#: ``--help`` stays fast).
RUNTIME_HOST = "127.0.0.1"
#: The SuperNode's log, under the work directory.
LOG_NAME = "supernode.log"


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
        "so that a restarted edge downloads only a delta (default: WORK-DIR/cache); "
        "also the versions it held lately, by content (CACHE-DIR/parts), so that "
        "tensors a later model shares with them are not downloaded again",
    )
    parser.add_argument(
        "--part-cache-mb",
        type=float,
        metavar="MB",
        help="most megabytes (MiB) of held tensors kept in CACHE-DIR/parts; the least "
        "recently used versions go first (default: 512)",
    )
    parser.add_argument(
        "--spool-mb",
        type=float,
        metavar="MB",
        help="models of at least this many MiB (raw) are fetched in bounded memory: "
        "verified segments go to a file and the model is decoded part by part into a "
        "file it is then read from (default: 256)",
    )
    parser.add_argument(
        "--spool-dir",
        metavar="DIR",
        help="an existing folder for those files, which are deleted as soon as they are "
        "open (default: the system's temporary folder)",
    )
    parser.add_argument(
        "--fetch-timeout-s",
        type=float,
        metavar="S",
        help="how long one fetch or upload may take, retries included (default: 60); "
        "raise it for large models: the coordinator's first encoding of a "
        "billion-parameter model takes minutes",
    )


def client_app_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment variables the edge's ClientApps get from its flags (the data
    plane's CA, threads, spooling and the fetch deadline), checked.

    Raises
    ------
    ConfigError
        A flag's value that cannot be used.
    FileNotFoundError
        ``--data-plane-ca`` names no file.
    """
    from fedsqueeze.deploy.preflight import check_pem_ca
    from fedsqueeze.errors import ConfigError

    extra: dict[str, str] = {}
    data_plane_ca = _existing(args.data_plane_ca)
    if data_plane_ca is not None:
        check_pem_ca(data_plane_ca, "--data-plane-ca")
        extra[CA_ENV] = str(data_plane_ca)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        extra.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    for flag, value, var in (
        ("--spool-mb", args.spool_mb, SPOOL_MB_ENV),
        ("--fetch-timeout-s", args.fetch_timeout_s, FETCH_TIMEOUT_ENV),
    ):
        if value is not None:
            if not 0 < value < float("inf"):
                raise ConfigError(f"{flag} must be a finite number > 0, got {value}")
            extra[var] = repr(value)
    if args.spool_dir is not None:
        spool_dir = Path(args.spool_dir).expanduser().resolve()
        if not spool_dir.is_dir():
            raise ConfigError(f"--spool-dir names no folder: {args.spool_dir}")
        extra[SPOOL_DIR_ENV] = str(spool_dir)
    return extra


def main(args: argparse.Namespace) -> int:
    """Run the edge until Ctrl-C or SIGTERM, restarting its SuperNode whenever it exits.

    Everything that can be checked is checked before anything starts (flags, CA files,
    whether the SuperLink speaks TLS).
    """
    from fedsqueeze.deploy.federation import flower_env
    from fedsqueeze.deploy.preflight import check_link_security, check_pem_ca, parse_address
    from fedsqueeze.deploy.processes import Supervisor, free_port, interrupt_on_signals
    from fedsqueeze.deploy.supernode import SuperNodeOptions
    from fedsqueeze.errors import ConfigError

    host, port = parse_address(args.superlink, "--superlink")
    extra = client_app_env(args)
    part_bytes = None
    if args.part_cache_mb is not None:
        if not args.part_cache_mb > 0:
            raise ConfigError(f"--part-cache-mb must be > 0, got {args.part_cache_mb}")
        part_bytes = max(1, int(args.part_cache_mb * (1 << 20)))
    flower_ca = _existing(args.flower_ca)
    if flower_ca is not None:
        check_pem_ca(flower_ca, "--flower-ca")
    try:
        options = SuperNodeOptions(
            superlink=args.superlink,
            partition_id=args.partition_id,
            num_partitions=args.num_partitions,
            runtime_port=args.runtime_port or free_port(RUNTIME_HOST),
            root_certificates=flower_ca,
        )
    except ValueError as exc:
        raise ConfigError(str(exc).replace("_", "-")) from exc
    check_link_security(args.superlink, host, port, flower_ca)
    with contextlib.ExitStack() as stack:
        work_dir = _work_dir(args.work_dir)
        work = work_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="fsq-edge-"))
        )
        cache = Path(args.cache_dir).expanduser().resolve() if args.cache_dir else work / "cache"
        try:
            options = replace(options, cache_dir=cache, part_cache_bytes=part_bytes)
        except ValueError as exc:
            raise ConfigError(str(exc).replace("_", "-")) from exc
        cache.mkdir(parents=True, exist_ok=True)
        # Flower colours its console log unconditionally; these ask it (and rich, and
        # anything else that listens) not to. The SuperNode's output is piped to a log
        # file with colour codes stripped either way.
        extra.update(NO_COLOR="1", TERM="dumb")
        env = flower_env(work / "flwr-home", extra)
        log_file = work / LOG_NAME
        stack.enter_context(interrupt_on_signals())
        supervisor = stack.enter_context(Supervisor(adopt_orphans=True))
        _EdgeRun(supervisor, options, env, log_file, kept=work_dir is not None).run()
    return 0  # not reached: the edge ends by KeyboardInterrupt (exit status 130)


class _EdgeRun:
    """One edge: a SuperNode kept running, its output in a log, status lines printed."""

    def __init__(
        self,
        supervisor: Supervisor,
        options: SuperNodeOptions,
        env: dict[str, str],
        log_file: Path,
        *,
        kept: bool,
    ) -> None:
        from fedsqueeze.deploy.nodelog import NodeLog

        self.supervisor = supervisor
        self.options = options
        self.env = env
        self.log = NodeLog(log_file, self.say)
        self.kept = kept
        self.label = f"edge {options.partition_id}/{options.num_partitions}"
        self._copier: threading.Thread | None = None

    def say(self, line: str) -> None:
        """One status line on the edge's terminal."""
        print(f"{self.label}: {line}", flush=True)

    def run(self) -> None:
        """Start the SuperNode and keep it running; returns only by an exception."""
        from fedsqueeze.deploy.keeper import SuperNodeKeeper

        first = self._start()
        where = "" if self.kept else " (a temporary directory: keep it with --work-dir)"
        self.say(
            f"SuperNode running; it connects to the SuperLink at {self.options.superlink} "
            "and trains when the coordinator asks, and is started again whenever it exits "
            f"(a run ended, the coordinator restarted). Ctrl-C stops it. Flower's log: "
            f"{self.log.path}{where}"
        )
        keeper = SuperNodeKeeper(
            self._restart, describe=self._describe, report=self.say, quitting=self.log.quitting
        )
        keeper.run(first)

    def _start(self) -> ManagedProcess:
        """Stop what the last SuperNode left (its SuperExec, ClientApps), start anew."""
        from fedsqueeze.deploy.processes import Output
        from fedsqueeze.deploy.supernode import start_supernode

        self.supervisor.stop_all()
        process = start_supernode(self.supervisor, self.options, self.env, output=Output.PIPE)
        self._copier = self.log.follow(process.stdout)
        return process

    def _restart(self) -> ManagedProcess:
        process = self._start()
        self.say(f"SuperNode started again: it registers with {self.options.superlink}")
        return process

    def _describe(self, status: int | None) -> str:
        from fedsqueeze.deploy.keeper import explain_exit

        if self._copier is not None and status is not None:
            self._copier.join(timeout=5)  # its last lines, where Flower says why it quit
        return explain_exit(status, self.log.path)


def _work_dir(name: str | None) -> Path | None:
    if not name:
        return None
    path = Path(name).expanduser().resolve()
    if path.exists() and not path.is_dir():
        from fedsqueeze.errors import ConfigError

        raise ConfigError(f"--work-dir {name} is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _existing(name: str | None) -> Path | None:
    if not name:
        return None
    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {name}")
    return path
