"""The strategies a sweep can compare ("arms"), and the ones the default sweep runs.

=================  ==========================================================================
arm                what travels
=================  ==========================================================================
``fedavg-fp32``    plain Flower FedAvg: fp32 weights in Flower's own messages, no fedsqueeze
                   code in the loop (the reference every ratio is measured against)
``fp16``           fedsqueeze data plane, models and updates as fp16 deltas
``int8``           fedsqueeze data plane, models and updates as 8-bit deltas
``topk-ef``        fedsqueeze data plane, exact fp32 model deltas down; updates top-k 10%
                   with error feedback, fp32 values (the classic uplink-only compression)
``adaptive``       fedsqueeze with the adaptive budget policy: per client and round, the
                   least-error download (a sparse, low-bit delta against what the client
                   holds) and upload (low-rank factors with error feedback, 4-bit
                   values) that fit 3.7 kB down and 2.4 kB up on the data plane
                   (together 1/50 of an fp32 model down and up) and the client's link
                   within the round deadline, if any
``progressive``    (not in the default sweep) a progressive download (a sparse 2-bit
                   k-means delta in levels of 1+1 bits against what the client holds, the
                   densest of 80-99% sparsity whose base level fits) truncated to the
                   client's budget and deadline instead of a skip or a drop; uploads as
                   ``adaptive``, within the same 3.7 kB / 2.4 kB
``distill``        (not in the default sweep) ``adaptive``, and a student track: clients
                   on 2g, iot-lpwan and satellite links train the task's compact student
                   at their own lr 0.01 (its own versions and aggregation, refreshed by
                   distilling the global model on the coordinator's proxy set after
                   every round), the rest the global model; the student edges' budgets
                   are 595 B down / 531 B up (``adaptive``'s scaled by the student's
                   size, see ``STUDENT_DOWN_BUDGET``)
``student-fedavg`` (not in the default sweep) the honest baseline of ``distill``: the
                   same clients train the same student at the sweep's lr, federated
                   alone, never distilled from the global model, within the same
                   student budgets
``adaptive-feddf`` (not in the default sweep) ``adaptive`` with FedDF fusion as the
                   aggregation after 10 rounds of plain averaging (a warm-up): the same
                   bytes, the average distilled for 40 epochs towards the clients'
                   ensemble on the proxy set
``frontier``       (not in the default sweep) ``adaptive`` with the download as low-rank
                   factors of the delta an edge lacks (4-bit values, the highest rank of
                   16 … 1 that fits 2.2 kB: no position bytes) and server momentum 0.5
                   (FedAvgM) on the coordinator; uploads as ``adaptive`` within 2.4 kB
``sparse``         (not in the default sweep) fixed specs: 95%-sparse 2-bit model deltas
                   down, top-k 5% 2-bit updates with error feedback up
=================  ==========================================================================

Every fedsqueeze arm rebuilds the initial model on the client from the shared seed (and
installed weights), and asks for deltas against the version it holds, unless the arm sets
``first-delivery``: then each edge's first download is the whole model under that spec,
frozen tensors included, outside the arm's budget and counted like every other byte.

An arm may train its own task (``task``, e.g. ``minilm-text@unfreeze-top=6`` for full
fine-tuning beside adapter arms). A plain Flower arm honours ``freeze`` too: the frozen
tensors are left out of Flower's messages and each client keeps its own copy (what a
FlowerTune client does with its base model); the preset ``fedavg-fp32`` freezes nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from coordinator.budget import PolicyKind
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.errors import ConfigError
from fedsqueeze.runconfig import (
    AUTO_FREEZE,
    MAX_INLINE_BYTES,
    Aggregation,
    StrategyName,
    StudentToTeacher,
    check_freeze,
)
from fedsqueeze.tasks.base import Optimizer

__all__ = [
    "ADAPTIVE_DOWN_LADDER",
    "ADAPTIVE_UP_LADDER",
    "ARM_PRESETS",
    "DEFAULT_ARMS",
    "DISTILLED_STUDENT_LR",
    "FRONTIER_DOWN_BUDGET",
    "FRONTIER_DOWN_LADDER",
    "FRONTIER_ENTROPY",
    "FRONTIER_INLINE_BYTES",
    "FRONTIER_UP_BUDGET",
    "FRONTIER_UP_LADDER",
    "STUDENT_DOWN_BUDGET",
    "STUDENT_UP_BUDGET",
    "WEAK_LINKS",
    "ArmConfig",
    "ArmKind",
]


_ALL = ",targets=*,min-ndim=1"
ADAPTIVE_DOWN_LADDER: tuple[str, ...] = tuple(
    spec + _ALL
    for spec in (
        "quant=8",
        "quant=4",
        "prune=l1:0.8,quant=4:kmeans",
        "prune=l1:0.9,quant=2:kmeans",
        "prune=l1:0.93,quant=2:kmeans",
        "prune=l1:0.95,quant=2:kmeans",
        "prune=l1:0.96,quant=2:kmeans",
        "prune=l1:0.97,quant=2:kmeans",
        "prune=l1:0.98,quant=2:kmeans",
        "prune=l1:0.99,quant=2:kmeans",
    )
)
"""Download specs of the adaptive policy, least expected error first. Past 80% sparsity
2-bit values win: positions cost 5-7 bits per kept value, so 2-bit values keep about
twice as many entries as 4-bit ones for 1.4 times the bytes, and what they round away
stays in the delta the edge still lacks, to be sent later."""

ADAPTIVE_UP_LADDER: tuple[str, ...] = tuple(
    spec + _ALL
    for spec in (
        "rank=16,quant=4",
        "rank=12,quant=4",
        "rank=10,quant=4",
        "rank=8,quant=4",
        "rank=6,quant=4",
        "rank=5,quant=4",
        "rank=4,quant=4",
        "rank=3,quant=4",
        "rank=2,quant=4",
        "rank=1,quant=4",
        "rank=1,quant=2:kmeans",
    )
)
"""Upload specs of the adaptive policy (low-rank with error feedback), least error first.

