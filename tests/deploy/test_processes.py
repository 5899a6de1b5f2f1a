"""``fedsqueeze coordinator`` on loopback: Ctrl-C in the middle of a run.

Real Flower processes (SuperLink, SuperExec, ServerApp); the test checks that nothing it
started is left running. A whole deployed run with two edges (rounds, held models,
Ctrl-C and SIGTERM to the edges) is tests/deploy/test_edges_outlive_runs.py's, beside a
``kill -9`` and ``--resume``.
"""

from __future__ import annotations

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
