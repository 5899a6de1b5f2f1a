"""The settings of one federated run, read once from Flower's run config.

Flower hands both apps a flat, string-keyed ``run_config`` (``[tool.flwr.app.config]``
in ``pyproject.toml``, overridden by ``flwr run --run-config`` or the simulation
runner). :meth:`RunSettings.from_run_config` turns it into a frozen, validated object at
the edge of the program; nothing below reads string keys.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedsqueeze.codec.spec import CodecSpec
from fedsqueeze.codec.spec_text import parse_freeze, parse_spec
from fedsqueeze.errors import ConfigError
from fedsqueeze.tasks.base import Optimizer

#: ``freeze`` value that takes the task's frozen patterns.
AUTO_FREEZE = "auto"


def check_freeze(text: str, where: str) -> None:
    """Refuse a ``freeze`` value that is neither ``auto`` nor valid patterns.

    Raises
    ------
    ConfigError
        ``{where}freeze=...: why``, in one line.
    """
    if text.strip() == AUTO_FREEZE:
        return
    try:
        parse_freeze(text)
    except ValueError as exc:
        raise ConfigError(f"{where}freeze={text!r}: {exc}") from None


class Partitioning(enum.Enum):
    """How the training set is split among clients."""

    IID = "iid"
    DIRICHLET = "dirichlet"
    NATURAL = "natural"
    """Along the task's natural groups (``minilm-text``: each client holds a few modules)."""


class StrategyName(enum.Enum):
    """The Flower strategy the coordinator wraps."""

    FEDAVG = "fedavg"
    FEDAVGM = "fedavgm"
    """FedAvg with server momentum (``server-lr``, ``server-momentum``): the round's
    average step is accumulated into a momentum buffer the global model follows."""
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDMEDIAN = "fedmedian"
    FEDTRIMMEDAVG = "fedtrimmedavg"


class Aggregation(enum.Enum):
    """How the coordinator combines a round's client models into the global one."""

    AVERAGE = "average"
    """The wrapped Flower strategy's aggregate (FedAvg's weighted average by default)."""
    FEDDF = "feddf"
    """FedDF fusion: the average, then distilled towards the ensemble's averaged logits on
    the coordinator's proxy set (needs ``strategy = fedavg``)."""


class StudentToTeacher(enum.Enum):
    """What the teacher is distilled towards when it learns from the students."""

    UPDATE = "update"
    """The averaged teacher plus the students' change over the round."""
    ENSEMBLE = "ensemble"
    """The example-weighted ensemble of the teacher and the student."""


MAX_INLINE_BYTES = 65536
"""The most ``inline-bytes`` a run may set: model bytes ride in Flower's messages only
when small; anything larger belongs on the data plane (segments, resumption, limits)."""


