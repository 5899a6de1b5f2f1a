"""One Ray node per test process, shared by the Flower simulations that process starts.

Every simulation used to start and stop its own Ray node: 5-6 s of an idle 2-core
machine before Flower's first round and after its last, for each of the suite's
simulations. :func:`ray_address` starts one node the first time
a test asks (``python -m tests.ray_head``, which holds it until its stdin closes) and
hands its address to the simulations through ``RAY_ADDRESS``, which
:func:`simulations.engine.start_ray` connects to. Each simulation still starts its own
workers (a job of its own), so nothing of one run's Python state reaches the next.

One node per pytest-xdist worker: two simulations never share one node's CPUs. The node
has the CPUs a simulation asks for by default (``cpus = 0``: all of the machine's).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPUS = os.cpu_count() or 1
_READY = "RAY-HEAD "
_lock = threading.Lock()
_head: tuple[subprocess.Popen[str], str] | None = None


def ray_address() -> str:
    """The address of this process's shared Ray node, started on first use."""
    global _head
    with _lock:
        if _head is not None and _head[0].poll() is None:
            return _head[1]
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.ray_head"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(_READY):
                _head = (proc, line[len(_READY) :].strip())
                atexit.register(_stop, proc)
                return _head[1]
        proc.wait(timeout=60)
        raise RuntimeError(f"the shared Ray node did not start (exit {proc.returncode})")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()  # the head shuts Ray down and exits
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()  # else the interpreter warns of an unclosed pipe at exit


def _hold() -> None:
    """The head: start Ray, print its address, shut it down when stdin closes."""
    import ray

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(0))
    context = ray.init(
        num_cpus=CPUS,
        num_gpus=0,
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    try:
        print(_READY + context.address_info["gcs_address"], flush=True)  # type: ignore[attr-defined]
        sys.stdin.read()  # EOF: the test process closed the pipe, or died
    finally:
        ray.shutdown()


if __name__ == "__main__":
    _hold()
