"""Framing: the data-plane bytes of one edge's round that are not payload.

An edge in a bandwidth-budget round fetches the global model as a sparse delta and pushes
its update, both small (a few kB), so the messages around the payload (requests, the
manifest, the upload's metadata, the receipt, gRPC's 5-byte prefixes) are a large share of
its bytes. :func:`measure_framing` runs that round once on loopback, the way the edge does
it (the model asked for by digest, the base held, an update id of node id, round and
content hash), and counts the bytes on the wire
(:mod:`fedsqueeze.transport.accounting`) besides the payloads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedsqueeze.codec import encode_state, preset
from fedsqueeze.tasks import get_task
from fedsqueeze.transport import (
    InMemoryModelSource,
    TokenTable,
    TransferClient,
    TransferServer,
    UpdateStore,
)

__all__ = ["FRAMING_SPEC", "Framing", "measure_framing"]

#: The codec spec of both directions: a sparse delta, as in the bandwidth-budget runs.
FRAMING_SPEC = "prune95-kmeans3"
#: A Flower node id (a 64-bit integer), the edge id an edge has in a deployment.
_EDGE = "1234567890123456789"


@dataclass(frozen=True)
class Framing:
    """Bytes of one fetch and one push, counted on the wire.

    Attributes
    ----------
    spec
        The codec spec's preset name.
    fetch_payload_bytes, push_payload_bytes
        Encoded model and encoded update, in bytes.
    fetch_framing_down, fetch_framing_up, push_framing_up, push_framing_down
        Bytes besides the payload, per operation and direction.
    fetch_calls
        RPCs (round trips) of the fetch.
    """

    spec: str
    fetch_payload_bytes: int
    fetch_framing_down: int
    fetch_framing_up: int
    fetch_calls: int
    push_payload_bytes: int
    push_framing_up: int
    push_framing_down: int

    @property
    def fetch_framing_bytes(self) -> int:
        """Framing of the fetch, both directions."""
        return self.fetch_framing_down + self.fetch_framing_up

    @property
    def push_framing_bytes(self) -> int:
        """Framing of the push, both directions."""
        return self.push_framing_up + self.push_framing_down


def _nudged(
    state: Mapping[str, torch.Tensor], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """``state`` plus small noise on its floating tensors (a round's worth of training)."""
    return {
        k: v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in state.items()
    }


def measure_framing(spec_name: str = FRAMING_SPEC, task: str = "digits-cnn") -> Framing:
    """Fetch ``task``'s model as a delta and push an update, on loopback; count the bytes.

    Parameters
    ----------
    spec_name
        The codec preset of the fetch and of the update.
    task
        The built-in task whose model is sent.
    """
    spec = preset(spec_name)
    model = get_task(task).build_model(0)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    target = _nudged(base, g)
    source = InMemoryModelSource()
    source.publish(base)
    digest = source.publish(target)
    tokens, handed_out = TokenTable.generate([_EDGE])
    update = encode_state(_nudged(target, g), spec, target, base_digest=bytes.fromhex(digest))
    with (
        TransferServer(source, UpdateStore(), tokens, plaintext=True) as server,
        TransferClient(
            server.address, edge_id=_EDGE, token=handed_out[_EDGE], plaintext=True
        ) as client,
    ):
        fetched = client.fetch(digest, spec=spec, base=base)
        pushed = client.push_update(
            update, update_id=f"{_EDGE}-3-0123abcd", base_digest=bytes.fromhex(digest)
        )
    down, up = fetched.stats.wire, pushed.stats.wire
    return Framing(
        spec=spec_name,
        fetch_payload_bytes=fetched.manifest.encoded_bytes,
        fetch_framing_down=down.received - fetched.manifest.encoded_bytes,
        fetch_framing_up=down.sent,
        fetch_calls=fetched.stats.calls,
        push_payload_bytes=pushed.receipt.stored_bytes,
        push_framing_up=up.sent - pushed.receipt.stored_bytes,
        push_framing_down=up.received,
    )
