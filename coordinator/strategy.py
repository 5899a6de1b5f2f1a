"""The strategy wrapper: any Flower strategy, with model bytes moved to the data plane.

``CompressedStrategy(FedAvg(...))`` behaves like the strategy it wraps, except that

* ``configure_*`` publishes the global model as a version and replaces the model in
  every outgoing message by a small :class:`~fedsqueeze.control.RoundInstruction`;
* ``aggregate_train`` takes each edge's receipt, decodes its update from the data plane
  against the version it trained from, checks and clips it, and hands the wrapped
  strategy ordinary arrays: ``global + (edge model − edge base)``. With a lossless spec
  the edge base *is* the global, so this is exactly what the wrapped strategy would see
  without fedsqueeze.

With ``inline_limit`` (run setting ``inline-bytes``) a receipt may carry its update inline
instead of naming one pushed on the data plane; it is decoded and checked the same way.

With frozen parts (``frozen=...``, see :mod:`coordinator.frozen`) the wrapped strategy
only ever sees the trainable arrays, in ``configure_*`` and in ``aggregate_train``; the
new global model takes its frozen tensors unchanged from the current one.
With a student track (:mod:`coordinator.student_track`) the edges it assigns train the
student instead: their instructions name the student's version, their updates are decoded
against it and averaged into the student, never handed to the wrapped strategy. With a
fusion (``aggregation = feddf``, :mod:`coordinator.fusion`) the teacher's new model is the
fusion of the round's client models instead of the wrapped strategy's average. With the
track's teacher learning on (:meth:`coordinator.student_track.StudentTrack.teach`) the
teacher's aggregate is then distilled towards what the round's students learned, before the
student is refreshed from it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from coordinator.frozen import FrozenParts
from coordinator.hygiene import Rejection, check_update, clip_update
from coordinator.student_track import StudentTrack
from coordinator.version_store import VersionStore
from fedsqueeze.codec import EncodedModel, decode_state
from fedsqueeze.control import (
    CONTROL_KEY,
    RECEIPT_KEY,
    ModelTrack,
    RoundInstruction,
    TrainReceipt,
)
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
#: ``(client states, weights) -> state``: the teacher's aggregation replacing the wrapped
#: strategy's average (FedDF fusion); its metrics still come from the wrapped strategy.
GlobalAggregator = Callable[[Sequence[Mapping[str, torch.Tensor]], Sequence[float]], State]


@dataclass
class RoundStats:
    """What one training round cost and who was left out.

    Attributes
    ----------
    bytes_down, bytes_up
        Model bytes moved: the data plane's wire bytes the receipts report, plus the
        payloads sent inline (downloads in instructions, updates in receipts).
    accepted
        Updates decoded, checked and handed to the wrapped strategy.
    rejected
        Updates that arrived and were refused (or never arrived on the data plane).
    failed
        ``(edge, reason)`` of edges whose reply was an error: their fetch or their
        training raised.
    dropped
        Edges that were instructed but did not reply within the round timeout.
    skipped
        Edges that sat the round out (a budget they cannot fit).
    aggregated
        Whether the wrapped strategy produced a new global model this round (or, with a
        student track, the student took updates).
    student_accepted
        Of ``accepted``, the updates that went into the student.
    """

    bytes_down: int = 0
    bytes_up: int = 0
    accepted: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    aggregated: bool = False
    student_accepted: int = 0

    def losses(self) -> str:
        """Why edges are missing from the aggregate, in one line."""
        parts = [
            _counted(len(self.failed), "edge failed", "edges failed", _first(self.failed)),
            _counted(
                len(self.rejected),
                "update rejected",
                "updates rejected",
                _first([(r.edge, r.reason) for r in self.rejected]),
            ),
            _counted(len(self.dropped), "edge dropped", "edges dropped", "no reply in time"),
            _counted(len(self.skipped), "edge skipped", "edges skipped", "budget"),
        ]
        return ", ".join(parts)


def _counted(n: int, one: str, many: str, why: str) -> str:
    text = f"{n} {one if n == 1 else many}"
    return f"{text} ({why})" if n and why else text


def _first(reasons: list[tuple[str, str]]) -> str:
    """The first edge's reason, shortened to one line (the rest are logged per edge)."""
    if not reasons:
        return ""
    edge, reason = reasons[0]
    reason = " ".join(reason.split())
    reason = reason if len(reason) <= 200 else reason[:197] + "..."
    return f"edge {edge}: {reason}" + (f"; {len(reasons) - 1} more" if len(reasons) > 1 else "")


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
    round_offset
        Rounds completed before this run started (a resumed run): the log names rounds
        by ``server_round + round_offset``, as the coordinator records them.
    frozen
        Glob patterns of the frozen tensors (the specs' ``freeze``): the wrapped strategy
        never sees them, and every new global model keeps the current one's.
    students, student_instruction
        The student track and the instructions of its edges (both or neither).
    aggregate_global
        Replaces the wrapped strategy's average for the teacher (FedDF fusion).
    fusion_warmup
        With ``aggregate_global``: the first ``fusion_warmup`` rounds of the run (its own
        numbering, so a resumed run counts the rounds done) keep the plain average, as
        FedDF's authors warm up; fusing near-random models distils their noise.
    inline_limit
        Most bytes of an update an edge may return inline in its receipt (the run's
        ``inline-bytes``; 0: none, every update comes over the data plane). A larger
        one is rejected.
    device
        Where updates are decoded and their differences, clipping and merge computed
        (the run's ``coordinator-device``); the merged models go back to the CPU for the
        wrapped strategy.
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
        round_offset: int = 0,
        frozen: tuple[str, ...] = (),
        students: StudentTrack | None = None,
        student_instruction: InstructionFactory | None = None,
        aggregate_global: GlobalAggregator | None = None,
        fusion_warmup: int = 0,
        inline_limit: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if isinstance(inline_limit, bool) or not isinstance(inline_limit, int):
            raise TypeError(f"inline_limit must be an int, got {inline_limit!r}")
        if inline_limit < 0:
            raise ValueError(f"inline_limit must be >= 0, got {inline_limit}")
        self.inline_limit = inline_limit
        self.device = torch.device(device)
        if (students is None) != (student_instruction is None):
            raise ValueError("a student track needs its instruction factory, and vice versa")
        if isinstance(fusion_warmup, bool) or not isinstance(fusion_warmup, int):
            raise TypeError(f"fusion_warmup must be an int, got {fusion_warmup!r}")
        if fusion_warmup < 0:
            raise ValueError(f"fusion_warmup must be >= 0, got {fusion_warmup}")
        self.fusion_warmup = fusion_warmup
        self.students = students
        self._student_instruction = student_instruction
        self._aggregate_global = aggregate_global
        self._student: dict[int, tuple[str, State]] = {}
        self._student_nodes: dict[int, set[str]] = {}
        self.inner = inner
        self.frozen = FrozenParts(frozen)
        self._frozen_checked = False
        self.store = store
        self._instruction = instruction
        self._pull = pull_update
        self.clip_norm = clip_norm
        self._arrays_key = getattr(inner, "arrayrecord_key", arrayrecord_key)
        self._config_key = getattr(inner, "configrecord_key", configrecord_key)
        self._global: dict[int, tuple[str, State]] = {}
        self._skipped: dict[int, list[str]] = {}
        self._sent: dict[int, list[str]] = {}
        self._inline_sent: dict[int, int] = {}
        self.round_offset = round_offset
        self.stats: dict[int, RoundStats] = {}

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        log.info("CompressedStrategy wrapping %s", type(self.inner).__name__)
        self.inner.summary()

    # ---------------------------------------------------------------- configure
    def _publish(self, server_round: int, arrays: ArrayRecord) -> str:
        state = {k: v.detach().clone() for k, v in arrays.to_torch_state_dict().items()}
        if self.frozen and not self._frozen_checked:
            self.frozen.check(state, "the global model")  # once: the names never change
            self._frozen_checked = True
        digest = self.store.publish(state)
        self._global[server_round] = (digest, state)
        return digest

    def _visible(self, arrays: ArrayRecord) -> ArrayRecord:
        """What the wrapped strategy sees of a whole model: its trainable arrays."""
        if not self.frozen:
            return arrays
        return ArrayRecord(self.frozen.trainable(arrays.to_torch_state_dict()))

    def _strip(
        self,
        server_round: int,
        messages: Iterable[Message],
        target: str,
        student_target: str | None = None,
        *,
        training: bool = True,
    ) -> list[Message]:
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            content = RecordDict()
            for key, record in msg.content.items():
                if isinstance(record, ArrayRecord):
                    continue  # model bytes go on the data plane (or inline, small and encoded)
                content[key] = record
            if (
                student_target is not None
                and self.students is not None
                and self._student_instruction is not None
                and self.students.track_of(node) is ModelTrack.STUDENT
            ):
                instruction = self._student_instruction(server_round, node, student_target)
                if instruction is not None:
                    instruction = replace(instruction, track=ModelTrack.STUDENT)
                    self._student_nodes.setdefault(server_round, set()).add(str(node))
            else:
                instruction = self._instruction(server_round, node, target)
            if instruction is None:
                log.info("round %d: edge %s sits this round out (budget)", server_round, node)
                self._skipped.setdefault(server_round, []).append(str(node))
                continue
            content[CONTROL_KEY] = instruction.to_record()
            if training and instruction.payload:
                self._inline_sent.setdefault(server_round, 0)
                self._inline_sent[server_round] += len(instruction.payload)
            out.append(
                Message(content=content, dst_node_id=node, message_type=msg.metadata.message_type)
            )
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Publish the global model, let the wrapped strategy sample, strip the arrays."""
        target = self._publish(server_round, arrays)
        student_target = None
        if self.students is not None:
            student_target = self.students.publish()
            self._student[server_round] = (student_target, dict(self.students.state))
        messages = self.inner.configure_train(server_round, self._visible(arrays), config, grid)
        out = self._strip(server_round, messages, target, student_target)
        self._sent[server_round] = [str(m.metadata.dst_node_id) for m in out]
        return out

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Like :meth:`configure_train`, for federated evaluation."""
        target = self.store.publish(
            {k: v.detach().clone() for k, v in arrays.to_torch_state_dict().items()}
        )
        messages = self.inner.configure_evaluate(server_round, self._visible(arrays), config, grid)
        out = self._strip(server_round, messages, target, training=False)
        self._skipped.pop(server_round, None)  # skips are reported for training rounds
        return out

    # ---------------------------------------------------------------- aggregate
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode every edge's update, check and clip it, then aggregate as usual."""
        target, global_state = self._global.pop(server_round)
        student_round = self._student.pop(server_round, None)
        student_nodes = self._student_nodes.pop(server_round, set())
        student_models: list[tuple[State, float]] = []
        replies = list(replies)
        stats = RoundStats(skipped=self._skipped.pop(server_round, []))
        stats.bytes_down += self._inline_sent.pop(server_round, 0)
        replied = {str(reply.metadata.src_node_id) for reply in replies}
        stats.dropped = [n for n in self._sent.pop(server_round, []) if n not in replied]
        shown = server_round + self.round_offset
        teacher_examples = 0.0
        rebuilt: list[Message] = []
        for reply in replies:
            edge = str(reply.metadata.src_node_id)
            if reply.has_error():
                reason = reply.error.reason or f"error code {reply.error.code}"
                log.warning("round %d: edge %s failed: %s", shown, edge, edge_failure(reason))
                stats.failed.append((edge, reason))
                continue
            if RECEIPT_KEY not in reply.content:
                rebuilt.append(reply)  # not a fedsqueeze reply: the wrapped strategy judges
                continue
            receipt = TrainReceipt.from_records(
                reply.content.config_records[RECEIPT_KEY],
                reply.content.metric_records.get("metrics", MetricRecord()),
            )
            stats.bytes_down += receipt.bytes_down
            stats.bytes_up += receipt.bytes_up + len(receipt.update)
            is_student = edge in student_nodes and student_round is not None
            track_target, track_state = (
                student_round if is_student and student_round else (target, global_state)
            )
            arrays, rejection = self._decode_reply(edge, receipt, track_target, track_state)
            if rejection is not None:
                log.warning(
                    "round %d: rejected update from edge %s: %s", shown, edge, rejection.reason
                )
                stats.rejected.append(rejection)
                continue
            self.store.record_edge(
                edge,
                receipt.held,
                decoded_bytes=receipt.decoded_bytes,
                levels=receipt.decoded_levels,
            )
            assert arrays is not None  # no rejection means arrays were built
            stats.accepted += 1
            if is_student:
                stats.student_accepted += 1
                student_models.append((arrays.to_torch_state_dict(), float(receipt.num_examples)))
                continue
            teacher_examples += float(max(receipt.num_examples, 0))
            content = RecordDict(
                {
                    self._arrays_key: arrays,
                    "metrics": receipt.strategy_metrics(
                        reply.content.metric_records.get("metrics", MetricRecord())
                    ),
                }
            )
            reply.content = content
            rebuilt.append(reply)
        self.stats[server_round] = stats
        log.info(
            "round %d: %d updates accepted%s, %d rejected, %d edges failed, %d dropped; "
            "%d bytes down, %d up (target %s)",
            shown,
            stats.accepted,
            f" ({stats.student_accepted} to the student)" if self.students is not None else "",
            len(stats.rejected),
            len(stats.failed),
            len(stats.dropped),
            stats.bytes_down,
            stats.bytes_up,
            target[:12],
        )
        result: tuple[ArrayRecord | None, MetricRecord | None] = (None, None)
        if stats.accepted > stats.student_accepted:
            result = self.inner.aggregate_train(server_round, rebuilt)
            if (
                result[0] is not None
                and self._aggregate_global is not None
                and shown > self.fusion_warmup
            ):
                result = (self._fused(rebuilt), result[1])
            if result[0] is not None and self.frozen:
                merged = self.frozen.merge(result[0].to_torch_state_dict(), global_state)
                result = (ArrayRecord(merged), result[1])
        stats.aggregated = result[0] is not None
        if self.students is not None:
            stats.aggregated |= self.students.aggregate(student_models)
            if (
                self.students.teacher_learning.on
                and result[0] is not None
                and student_round is not None
                and student_models
            ):
                learned = sum(max(w, 0.0) for _, w in student_models)
                taught = self._taught(result[0], student_round[1], teacher_examples, learned)
                result = (taught, result[1])
            if self.students.due(shown):
                teacher = result[0].to_torch_state_dict() if result[0] is not None else global_state
                self.students.refresh(teacher)
        if not stats.aggregated:
            log.error(
                "round %d FAILED, it aggregated nothing: %d updates accepted; %s",
                shown,
                stats.accepted,
                stats.losses(),
            )
        return result

    def _taught(
        self, teacher: ArrayRecord, student_before: State, examples: float, learned: float
    ) -> ArrayRecord:
        """``teacher`` (from ``examples``) after learning from the round's students (from
        ``learned`` examples); the same record when it did not."""
        if self.students is None:
            raise RuntimeError("no student track")
        state = teacher.to_torch_state_dict()
        taught = self.students.teach(state, student_before, examples, learned)
        if taught is None:
            return teacher
        if self.frozen:  # distillation trains every tensor; the frozen ones stay as they were
            taught = self.frozen.merge(taught, state)
        return ArrayRecord(taught)

    def _fused(self, rebuilt: list[Message]) -> ArrayRecord:
        """The teacher's aggregate by :attr:`_aggregate_global` over the round's models."""
        if self._aggregate_global is None:
            raise RuntimeError("no fusion configured")
        states, weights = [], []
        for reply in rebuilt:
            if reply.has_error() or self._arrays_key not in reply.content.array_records:
                continue
            states.append(reply.content.array_records[self._arrays_key].to_torch_state_dict())
            examples = reply.content.metric_records.get("metrics", MetricRecord()).get(
                "num-examples", 1
            )
            weights.append(float(examples) if isinstance(examples, (int, float)) else 1.0)
        return ArrayRecord(self._aggregate_global(states, weights))

    def _decode_reply(
        self, edge: str, receipt: TrainReceipt, target: str, global_state: State
    ) -> tuple[ArrayRecord | None, Rejection | None]:
        if receipt.update:
            pulled, refused = self._inline_update(edge, receipt)
            if refused is not None:
                return None, refused
        else:
            pulled = self._pull(receipt.update_id)
        if pulled is None:
            return None, Rejection(edge, f"update {receipt.update_id} never arrived")
        base = self.store.get(pulled.base_digest)
        if base is None:
            return None, Rejection(edge, f"base {pulled.base_digest[:12]} is no longer kept")
        on_device = self.device.type != "cpu"
        if on_device:
            base = {k: v.to(self.device) for k, v in base.items()}
        try:
            model = decode_state(pulled.encoded, base, device=self.device)
        except FedsqueezeError as exc:
            return None, Rejection(edge, f"undecodable update: {exc}")
        rejection = check_update(edge, model, global_state)
        if rejection is not None:
            return None, rejection
        if self.frozen:
            model = self.frozen.trainable(model)
        if pulled.base_digest == target and self.clip_norm is None:
            # Trained from the exact global: the edge's model is what plain Flower sees.
            return ArrayRecord(_on_cpu(model)), None
        update = {
            k: model[k].float() - base[k].float()
            for k in global_state
            if k in model and model[k].is_floating_point()
        }
        if self.clip_norm is not None:
            update, norm = clip_update(update, self.clip_norm)
            if norm > self.clip_norm:
                log.info("edge %s: update norm %.3g clipped to %.3g", edge, norm, self.clip_norm)
        merged: State = {}
        for name, g in global_state.items():
            if name not in model:
                continue  # frozen: the wrapped strategy never sees it
            if name in update:
                merged[name] = (g.to(self.device).float() + update[name]).to(g.dtype)
            else:
                merged[name] = model[name]
        return ArrayRecord(_on_cpu(merged)), None

    def _inline_update(
        self, edge: str, receipt: TrainReceipt
    ) -> tuple[PulledUpdate | None, Rejection | None]:
        """The update a receipt carries inline, as if the data plane had accepted it."""
        size = len(receipt.update)
        if size > self.inline_limit:
            return None, Rejection(
                edge, f"inline update of {size} B over the run's limit of {self.inline_limit} B"
            )
        try:
            # An update may leave its base to the receipt, which names what it trained from.
            encoded = EncodedModel.from_bytes(
                receipt.update, base_digest=bytes.fromhex(receipt.held)
            )
        except (FedsqueezeError, ValueError) as exc:
            return None, Rejection(edge, f"malformed inline update: {exc}")
        base = encoded.base_digest.hex() if encoded.base_digest is not None else receipt.held
        return PulledUpdate(encoded, base, edge), None

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Metrics only: delegated unchanged."""
        return self.inner.aggregate_evaluate(server_round, replies)


def _on_cpu(state: State) -> State:
    """``state`` with every tensor on the CPU (Flower's arrays are host memory)."""
    return {k: v if v.device.type == "cpu" else v.cpu() for k, v in state.items()}


# Flower's reason for a ClientApp exception: "<class 'module.Error'>:<'message'>".
_FLOWER_REASON = re.compile(r"^<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>$", re.S)


def edge_failure(reason: str) -> str:
    """``"UnavailableError: fetching the model ... failed: ..."``, on one line.

    The reason is the edge's exception message as Flower reports it; for a failed fetch
    it names the cause (e.g. ``CERTIFICATE_VERIFY_FAILED``).
    """
    match = _FLOWER_REASON.match(reason.strip())
    text = f"{match.group(1)}: {match.group(2)}" if match else reason
    return " ".join(text.split())
