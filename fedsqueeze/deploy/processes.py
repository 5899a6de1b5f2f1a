"""A small supervisor for the Flower processes fedsqueeze starts.

Flower's Deployment Engine is a tree of processes: ``flower-superlink`` starts a
``flower-superexec`` in a *new session* (so it survives a signal to the SuperLink's
process group), which starts one ``flwr-serverapp`` per run; ``flower-supernode`` starts
its own ``flower-superexec``, which starts one ``flwr-clientapp`` per message. None of
them stops when the terminal that started them closes.

:class:`Supervisor` keeps that tree in hand:

* every process starts in its own session and process group, and (on Linux) receives
  ``SIGTERM`` if the supervisor dies, even by ``SIGKILL``;
* on Linux the supervisor can make itself a *child subreaper*, so processes orphaned
  below it (a SuperExec whose SuperLink crashed) are re-parented to it rather than to
  ``init``, and it can still find and stop them;
* :meth:`Supervisor.stop_all` signals every process group and every descendant found in
  ``/proc``, waits a grace period, then kills what is left and reaps it.

:func:`interrupt_on_signals` turns ``SIGTERM`` and ``SIGHUP`` into
``KeyboardInterrupt``, so a ``finally`` clause stops everything however the command is
asked to end.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from fedsqueeze.deploy.proctree import children, command_name, is_alive, live_tree
from fedsqueeze.errors import FedsqueezeError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
_POLL_SECONDS = 0.1


class ProcessError(FedsqueezeError):
    """A Flower process could not be started, or ended before it was ready."""


class Output(enum.Enum):
    """Where a process's stdout and stderr go."""

    INHERIT = "inherit"
    """Share the supervisor's terminal."""
    FILE = "file"
    """Append to :attr:`ProcessSpec.log_file`."""
    PIPE = "pipe"
    """A pipe the caller reads from :attr:`ManagedProcess.stdout`."""


@dataclass(frozen=True)
class ProcessSpec:
    """How to start one process.

    Attributes
    ----------
    name
        Short name for messages (``"superlink"``).
    argv
        The command and its arguments.
    env
        The complete environment of the process.
    output
        Where its output goes.
    log_file
        The file for :attr:`Output.FILE`.
    cwd
        Working directory (default: the supervisor's).
    """

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    output: Output = Output.INHERIT
    log_file: Path | None = None
    cwd: Path | None = None

    def __post_init__(self) -> None:
        if not self.argv:
            raise ValueError("argv must name a command")
        if self.output is Output.FILE and self.log_file is None:
            raise ValueError("Output.FILE needs a log_file")


