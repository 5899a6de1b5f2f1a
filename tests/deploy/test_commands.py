"""``fedsqueeze coordinator`` and ``fedsqueeze edge``: flags, user errors, Flower commands."""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from fedsqueeze.cli import coordinator_cmd, edge_cmd
from fedsqueeze.deploy.processes import Output, ProcessError, free_ports
from fedsqueeze.deploy.superlink import FlowerTls, SuperLinkOptions, superlink_spec
from fedsqueeze.deploy.supernode import SuperNodeOptions, supernode_spec
from fedsqueeze.errors import ConfigError
from fedsqueeze.runconfig import RunSettings


def _parse(module: object, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=getattr(module, "__doc__", ""))
    getattr(module, "add_arguments")(parser)  # noqa: B009
    return parser.parse_args(argv)


def _coordinator(*argv: str) -> argparse.Namespace:
    return _parse(coordinator_cmd, list(argv))


def _edge(*argv: str) -> argparse.Namespace:
    return _parse(edge_cmd, list(argv))


def test_flags_become_run_config_keys() -> None:
    args = _coordinator(
        "--rounds=5",
        "--task=digits-mlp",
        "--down-spec=int8",
        "--up-spec=topk10-int4",
        "--min-nodes=3",
        "--state-dir=/srv/fsq",
        "--data-plane-port=7443",
        "--resume",
        "--set",
        "epochs=2",
        "--set",
        "lr = 0.1",
    )
    settings = coordinator_cmd.settings_from_args(args)
    assert settings == RunSettings(
        task="digits-mlp",
        num_rounds=5,
        min_train_nodes=3,
        min_available_nodes=3,
        state_dir="/srv/fsq",
        data_plane_port=7443,
        resume=True,
        epochs=2,
        lr=0.1,
    )


def test_dedicated_flags_win_over_set() -> None:
    args = _coordinator("--set", "num-rounds=9", "--rounds", "4")
    assert coordinator_cmd.settings_from_args(args).num_rounds == 4
    assert coordinator_cmd.settings_from_args(_coordinator()) == RunSettings()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "epochs"], "KEY=VALUE"),
        (["--set", "=3"], "KEY=VALUE"),
        (["--set", "epoch=3"], "unknown run-config key 'epoch'"),
        (["--set", "epochs=many"], "expected int"),
        (["--task", "digits-rnn"], "unknown task 'digits-rnn'"),
        (["--rounds", "0"], "num-rounds"),
        (["--down-spec", "quant=9"], "bits must be"),
        (["--tls-cert", "a.pem"], "go together"),
        (["--data-plane-host", "192.0.2.7"], "--tls-cert"),
    ],
)
def test_bad_run_settings_are_config_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        coordinator_cmd.settings_from_args(_coordinator(*argv))


def test_a_used_state_dir_needs_resume(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(
        json.dumps({"completed_round": 1, "round_metrics": {"1": {"accuracy": 0.5}}})
    )
    with pytest.raises(ConfigError, match="--resume"):
        coordinator_cmd.main(_coordinator("--state-dir", str(tmp_path)))


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--flower-cert", "c.pem"], ConfigError),
        (["--flower-cert", "c.pem", "--flower-key", "k.pem", "--flower-ca", "x.pem"], OSError),
        (["--tls-cert", "no-such.pem", "--tls-key", "no-such.key"], OSError),
        (["--superlink", "10.0.0.1:8000", "--flower-key", "k.pem"], ConfigError),
        (["--superlink-port", "70000"], ConfigError),
    ],
)
def test_coordinator_user_errors_end_before_anything_starts(
    tmp_path: Path, argv: list[str], error: type[Exception]
) -> None:
    with pytest.raises(error):
        coordinator_cmd.main(_coordinator("--state-dir", str(tmp_path / "s"), *argv))
    assert not (tmp_path / "s" / "flower" / "superlink.log").exists()


