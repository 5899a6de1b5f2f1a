"""End a Flower app process when its parent has exited, even if nobody reaps the parent.

Flower starts each ``flwr-serverapp`` and ``flwr-clientapp`` with ``--parent-pid P`` (its
SuperExec) and ends it when ``kill(P, 0)`` fails. A parent that has exited but was not
reaped is a zombie, and ``kill`` succeeds on a zombie. That happens when the SuperExec is
orphaned (its SuperLink, killed with its coordinator, waits only a second for it) and the
process that adopts it never reaps: a container whose init is not a real init. The
ServerApp then runs for good, waiting for a SuperLink that is gone.

:func:`watch_flower_parent` adds the check Flower lacks: ``P`` has exited once it is a
zombie in ``/proc``, or once it is no longer this process's parent.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from fedsqueeze.deploy.proctree import is_alive

log = logging.getLogger(__name__)

_FLOWER_APPS = ("flwr-serverapp", "flwr-clientapp")
_lock = threading.Lock()
_watching = False


def flower_parent_pid(argv: Sequence[str]) -> int | None:
    """The ``--parent-pid`` of a Flower app process's command line, else ``None``.

    Only ``flwr-serverapp`` and ``flwr-clientapp`` count: another program's flag of the
    same name means something else.
    """
    if not argv or Path(argv[0]).name not in _FLOWER_APPS:
        return None
    value: str | None = None
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "--parent-pid" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--parent-pid="):
            value = arg.split("=", 1)[1]
    if value is None or not value.isdigit() or int(value) <= 1:
        return None
    return int(value)


def parent_has_exited(pid: int, *, was_parent: bool) -> bool:
    """Whether ``pid`` has exited: gone, a zombie, or (if it was) no longer our parent."""
    return (was_parent and os.getppid() != pid) or not is_alive(pid)


def watch_flower_parent(
    argv: Sequence[str] | None = None, *, interval: float = 0.5, sig: int = signal.SIGINT
) -> int | None:
    """In a Flower app process, signal the main thread once ``--parent-pid`` has exited.

    ``SIGINT`` is what Flower's own monitor raises, so the app shuts down the same way.
    A no-op (``None``) outside a Flower app process (a simulation) and on a second call;
    else starts one daemon thread and returns the watched pid.
    """
    global _watching
    pid = flower_parent_pid(sys.argv if argv is None else argv)
    if pid is None:
        return None
    with _lock:
        if _watching:
            return None
        _watching = True
    was_parent = os.getppid() == pid

    def watch() -> None:
        while not parent_has_exited(pid, was_parent=was_parent):
            time.sleep(interval)
        log.warning("parent process %d has exited: ending this Flower app", pid)
        # To the main thread: raised in this one, the signal would wait until the main
        # thread next wakes up (a blocking call there would not be interrupted).
        main = threading.main_thread().ident
        if main is None:
            signal.raise_signal(sig)
        else:
            signal.pthread_kill(main, sig)

    threading.Thread(target=watch, name="fedsqueeze-parent-watch", daemon=True).start()
    return pid
