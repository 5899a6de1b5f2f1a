"""Where one client-round's bytes go, for one arm of a sweep (a diagnostic of issue 15).

``python -m simulations.bytes_breakdown SEED_DIR --arm frontier``: ``SEED_DIR`` is one
seed's sweep output (``clients.csv`` and ``state/ARM``). Printed, per client and round:

* from ``clients.csv``, when the folder has one (every replying client-round of the
  arm, as the sweep counted them): all bytes down and up, their data-plane part, and the
  rest (the Flower messages: instruction and receipt), of which Flower's own message
  (metadata, record names, the train config, the receipt's metrics) is what is not ours;
* ours: the serialized instruction and receipt (``fedsqueeze.control``) of the transfer
  below, with a real target and token; for an arm with ``inline-bytes``, also with the
  payloads inline as the arm sends them (then the data plane is not used at all);
* of the data plane, payload against framing, measured on one real transfer: the arm's
  final global model fetched by an edge holding the version the sweep left it with, under
  the specs the arm's policy picks for that edge (the preset arm's ladders and budgets),
  and an update as large as the delta it lacked pushed back, over the real gRPC data
  plane on loopback; framing is what the transport counted beyond the encoded stream
  (requests, responses, acknowledgements).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from coordinator.budget import Budget, Choice, EdgeRequest, LadderPolicy
from coordinator.dataplane import CoordinatorDataPlane, InstructionTemplate
from coordinator.version_store import VersionStore
from edge.dataplane import GrpcConnector
from edge.mod import fit_update
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.control import RoundInstruction, TrainReceipt
from fedsqueeze.wire.control_convert import instruction_to_bytes, receipt_to_bytes
from simulations.config import load_config


def flower_rows(seed_dir: Path, arm: str) -> dict[str, float]:
    """Means per replying client-round from ``clients.csv``, and the most common specs."""
    with (seed_dir / "clients.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["arm"] == arm and r["dropped"] == "0"]
    if not rows:
        raise SystemExit(f"{seed_dir}: no client rows for arm {arm!r}")

    def mean(key: str) -> float:
        return statistics.fmean(float(r[key]) for r in rows)

    return {
        "rows": float(len(rows)),
        "down": mean("bytes_down"),
        "up": mean("bytes_up"),
        "data_down": mean("data_bytes_down"),
        "data_up": mean("data_bytes_up"),
    }


def ours(instruction: RoundInstruction, update: bytes = b"") -> tuple[int, int]:
    """Bytes of our serialized instruction and of a receipt of the same round (with
    ``update`` inline, if given: no update id, no data-plane bytes)."""
    receipt = TrainReceipt(
        update_id="" if update else f"{1234}-r{instruction.server_round}-{0:012x}",
        held=instruction.target,
        num_examples=180,
        loss=0.25,
        bytes_down=0 if update else 2300,
        bytes_up=0 if update else 1900,
        train_seconds=1.25,
        fetch_seconds=0.01,
        push_seconds=0.0 if update else 0.01,
        update=update,
    )
    return len(instruction_to_bytes(instruction)), len(receipt_to_bytes(receipt))


def main(argv: Sequence[str] | None = None) -> int:
    """Print the breakdown (markdown)."""
    parser = argparse.ArgumentParser(prog="python -m simulations.bytes_breakdown")
    parser.add_argument("seed_dir", type=Path, help="one seed's sweep output folder")
    parser.add_argument("--arm", default="frontier", help="a fedsqueeze arm of that sweep")
    args = parser.parse_args(argv)
    config = load_config(None, [f"arms={args.arm}"])
    arm = config.arm(args.arm)
    has_rows = (args.seed_dir / "clients.csv").exists()
    flower = flower_rows(args.seed_dir, args.arm) if has_rows else None
    with tempfile.TemporaryDirectory(prefix="fedsqueeze-bytes-") as tmp:
        shutil.copytree(args.seed_dir / "state" / args.arm, tmp, dirs_exist_ok=True)
        store = VersionStore(tmp, keep=1 << 20)
        doc = json.loads((Path(tmp) / "state.json").read_text())
        target = doc["tracks"]["global"]
        init = doc["tracks"]["init"]
        node, held = next(
            (int(e), d) for e, d in doc["edges"].items() if store.has(d) and d != target
        )
        plane = CoordinatorDataPlane(store)
        try:
            connector = GrpcConnector()
            template = InstructionTemplate("", "", config.task, config.seed, init)
            policy = LadderPolicy(
                store,
                arm.down_ladder,
                arm.up_ladder,
                budget=Budget(arm.down_budget, arm.up_budget),
            )
            choice = policy.choose(EdgeRequest(1, node, target, held))
            if not isinstance(choice, Choice):
                raise SystemExit(f"the policy skips this edge: {choice.reason}")
            instruction = replace(
                plane.instruction(template, 30, node, target),
                down_spec=choice.down_spec,
                up_spec=choice.up_spec,
                down_budget=choice.down_payload,
            )
            held_state = store.get(held)
            fetched = connector.fetch(instruction, str(node), held, held_state)
            target_state = store.get(target)
            if held_state is None or target_state is None:
                raise SystemExit("the global model or the edge's version is not kept")
            # An update as large as the delta the edge lacked (what its training moves).
            update = {k: fetched.state[k] + (v - held_state[k]) for k, v in target_state.items()}
            encoded = fit_update(
                update,
                parse_spec(choice.up_spec),
                fetched.state,
                residual=None,
                seed=0,
                base_digest=bytes.fromhex(fetched.digest),
                budget=choice.up_payload,
            )
            pushed = connector.push(
                instruction, str(node), f"{node}-r30-{1:012x}", fetched.digest, encoded
            )
            inline = plane.with_payload(replace(instruction, inline_limit=arm.inline_bytes), held)
        finally:
            plane.close()
    wire_down = fetched.bytes_down + pushed.bytes_down
    wire_up = fetched.bytes_up + pushed.bytes_up
    ins, rec = ours(instruction)
    # With payloads inline: our bytes around them (instruction less its payload, receipt
    # less its update), the part of the Flower messages that is neither payload nor Flower's.
    inline_ins = inline_rec = 0
    if inline.payload:
        inline_ins = ours(inline)[0] - len(inline.payload)
        pushed_bytes = encoded.to_bytes()
        if len(pushed_bytes) <= arm.inline_bytes:
            inline_rec = ours(inline, pushed_bytes)[1] - len(pushed_bytes)
    w = sys.stdout.write
    w(f"arm {args.arm}; specs {choice.down_spec} / {choice.up_spec}\n\n")
    w("| per client and round | down B | up B |\n|---|---:|---:|\n")
    if flower is not None:
        ctl_down = flower["down"] - flower["data_down"]
        ctl_up = flower["up"] - flower["data_up"]
        n = int(flower["rows"])
        w(f"| all ({n} client-rounds of clients.csv) | {flower['down']:,.0f} ")
        w(f"| {flower['up']:,.0f} |\n")
        w(f"| data plane | {flower['data_down']:,.0f} | {flower['data_up']:,.0f} |\n")
        w(f"| Flower messages | {ctl_down:,.0f} | {ctl_up:,.0f} |\n")
        if not inline_ins:  # with payloads inline their sizes vary: not separable here
            w(f"| of which Flower's own | {ctl_down - ins:,.0f} | {ctl_up - rec:,.0f} |\n")
    w(f"| ours in the Flower messages (instruction / receipt) | {ins} | {rec} |\n")
    if inline_ins:
        w(
            f"| ours around the payloads inline (inline-bytes {arm.inline_bytes}) "
            f"| {inline_ins:,} | {inline_rec or rec:,} |\n"
        )
    w(f"| one transfer: payload | {choice.down_payload:,} | {encoded.nbytes:,} |\n")
    w(
        f"| one transfer: data-plane framing and requests | {wire_down - choice.down_payload:,} "
        f"| {wire_up - encoded.nbytes:,} |\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
