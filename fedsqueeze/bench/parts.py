"""Bytes of fetches with and without content-addressed parts, one scenario side by side.

``python -m fedsqueeze.bench.parts``: the digits CNN of the ``digits-cnn`` task goes
through four versions over the real data plane (coordinator version store, gRPC on
127.0.0.1, the edge's :class:`~edge.dataplane.GrpcConnector`), once with the edge's part
store off (``held_versions=0``: what every client did before) and once on:

1. v1, a first download (full model);
2. v2: every tensor moved;
3. v3: every tensor moved again, except the largest layer, back to v1's (a layer reset
   or a stale aggregate: held in v1, not in the base v2);
4. v1 again (a rollback): held whole.

Each row is the bytes received by the edge, counted on the wire. Lossless spec, so the
held parts are compared exactly.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence

import torch

from coordinator.dataplane import CoordinatorDataPlane, InstructionTemplate
from coordinator.version_store import VersionStore
from edge.dataplane import Fetched, GrpcConnector
from fedsqueeze.tasks import get_task


def _versions() -> list[dict[str, torch.Tensor]]:
    model = get_task("digits-cnn").build_model(0)
    v1 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    v2 = {
        k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in v1.items()
    }
    largest = max(v1, key=lambda k: v1[k].numel())
    v3 = {
        k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in v2.items()
    }
    v3[largest] = v1[largest]
    return [v1, v2, v3, v1]


def run(held_versions: int, versions: list[dict[str, torch.Tensor]]) -> list[int]:
    """Bytes down per fetch of ``versions`` in turn, each from the one before."""
    with tempfile.TemporaryDirectory(prefix="fedsqueeze-parts-") as root:
        store = VersionStore(root)
        plane = CoordinatorDataPlane(store)
        try:
            connector = GrpcConnector(held_versions=held_versions)
            template = InstructionTemplate(down_spec="lossless", up_spec="lossless")
            held: Fetched | None = None
            out = []
            for server_round, state in enumerate(versions, start=1):
                target = store.publish(state)
                instruction = plane.instruction(template, server_round, 7, target)
                held = connector.fetch(
                    instruction,
                    "7",
                    held.digest if held is not None else None,
                    held.state if held is not None else None,
                )
                out.append(held.bytes_down)
            return out
        finally:
            plane.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table (markdown)."""
    del argv
    versions = _versions()
    without, with_parts = run(0, versions), run(3, versions)
    names = ["v1 (first)", "v2 (all moved)", "v3 (largest layer = v1's)", "v1 again"]
    sys.stdout.write("| fetch | without parts (B) | with parts (B) |\n|---|---:|---:|\n")
    for name, a, b in zip(names, without, with_parts, strict=True):
        sys.stdout.write(f"| {name} | {a:,} | {b:,} |\n")
    sys.stdout.write(f"| total | {sum(without):,} | {sum(with_parts):,} |\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
