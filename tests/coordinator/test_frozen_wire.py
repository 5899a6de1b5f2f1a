"""Frozen tensors on the wire: sent in the first full download and never again.

A real data plane (the drop-in's), the real edge mod with its gRPC connector, and the
strategy wrapper, for two rounds of two edges; bytes are the receipts' wire counts.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from coordinator.dropin import compressed
from edge.dataplane import GrpcConnector
from edge.mod import make_mod
from fedsqueeze.control import RECEIPT_KEY, TrainReceipt

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("flower_identity")]

#: 256 KiB of random float32: what a frozen backbone costs whenever it travels.
FROZEN_BYTES = 256 * 256 * 4


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> Iterable[int]:
        return self.nodes


def _initial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "frozen.encoder.weight": torch.randn(256, 256, generator=g),
        "trainable.head.weight": torch.randn(4, 256, generator=g),
        "trainable.head.bias": torch.zeros(4),
    }


def _train(msg: Message, context: Context) -> Message:
    state = msg.content.array_records["arrays"].to_torch_state_dict()
    # Everything moves, the frozen encoder too: what is frozen is not sent regardless.
    trained = {k: v + 0.01 * (1 + context.node_id) for k, v in state.items()}
    metrics = MetricRecord({"num-examples": 10, "train-loss": 0.5})
    return Message(RecordDict({"arrays": ArrayRecord(trained), "metrics": metrics}), reply_to=msg)


def test_frozen_tensors_never_travel_after_the_first_fetch(tmp_path: Path) -> None:
    nodes = [1, 2]
    mod = make_mod(connector=GrpcConnector(), initial_model=None)
    contexts = {
        n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
        for n in nodes
    }
    initial = _initial()
    model = ArrayRecord(initial)
    receipts: list[list[TrainReceipt]] = []
    with compressed(
        FedAvg(), down_spec="lossless", up_spec="lossless", freeze="frozen.*", state_dir=tmp_path
    ) as strategy:
        for rnd in (1, 2):
            random.seed(rnd)
            sent = strategy.configure_train(rnd, model, ConfigRecord(), FakeGrid(nodes))  # type: ignore[arg-type]
            replies = [mod(m, contexts[m.metadata.dst_node_id], _train) for m in sent]
            receipts.append(
                [TrainReceipt.from_records(r.content.config_records[RECEIPT_KEY]) for r in replies]
            )
            aggregated, _ = strategy.aggregate_train(rnd, replies)
            assert aggregated is not None
            model = aggregated
            state = model.to_torch_state_dict()
            assert torch.equal(state["frozen.encoder.weight"], initial["frozen.encoder.weight"])
            assert not torch.equal(state["trainable.head.weight"], initial["trainable.head.weight"])
    first, second = receipts
    # Round 1: no model held, so the first full download carries the frozen encoder
    # (zstd takes about 6% off random float32) ...
    # the frozen tensors travel in the first fetch (random floats: lossless coding keeps
    # most of their bytes), and never after it
    assert all(r.bytes_down > FROZEN_BYTES * 0.6 for r in first)
    # ... and from then on nothing of it travels, down or up (4 KiB of head + framing).
    assert all(r.bytes_up < FROZEN_BYTES // 16 for r in first + second)
    assert all(r.bytes_down < FROZEN_BYTES // 16 for r in second)