class ManagedProcess:
    """A process started by a :class:`Supervisor`."""

    def __init__(self, spec: ProcessSpec, popen: subprocess.Popen[str]) -> None:
        self.spec = spec
        self.popen = popen

    @property
    def name(self) -> str:
        """The spec's name."""
        return self.spec.name

    @property
    def pid(self) -> int:
        """Its process id (also its process group and session id)."""
        return self.popen.pid

    @property
    def stdout(self) -> IO[str]:
        """Its output, for :attr:`Output.PIPE`."""
        if self.popen.stdout is None:
            raise ValueError(f"{self.name} was not started with Output.PIPE")
        return self.popen.stdout

    def poll(self) -> int | None:
        """Its exit status, or ``None`` while it runs."""
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for it to exit; returns the exit status."""
        return self.popen.wait(timeout)

    def describe_exit(self) -> str:
        """``"superlink exited with status 1 (see LOG)"`` for messages."""
        where = f" (see {self.spec.log_file})" if self.spec.output is Output.FILE else ""
        return f"{self.name} exited with status {self.poll()}{where}"


class Supervisor:
    """Starts processes and stops all of them, and everything they started.

    Parameters
    ----------
    adopt_orphans
        Make this process a child subreaper (Linux), so descendants whose parent dies
        stay below it, until :meth:`stop_all` has stopped them (then the flag is as it
        was). Meant for a command-line process that does nothing else.
    grace
        Seconds between ``SIGTERM`` and ``SIGKILL`` in :meth:`stop_all`.
    """

    def __init__(self, *, adopt_orphans: bool = False, grace: float = 10.0) -> None:
        if grace < 0:
            raise ValueError("grace must be >= 0")
        self.grace = grace
        self.processes: list[ManagedProcess] = []
        self._lock = threading.Lock()
        self._was_subreaper = is_subreaper()
        self._adopts = adopt_orphans and set_subreaper(True)
        # Children this process had already are its own business, not orphans to stop
        # (a program that runs a command in-process: a test process's shared Ray node).
        self._children_before = children(os.getpid()) if self._adopts else set()
        if adopt_orphans and not self._adopts:
            log.debug("not a child subreaper here: orphans go to init")

    def start(self, spec: ProcessSpec) -> ManagedProcess:
        """Start ``spec`` in a new session.

        Call it from a thread that lives as long as the process should: on Linux the
        child receives ``SIGTERM`` when the thread that started it ends.
        """
        stdout: int | IO[str] | None = None
        log_handle: IO[str] | None = None
        if spec.output is Output.FILE and spec.log_file is not None:
            spec.log_file.parent.mkdir(parents=True, exist_ok=True)
            log_handle = spec.log_file.open("a", encoding="utf-8")
            stdout = log_handle
        elif spec.output is Output.PIPE:
            stdout = subprocess.PIPE
        log.info("starting %s: %s", spec.name, " ".join(spec.argv))
        try:
            popen = subprocess.Popen(
                list(spec.argv),
                env=dict(spec.env),
                cwd=spec.cwd,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT if stdout is not None else None,
                text=True,
                errors="replace",
                bufsize=1 if spec.output is Output.PIPE else -1,
                start_new_session=True,
                preexec_fn=_die_with_parent if _PRCTL is not None else None,
            )
        except OSError as exc:
            raise ProcessError(f"cannot start {spec.name} ({spec.argv[0]}): {exc}") from exc
        finally:
            if log_handle is not None:
                log_handle.close()  # the child holds its own descriptor
        process = ManagedProcess(spec, popen)
        with self._lock:
            self.processes.append(process)
        return process

    def stop_all(self) -> None:
        """Stop every process started here and all their descendants.

        ``SIGTERM`` to each process group and each descendant, up to :attr:`grace`
        seconds to exit, then ``SIGKILL``. Signals that would interrupt the shutdown
        (a second Ctrl-C) are ignored until it is done.
        """
        with _signals_ignored(), self._lock:
            try:
                self._stop_locked()
            finally:
                for process in self.processes:
                    if process.popen.stdout is not None and process.poll() is not None:
                        process.popen.stdout.close()
                if self._adopts and not self._was_subreaper:
                    # Hand the flag back: a process that stays a subreaper after its
                    # supervisor is done adopts later orphans it will never reap, and a
                    # zombie parent looks alive to children that poll for it (Flower's
                    # ServerApp then never exits; a test process ran coordinator_cmd.main).
                    set_subreaper(False)
                    self._adopts = False

    def _roots(self) -> set[int]:
        # A process not yet reaped cannot have given its pid to another one.
        roots = {p.pid for p in self.processes if p.poll() is None}
        return roots | self._orphans()

    def _orphans(self) -> set[int]:
        """Children of this process it did not start itself (adopted as a subreaper)."""
        if not self._adopts:
            return set()
        return children(os.getpid()) - {p.pid for p in self.processes} - self._children_before

    def _stop_locked(self) -> None:
        tracked: set[int] = set()
        signalled: set[int] = set()
        deadline = time.monotonic() + self.grace
        while True:
            self._reap()
            # A started process counts until it is reaped: a multi-threaded one whose main
            # thread has exited shows as a zombie in /proc while its other threads still
            # run, and cannot be reaped until they end.
            unreaped = {p.pid for p in self.processes if p.poll() is None}
            tracked = {pid for pid in tracked if is_alive(pid)} | live_tree(self._roots())
            tracked |= unreaped
            if not tracked:
                # One that exited since the last poll is a zombie, which live_tree
                # leaves out: reap it, or its Popen warns that it is still running.
                self._reap()
                return
            fresh = tracked - signalled
            if fresh:
                log.info("stopping %s", ", ".join(command_name(p) for p in sorted(fresh)))
                self._signal(fresh, signal.SIGTERM)
                signalled |= fresh
            if time.monotonic() > deadline:
                break
            time.sleep(_POLL_SECONDS)
        names = ", ".join(command_name(pid) for pid in sorted(tracked))
        log.warning("killing what did not stop within %.0f s: %s", self.grace, names)
        self._signal(tracked, signal.SIGKILL)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        self._reap()

    def _signal(self, pids: set[int], signum: int) -> None:
        for process in self.processes:
            if process.pid in pids and process.poll() is None:
                # Its whole group: also members that left its tree (their parent died).
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signum)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    def _reap(self) -> None:
        for process in self.processes:
            process.poll()
        for pid in self._orphans():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def wait_for_port(
    host: str, port: int, *, timeout: float, process: ManagedProcess | None = None
) -> None:
    """Block until something accepts TCP connections on ``host:port``.

    Raises
    ------
    ProcessError
        If ``process`` exits first, or nothing listens within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise ProcessError(f"{process.describe_exit()} before listening on {host}:{port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        if time.monotonic() > deadline:
            who = process.name if process is not None else "nothing"
            raise ProcessError(f"{who} is not listening on {host}:{port} after {timeout:.0f} s")
        time.sleep(_POLL_SECONDS * 2)


def check_port_free(host: str, port: int, what: str) -> None:
    """Raise :class:`ProcessError` if ``host:port`` cannot be bound.

    Call it before starting a server that waits with :func:`wait_for_port`: that would
    otherwise take another program listening there for the new server.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As servers do: a connection of an earlier server in TIME_WAIT does not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ProcessError(f"cannot use {host}:{port} for {what}: {exc.strerror}") from exc


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (see :func:`free_ports`)."""
    return free_ports(1, host)[0]


#: Where :func:`free_ports` looks first: below the usual ephemeral range.
_PICKED_PORTS = (20000, 32768)
_PICK_TRIES = 64


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` different TCP ports, all free on ``host`` right now.

    A port handed out here is free until the caller's server binds it, so it is drawn
    at random from below the kernel's ephemeral range (``ip_local_port_range``), where
    bind-to-port-0 and outgoing connections of other programs never land; if none there
    binds, the kernel picks one. All are held until the last is found, so none repeats.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low, high = _PICKED_PORTS
    high = min(high, _ephemeral_start())
    draw = random.SystemRandom()
    with contextlib.ExitStack() as held:
        ports: list[int] = []
        for _ in range(count):
            sock = held.enter_context(socket.socket(family, socket.SOCK_STREAM))
            for _ in range(_PICK_TRIES if high > low else 0):
                try:
                    sock.bind((host, draw.randrange(low, high)))
                    break
                except OSError:
                    continue
            else:
                sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (32768, Linux's default, if unknown)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


@contextlib.contextmanager
def interrupt_on_signals(
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGHUP),
) -> Iterator[None]:
    """Inside the block, ``signals`` raise ``KeyboardInterrupt`` like Ctrl-C does.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


# ------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in names}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _libc_prctl() -> Callable[..., int] | None:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn: Callable[..., int] = libc.prctl
    return fn


_PRCTL = _libc_prctl()


def _prctl(option: int, value: int) -> bool:
    if _PRCTL is None:
        return False
    return _PRCTL(option, value, 0, 0, 0) == 0


def set_subreaper(on: bool) -> bool:
    """Make this process a child subreaper, or no longer one (Linux); whether it worked."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1 if on else 0)


def is_subreaper() -> bool:
    """Whether this process is a child subreaper now (Linux; ``False`` elsewhere)."""
    if _PRCTL is None:
        return False
    flag = ctypes.c_int(0)
    return _PRCTL(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0 and flag.value != 0


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: only the already-loaded prctl is called.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
