"""Run the coordinator of a real federation on Flower's Deployment Engine.

It starts a Flower SuperLink on this machine (or uses an existing one given with
--superlink), submits the fedsqueeze run to it with `flwr run`, prints the run's log
while edges train, and ends with a per-round summary (accuracy, bytes down and up). The
coordinator's ServerApp keeps the global model's versions in --state-dir and serves
model bytes to edges on its own gRPC data plane (--data-plane-host/--data-plane-port).

Start it first, then one `fedsqueeze edge` per data partition (on this machine or
others); the run begins once --min-nodes edges are connected. Ctrl-C stops everything
this command started. Exit status: 0 when the run completed, 1 when it failed, 2 for a
usage error. A round that aggregated nothing (every edge failed, was rejected or was
dropped) fails the run, unless --set max-failed-rounds=N allows N such rounds; the
summary counts, per round, the accepted updates, failed edges, rejected updates and
dropped edges.

Examples::

    fedsqueeze coordinator --rounds 3 --min-nodes 2
    fedsqueeze coordinator --superlink-host 0.0.0.0 --data-plane-host 192.168.1.10 \\
        --data-plane-port 7443 --tls-cert dp.pem --tls-key dp.key --set epochs=2

See docs/deployment.md for a walkthrough.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fedsqueeze.deploy.federation import (
    LinkConnection,
    flower_env,
    write_app,
    write_flower_config,
    write_run_config,
)
from fedsqueeze.deploy.invite import edge_command
from fedsqueeze.deploy.preflight import parse_address
from fedsqueeze.deploy.processes import Supervisor, check_port_free, interrupt_on_signals
from fedsqueeze.deploy.runs import (
    STATE_FILE,
    RoundSummary,
    RunLog,
    RunStatus,
    failed_rounds,
    flwr_run_spec,
    format_summaries,
    read_round_summaries,
    stop_run,
    wait_for_outcome,
)
from fedsqueeze.deploy.superlink import (
    DEFAULT_SUPERLINK_PORT,
    FlowerTls,
    SuperLinkOptions,
    start_superlink,
)
from fedsqueeze.errors import ConfigError

if TYPE_CHECKING:  # imported where used: they pull in PyTorch, and --help must be quick
    from fedsqueeze.runconfig import RunSettings

__all__ = ["add_arguments", "main", "settings_from_args"]

# flag (argparse dest) → run-config key; --min-nodes sets two keys.
_FLAG_KEYS: dict[str, tuple[str, ...]] = {
    "rounds": ("num-rounds",),
    "task": ("task",),
    "down_spec": ("down-spec",),
    "up_spec": ("up-spec",),
    "freeze": ("freeze",),
    "state_dir": ("state-dir",),
    "data_plane_host": ("data-plane-host",),
    "data_plane_port": ("data-plane-port",),
    "data_plane_advertise": ("data-plane-advertise",),
    "min_nodes": ("min-train-nodes", "min-available-nodes"),
    "tls_cert": ("tls-cert",),
    "tls_key": ("tls-key",),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the coordinator's flags."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    run = parser.add_argument_group("the run (defaults: fedsqueeze's run config)")
    run.add_argument("--rounds", type=int, metavar="N", help="federated rounds (default 3)")
    run.add_argument("--task", help="learning task: digits-cnn, digits-mlp or module:attribute")
    run.add_argument("--down-spec", metavar="SPEC", help="codec spec of the model sent down")
    run.add_argument("--up-spec", metavar="SPEC", help="codec spec of the updates sent up")
    run.add_argument(
        "--freeze",
        metavar="PATTERNS",
        help="frozen tensors, sent at most once and never aggregated: glob patterns joined "
        "by '|', 'none', or 'auto' (default: the task's own, frozen.* for minilm-text)",
    )
    run.add_argument(
        "--min-nodes",
        type=int,
        metavar="N",
        help="edges that must be connected before a round starts, and train in it (default 2)",
    )
    run.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where the global model's versions, state.json and Flower's files go "
        "(default ./fedsqueeze-state)",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run recorded in --state-dir from its last completed round",
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other run-config key, e.g. --set epochs=2 --set lr=0.1 (repeatable; "
        "the flags above win over --set)",
    )
    plane = parser.add_argument_group("the data plane (model bytes, fedsqueeze's gRPC server)")
    plane.add_argument(
        "--data-plane-host",
        metavar="HOST",
        help="address the data plane listens on and edges dial (default 127.0.0.1; "
        "for other machines, this machine's address)",
    )
    plane.add_argument(
        "--data-plane-port",
        type=int,
        metavar="PORT",
        help="its port (default 0: any free port; fix one to open it in a firewall)",
    )
    plane.add_argument(
        "--data-plane-advertise",
        metavar="HOST[:PORT]",
        help="the address edges are told to dial, when it is not --data-plane-host "
        "(listening on 0.0.0.0, behind NAT or a port forward)",
    )
    plane.add_argument("--tls-cert", metavar="FILE", help="PEM certificate: serve it over TLS")
    plane.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    link = parser.add_argument_group("Flower's SuperLink (control messages)")
    link.add_argument(
        "--superlink",
        metavar="HOST:PORT",
        help="use this running SuperLink instead of starting one; the ServerApp then "
        "runs on its machine, so --state-dir and TLS paths are paths there",
    )
    link.add_argument(
        "--superlink-host",
        default="127.0.0.1",
        metavar="HOST",
        help="interface the SuperLink listens on (default 127.0.0.1; 0.0.0.0 for edges "
        "on other machines)",
    )
    link.add_argument(
        "--superlink-port",
        type=int,
        default=DEFAULT_SUPERLINK_PORT,
        metavar="PORT",
        help=f"its one port for edges and for flwr (default {DEFAULT_SUPERLINK_PORT})",
    )
    link.add_argument(
        "--flower-cert", metavar="FILE", help="PEM certificate: the SuperLink uses TLS"
    )
    link.add_argument("--flower-key", metavar="FILE", help="PEM private key of --flower-cert")
    link.add_argument(
        "--flower-ca",
        metavar="FILE",
        help="PEM CA certificate that signed --flower-cert (with --superlink: the one "
        "that signed that SuperLink's certificate)",
    )


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """The run's settings: defaults < --set < the dedicated flags.

    Raises
    ------
    ConfigError
        For a malformed ``--set``, an unknown key or a value that does not fit.
    """
    from fedsqueeze.runconfig import RunSettings
    from fedsqueeze.transport.tls import is_loopback

    _check_min_nodes(args.min_nodes)
    config: dict[str, object] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        config[key.strip()] = value.strip()
    for dest, keys in _FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            config.update(dict.fromkeys(keys, value))
    if args.resume:
        config["resume"] = True
    settings = RunSettings.from_run_config(config)
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if ":" not in settings.task:  # a built-in name; a user task loads where the ServerApp runs
        from fedsqueeze.tasks import get_task  # deferred: pulls in scikit-learn

        get_task(settings.task)
    if not settings.tls_cert and not is_loopback(settings.data_plane_host):
        raise ConfigError(
            f"the data plane carries model bytes in plaintext only on loopback, not on "
            f"{settings.data_plane_host}: give it --tls-cert and --tls-key"
        )
    return settings


def main(args: argparse.Namespace) -> int:
    """Run the coordinator; returns the exit status."""
    from fedsqueeze.runconfig import RunSettings

    settings = settings_from_args(args)
    tls = _flower_tls(args)
    local = args.superlink is None
    if args.superlink is not None:
        parse_address(args.superlink, "--superlink")
    _check_state_dir(settings.state_dir)
    flower_dir = Path(settings.state_dir).expanduser().resolve() / "flower"
    if local:
        settings = _localize(settings)
        _check_resume(settings)
        _check_data_plane_port(settings)
    link = SuperLinkOptions(args.superlink_host, _port(args.superlink_port), tls)
    if local and settings.data_plane_port == link.port:
        raise ConfigError(
            f"--data-plane-port {link.port} is also the SuperLink's port (--superlink-port);"
            " give each its own"
        )
    address = args.superlink or link.local_address
    ca = Path(args.flower_ca).expanduser().resolve() if args.flower_ca else None
    if ca is not None and not ca.is_file():
        raise FileNotFoundError(f"no such file: {args.flower_ca}")
    home = flower_dir / "home"
    write_flower_config(home, LinkConnection(address, ca))
    app_dir = write_app(flower_dir / "app", RunSettings().to_run_config())
    run_config = write_run_config(flower_dir / "run-config.toml", settings.to_run_config())
    env = flower_env(home)
    out = sys.stdout
    with interrupt_on_signals(), Supervisor(adopt_orphans=True) as supervisor:
        if local:
            log_file = flower_dir / "superlink.log"
            print(f"Starting a Flower SuperLink on {link.host}:{link.port} (log: {log_file})")
            start_superlink(supervisor, link, env, log_file)
            print(_edge_instructions(link, settings), flush=True)
        offset = _resume_banner(settings) if local else 0
        runner = supervisor.start(flwr_run_spec(app_dir, run_config, env))
        run_log = RunLog(out, color=out.isatty(), round_offset=offset)
        try:
            run_id = run_log.follow(runner)
        except KeyboardInterrupt:
            if not local and run_log.run_id is not None:
                # Not our SuperLink: it would go on running the run without us.
                stop_run(run_log.run_id, env)
            raise
        if run_id is None:
            print(
                f"fedsqueeze coordinator: flwr run did not start a run (exit status "
                f"{runner.poll()}); its output is above",
                file=sys.stderr,
            )
            return 1
        outcome = wait_for_outcome(run_id, env)
    rows = read_round_summaries(Path(settings.state_dir)) if local else []
    if rows:
        print(f"\nRun {run_id}: {len(rows)} round(s) recorded in {settings.state_dir}")
        print(format_summaries(rows))
    if outcome.status is RunStatus.COMPLETED and _failed_rounds_tolerated(rows, settings):
        print(f"Run {run_id} completed.")
        return 0
    details = f": {outcome.details}" if outcome.details else ""
    print(f"fedsqueeze coordinator: run {run_id} {outcome.status.value}{details}", file=sys.stderr)
    return 1


def _failed_rounds_tolerated(rows: list[RoundSummary], settings: RunSettings) -> bool:
    """Say which rounds aggregated nothing; whether max-failed-rounds allows that many."""
    failed = failed_rounds(rows)
    if failed:
        print(
            f"fedsqueeze coordinator: {len(failed)} round(s) aggregated nothing "
            f"({', '.join(map(str, failed))}); max-failed-rounds = {settings.max_failed_rounds}",
            file=sys.stderr,
        )
    return len(failed) <= settings.max_failed_rounds


def _flower_tls(args: argparse.Namespace) -> FlowerTls | None:
    files = (args.flower_cert, args.flower_key, args.flower_ca)
    if args.superlink is not None:
        if args.flower_cert or args.flower_key:
            raise ConfigError("--flower-cert/--flower-key are for the SuperLink this starts")
        return None
    if not any(files):
        return None
    if not all(files):
        raise ConfigError("Flower TLS needs all of --flower-cert, --flower-key and --flower-ca")
    tls = FlowerTls(*(Path(f).resolve() for f in files))
    if tls.missing():
        raise FileNotFoundError(f"no such file: {tls.missing()[0]}")
    return tls


def _localize(settings: RunSettings) -> RunSettings:
    """Absolute paths: the ServerApp does not run in this directory."""
    state_dir = Path(settings.state_dir).expanduser().resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    cert, key = settings.tls_cert, settings.tls_key
    for name in (cert, key):
        if name and not Path(name).expanduser().is_file():
            raise FileNotFoundError(f"no such file: {name}")
    return replace(
        settings,
        state_dir=str(state_dir),
        tls_cert=str(Path(cert).expanduser().resolve()) if cert else "",
        tls_key=str(Path(key).expanduser().resolve()) if key else "",
    )


def _check_resume(settings: RunSettings) -> None:
    """Fail now, not after Flower started the ServerApp, on a state dir already used."""
    if settings.resume:
        return
    state = Path(settings.state_dir) / STATE_FILE
    if read_round_summaries(Path(settings.state_dir)):
        raise ConfigError(
            f"{state.parent} already holds a run: pass --resume to continue it, or choose "
            "another --state-dir"
        )


def _check_min_nodes(value: int | None) -> None:
    """A run that waits for no edge would "complete" having trained nothing."""
    if value is not None and value < 1:
        raise ConfigError(f"--min-nodes must be >= 1, got {value}")


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ConfigError(f"--superlink-port must be in 1..65535, got {value}")
    return value


def _check_state_dir(name: str) -> None:
    """A --state-dir that exists must be a directory."""
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--state-dir {name} is not a directory")


def _check_data_plane_port(settings: RunSettings) -> None:
    """A fixed data-plane port must be free now, before the SuperLink starts.

    The ServerApp binds it only once the run starts; found busy then, the run fails
    after edges have connected.
    """
    if settings.data_plane_port:
        host = {"": "0.0.0.0"}.get(settings.data_plane_host, settings.data_plane_host)
        check_port_free(host, settings.data_plane_port, "the data plane (--data-plane-port)")


def _edge_instructions(link: SuperLinkOptions, settings: RunSettings) -> str:
    """The complete command edges start with, TLS flags included."""
    host = "THIS-MACHINE" if link.host in ("0.0.0.0", "::", "") else link.host
    address = f"[{host}]:{link.port}" if ":" in host else f"{host}:{link.port}"
    command = edge_command(
        address,
        flower_ca=link.tls.ca_certfile if link.tls else None,
        data_plane_cert=Path(settings.tls_cert) if settings.tls_cert else None,
    )
    lines = ["SuperLink ready. Start each edge with:", f"  {command}"]
    if link.tls or settings.tls_cert:
        lines.append("  (copy the CA file(s) named there to each edge machine)")
    return "\n".join(lines)


def _resume_banner(settings: RunSettings) -> int:
    """Say where a resumed run picks up; returns the rounds already completed."""
    if not settings.resume:
        return 0
    done = max((r.server_round for r in read_round_summaries(Path(settings.state_dir))), default=0)
    if done:
        left = max(0, settings.num_rounds - done)
        print(
            f"Resuming the run in {settings.state_dir} after round {done} of "
            f"{settings.num_rounds}: {left} round(s) to go. Flower counts the rounds of "
            f"this run from 1, so its [ROUND 1/{left}] is fedsqueeze round {done + 1}.",
            flush=True,
        )
    return done
