"""Start Flower's simulation engine so that a failed start is an error, not a hang.

Flower's Ray backend starts Ray lazily, inside the engine's thread. When Ray does not
come up (its raylet has a fixed 30 s to register with the GCS, which a loaded 2-core
machine sometimes misses: "The current node timed out during startup"), Flower logs
"Simulation Runtime crashed" and the ServerApp waits for replies that never come: a
run that hangs until its round timeout, round after round (seen in CI).

:func:`run_simulation` here starts Ray first, the way Flower would (same init
arguments, the driver's ``sys.path`` passed to the workers), retries a start that
timed out after clearing what it left behind, and only then hands over to Flower,
which finds Ray running and uses it.

What a failed start leaves: ``ray.init`` spawns the GCS server and the raylet as children
of this process before it waits for them, and when the wait times out it raises before
Ray records the node, so ``ray.shutdown`` knows nothing to stop. Left alone they run
(and load the machine) until this process exits, beside the next attempt's. So every
child process that appeared during a failed attempt is stopped (SIGTERM, then SIGKILL
after a grace period) and reaped before the next one.

With ``RAY_ADDRESS`` set (Ray's own variable: ``host:port`` of a running cluster's GCS),
:func:`start_ray` joins that cluster instead of starting a node: the cluster's CPUs and
GPUs decide how many clients train at once, and the settings that only a new node takes
(``num_cpus``, ``num_gpus``, the dashboard) are left out. Joining takes well under a
second where starting a node takes 5-6 s, so a sweep of many arms, or a test suite, can
keep one cluster up for all of its runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any

from fedsqueeze.deploy import proctree
from fedsqueeze.errors import FedsqueezeError

log = logging.getLogger(__name__)

__all__ = ["EngineStartError", "child_pids", "run_simulation", "start_ray", "stop_processes"]

#: Attempts at starting Ray before giving up.
START_ATTEMPTS = 3
#: Seconds a left-behind process gets to exit after SIGTERM before SIGKILL.
STOP_GRACE_S = 5.0
#: Ray's variable naming a running cluster to join.
RAY_ADDRESS_ENV = "RAY_ADDRESS"
#: ``ray.init`` arguments that only a new node takes (refused when joining a cluster).
NEW_NODE_ONLY = frozenset(
    {"num_cpus", "num_gpus", "resources", "object_store_memory", "include_dashboard"}
)
#: The start of the FutureWarning ``ray.init`` gives about accelerator variables.
RAY_ACCELERATOR_TIP = r"Tip: In future versions of Ray, Ray will no longer override accelerator"


class EngineStartError(FedsqueezeError):
    """Ray, under Flower's simulation engine, did not start."""


def start_ray(init_args: Mapping[str, Any], attempts: int = START_ATTEMPTS) -> None:
    """Start Ray with Flower's ``init_args`` unless it runs already; retry failed starts.

    With ``RAY_ADDRESS`` set, join that cluster instead (``init_args`` less what only a
    new node takes).

    Raises
    ------
    EngineStartError
        Ray did not start (or the cluster could not be joined) in ``attempts`` tries; the
        message holds the last error.
    """
    import ray  # deferred: heavy

    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    if ray.is_initialized():
        return
    args = dict(init_args)
    address = os.environ.get(RAY_ADDRESS_ENV, "").strip()
    if address:
        left_out = sorted(k for k in args if k in NEW_NODE_ONLY)
        args = {k: v for k, v in args.items() if k not in NEW_NODE_ONLY}
        args["address"] = address
        _check_reachable(address)
        log.info(
            "joining the Ray cluster at %s (%s)%s",
            address,
            RAY_ADDRESS_ENV,
            f"; its own resources apply, not {', '.join(left_out)}" if left_out else "",
        )
    else:
        args.setdefault("include_dashboard", False)
    # As Flower's backend does: workers import the app from the driver's sys.path.
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        before = child_pids()
        try:
            with warnings.catch_warnings():
                # Ray 2.5x tells every driver that a future Ray will stop hiding GPUs
                # from actors that ask for none; we keep today's behaviour (clients ask
                # for num_gpus=0 and must not grab a GPU), so the tip is only noise.
                warnings.filterwarnings(
                    "ignore", message=RAY_ACCELERATOR_TIP, category=FutureWarning
                )
                ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **args)
            return
        except Exception as exc:  # Ray raises a bare Exception on a start timeout
            last = exc
            log.warning("Ray did not start (attempt %d of %d): %s", attempt, attempts, exc)
            try:
                ray.shutdown()  # stops the processes a half-started node left
            except Exception as cleanup:  # pragma: no cover - best effort
                log.debug("ray.shutdown after a failed start: %s", cleanup)
            left = sorted(child_pids() - before)
            if left:
                log.warning("stopping %d process(es) the failed start left: %s", len(left), left)
                stop_processes(left)
            time.sleep(2.0 * attempt)
    if address:
        raise EngineStartError(
            f"could not join the Ray cluster at {address} ({RAY_ADDRESS_ENV}) in {attempts} "
            f"attempts: {last}"
        )
    raise EngineStartError(f"Ray did not start in {attempts} attempts: {last}")


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once where nothing listens at ``host:port`` (Ray itself would retry for
    minutes); names Ray understands otherwise (``auto``, ``ray://...``) are left to it."""
    import socket

    if address in ("auto", "local") or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EngineStartError(f"{RAY_ADDRESS_ENV} must be host:port, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise EngineStartError(
            f"nothing answers at {address} ({RAY_ADDRESS_ENV}): {exc}; start the cluster "
            f"(ray start --head) or unset {RAY_ADDRESS_ENV}"
        ) from None


def child_pids() -> set[int]:
    """Process ids of this process's live children (Linux ``/proc``; empty elsewhere)."""
    me = os.getpid()
    return {s.pid for s in proctree.all_stats() if s.ppid == me and s.live}


def stop_processes(pids: list[int], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM each of ``pids`` (children of this process), SIGKILL what is left after
    ``grace_s`` seconds, and reap them all."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    waiting = set(pids)
    deadline = time.monotonic() + grace_s
    while waiting:
        for pid in sorted(waiting):
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere (a Popen's own wait)
                done = pid
            if done:
                waiting.discard(pid)
        if not waiting:
            return
        if time.monotonic() >= deadline:
            for pid in waiting:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for pid in waiting:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            return
        time.sleep(0.05)


def run_simulation(
    server_app: Any,
    client_app: Any,
    num_supernodes: int,
    backend_config: Mapping[str, Any],
    **kwargs: Any,
) -> None:
    """``flwr.simulation.run_simulation`` with Ray started (and retried) first."""
    from flwr.simulation import run_simulation as flower_run_simulation

    start_ray(backend_config.get("init_args", {}))
    flower_run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_supernodes,
        backend_config=dict(backend_config),
        **kwargs,
    )
