"""The control plane's small messages, carried inside Flower messages.

A :class:`RoundInstruction` tells an edge where the data plane is and what to fetch; a
:class:`TrainReceipt` tells the coordinator which update the edge pushed and what it
cost. Model bytes travel here only when a run allows payloads of a few kilobytes inline
(run setting ``inline-bytes``): then the download rides in the instruction
(``payload``) and the update in the receipt (``update``), which saves the data plane's
requests and acknowledgements (about 300 B a client-round at 2 kB payloads).

On the wire each is one serialized protobuf message
(``proto/fedsqueeze/v1/control.proto``) stored as the bytes value ``"v1"`` of a Flower
``ConfigRecord``: about 140 bytes for an instruction and 120 for a receipt, where a
``ConfigRecord`` of named fields with hex digests cost about 440 and 380. Every client
pays them every round, so they matter on a budget of a few kilobytes.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from flwr.app import ConfigRecord, MetricRecord

from fedsqueeze.errors import ConfigError

#: The record names of the instruction and the receipt in Flower's messages: short, since
#: every client-round pays for them (they were "fedsqueeze" and "fedsqueeze-receipt").
CONTROL_KEY = "fsq"
RECEIPT_KEY = "fsq-r"
#: The key of the serialized message inside the ``ConfigRecord``.
WIRE_KEY = "v1"
#: The key in the app's ``"config"`` record that tells the training code which model
#: architecture the arrays are (set by the edge mod for the student track only).
TRACK_CONFIG_KEY = "fedsqueeze-track"


class ModelTrack(enum.Enum):
    """Which model an edge trains (the version store's track of the same name)."""

    GLOBAL = "global"
    """The global (teacher) model."""
    STUDENT = "student"
    """The compact student distilled from the global model (the task's student builder)."""


@dataclass(frozen=True)
class RoundInstruction:
    """What the coordinator asks of an edge this round.

    Attributes
    ----------
    server_round
        The round, from 1.
    address
        ``host:port`` of the data plane.
    target
        Hex digest of the global model to fetch.
    down_spec, up_spec
        Codec specs (text form) for the download and the update.
    down_budget, up_budget
        Byte budgets (0: none).
    task
        Task name (built-in or ``module:attribute``).
    init_seed, init_digest
        The initial model can be rebuilt from ``task`` and this seed instead of
        downloaded; the digest proves it is the same model.
    token
        This edge's bearer token for the data plane.
    tls
        Whether the data plane uses TLS.
    track
        Which model the edge trains; ``target`` and ``init_digest`` are that track's.
    payload
        The encoded download inline (empty: fetch it from the data plane): the stream
        the data plane would serve, a delta from the version the coordinator believes
        the edge holds (named in the stream's header).
    payload_digest
        With ``payload``: hex digest of the model it decodes to.
    inline_limit
        Most encoded bytes of an update the edge may return inline in its receipt
        (0: always push it on the data plane).
    """

    server_round: int
    address: str
    target: str
    down_spec: str
    up_spec: str
    task: str
    init_seed: int
    init_digest: str
    down_budget: int = 0
    up_budget: int = 0
    token: str = ""
    tls: bool = False
    track: ModelTrack = ModelTrack.GLOBAL
    payload: bytes = b""
    payload_digest: str = ""
    inline_limit: int = 0

    def to_record(self) -> ConfigRecord:
        """As a Flower ``ConfigRecord`` holding the serialized message."""
        from fedsqueeze.wire.control_convert import instruction_to_bytes

        return ConfigRecord({WIRE_KEY: instruction_to_bytes(self)})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundInstruction:
        """From a ``ConfigRecord``; raises :class:`ConfigError` if it is not one of ours."""
        from fedsqueeze.wire.control_convert import instruction_from_bytes

        return instruction_from_bytes(_wire_value(record, "round instruction"))


@dataclass(frozen=True)
class TrainReceipt:
    """What an edge reports after a training round.

    Attributes
    ----------
    update_id
        The id of the update it pushed on the data plane (empty with ``update``).
    held
        Hex digest of the model it holds (what it decoded, and trained from).
    num_examples, loss
        Local training set size and last-epoch loss.
    bytes_down, bytes_up
        Data-plane bytes counted on the wire this round.
    train_seconds, fetch_seconds, push_seconds
        Wall time spent.
    decoded_bytes
        Stream bytes decoded from a truncated progressive fetch (0: the whole stream).
    decoded_levels
        With ``decoded_bytes``: the highest level each progressive tensor holds.
    update
        The encoded update inline (at most the instruction's ``inline_limit``
        bytes), instead of a push on the data plane; empty: pushed.
    """

    update_id: str
    held: str
    num_examples: int
    loss: float
    bytes_down: int
    bytes_up: int
    train_seconds: float
    fetch_seconds: float
    push_seconds: float
    decoded_bytes: int = 0
    decoded_levels: tuple[int, ...] = ()
    update: bytes = b""

    def to_records(
        self, app_metrics: MetricRecord | None = None
    ) -> tuple[ConfigRecord, MetricRecord]:
        """The serialized receipt, and what is left of the app's metrics to send.

        The receipt carries the examples, the loss and the training seconds itself
        (about 8 bytes in its protobuf instead of about 75 as named metrics), so the
        app's ``num-examples``, ``train-loss`` / ``loss`` and ``compute-seconds`` are left
        out of the returned metrics; the coordinator puts them back
        (:meth:`strategy_metrics`) before Flower's strategies read them. An empty
        result need not be sent at all.
        """
        from fedsqueeze.wire.control_convert import receipt_to_bytes

        metrics = MetricRecord(
            {k: v for k, v in (app_metrics or {}).items() if k not in RECEIPT_METRICS}
        )
        return ConfigRecord({WIRE_KEY: receipt_to_bytes(self)}), metrics

    def strategy_metrics(self, metrics: MetricRecord | None = None) -> MetricRecord:
        """The metrics Flower's strategies read for this reply: the app's ``metrics``
        that travelled, with ``num-examples``, ``train-loss`` (when finite) and
        ``compute-seconds`` from the receipt."""
        out = MetricRecord(dict(metrics or {}))
        out["num-examples"] = self.num_examples
        if math.isfinite(self.loss):
            out["train-loss"] = self.loss
        out["compute-seconds"] = self.train_seconds
        return out

    @classmethod
    def from_records(cls, ids: ConfigRecord, metrics: MetricRecord | None = None) -> TrainReceipt:
        """Inverse of :meth:`to_records`; :class:`ConfigError` if it is not one of ours.

        Examples and loss come from the receipt, or from ``metrics`` when the receipt
        lacks them (an edge from before they moved there).
        """
        from fedsqueeze.wire.control_convert import receipt_from_bytes

        metrics = metrics or MetricRecord()
        examples = metrics.get("num-examples", 0)
        loss = metrics.get("train-loss", metrics.get("loss", math.nan))
        if not isinstance(examples, (int, float)) or isinstance(examples, bool) or examples < 0:
            raise ConfigError("num-examples must be a non-negative number")
        if not isinstance(loss, (int, float)) or isinstance(loss, bool):
            raise ConfigError("the loss must be a number")
        return receipt_from_bytes(_wire_value(ids, "train receipt"), int(examples), float(loss))


#: The app's metrics a receipt carries in its own fields (left out of the reply's).
RECEIPT_METRICS = frozenset({"num-examples", "train-loss", "loss", "compute-seconds"})


def _wire_value(record: ConfigRecord, what: str) -> bytes:
    value = record.get(WIRE_KEY)
    if not isinstance(value, bytes):
        raise ConfigError(f"not a fedsqueeze {what}: no bytes under {WIRE_KEY!r}")
    return value