A client's update after a few local steps lies mostly in a few directions, so its
truncated SVD beats top-k at every size: on the default sweep's kind of update rank 3
with 4-bit values (about 1.2 kB) misses 9 % of its squared norm and rank 5 (about
1.7 kB) 5 %, where top-5 % with 2-bit k-means values (about 1.7 kB) misses 43 %
(``python -m tests.codec.test_lowrank``).
4-bit affine codes of the factors are near-Gaussian and zstandard squeezes them below
3-bit k-means codes at lower error."""


FRONTIER_ENTROPY = ",entropy=ans:19"
"""The ``frontier`` arm's zstandard level (the specs' default is 3). On its 2 kB low-rank
payloads level 19 saves about 3% (seed 0's final model against 8 edges: rank 5 1,819 →
1,766 B, rank 6 2,047 → 1,986 B; levels 19 and 22 equal, 9 saves 1.2%), in the same
format: the level is the encoder's choice, decoding is the same. At 2 kB a payload
the extra encoding time is a millisecond."""

FRONTIER_DOWN_LADDER: tuple[str, ...] = tuple(
    f"rank={rank},quant=4" + FRONTIER_ENTROPY + _ALL for rank in (16, 12, 10, 8, 6, 5, 4, 3, 2, 1)
)
"""Download specs of the ``frontier`` arm: the delta an edge lacks as low-rank factors
with 4-bit values, highest rank first. The global model moves by averages of low-rank
updates, so the delta against what an edge holds is nearly low-rank too, and factors
need no position bytes: on the default sweep's final model against what each edge
held (seed 0, 8 edges, ``simulations.progressive_rd``-style re-encoding) rank 4 costs
1,379 B for a relative L2 error of 0.664, rank 6 1,937 B for 0.564 and rank 12 3,041 B
for 0.496, where the adaptive ladder's ``prune=l1:0.9,quant=2:kmeans`` costs 3,250 B
for 0.651 (BENCHMARKS.md, "Frontier")."""


FRONTIER_DOWN_BUDGET, FRONTIER_UP_BUDGET = 2060, 2250
"""The ``frontier`` arm's byte budgets per client-round, so that the ANS coder's saving is
bytes, not fidelity: the policy picks the ranks it picked with zstd 19 and budgets of
2,200 B down and 2,400 B up. Each is the policy's fixed allowance for framing (150 B
down, 220 B up, :mod:`coordinator.budget`) plus 0.93 times the rest: the ANS coder makes
the policy's own payload sizes 7% smaller (its expected sizes of random rank-3 to
rank-8 updates: 0.927 to 0.943 of zstd 19's; seed 0's final model against 6 edges'
versions at rank 6: 2,017 → 1,859 B). Rank 5 uploads (expected 2,010 B + 220) fit and
rank 6 (2,297 B + 220) do not, as with zstd (2,169 / 2,462 B against 2,400); the
downloads keep rank 6 where it fitted."""

FRONTIER_INLINE_BYTES = 4096
"""The ``frontier`` arm's ``inline-bytes``: its payloads (about 1.9 kB down, 1.7 kB up)
ride inside the Flower messages, which saves the data plane's requests and
acknowledgements: about 315 B per client-round of 4.5 kB (BENCHMARKS.md, "Frontier")."""


FRONTIER_UP_LADDER: tuple[str, ...] = tuple(
    spec.replace(_ALL, FRONTIER_ENTROPY + _ALL) for spec in ADAPTIVE_UP_LADDER
)
"""Upload specs of the ``frontier`` arm: the adaptive ladder at zstandard level 19."""


PROGRESSIVE_DOWN_SPEC = "prune=l1:0.95,quant=4,levels=2+2" + _ALL
"""The ``progressive`` arm's download spec before its ladder (a 95%-sparse delta whose base
level, 2 bits and the positions, is about 1.9 kB for the digits CNN); kept for configs
that name it."""

PROGRESSIVE_DOWN_LADDER: tuple[str, ...] = tuple(
    f"prune=l1:{sparsity},quant=2:kmeans,levels=1+1" + _ALL
    for sparsity in (
        "0.8",
        "0.82",
        "0.84",
        "0.86",
        "0.88",
        "0.9",
        "0.91",
        "0.92",
        "0.93",
        "0.94",
        "0.95",
        "0.96",
        "0.97",
        "0.98",
        "0.99",
    )
)
"""Download specs of the ``progressive`` arm, densest first: 2-bit k-means values sent as
1+1 nested levels (the 1-bit level names a half of the sorted codebook). The policy takes
the densest whose base level fits a client's budget and the refinement fills the rest
until truncation. Measured on digits CNN round deltas of the deadline sweep (3,550 B of
payload, six edges): this family decodes at a relative L2 error of 0.660 for 3,420 B,
4-bit k-means in 2+2 levels at 0.723 and 4-bit affine in 2+2 levels (the arm's spec
before) at 0.711 for the same bytes, flat 2-bit k-means (the adaptive ladder's choice)
at 0.663 for 3,247 B."""


class ArmKind(enum.Enum):
    """Whether an arm is plain Flower or runs through fedsqueeze."""

    FLOWER = "flower"
    FEDSQUEEZE = "fedsqueeze"


@dataclass(frozen=True)
class ArmConfig:
    """One strategy of a sweep.

    Attributes
    ----------
    name
        Its name in tables, files and ``--set arm.NAME.key=value`` flags.
    kind
        Plain Flower or fedsqueeze.
    down_spec, up_spec
        Codec specs (text form) of the fixed policy.
    policy
        Fixed specs, or adaptive ladders.
    down_ladder, up_ladder
        The adaptive policy's specs, least expected error first.
    down_budget, up_budget
        Per client and round, data-plane wire bytes (0: no limit).
    total_budget
        For the whole run, data-plane wire bytes (0: none).
    budget_fraction
        For the whole run, as a fraction of what fp32 FedAvg would move with the same
        sampling (model bytes × 2 × clients per round × rounds); 0: none.
    down_share
        The part of a run budget reserved for downloads.
    freeze
        The run's frozen tensors (run config ``freeze``): ``auto`` (the task's own,
        ``frozen.*`` for ``minilm-text``), ``none``, or glob patterns joined by ``|``.
    student_links
        Link profile names whose clients train the student (empty: no student track).
    student_refresh_every
        With ``student_links``: distil the global model into the student every N rounds.
    student_lr
        With ``student_links``: the student edges' local learning rate (0: the arm's).
    student_from_teacher
        With ``student_links``: ``False`` never distils the global model into the student
        (the student is federated alone: the baseline of ``distill``).
    student_to_teacher_epochs
        With ``student_links``: epochs of distillation by which the teacher learns from the
        students every round (0: off; :mod:`coordinator.student_track`).
    student_to_teacher
        What the teacher is distilled towards then: ``update`` or ``ensemble``.
    student_down_budget, student_up_budget
        With ``student_links``: the student edges' own per-round budgets, data-plane wire
        bytes (0: ``down_budget`` / ``up_budget``, the arm's).
    fusion_warmup
        With FedDF fusion: rounds of plain averaging before fusion takes over.
    distill_epochs
        Epochs of each distillation (student refresh, FedDF fusion) on the proxy set.
    aggregation
        Averaging, or FedDF fusion on the coordinator's proxy set.
    task
        The task this arm trains ('': the sweep's ``task``). Every arm uses the same data
        split only if their tasks load the same data.
    lr
        This arm's local learning rate (0: the sweep's ``lr``), for arms that train
        different parameters (full fine-tuning wants a smaller one than adapters).
    optimizer
        This arm's local optimizer: ``sgd`` (momentum 0.9, the default) or ``adam`` (a
        fresh Adam each round, as a transformer's full fine-tuning is usually run).
    strategy
        The Flower strategy the coordinator wraps (fedsqueeze arms only): ``fedavg``, or
        ``fedavgm`` (server momentum) with ``server_lr`` and ``server_momentum``.
    server_lr, server_momentum
        With ``fedavgm``: the global model moves by ``server_lr`` times a momentum buffer
        ``m = server_momentum · m + (average − global)``.
    first_delivery
        Codec spec of each edge's first download, the whole model, frozen tensors
        included ('': edges rebuild the initial model themselves, no bytes). Fedsqueeze
        arms only; sent whatever the budget, and counted.
    inline_bytes
        Payloads of at most this many encoded bytes travel inside the Flower messages
        instead of the data plane (run setting ``inline-bytes``; 0: never). Fedsqueeze
        arms only; every byte is still counted, in the control columns.
    """

    name: str
    kind: ArmKind = ArmKind.FEDSQUEEZE
    down_spec: str = "int8"
    up_spec: str = "topk10-int4"
    policy: PolicyKind = PolicyKind.FIXED
    down_ladder: tuple[str, ...] = ADAPTIVE_DOWN_LADDER
    up_ladder: tuple[str, ...] = ADAPTIVE_UP_LADDER
    down_budget: int = 0
    up_budget: int = 0
    total_budget: int = 0
    budget_fraction: float = 0.0
    down_share: float = 0.5
    freeze: str = AUTO_FREEZE
    student_links: tuple[str, ...] = ()
    student_refresh_every: int = 5
    student_lr: float = 0.0
    student_from_teacher: bool = True
    student_to_teacher_epochs: int = 0
    student_to_teacher: StudentToTeacher = StudentToTeacher.UPDATE
    student_down_budget: int = 0
    student_up_budget: int = 0
    fusion_warmup: int = 0
    distill_epochs: int = 40
    aggregation: Aggregation = Aggregation.AVERAGE
    task: str = ""
    lr: float = 0.0
    optimizer: Optimizer = Optimizer.SGD
    strategy: StrategyName = StrategyName.FEDAVG
    server_lr: float = 1.0
    server_momentum: float = 0.0
    first_delivery: str = ""
    inline_bytes: int = 0
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in " ,./\\") or self.name != self.name.lower():
            raise ConfigError(f"arm name {self.name!r}: lower case, no spaces, commas or slashes")
        for text in (self.down_spec, self.up_spec, *self.down_ladder, *self.up_ladder):
            parse_spec(text)
        if self.first_delivery:
            parse_spec(self.first_delivery)
            if self.kind is ArmKind.FLOWER:
                raise ConfigError(f"arm {self.name}: first-delivery needs a fedsqueeze arm")
        if not self.down_ladder or not self.up_ladder:
            raise ConfigError(f"arm {self.name}: ladders need at least one spec")
        if self.lr < 0:
            raise ConfigError(f"arm {self.name}: lr must be > 0 (or 0: the sweep's)")
        if min(self.down_budget, self.up_budget, self.total_budget) < 0:
            raise ConfigError(f"arm {self.name}: budgets must be >= 0")
        if not 0.0 <= self.budget_fraction < 1.0:
            raise ConfigError(f"arm {self.name}: budget-fraction must be in [0, 1)")
        if not 0.0 < self.down_share < 1.0:
            raise ConfigError(f"arm {self.name}: down-share must be in (0, 1)")
        if self.student_refresh_every < 1:
            raise ConfigError(f"arm {self.name}: student-refresh-every must be >= 1")
        if self.student_lr < 0:
            raise ConfigError(f"arm {self.name}: student-lr must be >= 0 (0: the arm's lr)")
        if self.fusion_warmup < 0 or self.distill_epochs < 0:
            raise ConfigError(f"arm {self.name}: fusion-warmup and distill-epochs must be >= 0")
        if self.fusion_warmup and self.aggregation is not Aggregation.FEDDF:
            raise ConfigError(f"arm {self.name}: fusion-warmup needs aggregation = feddf")
        if self.student_to_teacher_epochs < 0:
            raise ConfigError(f"arm {self.name}: student-to-teacher-epochs must be >= 0 (0: off)")
        if min(self.student_down_budget, self.student_up_budget) < 0:
            raise ConfigError(
                f"arm {self.name}: student-down-budget and student-up-budget must be >= 0 "
                "(0: the arm's budgets)"
            )
        if (
            self.student_lr
            or not self.student_from_teacher
            or self.student_to_teacher_epochs
            or self.student_down_budget
            or self.student_up_budget
        ) and not self.student_links:
            raise ConfigError(
                f"arm {self.name}: student-lr, student-from-teacher, student-to-teacher-epochs "
                "and the student budgets need student-links"
            )
        if (self.student_links or self.aggregation is not Aggregation.AVERAGE) and (
            self.kind is ArmKind.FLOWER
        ):
            raise ConfigError(f"arm {self.name}: students and fusion need a fedsqueeze arm")
        if self.total_budget and self.budget_fraction:
            raise ConfigError(f"arm {self.name}: give total-budget or budget-fraction, not both")
        if self.strategy is not StrategyName.FEDAVG and self.kind is ArmKind.FLOWER:
            raise ConfigError(
                f"arm {self.name}: strategy {self.strategy.value} needs a fedsqueeze arm"
            )
        if not self.server_lr > 0 or not 0.0 <= self.server_momentum < 1.0:
            raise ConfigError(
                f"arm {self.name}: server-lr must be > 0 and server-momentum in [0, 1)"
            )
        if (self.server_lr != 1.0 or self.server_momentum) and (
            self.strategy is not StrategyName.FEDAVGM
        ):
            raise ConfigError(
                f"arm {self.name}: server-lr and server-momentum need strategy = fedavgm"
            )
        if not 0 <= self.inline_bytes <= MAX_INLINE_BYTES:
            raise ConfigError(f"arm {self.name}: inline-bytes must be in [0, {MAX_INLINE_BYTES}]")
        if self.inline_bytes and self.kind is ArmKind.FLOWER:
            raise ConfigError(f"arm {self.name}: inline-bytes needs a fedsqueeze arm")
        check_freeze(self.freeze, f"arm {self.name}: ")

    @property
    def budgeted(self) -> bool:
        """Whether a budget limits this arm's specs (adaptive, or fixed with a budget)."""
        return self.kind is ArmKind.FEDSQUEEZE and (
            self.policy in (PolicyKind.ADAPTIVE, PolicyKind.PROGRESSIVE)
            or bool(self.down_budget or self.up_budget or self.total_budget)
            or self.budget_fraction > 0
        )


WEAK_LINKS: tuple[str, ...] = ("2g", "iot-lpwan", "satellite")
"""The link profiles whose clients train the student in ``distill`` and ``student-fedavg``."""

DISTILLED_STUDENT_LR = 0.01
"""The student edges' learning rate in ``distill``. A student distilled from the teacher
has sharp, large logits (their spread is the teacher's); at the sweep's lr 0.1 (SGD,
momentum 0.9) two epochs on a few dozen non-IID images blow it up to one class in
every seed of the offline replica (BENCHMARKS.md), at 0.01 it keeps what distillation
gave it. A student trained from scratch has small logits and learns best at 0.1:
``student-fedavg`` keeps the sweep's lr."""

STUDENT_DOWN_BUDGET = 595
"""The student edges' download budget in ``distill`` and ``student-fedavg``, wire bytes
per round: ``adaptive``'s payload allowance scaled by the student/teacher size ratio,
the message's fixed overhead added back, ``150 + (3700 - 150) * 4794 / 38282`` (digits
CNN: 4,794 student parameters, 38,282 teacher ones; 150 B is
:data:`coordinator.budget.DOWN_OVERHEAD_BYTES`). Every parameter gets the payload bytes a
teacher parameter gets; the manifest and receipt cost the same for either model. With the
teacher's budget the student fitted 8-bit deltas whole (about 2.6 kB a round)."""

STUDENT_UP_BUDGET = 531
"""The student edges' upload budget, wire bytes per round: the same scaling,
``220 + (2400 - 220) * 4794 / 38282 = 493``, raised to the smallest upload rung's bound
for the student (``rank=1,quant=2:kmeans``: 531 B with
:data:`coordinator.budget.UP_OVERHEAD_BYTES`), below which every student edge would be
skipped. Both values are derived, never tuned on sweep results; the test
``tests/simulations/test_distill_arm.py`` recomputes them from the models and the ladder."""

_ADAPTIVE = ArmConfig(
    "adaptive",
    policy=PolicyKind.ADAPTIVE,
    down_budget=3700,
    up_budget=2400,
    description="adaptive specs within 3.7 kB down / 2.4 kB up per client and round",
)
"""The ``adaptive`` preset, which ``distill`` and ``adaptive-feddf`` extend."""

ARM_PRESETS: Mapping[str, ArmConfig] = {
    "fedavg-fp32": ArmConfig(
        "fedavg-fp32",
        kind=ArmKind.FLOWER,
        freeze="none",
        description="plain Flower FedAvg, fp32 weights in Flower messages",
    ),
    "fp16": ArmConfig("fp16", down_spec="fp16", up_spec="fp16", description="fp16 deltas"),
    "int8": ArmConfig("int8", down_spec="int8", up_spec="int8", description="8-bit deltas"),
    "topk-ef": ArmConfig(
        "topk-ef",
        down_spec="lossless",
        up_spec="topk=0.1,targets=*,min-ndim=1",
        description="fp32 deltas down, top-k 10% + error feedback up",
    ),
    "adaptive": _ADAPTIVE,
    "progressive": ArmConfig(
        "progressive",
        policy=PolicyKind.PROGRESSIVE,
        down_spec=PROGRESSIVE_DOWN_SPEC,
        down_ladder=PROGRESSIVE_DOWN_LADDER,
        down_budget=3700,
        up_budget=2400,
        description="progressive downloads truncated to 3.7 kB and the deadline, "
        "adaptive uploads within 2.4 kB",
    ),
    "distill": replace(
        _ADAPTIVE,
        name="distill",
        student_links=WEAK_LINKS,
        student_lr=DISTILLED_STUDENT_LR,
        # Every round, not every 5: the student's quality comes from the refreshes, and on
        # three seeds it then ends higher and steadier, with fewer bytes (BENCHMARKS.md).
        student_refresh_every=1,
        student_down_budget=STUDENT_DOWN_BUDGET,
        student_up_budget=STUDENT_UP_BUDGET,
        description="adaptive; clients on 2g, iot-lpwan and satellite train the student "
        f"(lr {DISTILLED_STUDENT_LR}), refreshed from the global model every round, within "
        f"{STUDENT_DOWN_BUDGET} B down / {STUDENT_UP_BUDGET} B up",
    ),
    "student-fedavg": replace(
        _ADAPTIVE,
        name="student-fedavg",
        student_links=WEAK_LINKS,
        student_from_teacher=False,
        student_down_budget=STUDENT_DOWN_BUDGET,
        student_up_budget=STUDENT_UP_BUDGET,
        description="adaptive; clients on 2g, iot-lpwan and satellite train the student "
        f"without a teacher (the baseline of distill), within {STUDENT_DOWN_BUDGET} B down / "
        f"{STUDENT_UP_BUDGET} B up",
    ),
    "adaptive-feddf": replace(
        _ADAPTIVE,
        name="adaptive-feddf",
        aggregation=Aggregation.FEDDF,
        # 10 of 30 rounds averaged plainly first: fusing near-random models distils noise
        # (BENCHMARKS.md; 10 distillation epochs instead of 40 measured no better).
        fusion_warmup=10,
        description="adaptive, FedDF fusion instead of averaging after 10 rounds of plain "
        "averaging",
    ),
    "frontier": replace(
        _ADAPTIVE,
        name="frontier",
        down_ladder=FRONTIER_DOWN_LADDER,
        up_ladder=FRONTIER_UP_LADDER,
        down_budget=FRONTIER_DOWN_BUDGET,
        up_budget=FRONTIER_UP_BUDGET,
        strategy=StrategyName.FEDAVGM,
        server_momentum=0.5,
        inline_bytes=FRONTIER_INLINE_BYTES,
        description="adaptive with low-rank 4-bit downloads within 2.2 kB, server momentum 0.5, "
        "zstd level 19, payloads inline in the Flower messages",
    ),
    "sparse": ArmConfig(
        "sparse",
        down_spec="prune=l1:0.95,quant=2,targets=*,min-ndim=1",
        up_spec="topk=0.05,quant=2,targets=*,min-ndim=1",
        description="95% sparse 2-bit deltas down, top-k 5% 2-bit + error feedback up",
    ),
}
"""Named arms a config can list without defining them."""

DEFAULT_ARMS: tuple[str, ...] = ("fedavg-fp32", "fp16", "int8", "topk-ef", "adaptive")
"""The default sweep's arms."""
