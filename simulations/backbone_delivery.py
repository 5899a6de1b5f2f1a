"""What a frozen backbone's one delivery costs: bytes under a codec spec, and accuracy.

For a sweep arm whose backbone the edges held (no bytes), this answers the other case: each
edge is sent the initial model once, frozen tensors included, under a spec (fp32, int8 per
channel, 4-bit blocks), and keeps the decoded backbone for good. The accuracy it costs is
that of the arm's final global model with its frozen tensors replaced by their decoded
copies, against the same model with the exact ones (the edges trained on the exact
backbone here; an arm that really trains on a decoded one is ``first-delivery``)::

    python -m simulations.backbone_delivery simulations/outputs/text adaptive
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from coordinator.frozen import FrozenParts
from coordinator.version_store import VersionStore
from fedsqueeze.codec import decode_state, encode_state
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.errors import ConfigError
from fedsqueeze.tasks import get_task

__all__ = ["DELIVERY_SPECS", "DeliveryCost", "delivery_costs"]

DELIVERY_SPECS: tuple[str, ...] = (
    "lossless",
    "quant=8:channel",
    "quant=4:block64",
    "quant=4:nf4:block64",
)
"""fp32 (zstd only), int8 per channel, 4-bit affine and NF4 blocks of 64 (matrices;
biases and norms stay fp32 under every spec)."""


@dataclass(frozen=True)
class DeliveryCost:
    """One spec's first delivery.

    Attributes
    ----------
    spec
        The codec spec (text).
    nbytes
        Encoded bytes of the whole initial model (backbone, adapters, head) per edge.
    accuracy
        Test accuracy of the final model with the decoded backbone.
    """

    spec: str
    nbytes: int
    accuracy: float


def delivery_costs(
    task_name: str,
    seed: int,
    final: Mapping[str, torch.Tensor],
    frozen: Sequence[str],
    specs: Sequence[str] = DELIVERY_SPECS,
) -> list[DeliveryCost]:
    """Bytes and accuracy of each spec's first delivery for a final model ``final``."""
    task = get_task(task_name)
    data = task.load_data()
    initial = task.build_model(seed).state_dict()
    parts = FrozenParts(tuple(frozen))
    out = []
    for text in specs:
        encoded = encode_state(initial, parse_spec(text))
        decoded = decode_state(encoded)
        state = {n: decoded[n] if parts.is_frozen(n) else t for n, t in final.items()}
        model = task.build_model(seed)
        model.load_state_dict(state)
        result = task.evaluate(model, data.x_test, data.y_test)
        out.append(DeliveryCost(text, len(encoded.to_bytes()), result.accuracy))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Print a Markdown table for one fedsqueeze arm of a finished sweep."""
    parser = argparse.ArgumentParser(prog="python -m simulations.backbone_delivery")
    parser.add_argument("out", type=Path, help="the sweep's output folder")
    parser.add_argument("arm", help="a fedsqueeze arm of it (its state/ holds the final model)")
    args = parser.parse_args(argv)
    import json

    run = json.loads((args.out / "run.json").read_text())["config"]
    arm = next((a for a in run["arms"] if a["name"] == args.arm), None)
    if arm is None:
        print(f"no arm {args.arm!r} in {args.out}", file=sys.stderr)
        return 2
    task_name = arm["task"] or run["task"]
    store = VersionStore(args.out / "state" / args.arm)
    head = store.head("global")
    final = store.get(head) if head else None
    if final is None:
        raise ConfigError(f"no final global model in {args.out / 'state' / args.arm}")
    frozen = get_task(task_name).frozen
    print("| first delivery | bytes per edge | × fewer than fp32 | final accuracy |")
    print("|---|---:|---:|---:|")
    costs = delivery_costs(task_name, int(run["seed"]), final, frozen)
    for cost in costs:
        ratio = costs[0].nbytes / cost.nbytes
        print(f"| `{cost.spec}` | {cost.nbytes:,} | {ratio:.2f}× | {cost.accuracy:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
