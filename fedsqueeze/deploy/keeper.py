"""Keeping an edge's SuperNode up across runs and coordinator restarts.

A Flower 1.42 SuperNode registers with one SuperLink. When that SuperLink stops (the
run ended, the coordinator was killed or restarted with ``--resume``), the SuperNode's
heartbeat gets 401 once a SuperLink answers again, and the SuperNode quits. An edge is
meant to outlive runs, so :class:`SuperNodeKeeper` starts a fresh SuperNode each time
one exits on its own, after an exponential backoff (capped, with jitter, so a fleet of
edges does not stampede a SuperLink that just came back). A SuperNode that ran for a
while before it exited starts the backoff over.

A SuperNode can also say it quits and then never exit: on a 401 it signals itself, logs
"SuperNode terminated gracefully." and runs Flower's exit handlers, one of which may
block on the new SuperLink before Flower's own five-second force-exit timer is armed.
The keeper is told when the log holds that line (``quitting``); a SuperNode still alive
``hang_s`` seconds later counts as exited, and the restart stops it (and what it
started) before starting the next.

Ctrl-C (``KeyboardInterrupt``) ends the loop at once, whether it waits for the SuperNode
or sleeps before a restart; the caller's supervisor then stops what is left.
"""

from __future__ import annotations

import logging
import random
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fedsqueeze.deploy.processes import ProcessError

log = logging.getLogger(__name__)