@dataclass(frozen=True)
class RunSettings:
    """Everything both sides of a run agree on.

    Run-config keys are the field names with ``-`` for ``_`` (``num-rounds``).
    ``max-failed-rounds`` is how many rounds may aggregate nothing (every edge failed,
    was rejected or was dropped) before the coordinator stops the run as failed.
    ``freeze`` names the frozen tensors, which travel at most once and are never
    aggregated: ``auto`` (the default) takes the task's own (``frozen.*`` for
    ``minilm-text``, none for the digits tasks), ``none`` freezes nothing, anything else
    is glob patterns joined by ``|``. Patterns given by the codec specs' ``freeze`` key
    count as well.

    Students and fusion: ``student-refresh-every = N`` (0: off) runs a student track
    beside the global model (:mod:`coordinator.student_track`), refreshed by distilling
    the global model into it every N rounds; edges with a per-round download budget of
    at most ``student-budget`` bytes (or, in simulations, on weak links) train it.
    ``student-down-budget`` and ``student-up-budget`` are those edges' own per-round
    budgets in data-plane bytes (0: ``down-budget`` / ``up-budget``): a student a
    fraction of the teacher's size need not cost a teacher's round.
    ``aggregation = "feddf"`` fuses each round's client models by ensemble distillation
    (:mod:`coordinator.fusion`). Both distil on ``proxy-size`` training examples the
    coordinator holds, for ``distill-epochs`` epochs at ``distill-temperature``.
    ``student-lr`` is the student edges' local learning rate (0: ``lr``): a compact
    student is not stable at every rate its teacher is. ``student-from-teacher = false``
    never distils the teacher into the student: the student track is then federated
    alone (the honest baseline of a distilled student). ``fusion-warmup = N`` averages
    the first N rounds plainly before FedDF fusion takes over (fusing near-random models
    only spreads their noise). ``student-to-teacher-epochs = N`` (0: off) lets the teacher
    learn from the students: each round, N epochs of distillation on the proxy set towards
    the averaged teacher plus the students' change over the round (``student-to-teacher =
    "update"``) or towards the teacher-student ensemble (``"ensemble"``); see
    :mod:`coordinator.student_track`.

    ``inline-bytes = N`` (0: off, at most :data:`MAX_INLINE_BYTES`) lets payloads of at
    most N encoded bytes travel inside the Flower messages instead of the data plane: a
    download in the edge's instruction, an update in its receipt. At a few kB per
    client-round this saves the data plane's requests and acknowledgements (about 300 B);
    larger payloads, progressive downloads and the student track keep the data plane.

    ``coordinator-device`` (``cpu``, ``cuda``, ``cuda:N``) is where the coordinator
    decodes updates and computes their differences, clipping and merge; the wrapped Flower
    strategy then averages the merged models as always.
    """

    task: str = "digits-cnn"
    seed: int = 0
    num_rounds: int = 3
    partitioning: Partitioning = Partitioning.IID
    alpha: float = 0.5
    strategy: StrategyName = StrategyName.FEDAVG
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    fraction_evaluate: float = 0.0
    epochs: int = 1
    lr: float = 0.05
    optimizer: Optimizer = Optimizer.SGD
    batch_size: int = 32
    l1_lambda: float = 0.0
    proximal_mu: float = 0.0
    server_lr: float = 1.0
    server_momentum: float = 0.0
    down_spec: str = "int8"
    up_spec: str = "topk10-int4"
    down_budget: int = 0
    up_budget: int = 0
    inline_bytes: int = 0
    clip_norm: float = 0.0
    coordinator_device: str = "cpu"
    init_from_seed: bool = True
    state_dir: str = "fedsqueeze-state"
    keep_versions: int = 32
    resume: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    data_plane_host: str = "127.0.0.1"
    data_plane_port: int = 0
    data_plane_advertise: str = ""
    round_timeout: float = 600.0
    max_failed_rounds: int = 0
    freeze: str = "auto"
    aggregation: Aggregation = Aggregation.AVERAGE
    student_refresh_every: int = 0
    student_budget: int = 0
    student_down_budget: int = 0
    student_up_budget: int = 0
    student_lr: float = 0.0
    student_from_teacher: bool = True
    student_to_teacher_epochs: int = 0
    student_to_teacher: StudentToTeacher = StudentToTeacher.UPDATE
    fusion_warmup: int = 0
    proxy_size: int = 360
    hold_out_proxy: bool = False
    distill_epochs: int = 40
    distill_temperature: float = 4.0

    def __post_init__(self) -> None:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.coordinator_device)):
            raise ConfigError(
                f"coordinator-device must be cpu, cuda or cuda:N, got {self.coordinator_device!r}"
            )
        if not 0 <= self.inline_bytes <= MAX_INLINE_BYTES:
            raise ConfigError(
                f"inline-bytes must be in [0, {MAX_INLINE_BYTES}], got {self.inline_bytes}"
            )
        if self.num_rounds < 1:
            raise ConfigError(f"num-rounds must be >= 1, got {self.num_rounds}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if self.min_train_nodes < 1 or self.min_available_nodes < 1:
            raise ConfigError(
                "min-train-nodes and min-available-nodes must be >= 1, got "
                f"{self.min_train_nodes} and {self.min_available_nodes}"
            )
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ConfigError(f"fraction-evaluate must be in [0, 1], got {self.fraction_evaluate}")
        if self.alpha <= 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")
        if self.epochs < 1 or self.lr <= 0 or self.batch_size < 1:
            raise ConfigError("epochs, lr and batch-size must be positive")
        if not 0 <= self.data_plane_port <= 65535:
            raise ConfigError(f"data-plane-port must be a port number, got {self.data_plane_port}")
        if not self.server_lr > 0 or not 0.0 <= self.server_momentum < 1.0:
            raise ConfigError(
                f"server-lr must be > 0 and server-momentum in [0, 1), got {self.server_lr} "
                f"and {self.server_momentum}"
            )
        if (self.server_lr != 1.0 or self.server_momentum) and (
            self.strategy is not StrategyName.FEDAVGM
        ):
            raise ConfigError("server-lr and server-momentum need strategy = fedavgm")
        if self.round_timeout <= 0:
            raise ConfigError("round-timeout must be > 0")
        if self.max_failed_rounds < 0:
            raise ConfigError(f"max-failed-rounds must be >= 0, got {self.max_failed_rounds}")
        if self.aggregation is Aggregation.FEDDF and self.strategy is not StrategyName.FEDAVG:
            raise ConfigError("aggregation = feddf fuses FedAvg's clients: needs strategy = fedavg")
        if min(self.student_refresh_every, self.student_budget, self.distill_epochs) < 0:
            raise ConfigError("student-refresh-every, student-budget, distill-epochs must be >= 0")
        if min(self.student_down_budget, self.student_up_budget) < 0:
            raise ConfigError(
                "student-down-budget and student-up-budget must be >= 0 bytes (0: "
                f"down-budget / up-budget), got {self.student_down_budget} and "
                f"{self.student_up_budget}"
            )
        if (self.student_down_budget or self.student_up_budget) and not self.student_refresh_every:
            raise ConfigError(
                "student-down-budget and student-up-budget need a student track "
                "(student-refresh-every >= 1)"
            )
        if self.student_lr < 0:
            raise ConfigError(f"student-lr must be >= 0 (0: lr), got {self.student_lr}")
        if self.student_to_teacher_epochs < 0:
            raise ConfigError(
                f"student-to-teacher-epochs must be >= 0 (0: off), got "
                f"{self.student_to_teacher_epochs}"
            )
        if self.student_to_teacher_epochs and not self.student_refresh_every:
            raise ConfigError("student-to-teacher-epochs needs a student track")
        if self.fusion_warmup < 0:
            raise ConfigError(f"fusion-warmup must be >= 0, got {self.fusion_warmup}")
        if self.proxy_size < 1 or not self.distill_temperature > 0:
            raise ConfigError("proxy-size must be >= 1 and distill-temperature > 0")
        # Fail at start-up, not in round 7, on a spec typo.
        self.down_codec()
        self.up_codec()
        check_freeze(self.freeze, "run-config ")

    def frozen(self, task_frozen: tuple[str, ...]) -> tuple[str, ...]:
        """The run's frozen patterns, sorted: ``freeze`` (``auto``: ``task_frozen``, the
        task's own) with those of both codec specs."""
        text = self.freeze.strip()
        chosen = task_frozen if text == AUTO_FREEZE else parse_freeze(text)
        return tuple(sorted({*chosen, *self.down_codec().freeze, *self.up_codec().freeze}))

    @property
    def held_out_proxy(self) -> int:
        """How many training examples the coordinator holds out as its proxy set: 0
        unless distillation needs one (a student track or FedDF fusion) or
        ``hold-out-proxy`` asks (a sweep gives every arm the same client data). The edges
        partition the rest, so no example is both a client's and the coordinator's."""
        distils = self.student_refresh_every or self.aggregation is Aggregation.FEDDF
        if distils or self.hold_out_proxy:
            return self.proxy_size
        return 0

    def down_codec(self) -> CodecSpec:
        """The download spec."""
        return parse_spec(self.down_spec)

    def up_codec(self) -> CodecSpec:
        """The update spec."""
        return parse_spec(self.up_spec)

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> RunSettings:
        """Read and validate; unknown keys are an error (a typo would be silently ignored)."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in config.items():
            f = known.get(key)
            if f is None:
                raise ConfigError(
                    f"unknown run-config key {key!r}; known keys: {', '.join(sorted(known))}"
                )
            kwargs[f.name] = _coerce(key, value, f.type)
        return cls(**kwargs)

    def to_run_config(self) -> dict[str, str | int | float | bool]:
        """The flat form Flower carries (inverse of :meth:`from_run_config`)."""
        out: dict[str, str | int | float | bool] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name.replace("_", "-")] = value.value if isinstance(value, enum.Enum) else value
        return out


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    kind = str(annotation)
    try:
        if kind == "Partitioning":
            return Partitioning(str(value).lower())
        if kind == "StrategyName":
            return StrategyName(str(value).lower())
        if kind == "Aggregation":
            return Aggregation(str(value).lower())
        if kind == "StudentToTeacher":
            return StudentToTeacher(str(value).lower())
        if kind == "Optimizer":
            return Optimizer(str(value).lower())
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            return bool(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except ValueError as exc:
        raise ConfigError(f"run-config {key}={value!r}: expected {kind}") from exc
