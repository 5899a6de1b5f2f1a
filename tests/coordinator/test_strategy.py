"""The strategy wrapper against plain Flower strategies on the same updates."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi

from coordinator.strategy import CompressedStrategy, PulledUpdate
from coordinator.version_store import VersionStore
from fedsqueeze.codec import CodecSpec, NonFinite, QuantSpec, encode_state
from fedsqueeze.control import CONTROL_KEY, RECEIPT_KEY, RoundInstruction, TrainReceipt


class FakeGrid:
    """Just enough of a Flower Grid for sampling."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> Iterable[int]:
        return self.nodes


def _global() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 5, generator=g), "b": torch.randn(5, generator=g)}


def _edge_model(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in _global().items()}


def _instruction(rnd: int, node: int, target: str) -> RoundInstruction:
    return RoundInstruction(rnd, "127.0.0.1:1", target, "lossless", "lossless", "digits-cnn", 0, "")


def _replies(messages: list[Message], receipts: dict[int, TrainReceipt]) -> list[Message]:
    out = []
    for msg in messages:
        ids, metrics = receipts[msg.metadata.dst_node_id].to_records()
        out.append(Message(RecordDict({RECEIPT_KEY: ids, "metrics": metrics}), reply_to=msg))
    return out


def _plain_replies(
    messages: list[Message], models: dict[int, dict[str, torch.Tensor]]
) -> list[Message]:
    out = []
    for msg in messages:
        node = msg.metadata.dst_node_id
        content = RecordDict(
            {
                "arrays": ArrayRecord(models[node]),
                "metrics": MetricRecord({"num-examples": 10 * node}),
            }
        )
        out.append(Message(content, reply_to=msg))
    return out


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedAvg(),
        lambda: FedProx(proximal_mu=0.1),
        lambda: FedAdam(),
        lambda: FedYogi(),
        lambda: FedMedian(),
        lambda: FedTrimmedAvg(beta=0.2),
    ],
)
@pytest.mark.usefixtures("flower_identity")
def test_lossless_aggregate_equals_plain_flower(tmp_path: Path, make) -> None:  # type: ignore[no-untyped-def]
    nodes = [1, 2, 3, 4, 5]
    store = VersionStore(tmp_path)
    pushed: dict[str, PulledUpdate] = {}
    wrapper = CompressedStrategy(make(), store, _instruction, pushed.get)
    plain = make()
    g = _global()
    grid = FakeGrid(nodes)
    import random

    random.seed(0)
    sent = list(wrapper.configure_train(1, ArrayRecord(g), ConfigRecord(), grid))  # type: ignore[arg-type]
    assert all(not m.content.array_records for m in sent), "model bytes must not travel in Flower"
    assert all(CONTROL_KEY in m.content.config_records for m in sent)
    target = RoundInstruction.from_record(sent[0].content.config_records[CONTROL_KEY]).target
    models = {n: _edge_model(n) for n in nodes}
    receipts = {}
    for n in nodes:
        uid = f"u{n}"
        pushed[uid] = PulledUpdate(encode_state(models[n], CodecSpec(), g), target, str(n))
        receipts[n] = TrainReceipt(uid, target, 10 * n, 0.1, 100, 50, 0.0, 0.0, 0.0)
    arrays, _ = wrapper.aggregate_train(1, _replies(sent, receipts))
    random.seed(0)
    plain_sent = list(plain.configure_train(1, ArrayRecord(g), ConfigRecord(), grid))
    expected, _ = plain.aggregate_train(1, _plain_replies(plain_sent, models))
    assert arrays is not None and expected is not None
    got, want = arrays.to_torch_state_dict(), expected.to_torch_state_dict()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert wrapper.stats[1].bytes_down == 500 and wrapper.stats[1].bytes_up == 250


