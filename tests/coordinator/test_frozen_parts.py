"""Frozen parts in the strategy wrapper: the wrapped strategy sees trainable arrays only."""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from coordinator.dropin import compressed
from coordinator.frozen import FrozenParts
from coordinator.strategy import CompressedStrategy, PulledUpdate
from coordinator.version_store import VersionStore
from fedsqueeze.codec import CodecSpec, encode_state
from fedsqueeze.control import CONTROL_KEY, RECEIPT_KEY, RoundInstruction, TrainReceipt
from fedsqueeze.errors import ConfigError
from fedsqueeze.runconfig import RunSettings

FROZEN = ("frozen.*",)


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> Iterable[int]:
        return self.nodes


class SpyFedAvg(FedAvg):
    """FedAvg that records the array names it is shown."""

    def __init__(self) -> None:
        super().__init__()
        self.configured: list[set[str]] = []
        self.aggregated: list[set[str]] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.configured.append(set(arrays))
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            self.aggregated.append(set(reply.content.array_records["arrays"]))
        return super().aggregate_train(server_round, replies)


def _global() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "frozen.embed.weight": torch.randn(16, 8, generator=g),
        "frozen.norm.weight": torch.randn(8, generator=g),
        "trainable.head.weight": torch.randn(3, 8, generator=g),
        "trainable.head.bias": torch.randn(3, generator=g),
    }


def _edge_model(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    out = {}
    for k, v in _global().items():
        # the app changed its frozen tensors too: the update leaves them out regardless
        out[k] = v + 0.1 * torch.randn(v.shape, generator=g)
    return out


def _instruction(rnd: int, node: int, target: str) -> RoundInstruction:
    spec = "lossless,freeze=frozen.*"
    return RoundInstruction(rnd, "127.0.0.1:1", target, spec, spec, "digits-cnn", 0, "")


def _round(
    strategy: CompressedStrategy, pushed: dict[str, PulledUpdate], nodes: list[int]
) -> dict[str, torch.Tensor]:
    g = _global()
    random.seed(0)
    sent = list(strategy.configure_train(1, ArrayRecord(g), ConfigRecord(), FakeGrid(nodes)))  # type: ignore[arg-type]
    target = RoundInstruction.from_record(sent[0].content.config_records[CONTROL_KEY]).target
    spec = CodecSpec(freeze=FROZEN)
    replies = []
    for msg in sent:
        n = msg.metadata.dst_node_id
        encoded = encode_state(_edge_model(n), spec, g)
        assert not any(r.zero for r in encoded.records)  # frozen ones are simply absent
        pushed[f"u{n}"] = PulledUpdate(encoded, target, str(n))
        receipt = TrainReceipt(f"u{n}", target, 10 * n, 0.1, 100, 50, 0.0, 0.0, 0.0)
        ids, metrics = receipt.to_records()
        replies.append(Message(RecordDict({RECEIPT_KEY: ids, "metrics": metrics}), reply_to=msg))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return arrays.to_torch_state_dict()


@pytest.mark.usefixtures("flower_identity")
def test_wrapped_strategy_sees_only_trainable_arrays(tmp_path: Path) -> None:
    spy = SpyFedAvg()
    pushed: dict[str, PulledUpdate] = {}
    store = VersionStore(tmp_path)
    wrapper = CompressedStrategy(spy, store, _instruction, pushed.get, frozen=FROZEN)
    got = _round(wrapper, pushed, [1, 2, 3])
    trainable = {"trainable.head.weight", "trainable.head.bias"}
    assert spy.configured == [trainable]
    assert spy.aggregated == [trainable] * 3
    assert set(got) == set(_global())


@pytest.mark.usefixtures("flower_identity")
def test_lossless_frozen_run_aggregates_bit_for_bit_like_fedavg_on_trainable_parts(
    tmp_path: Path,
) -> None:
    nodes = [1, 2, 3, 4]
    pushed: dict[str, PulledUpdate] = {}
    store = VersionStore(tmp_path)
    wrapper = CompressedStrategy(FedAvg(), store, _instruction, pushed.get, frozen=FROZEN)
    got = _round(wrapper, pushed, nodes)
    # plain FedAvg, shown the trainable arrays of the same models
    plain = FedAvg()
    g = _global()
    trainable = FrozenParts(FROZEN).trainable(g)
    random.seed(0)
    sent = list(plain.configure_train(1, ArrayRecord(trainable), ConfigRecord(), FakeGrid(nodes)))  # type: ignore[arg-type]
    replies = []
    for msg in sent:
        n = msg.metadata.dst_node_id
        arrays = ArrayRecord(FrozenParts(FROZEN).trainable(_edge_model(n)))
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10 * n})})
        replies.append(Message(content, reply_to=msg))
    expected, _ = plain.aggregate_train(1, replies)
    assert expected is not None
    for name, want in expected.to_torch_state_dict().items():
        assert torch.equal(got[name], want), name
    for name in ("frozen.embed.weight", "frozen.norm.weight"):
        assert torch.equal(got[name], g[name]), "frozen tensors come from the global, exactly"
    assert list(got) == list(g)


def test_frozen_parts_merge_and_check() -> None:
    parts = FrozenParts(FROZEN)
    g = _global()
    assert parts.merge(parts.trainable(g), g) == g
    with pytest.raises(ValueError, match=r"trainable\.head\.bias"):
        parts.merge({"trainable.head.weight": g["trainable.head.weight"]}, g)
    with pytest.raises(ConfigError, match="matches no tensor") as err:
        FrozenParts(("frozn.*",)).check(g, "task 'x'")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="nothing would train"):
        FrozenParts(("frozen.*", "trainable.*")).check(g, "task 'x'")


def test_run_settings_resolve_and_refuse_freeze() -> None:
    assert RunSettings().frozen(("frozen.*",)) == ("frozen.*",)  # auto: the task's
    assert RunSettings(freeze="none").frozen(("frozen.*",)) == ()
    both = RunSettings(freeze="a.*", up_spec="topk10-int4,freeze=b.*")
    assert both.frozen(("frozen.*",)) == ("a.*", "b.*")
    with pytest.raises(ConfigError, match="freeze") as err:
        RunSettings.from_run_config({"freeze": "enc.[0-3"})
    assert "\n" not in str(err.value)


def test_minilm_text_names_its_frozen_tensors() -> None:
    from fedsqueeze.tasks import get_task

    assert get_task("minilm-text").frozen == ("frozen.*",)
    assert get_task("digits-cnn").frozen == ()


def test_dropin_refuses_a_bad_pattern_before_starting() -> None:
    with (
        pytest.raises(ConfigError, match="unbalanced") as err,
        compressed(FedAvg(), freeze="enc.[0-3"),
    ):
        pass
    assert "\n" not in str(err.value)