def test_a_taken_superlink_port_is_refused(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = str(other.getsockname()[1])
        args = _coordinator("--state-dir", str(tmp_path), "--superlink-port", port)
        with pytest.raises(ProcessError, match="another one running"):
            coordinator_cmd.main(args)
    assert not (tmp_path / "flower" / "superlink.log").exists()


def test_one_port_for_the_superlink_and_the_data_plane_is_refused(tmp_path: Path) -> None:
    [port] = free_ports(1)
    args = _coordinator(
        *("--state-dir", str(tmp_path / "s"), "--superlink-port", str(port)),
        *("--data-plane-port", str(port)),
    )
    with pytest.raises(ConfigError, match="also the SuperLink's port"):
        coordinator_cmd.main(args)
    assert not (tmp_path / "s" / "flower").exists()


def test_free_ports_are_all_different_and_bindable() -> None:
    ports = free_ports(64)
    assert len(set(ports)) == 64 and all(1 <= p <= 65535 for p in ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    with pytest.raises(ValueError, match="at least 1"):
        free_ports(0)


def test_free_ports_come_from_below_the_ephemeral_range_else_from_the_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedsqueeze.deploy import processes

    assert all(p < processes._ephemeral_start() for p in free_ports(8))
    monkeypatch.setattr(processes, "_ephemeral_start", lambda: 1024)  # no room below
    ports = free_ports(4)
    assert len(set(ports)) == 4 and all(p >= 1024 for p in ports)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--partition-id", "2", "--num-partitions", "2"], "partition-id must be in 0..1"),
        (["--partition-id", "0", "--num-partitions", "0"], "num-partitions must be >= 1"),
        (["--partition-id", "0", "--num-partitions", "1", "--threads", "0"], "--threads"),
    ],
)
def test_edge_user_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        edge_cmd.main(_edge("--superlink", "127.0.0.1:8000", *argv))


def test_edge_needs_existing_ca_files() -> None:
    args = _edge(
        *("--superlink", "127.0.0.1:8000", "--partition-id", "0", "--num-partitions", "1"),
        *("--data-plane-ca", "/nonexistent/ca.pem"),
    )
    with pytest.raises(FileNotFoundError):
        edge_cmd.main(args)


def test_edge_and_dataplane_agree_on_the_ca_variable() -> None:
    from edge.dataplane import CA_ENV

    assert edge_cmd.CA_ENV == CA_ENV


def test_the_node_config_is_what_the_edge_app_reads(tmp_path: Path) -> None:
    from edge.mod import CACHE_DIR_KEY

    cache = tmp_path / "edge cache ü"
    options = SuperNodeOptions("127.0.0.1:8000", 3, 8, cache_dir=cache)
    parsed = parse_config_args([options.node_config])  # what flower-supernode does
    assert parsed == {"partition-id": 3, "num-partitions": 8, CACHE_DIR_KEY: str(cache)}
    with pytest.raises(ValueError, match="cache_dir"):
        SuperNodeOptions("127.0.0.1:8000", 0, 1, cache_dir=Path('a"b'))


def test_the_part_cache_bound_reaches_the_edge_app(tmp_path: Path) -> None:
    from flwr.app import Context, RecordDict

    from edge.cache import DirectoryCache
    from edge.mod import PART_CACHE_BYTES_KEY, default_cache

    options = SuperNodeOptions("127.0.0.1:8000", 0, 1, cache_dir=tmp_path, part_cache_bytes=5 << 20)
    parsed = parse_config_args([options.node_config])
    assert parsed[PART_CACHE_BYTES_KEY] == 5 << 20
    context = Context(run_id=1, node_id=1, node_config=parsed, state=RecordDict(), run_config={})
    cache = default_cache(context)
    assert isinstance(cache, DirectoryCache)
    assert cache.part_store().max_bytes == 5 << 20
    with pytest.raises(ValueError, match="part_cache_bytes"):
        SuperNodeOptions("127.0.0.1:8000", 0, 1, part_cache_bytes=0)
    with pytest.raises(ConfigError, match="--part-cache-mb"):
        edge_cmd.main(
            _edge(
                *("--superlink", "127.0.0.1:8000", "--partition-id", "0"),
                *("--num-partitions", "1", "--part-cache-mb", "0"),
            )
        )