@pytest.mark.usefixtures("flower_identity")
def test_bad_and_missing_updates_are_dropped_and_the_round_continues(tmp_path: Path) -> None:
    nodes = [1, 2, 3]
    store = VersionStore(tmp_path)
    pushed: dict[str, PulledUpdate] = {}
    wrapper = CompressedStrategy(FedAvg(), store, _instruction, pushed.get, clip_norm=0.5)
    g = _global()
    sent = list(wrapper.configure_train(1, ArrayRecord(g), ConfigRecord(), FakeGrid(nodes)))  # type: ignore[arg-type]
    target = RoundInstruction.from_record(sent[0].content.config_records[CONTROL_KEY]).target
    nan_model = {k: v.clone() for k, v in g.items()}
    nan_model["w"][0, 0] = float("nan")
    far = {k: v + 10.0 for k, v in g.items()}
    # an edge that carries NaN on purpose (the default refuses to encode it)
    nan_update = encode_state(nan_model, CodecSpec(), g, nonfinite=NonFinite.CARRY)
    pushed["nan"] = PulledUpdate(nan_update, target, "2")
    pushed["far"] = PulledUpdate(encode_state(far, CodecSpec(quant=QuantSpec(8)), g), target, "3")
    receipts = {
        1: TrainReceipt("never-arrived", target, 5, 0.1, 1, 1, 0, 0, 0),
        2: TrainReceipt("nan", target, 5, 0.1, 1, 1, 0, 0, 0),
        3: TrainReceipt("far", target, 5, 0.1, 1, 1, 0, 0, 0),
    }
    arrays, _ = wrapper.aggregate_train(1, _replies(sent, receipts))
    stats = wrapper.stats[1]
    assert stats.accepted == 1
    assert {r.edge for r in stats.rejected or []} == {"1", "2"}
    assert arrays is not None
    out = arrays.to_torch_state_dict()
    delta = torch.cat([(out[k] - g[k]).flatten() for k in g])
    assert delta.norm() <= 0.5 + 1e-4  # clipped


def _error_reply(msg: Message, reason: str) -> Message:
    return Message(Error(code=2, reason=reason), reply_to=msg)


@pytest.mark.usefixtures("flower_identity")
def test_a_round_that_aggregates_nothing_is_logged_as_failed_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    nodes = [1, 2, 3, 4]
    pushed: dict[str, PulledUpdate] = {}
    wrapper = CompressedStrategy(
        FedAvg(), VersionStore(tmp_path), _instruction, pushed.get, round_offset=5
    )
    g = _global()
    sent = list(wrapper.configure_train(1, ArrayRecord(g), ConfigRecord(), FakeGrid(nodes)))  # type: ignore[arg-type]
    target = RoundInstruction.from_record(sent[0].content.config_records[CONTROL_KEY]).target
    by_node = {m.metadata.dst_node_id: m for m in sent}
    replies = [
        _error_reply(by_node[1], "<class 'UnavailableError'>:<'data plane unreachable'>"),
        _error_reply(by_node[2], "<class 'RuntimeError'>:<'out of memory'>"),
        *_replies([by_node[3]], {3: TrainReceipt("lost", target, 5, 0.1, 1, 1, 0, 0, 0)}),
    ]  # node 4 never replies
    with caplog.at_level(logging.INFO, logger="coordinator.strategy"):
        arrays, metrics = wrapper.aggregate_train(1, replies)
    assert arrays is None and metrics is None
    stats = wrapper.stats[1]
    assert stats.accepted == 0 and not stats.aggregated
    assert [edge for edge, _ in stats.failed] == ["1", "2"]
    assert [r.edge for r in stats.rejected] == ["3"]
    assert stats.dropped == ["4"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    line = errors[0].getMessage()
    assert line.startswith("round 6 FAILED, it aggregated nothing")  # 1 + offset 5
    assert "2 edges failed (edge 1: <class 'UnavailableError'>:<'data plane unreachable'>" in line
    assert "1 update rejected (edge 3: update lost never arrived)" in line
    assert "1 edge dropped (no reply in time)" in line


@pytest.mark.usefixtures("flower_identity")
def test_a_round_with_an_accepted_update_counts_the_rest_and_is_not_failed(
    tmp_path: Path,
) -> None:
    nodes = [1, 2]
    pushed: dict[str, PulledUpdate] = {}
    wrapper = CompressedStrategy(FedAvg(), VersionStore(tmp_path), _instruction, pushed.get)
    g = _global()
    sent = list(wrapper.configure_train(1, ArrayRecord(g), ConfigRecord(), FakeGrid(nodes)))  # type: ignore[arg-type]
    target = RoundInstruction.from_record(sent[0].content.config_records[CONTROL_KEY]).target
    pushed["u"] = PulledUpdate(encode_state(_edge_model(1), CodecSpec(), g), target, "1")
    by_node = {m.metadata.dst_node_id: m for m in sent}
    replies = [
        *_replies([by_node[1]], {1: TrainReceipt("u", target, 5, 0.1, 1, 1, 0, 0, 0)}),
        _error_reply(by_node[2], "fetch failed"),
    ]
    arrays, _ = wrapper.aggregate_train(1, replies)
    stats = wrapper.stats[1]
    assert arrays is not None and stats.aggregated
    assert (stats.accepted, len(stats.failed), stats.dropped) == (1, 1, [])
