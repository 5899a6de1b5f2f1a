"""What one round's download gives each edge, per arm: bytes and error of the model it
decodes (a diagnostic of the ``deadline`` sweep's progressive arm).

``python -m simulations.progressive_rd STATE_DIR [--budget 3700]``: ``STATE_DIR`` is one
arm's coordinator state from a sweep (``OUT/state/ARM``). For its final global model and
the version each edge holds, the download each policy would send within the budget (no
link limit) is encoded as the data plane encodes it, cut as the data plane cuts a
progressive stream, and decoded as the edge decodes it; printed: the mean payload bytes
and the mean relative L2 error ``‖decoded − target‖ / ‖target − held‖`` (1.0: the edge
learns nothing of the round), for

* ``adaptive``: the adaptive ladder's first rung that fits;
* ``progressive, one spec``: the arm's single spec before its ladder
  (:data:`~simulations.baselines.PROGRESSIVE_DOWN_SPEC`), truncated to the budget;
* ``progressive, ladder``: the arm's ladder (the densest rung whose base level fits),
  truncated.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from coordinator.budget import Budget, Choice, EdgeRequest, LadderPolicy
from coordinator.source import StoreModelSource
from coordinator.version_store import VersionStore
from fedsqueeze.codec import decode_prefix
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.transport.cache import CacheKey
from fedsqueeze.transport.prepare import prepare_model
from fedsqueeze.transport.truncate import plan_prefix
from fedsqueeze.wire.convert import segment_from_message
from simulations.baselines import (
    ADAPTIVE_DOWN_LADDER,
    ADAPTIVE_UP_LADDER,
    PROGRESSIVE_DOWN_LADDER,
    PROGRESSIVE_DOWN_SPEC,
)

State = Mapping[str, torch.Tensor]


def relative_error(decoded: State, target: State, held: State) -> float:
    """``‖decoded − target‖ / ‖target − held‖`` over every floating tensor."""
    num = sum(float((decoded[k].double() - v.double()).square().sum()) for k, v in target.items())
    den = sum(float((v.double() - held[k].double()).square().sum()) for k, v in target.items())
    return (num / den) ** 0.5 if den else 0.0


def received(source: StoreModelSource, target: str, held: str, choice: Choice) -> tuple[int, State]:
    """Payload bytes the edge gets and the model it decodes (as the data plane sends)."""
    spec = parse_spec(choice.down_spec)
    prepared = prepare_model(source, CacheKey(target, held, spec, None, ()), 1 << 20)
    manifest = prepared.manifest
    budget = choice.down_payload or None
    count = plan_prefix(manifest, frozenset(), budget) if spec.levels else 0
    count = count or len(manifest.segments)
    stream = b"".join(
        bytes(segment_from_message(prepared.messages[i]).payload) for i in range(count)
    )
    base = source.get(held)
    decoded = decode_prefix(stream, dict(base) if base else None, base_digest=bytes.fromhex(held))
    return len(stream), decoded.state


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table (markdown)."""
    parser = argparse.ArgumentParser(prog="python -m simulations.progressive_rd")
    parser.add_argument("state_dir", type=Path, help="one arm's state from a sweep")
    parser.add_argument("--budget", type=int, default=3700, help="download wire bytes")
    parser.add_argument("--edges", type=int, default=8, help="how many edges to look at")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedsqueeze-rd-") as tmp:
        # A copy: opening a store may evict, and the sweep's state stays as it was.
        shutil.copytree(args.state_dir, tmp, dirs_exist_ok=True)
        store = VersionStore(tmp, keep=1 << 20)
        doc = json.loads((Path(tmp) / "state.json").read_text())
        target = doc["tracks"]["global"]
        source = StoreModelSource(store)
        budget = Budget(args.budget, 0)
        arms = {
            "adaptive": LadderPolicy(
                store, ADAPTIVE_DOWN_LADDER, ADAPTIVE_UP_LADDER, budget=budget
            ),
            "progressive, one spec": LadderPolicy(
                store,
                (PROGRESSIVE_DOWN_SPEC,),
                ADAPTIVE_UP_LADDER,
                budget=budget,
                progressive=True,
            ),
            "progressive, ladder": LadderPolicy(
                store,
                PROGRESSIVE_DOWN_LADDER,
                ADAPTIVE_UP_LADDER,
                budget=budget,
                progressive=True,
            ),
        }
        rows: dict[str, list[tuple[int, float, str]]] = {name: [] for name in arms}
        target_state = store.get(target)
        if target_state is None:
            raise SystemExit(f"{args.state_dir}: the global model is not kept")
        edges = [(e, d) for e, d in doc["edges"].items() if store.has(d) and d != target]
        for node, held in edges[: args.edges]:
            held_state = store.get(held)
            if held_state is None:
                continue
            for name, policy in arms.items():
                choice = policy.choose(EdgeRequest(1, int(node), target, held))
                if not isinstance(choice, Choice):
                    continue
                nbytes, decoded = received(source, target, held, choice)
                err = relative_error(decoded, target_state, held_state)
                rows[name].append((nbytes, err, choice.down_spec.split(",targets")[0]))
    sys.stdout.write("| download | payload B (mean) | relative error (mean) | specs |\n")
    sys.stdout.write("|---|---:|---:|---|\n")
    for name, got in rows.items():
        if not got:
            continue
        mean_b = sum(b for b, _, _ in got) / len(got)
        mean_e = sum(e for _, e, _ in got) / len(got)
        specs = sorted({s for _, _, s in got})
        sys.stdout.write(f"| {name} | {mean_b:,.0f} | {mean_e:.3f} | {'; '.join(specs)} |\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
