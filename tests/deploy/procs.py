"""Helpers for tests that start ``fedsqueeze coordinator`` / ``edge`` as real processes.

Every process a test starts carries a marker in its environment, which Flower's own
processes inherit; :func:`marked` finds them all in ``/proc`` (other people's Flower
processes on the machine are left alone).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from fedsqueeze.deploy.processes import is_subreaper, set_subreaper
from fedsqueeze.deploy.proctree import children

MARKER_KEY = "FEDSQUEEZE_DEPLOY_TEST"


def fedsqueeze_argv() -> list[str]:
    """``python -m fedsqueeze`` with this Python."""
    return [sys.executable, "-m", "fedsqueeze"]


def marked(marker: str) -> list[tuple[int, str]]:
    """Live processes whose environment holds ``MARKER_KEY=marker``: (pid, command)."""
    needle = f"{MARKER_KEY}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            stat = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if stat and stat[0] not in ("Z", "X"):
            found.append((int(entry.name), cmd.strip()))
    return found


def wait_until_none(marker: str, timeout: float) -> list[tuple[int, str]]:
    """Poll :func:`marked` until it is empty or ``timeout`` passes; the last answer."""
    deadline = time.monotonic() + timeout
    left = marked(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = marked(marker)
    return left


def kill_marked(marker: str) -> None:
    """SIGKILL whatever carries the marker (test teardown)."""
    for pid, _ in marked(marker):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _default_signals() -> None:
    """Give a started command the signal dispositions a terminal would.

    A test run started in the background (``make test &``, ``nohup``, a subshell) ignores
    SIGINT and SIGQUIT (SIGHUP too under nohup), and a child inherits ignored signals
    across exec: the commands under test would then ignore the Ctrl-C these tests send.
    """
    for s in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(s, signal.SIG_DFL)


class Fleet:
    """The processes of one test, all carrying one marker.

    ``lazy_init=True`` makes this process adopt the orphans below it and reap none of
    them until :meth:`close`, like a container's init that does not reap (the CI
    machine's): a process whose parent was killed then sees that parent as a zombie.
    """

    def __init__(self, logs: Path, *, lazy_init: bool = False) -> None:
        self.marker = uuid.uuid4().hex
        self.logs = logs
        self._children_before = children(os.getpid())
        self._was_subreaper = is_subreaper()
        self._adopts = lazy_init and not self._was_subreaper and set_subreaper(True)
        # One thread per process: on a small machine the ServerApp and the ClientApps
        # would otherwise fight over every core.
        self.env = {
            **os.environ,
            MARKER_KEY: self.marker,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        }
        self.env.pop("FLWR_HOME", None)
        self.popens: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """``fedsqueeze ARGS...`` with output to ``logs/NAME.log``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("wb") as out:
            popen = subprocess.Popen(
                [*fedsqueeze_argv(), *args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_default_signals,
            )
        self.popens.append(popen)
        return popen

    def log(self, name: str) -> str:
        """What ``name`` printed so far."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def tail(self, name: str, lines: int = 40) -> str:
        """The end of ``name``'s log, for assertion messages."""
        return "\n".join(self.log(name).splitlines()[-lines:])

    def close(self) -> None:
        """Kill everything left (after a failure) and reap it."""
        kill_marked(self.marker)
        for popen in self.popens:
            if popen.poll() is None:
                popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=10)
        if self._adopts:
            set_subreaper(False)
            self._adopts = False
            self._reap_adopted()

    def _reap_adopted(self) -> None:
        """Reap the orphans this process adopted (all killed by now; a few may be dying)."""
        own = self._children_before | {p.pid for p in self.popens}
        deadline = time.monotonic() + 10
        while True:
            adopted = children(os.getpid()) - own
            for pid in adopted:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            if not adopted or time.monotonic() > deadline:
                return
            time.sleep(0.1)


@contextlib.contextmanager
def fleet(logs: Path, *, lazy_init: bool = False) -> Iterator[Fleet]:
    """A :class:`Fleet` whose leftovers are killed however the test ends."""
    f = Fleet(logs, lazy_init=lazy_init)
    try:
        yield f
    finally:
        f.close()