def test_superlink_command(tmp_path: Path) -> None:
    plain = superlink_spec(SuperLinkOptions("0.0.0.0", 9000), {}, tmp_path / "l.log")
    assert plain.output is Output.FILE and plain.log_file == tmp_path / "l.log"
    assert "--insecure" in plain.argv and "--disable-runtime-dependency-installation" in plain.argv
    assert plain.argv[plain.argv.index("--port") + 1] == "9000"
    assert SuperLinkOptions("0.0.0.0", 9000).local_address == "127.0.0.1:9000"
    assert SuperLinkOptions("::", 9000).local_address == "[::1]:9000"
    tls = FlowerTls(tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem")
    secure = superlink_spec(SuperLinkOptions(tls=tls), {}, tmp_path / "l.log")
    assert "--insecure" not in secure.argv
    assert secure.argv[secure.argv.index("--ssl-ca-certfile") + 1] == str(tmp_path / "ca.pem")
    assert tls.missing() == [tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"]
    with pytest.raises(ValueError):
        SuperLinkOptions(port=0)


def test_supernode_command(tmp_path: Path) -> None:
    options = SuperNodeOptions("10.1.2.3:8000", 1, 4, runtime_port=9111)
    argv = supernode_spec(options, {}).argv
    assert argv[argv.index("--superlink") + 1] == "10.1.2.3:8000"
    assert argv[argv.index("--node-config") + 1] == "partition-id=1 num-partitions=4"
    assert argv[argv.index("--port") + 1] == "9111"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert "--insecure" in argv
    secure = SuperNodeOptions("10.1.2.3:8000", 0, 1, root_certificates=tmp_path / "ca.pem")
    argv = supernode_spec(secure, {}).argv
    assert "--insecure" not in argv
    assert argv[argv.index("--root-certificates") + 1] == str(tmp_path / "ca.pem")
    with pytest.raises(ValueError, match="HOST:PORT"):
        SuperNodeOptions("no-port", 0, 1)


def test_help_texts_explain_the_commands() -> None:
    coordinator = argparse.ArgumentParser(description=coordinator_cmd.__doc__)
    coordinator_cmd.add_arguments(coordinator)
    text = coordinator.format_help()
    for flag in ("--rounds", "--min-nodes", "--set", "--superlink", "--tls-cert", "--resume"):
        assert flag in text
    assert "SuperLink" in text and "Ctrl-C" in text
    edge = argparse.ArgumentParser(description=edge_cmd.__doc__)
    edge_cmd.add_arguments(edge)
    text = edge.format_help()
    for flag in ("--superlink", "--partition-id", "--num-partitions", "--data-plane-ca"):
        assert flag in text
    assert "SuperNode" in text


def test_the_advertised_data_plane_address_is_a_flag() -> None:
    args = _coordinator("--data-plane-advertise", "203.0.113.5:7443")
    assert coordinator_cmd.settings_from_args(args).data_plane_advertise == "203.0.113.5:7443"


def test_spool_and_deadline_flags_reach_the_client_apps_and_bad_ones_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge.dataplane import (
        FETCH_TIMEOUT_ENV,
        SPOOL_DIR_ENV,
        SPOOL_MB_ENV,
        GrpcConnector,
    )

    base = ("--superlink", "127.0.0.1:8000", "--partition-id", "0", "--num-partitions", "1")
    env = edge_cmd.client_app_env(
        _edge(*base, "--spool-mb", "64", "--spool-dir", str(tmp_path), "--fetch-timeout-s", "900")
    )
    assert env == {SPOOL_MB_ENV: "64.0", SPOOL_DIR_ENV: str(tmp_path), FETCH_TIMEOUT_ENV: "900.0"}
    assert edge_cmd.client_app_env(_edge(*base)) == {}
    # What a ClientApp started with that environment builds by default.
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    connector = GrpcConnector()
    assert connector.spool.threshold_bytes == 64 << 20 and connector.spool.directory == tmp_path
    assert connector.retry is not None and connector.retry.deadline_s == 900.0
    for flag, value, wanted in (
        ("--spool-mb", "0", "--spool-mb must be"),
        ("--spool-mb", "inf", "--spool-mb must be"),
        ("--fetch-timeout-s", "-1", "--fetch-timeout-s must be"),
        ("--spool-dir", str(tmp_path / "nowhere"), "--spool-dir names no folder"),
    ):
        with pytest.raises(ConfigError, match=wanted):
            edge_cmd.main(_edge(*base, flag, value))
    # A ClientApp given a bad value by hand says which variable.
    monkeypatch.setenv(SPOOL_MB_ENV, "lots")
    with pytest.raises(ConfigError, match=SPOOL_MB_ENV):
        GrpcConnector()
    monkeypatch.setenv(SPOOL_MB_ENV, "1")
    monkeypatch.setenv(SPOOL_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=SPOOL_DIR_ENV):
        GrpcConnector()
    monkeypatch.delenv(SPOOL_DIR_ENV)
    monkeypatch.setenv(FETCH_TIMEOUT_ENV, "0")
    with pytest.raises(ConfigError, match=FETCH_TIMEOUT_ENV):
        GrpcConnector()
