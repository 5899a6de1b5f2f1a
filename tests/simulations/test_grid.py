"""SimGrid: discovery, seeded sampling, byte counting, sorted replies, deadlines, no hangs."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedsqueeze.control import RECEIPT_KEY, TrainReceipt
from fedsqueeze.transport.shaping import LinkProfile
from simulations.grid import (
    ARM_KEY,
    PARTITION_KEY,
    RoundTraffic,
    SimGrid,
    SimulationError,
    message_wire_bytes,
    sample_partitions,
)

FAST = LinkProfile.from_mbit(100.0, 100.0, 1)
SLOW = LinkProfile.from_mbit(0.1, 0.1, 100)

Handler = Callable[[Message, int], Message | None]


class FakeInner:
    """A Grid whose nodes answer at once through ``handler(message, partition)``."""

    def __init__(
        self, partitions: list[int], handler: Handler, *, registered: bool = False
    ) -> None:
        self.node_of = {p: 1000 + 7 * p for p in partitions}
        self.partition = {n: p for p, n in self.node_of.items()}
        self.handler = handler
        self.pending: dict[str, Message] = {}
        self.seen: list[Message] = []
        if registered:
            # As Flower's in-memory link state: nodes listed in registration order.
            infos = [SimpleNamespace(node_id=self.node_of[p]) for p in sorted(partitions)]
            self.state = SimpleNamespace(get_node_info=lambda: infos)

    def get_node_ids(self) -> Iterable[int]:
        return set(self.node_of.values())

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.seen.append(m)
            if m.metadata.message_type == MessageType.QUERY:
                reply: Message | None = Message(
                    RecordDict(
                        {
                            "metrics": MetricRecord(
                                {"partition-id": self.partition[m.metadata.dst_node_id]}
                            )
                        }
                    ),
                    reply_to=m,
                )
            else:
                reply = self.handler(m, self.partition[m.metadata.dst_node_id])
                if reply is not None and not reply.has_error():
                    # What the simulated client adds: its partition id, not counted.
                    pid = self.partition[m.metadata.dst_node_id]
                    reply.content[ARM_KEY] = ConfigRecord({PARTITION_KEY: pid})
            if reply is not None:
                reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
                self.pending[m.metadata.message_id] = reply
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = [self.pending.pop(i) for i in list(message_ids) if i in self.pending]
        return list(reversed(out))  # arrival order is not partition order


def _plain_reply(message: Message, pid: int) -> Message:
    arrays = message.content.array_records["arrays"]
    return Message(
        RecordDict(
            {
                "arrays": arrays,
                "metrics": MetricRecord({"num-examples": 10, "compute-seconds": 0.25}),
            }
        ),
        reply_to=message,
    )


def _grid(inner: FakeInner, n: int, k: int, **kw: object) -> SimGrid:
    links = tuple(SLOW if p == 0 else FAST for p in range(n))
    defaults: dict[str, object] = {"deadline_s": None, "round_timeout_s": 5.0}
    defaults.update(kw)
    return SimGrid(
        inner,  # type: ignore[arg-type]
        num_clients=n,
        clients_per_round=k,
        seed=7,
        links=links,
        abort=threading.Event(),
        **defaults,  # type: ignore[arg-type]
    )


def _train_messages(grid: SimGrid, state: dict[str, torch.Tensor]) -> list[Message]:
    return [
        Message(
            RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"lr": 0.1})}),
            node,
            MessageType.TRAIN,
        )
        for node in grid.get_node_ids()
    ]


def test_sampling_is_by_partition_and_seeded(flower_identity: None) -> None:
    assert sample_partitions(7, 3, 20, 5) == sample_partitions(7, 3, 20, 5)
    assert sample_partitions(7, 3, 20, 5) != sample_partitions(7, 4, 20, 5)
    assert len(set(sample_partitions(0, 1, 1000, 10))) == 10
    inner = FakeInner(list(range(8)), _plain_reply)
    grid = _grid(inner, 8, 3)
    nodes = list(grid.get_node_ids())
    assert [grid.partition_of[n] for n in nodes] == list(sample_partitions(7, 1, 8, 3))


def test_bytes_are_counted_both_ways_and_replies_come_sorted(flower_identity: None) -> None:
    state = {"w": torch.randn(256, 256), "b": torch.randn(256)}
    raw = sum(t.numel() * 4 for t in state.values())
    inner = FakeInner(list(range(6)), _plain_reply)
    grid = _grid(inner, 6, 4)
    rounds: list[RoundTraffic] = []
    grid.begin_arm("plain", on_round=rounds.append)
    messages = _train_messages(grid, state)
    replies = list(grid.send_and_receive(messages))
    pids = [grid.partition_of[r.metadata.src_node_id] for r in replies]
    assert pids == sorted(pids) and len(pids) == 4
    (traffic,) = rounds
    assert traffic.data_down == traffic.data_up == 0
    for total in (traffic.bytes_down, traffic.bytes_up):
        assert 4 * raw < total < 4 * raw * 1.01
    # the simulation's tag reached the client but was not counted
    assert all(ARM_KEY in m.content.config_records for m in inner.seen[-4:])


def test_fedsqueeze_receipts_add_data_plane_bytes(flower_identity: None) -> None:
    def reply(message: Message, pid: int) -> Message:
        receipt = TrainReceipt("u", "ab" * 32, 10, 0.5, 1000 + pid, 500, 0.125, 0.0, 0.0)
        ids, metrics = receipt.to_records(MetricRecord({"num-examples": 10}))
        return Message(RecordDict({RECEIPT_KEY: ids, "metrics": metrics}), reply_to=message)

    inner = FakeInner(list(range(4)), reply)
    grid = _grid(inner, 4, 4)
    rounds: list[RoundTraffic] = []
    grid.begin_arm("squeezed", on_round=rounds.append)
    grid.send_and_receive(_train_messages(grid, {"w": torch.zeros(3)}))
    (traffic,) = rounds
    assert traffic.data_down == 4 * 1000 + 0 + 1 + 2 + 3 and traffic.data_up == 4 * 500
    assert traffic.per_client[2].data_down == 1002


def test_deadline_drops_the_straggler_before_the_strategy_sees_it(flower_identity: None) -> None:
    inner = FakeInner(list(range(4)), _plain_reply)
    grid = _grid(inner, 4, 4, deadline_s=2.0)
    dropped: list[Message] = []
    rounds: list[RoundTraffic] = []
    grid.begin_arm("plain", on_round=rounds.append, on_dropped=dropped.append)
    state = {"w": torch.randn(100, 100)}  # 40 kB: 3.2 s each way on the slow link
    replies = list(grid.send_and_receive(_train_messages(grid, state)))
    assert [grid.partition_of[r.metadata.src_node_id] for r in replies] == [1, 2, 3]
    assert [grid.partition_of[m.metadata.src_node_id] for m in dropped] == [0]
    assert rounds[0].dropped == (0,) and rounds[0].time.seconds == 2.0


def test_silence_is_an_error_not_a_hang(flower_identity: None) -> None:
    inner = FakeInner(list(range(3)), lambda m, pid: None if pid == 1 else _plain_reply(m, pid))
    grid = _grid(inner, 3, 3, round_timeout_s=0.3)
    grid.begin_arm("plain")
    with pytest.raises(SimulationError, match="never replied"):
        grid.send_and_receive(_train_messages(grid, {"w": torch.zeros(3)}))


def test_abort_stops_the_wait(flower_identity: None) -> None:
    inner = FakeInner(list(range(3)), lambda m, pid: None)
    grid = _grid(inner, 3, 3, round_timeout_s=60.0)
    grid.begin_arm("plain")
    grid.abort.set()
    with pytest.raises(SimulationError, match="stopped"):
        grid.send_and_receive(_train_messages(grid, {"w": torch.zeros(3)}))


def test_missing_clients_are_an_error(flower_identity: None) -> None:
    inner = FakeInner(list(range(3)), _plain_reply)
    grid = _grid(inner, 5, 2, round_timeout_s=0.2)
    with pytest.raises(SimulationError, match="registered"):
        grid.discover()


def test_partitions_come_from_flower_registration_order_without_a_message(
    flower_identity: None,
) -> None:
    inner = FakeInner(list(range(1000)), _plain_reply, registered=True)
    grid = _grid(inner, 1000, 3)
    grid.discover()
    assert inner.seen == []  # no query to anyone
    assert all(grid.partition_of[inner.node_of[p]] == p for p in range(1000))


def test_a_client_that_is_not_sampled_gets_nothing(flower_identity: None) -> None:
    inner = FakeInner(list(range(1000)), _plain_reply, registered=True)
    grid = _grid(inner, 1000, 3)
    grid.begin_arm("plain")
    for server_round in range(1, 6):
        before = len(inner.seen)
        grid.send_and_receive(_train_messages(grid, {"w": torch.zeros(3)}))
        sent = inner.seen[before:]
        assert all(m.metadata.message_type == MessageType.TRAIN for m in sent)
        to = sorted(inner.partition[m.metadata.dst_node_id] for m in sent)
        assert to == list(sample_partitions(7, server_round, 1000, 3))
    contacted = {inner.partition[m.metadata.dst_node_id] for m in inner.seen}
    assert len(contacted) <= 15  # of 1,000 clients, only the sampled ones heard anything


def test_the_partition_tag_of_a_reply_is_not_counted(flower_identity: None) -> None:
    inner = FakeInner(list(range(4)), _plain_reply, registered=True)
    grid = _grid(inner, 4, 2)
    rounds: list[RoundTraffic] = []
    grid.begin_arm("plain", on_round=rounds.append)
    replies = list(grid.send_and_receive(_train_messages(grid, {"w": torch.randn(50)})))
    assert all(ARM_KEY not in r.content.config_records for r in replies)
    (traffic,) = rounds
    assert traffic.control_up == sum(message_wire_bytes(r) for r in replies)


def test_a_reply_from_the_wrong_partition_is_an_error(flower_identity: None) -> None:
    inner = FakeInner(list(range(4)), _plain_reply, registered=True)
    inner.state = SimpleNamespace(  # registration order no longer partition order
        get_node_info=lambda: [SimpleNamespace(node_id=inner.node_of[p]) for p in (1, 0, 2, 3)]
    )
    grid = _grid(inner, 4, 4)
    grid.begin_arm("plain")
    with pytest.raises(SimulationError, match="registration order"):
        grid.send_and_receive(_train_messages(grid, {"w": torch.zeros(3)}))


def test_the_simulated_client_tags_its_reply_with_its_partition(flower_identity: None) -> None:
    from flwr.app import Context

    from fedsqueeze.tasks import get_task
    from simulations.client import make_sim_client_app
    from simulations.config import SimulationConfig

    config = SimulationConfig(epochs=1)
    app = make_sim_client_app(config.run_settings(config.arms[0], ""))
    model = get_task(config.task).build_model(0).state_dict()
    msg = Message(
        RecordDict(
            {
                "arrays": ArrayRecord(model),
                "config": ConfigRecord({"server-round": 1}),
                ARM_KEY: ConfigRecord({"arm": "fedavg-fp32"}),
            }
        ),
        42,
        MessageType.TRAIN,
    )
    context = Context(
        run_id=1,
        node_id=42,
        node_config={"partition-id": 3, "num-partitions": 20},
        state=RecordDict(),
        run_config={},
    )
    reply = app(msg, context)
    assert reply.content.config_records[ARM_KEY] == ConfigRecord({PARTITION_KEY: 3})
