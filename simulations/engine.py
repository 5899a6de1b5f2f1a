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
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any

from fedsqueeze.errors import FedsqueezeError

log = logging.getLogger(__name__)

__all__ = ["EngineStartError", "run_simulation", "start_ray"]

#: Attempts at starting Ray before giving up.
START_ATTEMPTS = 3
#: The start of the FutureWarning ``ray.init`` gives about accelerator variables.
RAY_ACCELERATOR_TIP = r"Tip: In future versions of Ray, Ray will no longer override accelerator"


class EngineStartError(FedsqueezeError):
    """Ray, under Flower's simulation engine, did not start."""


def start_ray(init_args: Mapping[str, Any], attempts: int = START_ATTEMPTS) -> None:
    """Start Ray with Flower's ``init_args`` unless it runs already; retry failed starts.

    Raises
    ------
    EngineStartError
        Ray did not start in ``attempts`` tries; the message holds the last error.
    """
    import ray  # deferred: heavy

    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    if ray.is_initialized():
        return
    args = dict(init_args)
    args.setdefault("include_dashboard", False)
    # As Flower's backend does: workers import the app from the driver's sys.path.
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
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
            time.sleep(2.0 * attempt)
    raise EngineStartError(f"Ray did not start in {attempts} attempts: {last}")


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
