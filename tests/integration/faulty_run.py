"""A simulation with injected edge faults, run as a subprocess by the tests.

Usage: python -m tests.integration.faulty_run STATE_DIR OUT_JSON
           [--faults | --no-fetch] [--rounds N] [--resume]

With ``--faults``: in round 2 the edge of partition 0 dies after fetching the model
(its ClientApp raises), and the edge of partition 1 trains but its upload never
arrives. Both are back in round 3.

With ``--no-fetch``: every edge's fetch fails, every round (a data plane nobody can
reach). The coordinator must fail the run: the state is written to OUT_JSON all the
same, the error goes to stderr as one line, and the exit status is 3.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from edge.dataplane import Fetched, GrpcConnector, Pushed, State
from edge.mod import make_mod
from edge.part_store import PartStore
from fedsqueeze.codec import EncodedModel
from fedsqueeze.control import CONTROL_KEY, RoundInstruction
from fedsqueeze.errors import RunFailedError, UnavailableError
from tests.subproc import arm_watchdog

warnings.simplefilter("ignore")


arm_watchdog()


def _round(msg: Message) -> int:
    if "config" in msg.content.config_records:
        value = msg.content.config_records["config"].get("server-round", 0)
        return int(value) if isinstance(value, int) else 0
    return 0


def die_in_round_two(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Inner mod: partition 0 crashes in round 2, after the model was fetched."""
    if context.node_config.get("partition-id") == 0 and _round(msg) == 2:
        raise RuntimeError("injected: edge died mid-round")
    return call_next(msg, context)


class LosingConnector(GrpcConnector):
    """Drops partition 1's upload in round 2 (it never reaches the coordinator)."""

    def push(
        self,
        instruction: RoundInstruction,
        edge_id: str,
        update_id: str,
        base_digest: str,
        encoded: EncodedModel,
    ) -> Pushed:
        if instruction.server_round == 2 and edge_id in LOSE_FOR:
            return Pushed(0, 0)
        return super().push(instruction, edge_id, update_id, base_digest, encoded)


LOSE_FOR: set[str] = set()


class UnreachableConnector(GrpcConnector):
    """A data plane no edge can reach."""

    def fetch(
        self,
        instruction: RoundInstruction,
        edge_id: str,
        held_digest: str | None,
        held: State | None,
        *,
        parts: PartStore | None = None,
    ) -> Fetched:
        raise UnavailableError(f"injected: {instruction.address} unreachable")


def remember_partition_one(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outer mod: notes partition 1's node id so the connector knows whom to fail."""
    if context.node_config.get("partition-id") == 1 and CONTROL_KEY in msg.content.config_records:
        LOSE_FOR.add(str(msg.metadata.dst_node_id))
    return call_next(msg, context)


def main() -> int:
    from coordinator.app import make_server_app
    from edge.app import make_client_app
    from fedsqueeze.runconfig import RunSettings
    from simulations.engine import run_simulation

    state_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    faults = "--faults" in sys.argv
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
    settings = RunSettings(
        num_rounds=rounds,
        resume="--resume" in sys.argv,
        state_dir=str(state_dir),
        min_train_nodes=4,
        min_available_nodes=4,
        lr=0.1,
        epochs=2,
        round_timeout=120.0,
    )
    mods = (
        [remember_partition_one, make_mod(connector=LosingConnector()), die_in_round_two]
        if faults
        else None
    )
    if "--no-fetch" in sys.argv:
        mods = [make_mod(connector=UnreachableConnector())]
    status = 0
    try:
        run_simulation(
            make_server_app(settings),
            make_client_app(settings, mods=mods),
            num_supernodes=4,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": 2},
            },
        )
    except RunFailedError as exc:
        print(f"run failed: {exc}", file=sys.stderr)
        status = 3
    state = json.loads((state_dir / "state.json").read_text())
    out.write_text(json.dumps(state))
    return status


if __name__ == "__main__":
    sys.exit(main())
