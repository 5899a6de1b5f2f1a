"""The process supervisor: process groups, detached grandchildren, grace, readiness."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedsqueeze.deploy.processes import (
    Output,
    ProcessError,
    ProcessSpec,
    Supervisor,
    check_port_free,
    free_port,
    interrupt_on_signals,
    is_subreaper,
    wait_for_port,
)
from fedsqueeze.deploy.proctree import descendants

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _python(name: str, code: str, output: Output = Output.PIPE) -> ProcessSpec:
    return ProcessSpec(
        name, (sys.executable, "-c", textwrap.dedent(code)), dict(os.environ), output
    )


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# A parent that starts a grandchild in a new session (as flower-superlink starts its
# SuperExec), prints the grandchild's pid, and waits.
_DETACHING_PARENT = """
    import subprocess, sys, time
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True
    )
    print(child.pid, flush=True)
    time.sleep(120)
"""


@linux_only
def test_stop_all_stops_a_detached_grandchild() -> None:
    supervisor = Supervisor(grace=5)
    parent = supervisor.start(_python("parent", _DETACHING_PARENT))
    grandchild = int(parent.stdout.readline())
    assert grandchild in descendants(parent.pid)
    assert os.getpgid(grandchild) != parent.pid  # out of reach of a killpg
    supervisor.stop_all()
    assert parent.poll() is not None
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


@linux_only
def test_what_ignores_sigterm_is_killed_after_the_grace_period() -> None:
    stubborn = """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(120)
    """
    with Supervisor(grace=0.5) as supervisor:
        process = supervisor.start(_python("stubborn", stubborn))
        assert process.stdout.readline().strip() == "ready"
        started = time.monotonic()
    assert process.poll() == -signal.SIGKILL
    assert time.monotonic() - started < 10


@linux_only
def test_a_process_whose_main_thread_exited_is_waited_for_until_reaped() -> None:
    # Its main thread gone, the process shows as a zombie in /proc while another thread
    # still runs (as a gRPC server's threads outlive flower-supernode's main thread).
    # It is still running: stop_all waits for it, and its Popen is reaped.
    leader_gone = """
        import ctypes, os, signal, threading, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        def last_thread():
            time.sleep(1.0)
            os._exit(3)
        threading.Thread(target=last_thread).start()
        print("ready", flush=True)
        ctypes.CDLL(None).pthread_exit(None)
    """
    with Supervisor(grace=10) as supervisor:
        process = supervisor.start(_python("leader-gone", leader_gone))
        assert process.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 5
        while _alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _alive(process.pid)  # a zombie in /proc ...
        assert process.poll() is None  # ... yet not reapable: a thread runs
    assert process.poll() == 3


def test_processes_start_in_their_own_session() -> None:
    with Supervisor(grace=2) as supervisor:
        process = supervisor.start(_python("sleeper", "import time; time.sleep(60)"))
        assert os.getsid(process.pid) == process.pid
        assert os.getpgid(process.pid) == process.pid
    assert process.poll() == -signal.SIGTERM


def test_output_goes_to_the_log_file(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "hello.log"
    spec = ProcessSpec(
        "hello",
        (sys.executable, "-c", "print('hello from a child')"),
        dict(os.environ),
        Output.FILE,
        log_file,
    )
    with Supervisor() as supervisor:
        assert supervisor.start(spec).wait(timeout=30) == 0
    assert "hello from a child" in log_file.read_text()


def test_a_missing_program_is_a_process_error() -> None:
    spec = ProcessSpec("ghost", ("/nonexistent/flower-superlink",), dict(os.environ))
    with Supervisor() as supervisor, pytest.raises(ProcessError, match="cannot start ghost"):
        supervisor.start(spec)


def test_specs_are_checked() -> None:
    with pytest.raises(ValueError, match="argv"):
        ProcessSpec("empty", ())
    with pytest.raises(ValueError, match="log_file"):
        ProcessSpec("x", ("true",), output=Output.FILE)
    with pytest.raises(ValueError, match="grace"):
        Supervisor(grace=-1)


def test_wait_for_port_returns_once_something_listens() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        wait_for_port("127.0.0.1", server.getsockname()[1], timeout=5)


def test_wait_for_port_fails_fast_when_the_process_exits() -> None:
    with Supervisor() as supervisor:
        process = supervisor.start(_python("quitter", "raise SystemExit(3)", Output.INHERIT))
        started = time.monotonic()
        with pytest.raises(ProcessError, match="quitter exited with status 3"):
            wait_for_port("127.0.0.1", free_port(), timeout=60, process=process)
        assert time.monotonic() - started < 30


def test_wait_for_port_times_out() -> None:
    with pytest.raises(ProcessError, match="not listening"):
        wait_for_port("127.0.0.1", free_port(), timeout=0.3)


def test_a_port_in_use_is_refused_before_anything_starts() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(ProcessError, match=f"cannot use 127.0.0.1:{port} for the test"):
            check_port_free("127.0.0.1", port, "the test")
    check_port_free("127.0.0.1", port, "the test")  # released


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_sigterm_becomes_keyboard_interrupt_inside_the_block() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), interrupt_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_a_finished_supervisor_hands_the_subreaper_flag_back() -> None:
    # coordinator_cmd.main run in a test process made it a subreaper for good: a killed
    # coordinator's SuperLink was then adopted by the test process and never reaped, and
    # Flower's ServerApp, polling for its parent, took the zombie for alive
    assert not is_subreaper()
    with Supervisor(adopt_orphans=True):
        assert is_subreaper()
    assert not is_subreaper()
    code = (
        "import subprocess, sys; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
        "print(p.pid)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    orphan = int(out.stdout)
    try:
        stat = Path(f"/proc/{orphan}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(stat[1]) != os.getpid()  # not adopted by this process
    finally:
        os.kill(orphan, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_children_the_process_had_before_are_not_taken_for_orphans() -> None:
    # A program that runs the coordinator in-process (the suite runs coordinator_cmd.main)
    # keeps its own children: the test processes' shared Ray node was stopped here.
    own = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        supervisor = Supervisor(adopt_orphans=True, grace=1.0)
        supervisor.stop_all()
        assert own.poll() is None
    finally:
        own.kill()
        own.wait()
