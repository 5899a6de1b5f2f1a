"""The edge's SuperNode keeper: restart with capped, jittered backoff; Ctrl-C stops it."""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedsqueeze.deploy.keeper import START_MARK, Backoff, SuperNodeKeeper, explain_exit
from fedsqueeze.deploy.processes import (
    ManagedProcess,
    Output,
    ProcessError,
    ProcessSpec,
    Supervisor,
    interrupt_on_signals,
)


class FakeNode:
    """A SuperNode that has already exited with ``status``."""

    def __init__(self, status: int = 0) -> None:
        self.status = status

    def wait(self, timeout: float | None = None) -> int:
        return self.status


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_up_to_the_cap_and_jitter_only_shortens() -> None:
    plain = Backoff(initial_s=1, factor=2, cap_s=10, jitter=0)
    rng = random.Random(0)
    assert [plain.delay(n, rng) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    jittered = Backoff(initial_s=1, factor=2, cap_s=10, jitter=0.25)
    for n in range(1, 40):
        base = min(10.0, 2.0 ** (n - 1))
        assert 0.75 * base <= jittered.delay(n, rng) <= base
    assert len({jittered.delay(3, rng) for _ in range(20)}) > 1  # edges do not stampede
    for bad in ({"factor": 0.5}, {"initial_s": 5, "cap_s": 1}, {"jitter": 2}):
        with pytest.raises(ValueError):
            Backoff(**bad)
    with pytest.raises(ValueError):
        plain.delay(0, rng)


def _keeper(
    starts: list[object], sleeps: list[float], reports: list[str], *, stop_after: int
) -> SuperNodeKeeper:
    def start() -> FakeNode:
        starts.append("start")
        return FakeNode(1)

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) >= stop_after:
            raise KeyboardInterrupt  # Ctrl-C while it waits to restart

    return SuperNodeKeeper(
        start,
        describe=lambda status: f"SuperNode exited (status {status})",
        report=reports.append,
        backoff=Backoff(initial_s=1, factor=2, cap_s=8, jitter=0),
        sleep=sleep,
        clock=Clock(),
        rng=random.Random(0),
    )


def test_an_exiting_supernode_is_restarted_with_growing_delays_until_ctrl_c() -> None:
    starts: list[object] = []
    sleeps: list[float] = []
    reports: list[str] = []
    keeper = _keeper(starts, sleeps, reports, stop_after=6)
    with pytest.raises(KeyboardInterrupt):
        keeper.run(FakeNode(0))
    assert sleeps == [1, 2, 4, 8, 8, 8]  # capped
    assert len(starts) == 5 == keeper.restarts  # the 6th sleep was interrupted
    assert reports[0] == "SuperNode exited (status 0); starting a new SuperNode in 1 s"
    assert all(r.count("\n") == 0 for r in reports)  # one line each


def test_a_supernode_that_ran_long_enough_resets_the_backoff() -> None:
    clock = Clock()
    sleeps: list[float] = []

    class LongRunner:
        def wait(self, timeout: float | None = None) -> int:
            clock.now += 100.0  # ran 100 s, more than stable_s
            return 0

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 4:
            raise KeyboardInterrupt

    keeper = SuperNodeKeeper(
        LongRunner,
        describe=str,
        report=lambda _: None,
        backoff=Backoff(initial_s=1, factor=2, cap_s=8, jitter=0),
        stable_s=60,
        sleep=sleep,
        clock=clock,
    )
    with pytest.raises(KeyboardInterrupt):
        keeper.run(LongRunner())
    assert sleeps == [1, 1, 1, 1]


def test_a_failed_restart_is_reported_and_retried() -> None:
    attempts: list[int] = []
    reports: list[str] = []
    sleeps: list[float] = []

    def start() -> FakeNode:
        attempts.append(1)
        if len(attempts) < 3:
            raise ProcessError("supernode exited with status 1 before listening")
        raise KeyboardInterrupt  # the operator gives up: Ctrl-C during a start

    keeper = SuperNodeKeeper(
        start,
        describe=lambda s: f"exited {s}",
        report=reports.append,
        backoff=Backoff(initial_s=1, factor=2, cap_s=8, jitter=0),
        sleep=sleeps.append,
        clock=Clock(),
    )
    with pytest.raises(KeyboardInterrupt):
        keeper.run(FakeNode(3))
    assert sleeps == [1, 2, 4]
    assert "did not start again (supernode exited with status 1" in reports[1]


