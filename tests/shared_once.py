"""A module fixture's costly output made once per test session, however the suite's
workers share that module's tests.

pytest-xdist's ``worksteal`` hands a module's tests to whichever worker is free, and
each worker then runs the module's fixtures itself: a 60-second simulation whose
outputs several tests only read ran twice. :func:`made_once` makes it once, in a folder
every worker of the session sees, behind a file lock (the second worker waits for the
first instead of running it again). A run that fails leaves no mark: the next worker
makes it afresh and sees the same failure.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest


def made_once(
    tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], object]
) -> Path:
    """A folder that ``make`` filled (once per session); the tests must only read it."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # one process: its own temporary folder
        out = tmp_path_factory.mktemp(name)
        make(out)
        return out
    # The workers' base folders (popen-gw0, ...) share this session's parent folder.
    shared = tmp_path_factory.getbasetemp().parent / f"made-once-{name}"
    shared.mkdir(exist_ok=True)
    out, done = shared / "out", shared / "done"
    with (shared / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            make(out)
            done.touch()
    return out
