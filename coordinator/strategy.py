"""The strategy wrapper: any Flower strategy, with model bytes moved to the data plane.

``CompressedStrategy(FedAvg(...))`` behaves like the strategy it wraps, except that

* ``configure_*`` publishes the global model as a version and replaces the model in
  every outgoing message by a small :class:`~fedsqueeze.control.RoundInstruction`;
* ``aggregate_train`` takes each edge's receipt, decodes its update from the data plane
  against the version it trained from, checks and clips it, and hands the wrapped
  strategy ordinary arrays: ``global + (edge model − edge base)``. With a lossless spec
  the edge base *is* the global, so this is exactly what the wrapped strategy would see
  without fedsqueeze.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from coordinator.hygiene import Rejection, check_update, clip_update
from coordinator.version_store import VersionStore
from fedsqueeze.codec import EncodedModel, decode_state
from fedsqueeze.control import CONTROL_KEY, RECEIPT_KEY, RoundInstruction, TrainReceipt
from fedsqueeze.errors import FedsqueezeError

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PulledUpdate:
    """An update the data plane accepted."""

    encoded: EncodedModel
    base_digest: str
    edge_id: str


UpdatePuller = Callable[[str], PulledUpdate | None]
#: ``(server_round, node_id, target_digest)`` → the edge's instruction, or ``None`` when
#: the edge sits the round out (a budget it cannot fit).
InstructionFactory = Callable[[int, int, str], RoundInstruction | None]


@dataclass
class RoundStats:
    """What one round cost and who was left out."""

    bytes_down: int = 0
    bytes_up: int = 0
    accepted: int = 0
    rejected: list[Rejection] | None = None
    skipped: list[str] | None = None


class CompressedStrategy(Strategy):
    """Wraps a Flower strategy so that model bytes travel on the fedsqueeze data plane.

    Parameters
    ----------
    inner
        The strategy that samples nodes and aggregates (FedAvg, FedProx, FedAdam, ...).
    store
        Where global versions are published and read back.
    instruction
        ``instruction(server_round, node_id, target_digest)`` builds each edge's control
        message (address, specs, budgets, training settings).
    pull_update
        Takes an update id from a receipt and returns the accepted update (or ``None``).
    clip_norm
        Optional L2 bound on each update before aggregation.
    arrayrecord_key, configrecord_key
        The keys the wrapped strategy uses (FedAvg's defaults).
    """

    def __init__(
        self,
        inner: Strategy,
        store: VersionStore,
        instruction: InstructionFactory,
        pull_update: UpdatePuller,
        *,
        clip_norm: float | None = None,
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
    ) -> None:
        self.inner = inner
        self.store = store
        self._instruction = instruction
        self._pull = pull_update
        self.clip_norm = clip_norm
        self._arrays_key = getattr(inner, "arrayrecord_key", arrayrecord_key)
        self._config_key = getattr(inner, "configrecord_key", configrecord_key)
        self._global: dict[int, tuple[str, State]] = {}
        self._skipped: dict[int, list[str]] = {}
        self.stats: dict[int, RoundStats] = {}

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        log.info("CompressedStrategy wrapping %s", type(self.inner).__name__)
        self.inner.summary()

    # ---------------------------------------------------------------- configure
    def _publish(self, server_round: int, arrays: ArrayRecord) -> str:
        state = {k: v.detach().clone() for k, v in arrays.to_torch_state_dict().items()}
        digest = self.store.publish(state)
        self._global[server_round] = (digest, state)
        return digest

    def _strip(self, server_round: int, messages: Iterable[Message], target: str) -> list[Message]:
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            content = RecordDict()
            for key, record in msg.content.items():
                if isinstance(record, ArrayRecord):
                    continue  # model bytes go on the data plane, never in Flower
                content[key] = record
            instruction = self._instruction(server_round, node, target)
            if instruction is None:
                log.info("round %d: edge %s sits this round out (budget)", server_round, node)
                self._skipped.setdefault(server_round, []).append(str(node))
                continue
            content[CONTROL_KEY] = instruction.to_record()
            out.append(
                Message(content=content, dst_node_id=node, message_type=msg.metadata.message_type)
            )
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Publish the global model, let the wrapped strategy sample, strip the arrays."""
        target = self._publish(server_round, arrays)
        messages = self.inner.configure_train(server_round, arrays, config, grid)
        return self._strip(server_round, messages, target)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Like :meth:`configure_train`, for federated evaluation."""
        target = self.store.publish(
            {k: v.detach().clone() for k, v in arrays.to_torch_state_dict().items()}
        )
        messages = self.inner.configure_evaluate(server_round, arrays, config, grid)
        out = self._strip(server_round, messages, target)
        self._skipped.pop(server_round, None)  # skips are reported for training rounds
        return out

    # ---------------------------------------------------------------- aggregate
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode every edge's update, check and clip it, then aggregate as usual."""
        target, global_state = self._global.pop(server_round)
        stats = RoundStats(rejected=[], skipped=self._skipped.pop(server_round, []))
        rebuilt: list[Message] = []
        for reply in replies:
            if reply.has_error() or RECEIPT_KEY not in reply.content:
                rebuilt.append(reply)  # the wrapped strategy logs and skips errors
                continue
            edge = str(reply.metadata.src_node_id)
            receipt = TrainReceipt.from_records(
                reply.content.config_records[RECEIPT_KEY],
                reply.content.metric_records.get("metrics", MetricRecord()),
            )
            stats.bytes_down += receipt.bytes_down
            stats.bytes_up += receipt.bytes_up
            arrays, rejection = self._decode_reply(edge, receipt, target, global_state)
            if rejection is not None:
                log.warning(
                    "round %d: rejected update from edge %s: %s",
                    server_round,
                    edge,
                    rejection.reason,
                )
                stats.rejected.append(rejection)  # type: ignore[union-attr]
                continue
            self.store.record_edge(edge, receipt.held)
            assert arrays is not None  # no rejection means arrays were built
            content = RecordDict(
                {
                    self._arrays_key: arrays,
                    "metrics": reply.content.metric_records.get("metrics", MetricRecord()),
                }
            )
            reply.content = content
            rebuilt.append(reply)
            stats.accepted += 1
        self.stats[server_round] = stats
        log.info(
            "round %d: %d updates accepted, %d rejected; %d bytes down, %d up (target %s)",
            server_round,
            stats.accepted,
            len(stats.rejected or []),
            stats.bytes_down,
            stats.bytes_up,
            target[:12],
        )
        if not stats.accepted:
            return None, None
        return self.inner.aggregate_train(server_round, rebuilt)

    def _decode_reply(
        self, edge: str, receipt: TrainReceipt, target: str, global_state: State
    ) -> tuple[ArrayRecord | None, Rejection | None]:
        pulled = self._pull(receipt.update_id)
        if pulled is None:
            return None, Rejection(edge, f"update {receipt.update_id} never arrived")
        base = self.store.get(pulled.base_digest)
        if base is None:
            return None, Rejection(edge, f"base {pulled.base_digest[:12]} is no longer kept")
        try:
            model = decode_state(pulled.encoded, base)
        except FedsqueezeError as exc:
            return None, Rejection(edge, f"undecodable update: {exc}")
        rejection = check_update(edge, model, global_state)
        if rejection is not None:
            return None, rejection
        if pulled.base_digest == target and self.clip_norm is None:
            # Trained from the exact global: the edge's model is what plain Flower sees.
            return ArrayRecord(model), None
        update = {
            k: model[k].float() - base[k].float()
            for k in global_state
            if model[k].is_floating_point()
        }
        if self.clip_norm is not None:
            update, norm = clip_update(update, self.clip_norm)
            if norm > self.clip_norm:
                log.info("edge %s: update norm %.3g clipped to %.3g", edge, norm, self.clip_norm)
        merged: State = {}
        for name, g in global_state.items():
            if name in update:
                merged[name] = (g.float() + update[name]).to(g.dtype)
            else:
                merged[name] = model[name]
        return ArrayRecord(merged), None

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Metrics only: delegated unchanged."""
        return self.inner.aggregate_evaluate(server_round, replies)
