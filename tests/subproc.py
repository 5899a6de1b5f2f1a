"""Run a Python module as a subprocess with a hard timeout that leaves nothing behind.

Flower simulations start Ray, which starts processes of its own (GCS, raylet, workers).
``subprocess.run(timeout=...)`` kills only the direct child, so a hung run would leave
Ray's processes eating the CPU for the rest of the suite. Here the child runs in its own
session and the whole process group is killed on timeout.

Before the hard timeout the child dumps every thread's stack to stderr (Python's
``faulthandler``, armed through ``FEDSQUEEZE_TEST_WATCHDOG_S``, see :func:`arm_watchdog`),
so a hang in CI shows where it waited instead of only that it timed out.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WATCHDOG_ENV = "FEDSQUEEZE_TEST_WATCHDOG_S"


def arm_watchdog() -> None:
    """In a child: dump all stacks to stderr (repeatedly) once the watchdog time passes."""
    seconds = float(os.environ.get(WATCHDOG_ENV, "0") or 0)
    if seconds > 0:
        faulthandler.dump_traceback_later(seconds, repeat=True, file=sys.stderr)


def run_module(
    module: str,
    *args: str,
    timeout: float,
    env: dict[str, str] | None = None,
    ray: bool = False,
) -> subprocess.CompletedProcess[str]:
    """``python -m module args...`` from the repository root, killed as a group on timeout.

    ``ray=True``: the run's Flower simulations join this test process's shared Ray node
    (:mod:`tests.ray_head`) instead of each starting its own (unless the environment
    says ``FEDSQUEEZE_TEST_SHARED_RAY=0``).

    Raises
    ------
    AssertionError
        The run timed out; the message holds the end of its output (stack dumps included).
    """
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    full_env[WATCHDOG_ENV] = str(max(timeout - 20.0, timeout * 0.8))
    if ray and os.environ.get("FEDSQUEEZE_TEST_SHARED_RAY", "1") != "0":
        from tests.ray_head import ray_address

        full_env["RAY_ADDRESS"] = ray_address()
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"{module} {' '.join(args)} did not finish in {timeout:.0f} s; "
            f"end of its output:\n{stdout[-2000:]}\n--- stderr ---\n{stderr[-12000:]}"
        ) from None
    finally:
        # Ray's daemons outlive a child that exits normally only if it failed to stop
        # them; the group is ours alone, so clear it either way.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
