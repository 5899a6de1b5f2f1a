"""``fedsqueeze coordinator`` and two ``fedsqueeze edge`` processes on loopback.

Real Flower processes (SuperLink, SuperNodes, SuperExecs, ServerApp, ClientApps), two
rounds of digits-cnn over the data plane, then Ctrl-C; and Ctrl-C to a coordinator in
the middle of a run. Each test checks that nothing it started is left running.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fedsqueeze.deploy import free_port
from tests.deploy.procs import Fleet, fleet, marked, wait_until_none

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]


def _wait(popen: subprocess.Popen[bytes], timeout: float, f: Fleet, name: str) -> int:
    try:
        return popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} still running after {timeout:.0f} s:\n{f.tail(name)}")


def _wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, f: Fleet, name: str
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout:.0f} s:\n{f.tail(name)}")
        time.sleep(0.5)


@pytest.mark.timeout(300)
def test_a_coordinator_and_two_edges_run_two_rounds(tmp_path: Path) -> None:
    state = tmp_path / "state"
    link = free_port()
    started = time.monotonic()
    with fleet(tmp_path / "logs") as f:
        coordinator = f.start(
            "coordinator",
            "coordinator",
            "--superlink-port",
            str(link),
            "--rounds",
            "2",
            "--task",
            "digits-cnn",
            "--min-nodes",
            "2",
            "--state-dir",
            str(state),
            "--data-plane-port",
            str(free_port()),
            "--set",
            "epochs=1",
        )
        edges = [
            f.start(
                f"edge{i}",
                "edge",
                "--superlink",
                f"127.0.0.1:{link}",
                "--partition-id",
                str(i),
                "--num-partitions",
                "2",
                "--threads",
                "1",
                "--cache-dir",
                str(tmp_path / f"edge{i}"),
            )
            for i in range(2)
        ]
        status = _wait(coordinator, 240, f, "coordinator")
        assert status == 0, f.tail("coordinator")
        ran = time.monotonic() - started
        out = f.log("coordinator")
        assert "Run " in out and "completed." in out

        record = json.loads((state / "state.json").read_text())
        assert record["completed_round"] == 2
        rounds = {int(k): v for k, v in record["round_metrics"].items()}
        assert sorted(rounds) == [1, 2]
        assert rounds[2]["accuracy"] > rounds[1]["accuracy"] > 0.1  # 0.1: chance on digits
        for r in rounds.values():
            assert r["bytes-down"] > 0 and r["bytes-up"] > 0
            assert r["updates-accepted"] == 2
        # the initial model and one global version per round, all on disk
        globals_ = [record["tracks"]["init"], *record["versions"]]
        assert len(set(globals_)) >= 3
        stored = {p.stem for p in (state / "versions").glob("*.fsq")}
        assert record["tracks"]["global"] in stored and record["tracks"]["init"] in stored
        assert len(stored) >= 3

        # Each edge kept the model it holds in its cache directory (the node config's
        # fedsqueeze-cache-dir reached its ClientApp).
        for i in range(2):
            held = json.loads((tmp_path / f"edge{i}" / "edge.json").read_text())["held"]
            assert held in stored and held in record["edges"].values()

        # The coordinator stopped its SuperLink, SuperExec and ServerApp on its way out.
        link_side = ("flower-superlink", "flwr-serverapp", f"runtime-api-address 127.0.0.1:{link}")
        left = [cmd for _, cmd in marked(f.marker) if any(n in cmd for n in link_side)]
        assert left == []

        # The edges' SuperNodes and SuperExecs wait for the next run (and carry the marker).
        edge_side = " ".join(cmd for _, cmd in marked(f.marker))
        assert edge_side.count("flower-supernode") == 2
        assert edge_side.count("flower-superexec") == 2

        edges[0].send_signal(signal.SIGINT)  # Ctrl-C
        edges[1].send_signal(signal.SIGTERM)  # a service manager stopping it
        for i, edge in enumerate(edges):
            assert _wait(edge, 60, f, f"edge{i}") == 130, f.tail(f"edge{i}")
        assert wait_until_none(f.marker, 15) == []
    print(f"two deployed rounds: {ran:.1f} s, all stopped: {time.monotonic() - started:.1f} s")


@pytest.mark.timeout(150)
def test_ctrl_c_to_the_coordinator_stops_everything_it_started(tmp_path: Path) -> None:
    with fleet(tmp_path / "logs") as f:
        coordinator = f.start(
            "coordinator",
            "coordinator",
            "--superlink-port",
            str(free_port()),
            "--state-dir",
            str(tmp_path / "state"),
            "--min-nodes",
            "2",
        )
        # No edge ever connects: the ServerApp waits for nodes until it is stopped.
        _wait_for(
            lambda: any("flwr-serverapp" in cmd for _, cmd in marked(f.marker)),
            120,
            "ServerApp process",
            f,
            "coordinator",
        )
        names = " ".join(cmd for _, cmd in marked(f.marker))
        for name in ("flower-superlink", "flower-superexec", "flwr-serverapp"):
            assert name in names
        coordinator.send_signal(signal.SIGINT)
        assert _wait(coordinator, 60, f, "coordinator") == 130, f.tail("coordinator")
        assert "interrupted" in f.log("coordinator")
        assert wait_until_none(f.marker, 15) == []
