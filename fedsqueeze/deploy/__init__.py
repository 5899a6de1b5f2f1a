"""Running fedsqueeze as real processes on Flower's Deployment Engine.

``fedsqueeze coordinator`` starts (or reaches) a Flower SuperLink and submits the run
with ``flwr run``; each ``fedsqueeze edge`` starts a Flower SuperNode. Flower then starts
the coordinator's ServerApp (``coordinator.app:app``) beside the SuperLink and an edge
ClientApp (``edge.app:app``) beside each SuperNode, all with this Python.

Modules:

* :mod:`~fedsqueeze.deploy.processes`: a supervisor that starts processes in their own
  process groups and stops them and everything they started
  (:mod:`~fedsqueeze.deploy.proctree` finds the latter in ``/proc``);
* :mod:`~fedsqueeze.deploy.federation`: the private ``FLWR_HOME`` (SuperLink connection)
  and the generated Flower app;
* :mod:`~fedsqueeze.deploy.superlink`, :mod:`~fedsqueeze.deploy.supernode`: the two
  Flower servers;
* :mod:`~fedsqueeze.deploy.runs`: ``flwr run``, the run's status, the per-round summary.
"""

from __future__ import annotations

from fedsqueeze.deploy.federation import (
    CONNECTION_NAME,
    LinkConnection,
    flower_env,
    write_app,
    write_flower_config,
    write_run_config,
)
from fedsqueeze.deploy.processes import (
    ManagedProcess,
    Output,
    ProcessError,
    ProcessSpec,
    Supervisor,
    free_port,
    free_ports,
    interrupt_on_signals,
    wait_for_port,
)
from fedsqueeze.deploy.runs import RoundSummary, RunOutcome, RunStatus, read_round_summaries
from fedsqueeze.deploy.superlink import FlowerTls, SuperLinkOptions, start_superlink
from fedsqueeze.deploy.supernode import SuperNodeOptions, start_supernode

__all__ = [
    "CONNECTION_NAME",
    "FlowerTls",
    "LinkConnection",
    "ManagedProcess",
    "Output",
    "ProcessError",
    "ProcessSpec",
    "RoundSummary",
    "RunOutcome",
    "RunStatus",
    "SuperLinkOptions",
    "SuperNodeOptions",
    "Supervisor",
    "flower_env",
    "free_port",
    "free_ports",
    "interrupt_on_signals",
    "read_round_summaries",
    "start_superlink",
    "start_supernode",
    "wait_for_port",
    "write_app",
    "write_flower_config",
    "write_run_config",
]
