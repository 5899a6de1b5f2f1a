"""The simulation's view of Flower's Grid: seeded sampling, byte counting, the clock.

:class:`SimGrid` wraps the Grid Flower's simulation engine hands the ServerApp and sits
between every strategy of a sweep and the virtual clients:

* **Who is who.** Simulated node ids are random per run. Flower's simulation engine
  registers node ``i`` for partition ``i``, one after the other, in its in-memory link
  state, so the grid reads the nodes in registration order from there: no message to any
  client, nothing that grows with idle clients. Every reply carries its partition id in a
  record of its own (:data:`ARM_KEY`, removed before anything is counted) and a reply from
  the wrong partition is a :class:`SimulationError`, so a Flower that registers in
  another order fails loudly instead of mixing up data or links. Only a Grid without that
  state (not Flower's simulation engine) makes the grid fall back to asking every node
  (a Flower ``query`` message: simulation bookkeeping, not counted).
* **Sampling.** ``get_node_ids()`` returns exactly the clients sampled for the round,
  drawn from a generator seeded by (seed, round) over partition ids: every arm sees the
  same clients in the same round, and a rerun sees them again. The wrapped strategies
  take every node offered.
* **Bytes.** Every Flower message is counted as its protobuf serialization plus gRPC's
  5-byte prefix (for plain FedAvg this is all its traffic; for fedsqueeze it is the
  control plane, and the receipts add the data plane, counted on the wire). This is a
  lower bound for Flower 1.42, which ships messages as content-addressed objects.
* **Time.** Each reply's traffic and measured compute go through the clients' links on
  the simulated clock (:mod:`simulations.clock`); stragglers past the deadline are
  dropped before the strategy sees them, as a real deployment's round timeout would.
* **Order and failure.** Replies reach the strategy sorted by partition id (aggregation
  is then bit-for-bit repeatable), and a round with missing replies after its timeout,
  or an aborted simulation, raises :class:`SimulationError` instead of waiting forever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedsqueeze.control import CONTROL_KEY, RECEIPT_KEY, RoundInstruction, TrainReceipt
from fedsqueeze.errors import FedsqueezeError
from fedsqueeze.transport.accounting import GRPC_PREFIX_BYTES
from fedsqueeze.transport.shaping import LinkProfile
from simulations.clock import (
    CONTROL_ROUND_TRIPS,
    DATA_PLANE_ROUND_TRIPS,
    ClientTraffic,
    RoundTime,
    round_time,
)

log = logging.getLogger(__name__)

__all__ = [
    "ARM_KEY",
    "PARTITION_KEY",
    "RoundTraffic",
    "SimGrid",
    "SimulationError",
    "registration_order",
    "sample_partitions",
]

#: ConfigRecord telling a simulated client which arm a message belongs to, and in a
#: reply, the client's partition id (simulation bookkeeping both ways, not counted).
ARM_KEY = "fedsqueeze-sim"
#: The key of the partition id in a reply's :data:`ARM_KEY` record.
PARTITION_KEY = "partition-id"
#: A message id as Flower assigns it at push time: protobuf tag, length, 36-char UUID.
_MESSAGE_ID_BYTES = 38
_POLL_S = 0.05


class SimulationError(FedsqueezeError):
    """The simulation cannot go on: clients missing, a timeout, or an abort."""


@dataclass(frozen=True)
class RoundTraffic:
    """What one round of one arm moved and how long it took on the simulated clock.

    Attributes
    ----------
    server_round
        The round, from 1.
    sampled, skipped, failed, dropped
        Partition ids: sampled; left out by a budget policy; replied with an error;
        dropped as stragglers.
    control_down, control_up, data_down, data_up
        Wire bytes of Flower messages and of the data plane, all clients together.
    time
        The round on the simulated clock.
    per_client
        Each replying client's traffic, by partition id.
    specs
        The (download, upload) codec specs each fedsqueeze client was told to use.
    wall_s
        Measured wall-clock seconds from sending the round's messages to the last reply
        (not the simulated clock: with ``realtime`` on, it includes the links' real waits).
    """

    server_round: int
    sampled: tuple[int, ...]
    skipped: tuple[int, ...]
    failed: tuple[int, ...]
    dropped: tuple[int, ...]
    control_down: int
    control_up: int
    data_down: int
    data_up: int
    time: RoundTime
    per_client: Mapping[int, ClientTraffic] = field(default_factory=dict)
    specs: Mapping[int, tuple[str, str]] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def bytes_down(self) -> int:
        """Everything received by clients."""
        return self.control_down + self.data_down

    @property
    def bytes_up(self) -> int:
        """Everything sent by clients."""
        return self.control_up + self.data_up


def sample_partitions(seed: int, server_round: int, num_clients: int, k: int) -> tuple[int, ...]:
    """The partition ids sampled in a round (sorted), the same for every arm and run."""
    rng = np.random.default_rng([seed, server_round, 0x5A_3B])
    return tuple(sorted(int(p) for p in rng.choice(num_clients, size=k, replace=False)))


def message_wire_bytes(message: Message) -> int:
    """A Flower message's protobuf size plus the gRPC prefix (id included once pushed)."""
    size = message_to_proto(message).ByteSize()
    if not message.metadata.message_id:
        size += _MESSAGE_ID_BYTES
    return int(size) + GRPC_PREFIX_BYTES


DroppedFn = Callable[[Message], None]
RoundFn = Callable[[RoundTraffic], None]


class SimGrid(Grid):
    """A Grid for one simulation; :meth:`begin_arm` before each strategy runs on it.

    Parameters
    ----------
    inner
        The Grid Flower's simulation engine passed to the ServerApp.
    num_clients, clients_per_round, seed
        Sampling.
    links
        Each partition's link.
    deadline_s
        Round deadline on the simulated clock (``None``: none).
    round_timeout_s
        Wall-clock seconds to wait for a round's replies.
    abort
        Set by the runner when the simulation engine failed.
    compute_s
        Local compute per client and round on the clock, in seconds; ``None`` uses what
        each client measured (which varies from run to run).
    """

    def __init__(
        self,
        inner: Grid,
        *,
        num_clients: int,
        clients_per_round: int,
        seed: int,
        links: tuple[LinkProfile, ...],
        deadline_s: float | None,
        round_timeout_s: float,
        abort: threading.Event,
        compute_s: float | None = None,
    ) -> None:
        if len(links) != num_clients:
            raise ValueError("one link per client")
        self.inner = inner
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.links = links
        self.deadline_s = deadline_s
        self.round_timeout_s = round_timeout_s
        self.abort = abort
        self.compute_s = compute_s
        self.partition_of: dict[int, int] = {}
        self.node_of: dict[int, int] = {}
        self._arm = ""
        self._round = 0
        self._on_round: RoundFn | None = None
        self._on_dropped: DroppedFn | None = None

    # ------------------------------------------------------------------ Grid API
    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[no-untyped-def]
        return self.inner.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def get_node_ids(self) -> Iterable[int]:
        """This round's sampled clients, in partition order."""
        self.discover()
        parts = sample_partitions(
            self.seed, self._round + 1, self.num_clients, self.clients_per_round
        )
        return [self.node_of[p] for p in parts]

    # ------------------------------------------------------------------ set-up
    def discover(self) -> None:
        """Learn every node's partition id (once): from Flower's registration order."""
        if self.partition_of:
            return
        deadline = time.monotonic() + self.round_timeout_s
        while len(nodes := list(self.inner.get_node_ids())) < self.num_clients:
            self._check(deadline, f"only {len(nodes)} of {self.num_clients} clients registered")
            time.sleep(_POLL_S)
        order = registration_order(self.inner, nodes)
        if order is not None and len(order) == self.num_clients:
            self.node_of = dict(enumerate(order))
            self.partition_of = {n: p for p, n in self.node_of.items()}
            return
        log.warning(
            "this Grid does not show Flower's registration order: asking all %d nodes "
            "for their partition ids",
            len(nodes),
        )
        self._query_partitions(nodes)

    def _query_partitions(self, nodes: list[int]) -> None:
        """The fallback: one ``query`` message to every node (grows with the clients)."""
        queries = [
            Message(RecordDict({"config": ConfigRecord()}), node, MessageType.QUERY)
            for node in nodes
        ]
        for reply in self._exchange(queries, self.round_timeout_s, "discovery"):
            metrics = reply.content.metric_records.get("metrics", MetricRecord())
            pid = metrics.get("partition-id")
            if reply.has_error() or not isinstance(pid, int):
                raise SimulationError(f"node {reply.metadata.src_node_id} sent no partition id")
            self.partition_of[reply.metadata.src_node_id] = pid
        self.node_of = {p: n for n, p in self.partition_of.items()}
        if sorted(self.node_of) != list(range(self.num_clients)):
            raise SimulationError("partition ids are not 0..num_clients-1")

    def begin_arm(
        self, arm: str, on_round: RoundFn | None = None, on_dropped: DroppedFn | None = None
    ) -> None:
        """Start counting for a new arm, from round 1."""
        self._arm, self._round = arm, 0
        self._on_round, self._on_dropped = on_round, on_dropped

    def link_of_node(self, node_id: int) -> LinkProfile | None:
        """The link of a node (``None`` before discovery)."""
        pid = self.partition_of.get(node_id)
        return self.links[pid] if pid is not None else None

    # ------------------------------------------------------------------ rounds
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send a round's messages; return the replies that made the deadline, sorted."""
        out = list(messages)
        if not out:
            return []
        if out[0].metadata.message_type != MessageType.TRAIN:
            raise SimulationError("simulations run training rounds only (fraction-evaluate 0)")
        self._round += 1
        sampled = sample_partitions(
            self.seed, self._round, self.num_clients, self.clients_per_round
        )
        sent: dict[int, int] = {}
        specs: dict[int, tuple[str, str]] = {}
        for msg in out:
            pid = self.partition_of[msg.metadata.dst_node_id]
            sent[pid] = message_wire_bytes(msg)
            control = msg.content.config_records.get(CONTROL_KEY)
            if control is not None:
                instruction = RoundInstruction.from_record(control)
                specs[pid] = (instruction.down_spec, instruction.up_spec)
            msg.content[ARM_KEY] = ConfigRecord({"arm": self._arm})
        wait = min(timeout or self.round_timeout_s, self.round_timeout_s)
        started = time.perf_counter()
        replies = self._exchange(out, wait, f"{self._arm} round {self._round}")
        wall_s = time.perf_counter() - started
        for reply in replies:
            self._check_partition(reply)
        replies.sort(key=lambda r: self.partition_of[r.metadata.src_node_id])
        return self._account(sampled, sent, replies, specs, wall_s)

    def _check_partition(self, reply: Message) -> None:
        """Take the reply's partition id out of it (before counting) and check it."""
        if reply.has_error():
            return
        node = reply.metadata.src_node_id
        tag = reply.content.config_records.get(ARM_KEY)
        if tag is None:
            raise SimulationError(f"node {node}'s reply carries no partition id")
        del reply.content[ARM_KEY]
        expected = self.partition_of[node]
        if tag.get(PARTITION_KEY) != expected:
            raise SimulationError(
                f"node {node} holds partition {tag.get(PARTITION_KEY)!r}, but Flower's "
                f"registration order gave it {expected}: the simulation engine changed"
            )

    def _account(
        self,
        sampled: tuple[int, ...],
        sent: dict[int, int],
        replies: list[Message],
        specs: dict[int, tuple[str, str]],
        wall_s: float = 0.0,
    ) -> list[Message]:
        traffic: dict[int, ClientTraffic] = {}
        failed: list[int] = []
        data_down = data_up = 0
        for reply in replies:
            pid = self.partition_of[reply.metadata.src_node_id]
            if reply.has_error():
                failed.append(pid)
                continue
            metrics = reply.content.metric_records.get("metrics", MetricRecord())
            fedsqueeze = RECEIPT_KEY in reply.content.config_records
            if fedsqueeze:
                receipt = TrainReceipt.from_records(
                    reply.content.config_records[RECEIPT_KEY], metrics
                )
                compute = receipt.train_seconds + receipt.fetch_seconds + receipt.push_seconds
                down, up = receipt.bytes_down, receipt.bytes_up
            else:
                compute, down, up = _number(metrics, "compute-seconds"), 0, 0
            data_down, data_up = data_down + down, data_up + up
            traffic[pid] = ClientTraffic(
                partition=pid,
                bytes_down=sent[pid] + down,
                bytes_up=message_wire_bytes(reply) + up,
                # payloads inline in the Flower messages: no data-plane round trips
                round_trips=CONTROL_ROUND_TRIPS
                + (DATA_PLANE_ROUND_TRIPS if fedsqueeze and (down or up) else 0),
                compute_s=compute if self.compute_s is None else self.compute_s,
                data_down=down,
                data_up=up,
            )
        clock = round_time([(self.links[p], t) for p, t in traffic.items()], self.deadline_s)
        kept = []
        for reply in replies:
            if self.partition_of[reply.metadata.src_node_id] not in clock.dropped:
                kept.append(reply)
            elif self._on_dropped is not None:
                self._on_dropped(reply)
        record = RoundTraffic(
            server_round=self._round,
            sampled=sampled,
            skipped=tuple(p for p in sampled if p not in sent),
            failed=tuple(failed),
            dropped=clock.dropped,
            control_down=sum(sent.values()),
            control_up=sum(message_wire_bytes(r) for r in replies),
            data_down=data_down,
            data_up=data_up,
            time=clock,
            per_client=traffic,
            specs=specs,
            wall_s=wall_s,
        )
        if clock.dropped:
            log.info("%s round %d: dropped stragglers %s", self._arm, self._round, clock.dropped)
        if self._on_round is not None:
            self._on_round(record)
        return kept

    def _exchange(self, messages: list[Message], timeout: float, what: str) -> list[Message]:
        ids = set(self.inner.push_messages(messages))
        if len(ids) != len(messages):
            raise SimulationError(f"{what}: Flower accepted {len(ids)} of {len(messages)}")
        deadline = time.monotonic() + timeout
        replies: list[Message] = []
        while ids:
            got = list(self.inner.pull_messages(ids))
            replies.extend(got)
            ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if ids:
                self._check(deadline, f"{what}: {len(ids)} client(s) never replied")
                time.sleep(_POLL_S)
        return replies

    def _check(self, deadline: float, what: str) -> None:
        if self.abort.is_set():
            raise SimulationError("the simulation engine stopped")
        if time.monotonic() > deadline:
            raise SimulationError(f"{what} within {self.round_timeout_s:.0f} s")


def registration_order(inner: Grid, nodes: Iterable[int]) -> list[int] | None:
    """The nodes in the order Flower's simulation engine registered them, if it shows it.

    Flower 1.42's ``run_simulation`` registers node ``i`` for partition ``i``
    (``vce_api._register_nodes``) in an in-memory link state whose node table keeps
    insertion order, and hands the ServerApp an ``InMemoryGrid`` holding that state.
    ``None`` when ``inner`` is another Grid or its state lists other nodes than ``nodes``.
    """
    state = getattr(inner, "state", None)
    node_info = getattr(state, "get_node_info", None)
    if node_info is None:
        return None
    online = set(nodes)
    order = [int(info.node_id) for info in node_info() if info.node_id in online]
    return order if len(order) == len(online) else None


def _number(metrics: MetricRecord, key: str) -> float:
    value = metrics.get(key, 0.0)
    return float(value) if isinstance(value, (int, float)) else 0.0
