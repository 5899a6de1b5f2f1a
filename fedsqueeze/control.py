"""The control plane's small messages, carried inside Flower messages.

Model bytes never travel here: a :class:`RoundInstruction` tells an edge where the data
plane is and what to fetch; a :class:`TrainReceipt` tells the coordinator which update
the edge pushed and what it cost. Both convert to and from Flower ``ConfigRecord`` /
``MetricRecord`` in exactly one place (this module).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from flwr.app import ConfigRecord, MetricRecord

from fedsqueeze.errors import ConfigError

CONTROL_KEY = "fedsqueeze"
RECEIPT_KEY = "fedsqueeze-receipt"


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

    def to_record(self) -> ConfigRecord:
        """As a Flower ``ConfigRecord``."""
        return ConfigRecord(dict(asdict(self)))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundInstruction:
        """From a ``ConfigRecord``; raises :class:`ConfigError` if fields are missing."""
        instruction: RoundInstruction = _from_mapping(cls, dict(record))
        return instruction


@dataclass(frozen=True)
class TrainReceipt:
    """What an edge reports after a training round.

    Attributes
    ----------
    update_id
        The id of the update it pushed on the data plane.
    held
        Hex digest of the model it holds (what it decoded, and trained from).
    num_examples, loss
        Local training set size and last-epoch loss.
    bytes_down, bytes_up
        Data-plane bytes counted on the wire this round.
    train_seconds, fetch_seconds, push_seconds
        Wall time spent.
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

    def to_records(self) -> tuple[ConfigRecord, MetricRecord]:
        """The ids as a ``ConfigRecord``, the numbers as a ``MetricRecord``."""
        ids = ConfigRecord({"update_id": self.update_id, "held": self.held})
        metrics = MetricRecord(
            {
                "num-examples": self.num_examples,
                "loss": self.loss,
                "bytes-down": self.bytes_down,
                "bytes-up": self.bytes_up,
                "train-seconds": self.train_seconds,
                "fetch-seconds": self.fetch_seconds,
                "push-seconds": self.push_seconds,
            }
        )
        return ids, metrics

    @classmethod
    def from_records(cls, ids: ConfigRecord, metrics: MetricRecord) -> TrainReceipt:
        """Inverse of :meth:`to_records`."""
        merged: dict[str, Any] = {k.replace("-", "_"): v for k, v in dict(metrics).items()}
        merged.update(dict(ids))
        receipt: TrainReceipt = _from_mapping(cls, merged)
        return receipt


def _from_mapping(cls: type[Any], values: dict[str, Any]) -> Any:
    kwargs = {}
    for f in fields(cls):
        if f.name in values:
            kwargs[f.name] = values[f.name]
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"incomplete {cls.__name__}: {exc}") from exc
