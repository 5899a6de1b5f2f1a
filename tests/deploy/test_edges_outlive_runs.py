"""Edges outlive a coordinator's ``kill -9`` and its ``--resume``, TLS on both planes.

It is also the suite's deployed run end to end: the rounds train on both edges and the
accuracy rises, versions and the edges' held models are on disk, the coordinator's
Flower processes end with it while the edges' wait, and Ctrl-C or SIGTERM stops an edge
with everything it started.

Two ``fedsqueeze edge`` processes stay up through: a coordinator run, a ``kill -9`` of
that coordinator after its first round, and ``fedsqueeze coordinator --resume``, which
finishes the run. The resumed rounds must train on both edges (2 updates accepted
each) without the edge processes restarting (same PIDs); each edge says in one line
that its SuperNode was started again, with Flower's tracebacks kept in its log file.
Certificates are made here; the SuperLink and the data plane both run TLS.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from fedsqueeze.deploy import free_ports
from tests.deploy.procs import Fleet, fleet, marked, wait_until_none
from tests.transport.certs import make_pki

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

ROUNDS = 2  # killed after round 1; the resumed coordinator runs round 2


def _wait_for(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    f: Fleet,
    name: str,
    left: Sequence[str] = (),
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            still = "".join(f"\n  still running: {c}" for c in left)
            pytest.fail(
                f"no {what} after {timeout:.0f} s{still}; end of {name}'s log:\n{f.tail(name)}"
            )
        time.sleep(0.5)


def _wait(popen: subprocess.Popen[bytes], timeout: float, f: Fleet, name: str) -> int:
    try:
        return popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} still running after {timeout:.0f} s:\n{f.tail(name)}")


def _completed(state: Path) -> int:
    try:
        return int(json.loads((state / "state.json").read_text())["completed_round"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.timeout(600)
def test_edges_stay_up_through_kill_9_and_resume_with_tls(tmp_path: Path) -> None:
    pki = make_pki()
    ca, cert, key = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"
    ca.write_bytes(pki.ca)
    cert.write_bytes(pki.server.cert)
    key.write_bytes(pki.server.key)
    state = tmp_path / "state"
    link, plane = free_ports(2)
    coordinator_args = (
        "coordinator",
        *("--superlink-port", str(link), "--rounds", str(ROUNDS), "--min-nodes", "2"),
        *("--state-dir", str(state), "--data-plane-port", str(plane)),
        *("--tls-cert", str(cert), "--tls-key", str(key)),
        *("--flower-cert", str(cert), "--flower-key", str(key), "--flower-ca", str(ca)),
        *("--task", "digits-cnn", "--set", "epochs=1"),
    )
    started = time.monotonic()
    with fleet(tmp_path / "logs", lazy_init=True) as f:
        first = f.start("coordinator1", *coordinator_args)
        _wait_for(
            lambda: "SuperLink ready" in f.log("coordinator1"), 120, "SuperLink", f, "coordinator1"
        )
        printed = f.log("coordinator1")
        assert f"--flower-ca {ca}" in printed and f"--data-plane-ca {ca}" in printed

        edges = [
            f.start(
                f"edge{i}",
                "edge",
                *("--superlink", f"127.0.0.1:{link}", "--partition-id", str(i)),
                *("--num-partitions", "2", "--threads", "1"),
                *("--flower-ca", str(ca), "--data-plane-ca", str(ca)),
                *("--work-dir", str(tmp_path / f"edge{i}")),
            )
            for i in range(2)
        ]
        pids = [e.pid for e in edges]

        # The first coordinator trains a round, then dies without a word. Its
        # SuperExec is stopped first, so the SuperLink's one-second wait for it runs
        # out and it is orphaned: to this test process, which reaps nothing (a
        # container's lazy init, as on the CI machine). Killed there, the SuperExec is
        # a zombie, which Flower's own parent check (kill(pid, 0)) takes for alive:
        # the ServerApp must end anyway (fedsqueeze.deploy.parentwatch).
        _wait_for(lambda: _completed(state) >= 1, 240, "completed round 1", f, "coordinator1")
        link_side = ("flower-superlink", "flwr-serverapp", f"runtime-api-address 127.0.0.1:{link}")
        superexec = [
            pid
            for pid, c in marked(f.marker)
            if "flower-superexec" in c and f"runtime-api-address 127.0.0.1:{link}" in c
        ]
        assert len(superexec) == 1, marked(f.marker)
        os.kill(superexec[0], signal.SIGSTOP)
        first.kill()
        first.wait(timeout=10)
        killed_after = _completed(state)
        assert killed_after < ROUNDS, "the run finished before it could be killed"
        _wait_for(
            lambda: not any("flower-superlink" in c for _, c in marked(f.marker)),
            60,
            "end of the killed coordinator's SuperLink",
            f,
            "coordinator1",
        )
        os.kill(superexec[0], signal.SIGKILL)
        flower: list[str] = []

        def flower_left() -> bool:
            flower[:] = [c for _, c in marked(f.marker) if any(n in c for n in link_side)]
            return not flower

        # They see their parent's death by signal or polling (slow on a loaded machine).
        _wait_for(
            flower_left,
            180,
            "end of the killed coordinator's Flower processes",
            f,
            "coordinator1",
            flower,
        )

        resumed = f.start("coordinator2", *coordinator_args, "--resume")
        assert _wait(resumed, 300, f, "coordinator2") == 0, f.tail("coordinator2")
        out = f.log("coordinator2")
        assert f"after round {killed_after} of {ROUNDS}" in out
        assert f"= fedsqueeze round {killed_after + 1} of {ROUNDS}" in out

        assert "Run " in out and "completed." in out
        record = json.loads((state / "state.json").read_text())
        assert record["completed_round"] == ROUNDS
        rounds = {int(k): v for k, v in record["round_metrics"].items()}
        assert sorted(rounds) == list(range(1, ROUNDS + 1))
        for r in range(1, ROUNDS + 1):
            assert rounds[r]["updates-accepted"] == 2, (r, rounds[r], f.tail("coordinator2"))
            assert rounds[r]["bytes-down"] > 0 and rounds[r]["bytes-up"] > 0
        # The run learns across the kill (0.1: chance on digits).
        assert rounds[ROUNDS]["accuracy"] > rounds[1]["accuracy"] > 0.1
        # The initial model and one global version per round, all on disk.
        assert len({record["tracks"]["init"], *record["versions"]}) >= ROUNDS + 1
        stored = {p.stem for p in (state / "versions").glob("*.fsq")}
        assert record["tracks"]["global"] in stored and record["tracks"]["init"] in stored
        assert len(stored) >= ROUNDS + 1
        # Each edge kept the model it holds in its cache directory (the node config's
        # fedsqueeze-cache-dir reached its ClientApp).
        for i in range(2):
            held = json.loads((tmp_path / f"edge{i}" / "cache" / "edge.json").read_text())
            assert held["held"] in stored and held["held"] in record["edges"].values()
        # The coordinator stopped its SuperLink, SuperExec and ServerApp on its way out;
        # the edges' SuperNodes and SuperExecs wait for the next run.
        assert not [c for _, c in marked(f.marker) if any(n in c for n in link_side)]
        edge_side = " ".join(cmd for _, cmd in marked(f.marker))
        assert edge_side.count("flower-supernode") == 2
        assert edge_side.count("flower-superexec") == 2

        # The same edge processes, still up, ready for the next run.
        assert [e.pid for e in edges] == pids and all(e.poll() is None for e in edges)
        for i in range(2):
            said = f.log(f"edge{i}")
            assert "starting a new SuperNode in" in said, said
            assert "Traceback" not in said and "\x1b[" not in said, said
            flower_log = (tmp_path / f"edge{i}" / "supernode.log").read_text()
            assert "\x1b[" not in flower_log

        edges[0].send_signal(signal.SIGINT)  # Ctrl-C
        edges[1].send_signal(signal.SIGTERM)  # a service manager stopping it
        for i, edge in enumerate(edges):
            assert _wait(edge, 60, f, f"edge{i}") == 130, f.tail(f"edge{i}")
        left = wait_until_none(f.marker, 45)  # a loaded machine: SIGTERM, 10 s grace, SIGKILL
        assert left == [], left
    print(f"kill -9 and --resume with TLS, two edges: {time.monotonic() - started:.1f} s")


@pytest.mark.timeout(300)
def test_an_edge_without_the_data_plane_ca_tells_the_coordinator_why(tmp_path: Path) -> None:
    """The cause of a failed fetch (CERTIFICATE_VERIFY_FAILED) reaches the coordinator's
    log, not only "server unavailable after 6 attempts"; the edge prints it too."""
    pki = make_pki()
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(pki.server.cert)
    key.write_bytes(pki.server.key)
    link, plane = free_ports(2)
    with fleet(tmp_path / "logs") as f:
        coordinator = f.start(
            "coordinator",
            "coordinator",
            *("--superlink-port", str(link), "--rounds", "1", "--min-nodes", "1"),
            *("--state-dir", str(tmp_path / "state"), "--data-plane-port", str(plane)),
            *("--tls-cert", str(cert), "--tls-key", str(key), "--set", "epochs=1"),
        )
        f.start(
            "edge",
            "edge",
            *("--superlink", f"127.0.0.1:{link}", "--partition-id", "0"),
            *("--num-partitions", "1", "--threads", "1"),
        )
        _wait_for(
            lambda: "CERTIFICATE_VERIFY_FAILED" in f.log("coordinator"),
            240,
            "cause in the coordinator's log",
            f,
            "coordinator",
        )
        line = next(x for x in f.log("coordinator").splitlines() if "CERTIFICATE_VERIFY" in x)
        assert "round 1: edge " in line and " failed: UnavailableError: fetching the model" in line
        assert "--data-plane-ca" in line
        _wait_for(
            lambda: "a round failed on this edge" in f.log("edge"), 60, "edge's line", f, "edge"
        )
        assert "CERTIFICATE_VERIFY_FAILED" in f.log("edge")
        coordinator.send_signal(signal.SIGINT)
        _wait(coordinator, 60, f, "coordinator")