__all__ = ["QUIT_LINE", "START_MARK", "Backoff", "SuperNodeKeeper", "explain_exit"]


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff, capped, with jitter.

    Attributes
    ----------
    initial_s
        Delay before the first restart, in seconds.
    factor
        Growth per consecutive failure.
    cap_s
        The longest delay, in seconds (jitter only shortens it).
    jitter
        Fraction of the delay drawn at random (``0``: none; ``0.25``: 75-100 %).
    """

    initial_s: float = 1.0
    factor: float = 2.0
    cap_s: float = 30.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if self.initial_s < 0 or self.cap_s < self.initial_s:
            raise ValueError("need 0 <= initial_s <= cap_s")
        if self.factor < 1:
            raise ValueError("factor must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be in 0..1")

    def delay(self, failures: int, rng: random.Random) -> float:
        """Seconds to wait after ``failures`` (>= 1) exits in a row."""
        if failures < 1:
            raise ValueError("failures must be >= 1")
        # Capped before jitter: a long-failing edge still waits at most cap_s.
        base = min(self.cap_s, self.initial_s * self.factor ** min(failures - 1, 64))
        return base * (1.0 - self.jitter * rng.random())


class Runner(Protocol):
    """A started process the keeper waits on (``ManagedProcess`` in real use)."""

    def wait(self, timeout: float | None = None) -> int:
        """Block until it exits; its exit status. Raises ``subprocess.TimeoutExpired``
        when it still runs after ``timeout`` seconds."""
        ...


class SuperNodeKeeper:
    """Restart a SuperNode each time it exits, until interrupted.

    Parameters
    ----------
    start
        Stops whatever the previous SuperNode left behind and starts a new one.
    describe
        ``describe(status)``: why the SuperNode exited, for the one status line;
        ``status`` is ``None`` for one that said it quit but hung (see ``quitting``).
    report
        Where the status lines go (the edge's terminal).
    backoff
        Delays between restarts.
    stable_s
        A SuperNode that ran at least this long resets the backoff.
    quitting
        ``True`` once the running SuperNode has said it quits (its log says so).
    hang_s
        How long a SuperNode that said it quits may take to exit before it counts as
        exited (Flower force-exits after 5 s when its exit handlers do not block).
    poll_s
        How often ``quitting`` is asked while a SuperNode runs.
    sleep, clock, rng
        Injected for tests.
    """

    def __init__(
        self,
        start: Callable[[], Runner],
        *,
        describe: Callable[[int | None], str],
        report: Callable[[str], None],
        backoff: Backoff | None = None,
        stable_s: float = 60.0,
        quitting: Callable[[], bool] = lambda: False,
        hang_s: float = 20.0,
        poll_s: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.start = start
        self.describe = describe
        self.report = report
        self.backoff = backoff or Backoff()
        self.stable_s = stable_s
        if not (hang_s >= 0 and poll_s > 0):
            raise ValueError("need hang_s >= 0 and poll_s > 0")
        self.quitting = quitting
        self.hang_s = hang_s
        self.poll_s = poll_s
        self.sleep = sleep
        self.clock = clock
        self.rng = rng or random.Random()
        self.restarts = 0

    def run(self, first: Runner) -> None:
        """Wait on ``first``, then restart each SuperNode that exits; returns only by
        an exception (``KeyboardInterrupt`` for Ctrl-C)."""
        process = first
        failures = 0
        while True:
            started = self.clock()
            why = self.describe(self._wait(process))
            failures = 1 if self.clock() - started >= self.stable_s else failures + 1
            process, failures = self._restart(why, failures)

    def _wait(self, process: Runner) -> int | None:
        """``process``'s exit status, or ``None`` once it has said it quits and still
        runs ``hang_s`` seconds later."""
        said_at: float | None = None
        while True:
            try:
                return process.wait(timeout=self.poll_s)
            except subprocess.TimeoutExpired:
                pass
            if said_at is None:
                if self.quitting():
                    said_at = self.clock()
            elif self.clock() - said_at >= self.hang_s:
                return None

    def _restart(self, why: str, failures: int) -> tuple[Runner, int]:
        """Report ``why``, back off, start a new SuperNode (again, if it fails to start)."""
        while True:
            delay = self.backoff.delay(failures, self.rng)
            self.report(f"{why}; starting a new SuperNode in {delay:.0f} s")
            self.sleep(delay)
            self.restarts += 1
            try:
                return self.start(), failures
            except ProcessError as exc:
                why = f"the SuperNode did not start again ({exc})"
                failures += 1


# Lines of a SuperNode's log that tell why it quit, most telling first.
_CAUSES: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"\b401\b|Unauthorized|not (?:registered|found)|Invalid node", re.I),
        "the SuperLink no longer knows this node (its run ended or the coordinator restarted)",
    ),
    (
        re.compile(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed|SSL", re.I),
        "the TLS handshake with the SuperLink failed",
    ),
    (
        re.compile(r"Connection attempt failed|Connection refused|ConnectError", re.I),
        "the SuperLink could not be reached",
    ),
)


def explain_exit(status: int | None, log_file: Path | None, *, tail_bytes: int = 16_384) -> str:
    """``"SuperNode exited (status 1): the SuperLink no longer knows this node ..."``.

    ``status`` is ``None`` for a SuperNode that said it quit but did not exit (it is
    stopped before the next starts). The cause is read from the end of the SuperNode's
    log, where Flower wrote it.
    """
    if status is None:
        head = "SuperNode said it quit but did not exit, so it is stopped"
    else:
        head = f"SuperNode exited (status {status})"
    if log_file is None:
        return head
    try:
        with log_file.open("rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(max(0, size - tail_bytes))
            text = handle.read().decode(errors="replace")
    except OSError:
        return head
    # Only what this SuperNode wrote: the log holds earlier ones too.
    text = text.rsplit(START_MARK, 1)[-1]
    for pattern, cause in _CAUSES:
        if pattern.search(text):
            return f"{head}: {cause}"
    return head


#: Written into the SuperNode log before each start, so causes are read per start.
START_MARK = "----- fedsqueeze edge: starting a SuperNode -----"

#: The line a SuperNode logs when it begins to quit (Flower 1.42's exit message; its
#: SuperExec and ClientApps, whose output shares the log, name themselves differently).
QUIT_LINE = re.compile(r"SuperNode terminated gracefully")