def _counting_child(marker: Path, then: str) -> str:
    """Python code for a fake SuperNode: it adds an ``x`` to ``marker`` (``n``: how many
    were there before), then runs ``then``."""
    return (
        "import pathlib, time\n"
        f"p = pathlib.Path({str(marker)!r})\n"
        "n = len(p.read_text()) if p.exists() else 0\n"
        "p.write_text('x' * (n + 1))\n" + then
    )


def _interrupt_at_run(marker: Path, run: int) -> None:
    """SIGUSR1 to this process (standing in for Ctrl-C) once the fake SuperNodes have
    marked ``run`` starts in ``marker`` (one ``x`` each); gives up after 40 s."""
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        if marker.exists() and marker.read_text() == "x" * run:
            os.kill(os.getpid(), signal.SIGUSR1)
            return
        time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.timeout(60)
def test_real_processes_are_restarted_and_a_signal_stops_the_running_one(tmp_path: Path) -> None:
    """A real child that exits at once is restarted twice; the third stays up, and a
    signal (SIGUSR1 standing in for SIGTERM/Ctrl-C) ends the keeper while it waits."""
    marker = tmp_path / "runs"
    code = _counting_child(marker, "time.sleep(60 if n >= 2 else 0)\n")
    spec = ProcessSpec("fake supernode", (sys.executable, "-c", code), {}, Output.PIPE)
    started: list[ManagedProcess] = []

    with interrupt_on_signals((signal.SIGUSR1,)), Supervisor(grace=5) as supervisor:

        def start() -> ManagedProcess:
            started.append(supervisor.start(spec))
            return started[-1]

        keeper = SuperNodeKeeper(
            start,
            describe=lambda s: f"exited {s}",
            report=lambda _: None,
            backoff=Backoff(initial_s=0.01, cap_s=0.01, jitter=0),
        )
        threading.Thread(target=_interrupt_at_run, args=(marker, 3), daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            keeper.run(start())
        assert started[-1].poll() is None  # interrupted while the third one ran
    assert marker.read_text() == "xxx" and len(started) == 3
    assert started[-1].poll() is not None  # the supervisor stopped it


def test_the_exit_is_explained_from_this_start_of_the_log(tmp_path: Path) -> None:
    log = tmp_path / "supernode.log"
    assert explain_exit(0, None) == "SuperNode exited (status 0)"
    assert explain_exit(0, tmp_path / "missing.log") == "SuperNode exited (status 0)"
    log.write_text(
        f"{START_MARK}\nhttpx.HTTPStatusError: Client error '401 Unauthorized' for url\n"
        f"{START_MARK}\nWARNING :   Connection attempt failed, retrying in 0.5 seconds\n"
    )
    assert explain_exit(1, log) == "SuperNode exited (status 1): the SuperLink could not be reached"
    with log.open("a") as handle:
        handle.write(f"{START_MARK}\nClient error '401 Unauthorized' for url 'http://x'\n")
    assert "no longer knows this node" in explain_exit(0, log)


def test_only_data_plane_failures_reach_the_edge_terminal() -> None:
    from fedsqueeze.deploy.nodelog import headline

    assert headline("fedsqueeze.errors.UnavailableError: Fetch: server unavailable") is None
    assert headline("INFO :      Received: train message") is None
    line = (
        "fedsqueeze.errors.UnavailableError: fetching the model from the data plane at "
        "h:1 (TLS) failed: Fetch: server unavailable after 6 attempts; cause: refused\n"
    )
    assert headline(line) == (
        "a round failed on this edge: fetching the model from the data plane at h:1 (TLS) "
        "failed: Fetch: server unavailable after 6 attempts; cause: refused"
    )


def _note(seen: list[int | None], status: int | None, why: str) -> str:
    seen.append(status)
    return why


class HangingNode:
    """A SuperNode that never exits by itself: each wait times out (and time passes)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.waits = 0

    def wait(self, timeout: float | None = None) -> int:
        self.waits += 1
        self.clock.now += timeout or 0.0
        raise subprocess.TimeoutExpired("supernode", timeout or 0.0)


def test_a_supernode_that_said_it_quit_but_hangs_counts_as_exited() -> None:
    """Flower logs "SuperNode terminated gracefully." on a 401 and may then block in an
    exit handler: the keeper restarts it ``hang_s`` after the line, not never."""
    clock = Clock()
    first = HangingNode(clock)
    said: list[bool] = []
    described: list[int | None] = []
    reports: list[str] = []

    def quitting() -> bool:
        said.append(first.waits >= 3)  # the line shows up on the third poll
        return said[-1]

    def sleep(_: float) -> None:
        raise KeyboardInterrupt  # stop at the first restart

    keeper = SuperNodeKeeper(
        lambda: FakeNode(0),
        describe=lambda status: _note(described, status, "hung"),
        report=reports.append,
        quitting=quitting,
        hang_s=10,
        poll_s=1,
        sleep=sleep,
        clock=clock,
    )
    with pytest.raises(KeyboardInterrupt):
        keeper.run(first)
    assert described == [None]
    # Said so at the third poll (t=3 s), counted as exited 10 s later, not before.
    assert first.waits == 13 and clock.now == 13
    assert reports == ["hung; starting a new SuperNode in 1 s"]


def test_a_quiet_long_running_supernode_is_left_alone() -> None:
    clock = Clock()

    class SlowNode(HangingNode):
        def wait(self, timeout: float | None = None) -> int:
            if self.waits == 500:
                return 0
            return super().wait(timeout)

    described: list[int | None] = []

    def sleep(_: float) -> None:
        raise KeyboardInterrupt

    keeper = SuperNodeKeeper(
        lambda: FakeNode(0),
        describe=lambda status: _note(described, status, ""),
        report=lambda _: None,
        hang_s=10,
        poll_s=1,
        sleep=sleep,
        clock=clock,
    )
    with pytest.raises(KeyboardInterrupt):
        keeper.run(SlowNode(clock))
    assert described == [0] and clock.now == 500
    with pytest.raises(ValueError):
        SuperNodeKeeper(lambda: FakeNode(0), describe=str, report=print, poll_s=0)


def test_the_log_marks_only_this_supernodes_quit_line(tmp_path: Path) -> None:
    from fedsqueeze.deploy.nodelog import NodeLog

    node_log = NodeLog(tmp_path / "supernode.log", lambda _: None)
    node_log.follow(
        io.StringIO("INFO : SuperExec terminated gracefully.\nINFO : Received: train\n")
    ).join(5)
    assert not node_log.quitting()  # its SuperExec's line is not its own
    node_log.follow(io.StringIO("\x1b[92mINFO \x1b[0m: SuperNode terminated gracefully.\n")).join(5)
    assert node_log.quitting()
    node_log.follow(io.StringIO("")).join(5)
    assert not node_log.quitting()  # a new SuperNode starts unmarked
    text = (tmp_path / "supernode.log").read_text()
    assert "INFO : SuperNode terminated gracefully." in text and "\x1b" not in text
    assert explain_exit(None, tmp_path / "supernode.log") == (
        "SuperNode said it quit but did not exit, so it is stopped"
    )
    with (tmp_path / "supernode.log").open("a") as handle:
        handle.write("Client error '401 Unauthorized'\nSuperNode terminated gracefully.\n")
    assert explain_exit(None, tmp_path / "supernode.log") == (
        "SuperNode said it quit but did not exit, so it is stopped: the SuperLink no longer "
        "knows this node (its run ended or the coordinator restarted)"
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.timeout(60)
def test_a_real_supernode_that_hangs_after_its_quit_line_is_stopped_and_restarted(
    tmp_path: Path,
) -> None:
    """The first child logs Flower's quit line and then blocks (as an exit handler
    stuck on a SuperLink would); the keeper stops it and starts the second."""
    from fedsqueeze.deploy.nodelog import NodeLog

    marker = tmp_path / "runs"
    code = _counting_child(
        marker,
        "if n == 0:\n"
        "    print('Client error 401 Unauthorized', flush=True)\n"
        "    print('INFO : SuperNode terminated gracefully.', flush=True)\n"
        "time.sleep(60)\n",
    )
    spec = ProcessSpec("fake supernode", (sys.executable, "-c", code), {}, Output.PIPE)
    node_log = NodeLog(tmp_path / "supernode.log", lambda _: None)
    started: list[ManagedProcess] = []
    reports: list[str] = []

    with interrupt_on_signals((signal.SIGUSR1,)), Supervisor(grace=5) as supervisor:

        def start() -> ManagedProcess:
            supervisor.stop_all()
            started.append(supervisor.start(spec))
            node_log.follow(started[-1].stdout)
            return started[-1]

        keeper = SuperNodeKeeper(
            start,
            describe=lambda status: explain_exit(status, node_log.path),
            report=reports.append,
            backoff=Backoff(initial_s=0.01, cap_s=0.01, jitter=0),
            quitting=node_log.quitting,
            hang_s=0.5,
            poll_s=0.05,
        )
        threading.Thread(target=_interrupt_at_run, args=(marker, 2), daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            keeper.run(start())
        assert started[0].poll() is not None  # the hung one was stopped
        assert started[-1].poll() is None
    assert len(started) == 2
    assert reports[0].startswith("SuperNode said it quit but did not exit, so it is stopped: ")
    assert "no longer knows this node" in reports[0]
