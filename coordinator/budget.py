"""Bandwidth budgets: which codec specs each edge gets in a round, or whether it sits out.

A budget is counted in **data-plane wire bytes** (what the transport counts: encoded
payload, manifests, requests, acknowledgements and gRPC prefixes) per edge and round,
in each direction. It comes from a fixed per-edge :class:`Budget`, from a
:class:`RunBudget` for the whole run (the bytes left, shared evenly over the rounds and
edges still to come), from the edge's link and a round deadline (what the link can move
in the time left after round trips and compute), or from all of them (the tightest wins).

A :class:`LadderPolicy` takes the first download spec that fits from a ladder ordered by
expected error (denser and more bits first; sizes fall along it, so a binary search
finds it), then does the same for the upload:

* the download's size is **exact**: the policy encodes the global model against the
  version the edge holds, with the seed the data plane will use, so it knows the payload
  to the byte before sending anything;
* the upload's size is a **bound**: the update is not known yet, so the policy encodes a
  random update of the model's shapes with entropy coding off (zstandard is only kept
  where it shrinks a record) and, for top-k and pruning specs, adds the worst case of the
  position coding beyond a random one (one bit per kept value: with the best Rice
  parameter, any gaps cost at most that much more than random ones). Low-rank and dense
  records have a size fixed by the shapes and the spec, so theirs is exact up to a few
  varint bytes;
* a **low-rank** upload rung is chosen by its *expected* size instead (the same random
  update, entropy coding on: zstandard squeezes 4-bit factor codes by about a quarter),
  as long as the bound of its rank-1 version fits too. The instruction carries the
  payload limit, and the edge lowers the rank until its update fits it
  (:func:`edge.mod.fit_update`), so the budget holds on the wire without paying for the
  worst case.

A **progressive** policy (``progressive=True``, download specs with ``levels``) never
skips an edge for its download: the instruction's download budget is what the edge's
byte limit and link time allow, and the data plane truncates the stream to the longest
prefix that fits (:mod:`fedsqueeze.transport.truncate`); the upload is chosen from the
ladder as above. With a ladder of progressive specs (denser first), the policy takes the
densest whose **base level** (every tensor's level 0: positions and the coarse codes)
fits the edge's payload, measured exactly as for a download rung, and the refinement
levels fill what is left until the data plane cuts them: one spec for every edge would
either not fit the tight ones' base level (a truncated delta leaves whole tensors at the
base) or leave the others' budget unspent (the measurement behind this:
BENCHMARKS.md, "Deadline, progressive arm"). With none fitting, the sparsest is sent,
truncated. The manifest of a progressive stream lists every segment, sent or not: its
bytes are counted from the chosen stream's own segments and their tensor names.

``LadderPolicy.fixed`` is a ladder of one: the run's specs, and a skip when they do not
fit. An edge that cannot fit even the last rung is skipped for the round and reported,
never dropped silently. Flower's own control messages are not part of these budgets.
"""

from __future__ import annotations

import enum
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from coordinator.version_store import VersionStore
from fedsqueeze.codec import CodecSpec, EncodedModel, EntropyCoder, encode_state
from fedsqueeze.codec.segments import split_progressive
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.transport.prepare import MIN_PROGRESSIVE_SEGMENT_BYTES, PROGRESSIVE_SEGMENTS
from fedsqueeze.transport.shaping import LinkDirection, LinkProfile
from fedsqueeze.transport.source import encode_seed

__all__ = [
    "DOWN_OVERHEAD_BYTES",
    "UP_OVERHEAD_BYTES",
    "Budget",
    "BudgetPolicy",
    "Choice",
    "EdgeRequest",
    "LadderPolicy",
    "PolicyKind",
    "RunBudget",
    "Skip",
]

#: Download wire bytes besides the payload: the manifest, segment framing and the push's
#: receipt. Measured 125 B for a lossy one-segment delta (``fedsqueeze bench transport``,
#: framing part; pinned by tests/transport/test_framing.py), plus a margin for longer ids.
DOWN_OVERHEAD_BYTES = 150
#: Upload wire bytes besides the update: the fetch request and the push's metadata.
#: Measured 188 B with a 19-digit node id, plus a margin.
UP_OVERHEAD_BYTES = 220
#: Extra framing per MiB segment of payload (its descriptor in the manifest, its prefix).
PER_SEGMENT_BYTES = 60
_SEGMENT = 1 << 20
#: Manifest bytes of a progressive stream's segment list (every segment is listed, sent
#: or not) when its segments are not counted: about 70 B a descriptor, and streams are
#: cut into at most about 12.
PROGRESSIVE_MANIFEST_BYTES = 12 * 70
#: Wire bytes per segment of a progressive stream beyond the one segment
#: ``DOWN_OVERHEAD_BYTES`` covers (its sha256, ids, lengths and level in the manifest, its
#: message framing), besides the tensor names the manifest lists for every segment (each
#: name's bytes and 2 more). Measured on the deadline sweep's digits CNN deltas (truncated
#: 5-segment answers listing 8 names: 272 B more than a one-segment answer, 43 B a segment
#: besides the names), plus a margin.
PROGRESSIVE_SEGMENT_BYTES = 50
#: Sizes the policy remembers (upload bounds per spec and shapes, download sizes per
#: target, held version and spec): a few rounds' worth of every rung for every distinct
#: held version, the least recently used dropped first (ints only, whatever the model).
SIZES_KEPT = 4096

_Size = TypeVar("_Size", int, tuple[int, ...])

#: What an edge that already holds the target is sent: a delta of zeros (a few bytes per
#: tensor). Lossless, so no pruning stage runs on an all-zero delta.
ZERO_DELTA_SPEC = "lossless"


class PolicyKind(enum.Enum):
    """How specs are chosen per edge and round."""

    FIXED = "fixed"
    ADAPTIVE = "adaptive"
    PROGRESSIVE = "progressive"


@dataclass(frozen=True)
class Budget:
    """Per edge and round, in data-plane wire bytes; 0 means no limit."""

    down_bytes: int = 0
    up_bytes: int = 0

    def __post_init__(self) -> None:
        if self.down_bytes < 0 or self.up_bytes < 0:
            raise ValueError("budgets must be >= 0 bytes (0: no limit)")


@dataclass(frozen=True)
class RunBudget:
    """A budget for the whole run, in data-plane wire bytes.

    Parameters
    ----------
    total_bytes
        Down and up together.
    down_share
        The part of it reserved for downloads, in ``(0, 1)``.
    """

    total_bytes: int
    down_share: float = 0.5

    def __post_init__(self) -> None:
        if self.total_bytes <= 0:
            raise ValueError("total_bytes must be > 0")
        if not 0.0 < self.down_share < 1.0:
            raise ValueError("down_share must be in (0, 1)")


@dataclass(frozen=True)
class EdgeRequest:
    """One edge about to be sent its instruction.

    Attributes
    ----------
    server_round
        The round, from 1.
    node_id
        The edge's Flower node id.
    target
        Hex digest of the global model it is to fetch.
    held
        Hex digest of the version it holds (``None``: it holds nothing).
    student
        Whether the edge trains the student track (its own budget, if the policy has one).
    """

    server_round: int
    node_id: int
    target: str
    held: str | None
    student: bool = False


@dataclass(frozen=True)
class Choice:
    """The specs an edge gets and what they cost.

    Attributes
    ----------
    down_spec, up_spec
        Codec specs, text form.
    down_payload
        The download's exact encoded size in bytes (0: not sized, no limit).
    down_bytes
        Its wire bytes, bounded (payload + overheads; 0: not sized).
    up_bytes
        The most wire bytes the upload may take (0: not sized): the spec's bound, or for a
        low-rank spec chosen by its expected size the edge's limit, which the edge meets
        by lowering the rank.
    """

    down_spec: str
    up_spec: str
    down_payload: int
    down_bytes: int
    up_bytes: int

    @property
    def up_payload(self) -> int:
        """The most encoded bytes of the update (``up_bytes`` less framing; 0: no limit):
        what the instruction tells the edge to fit."""
        return max(1, self.up_bytes - UP_OVERHEAD_BYTES) if self.up_bytes else 0


@dataclass(frozen=True)
class _UpSizes:
    """Wire bytes of an upload spec: expected, a bound, and the bound after shrinking."""

    expected: int
    bound: int
    floor: int


@dataclass(frozen=True)
class Skip:
    """An edge that sits this round out, and why."""

    reason: str


class BudgetPolicy(Protocol):
    """Chooses specs per edge and round."""

    def choose(self, request: EdgeRequest) -> Choice | Skip:
        """The edge's specs, or a skip."""
        ...

    def observe(self, bytes_down: int, bytes_up: int, *, compute_s: float | None = None) -> None:
        """Data-plane bytes spent (and, optionally, the slowest compute seen) so far."""
        ...


@dataclass(frozen=True)
class _Limits:
    down: float
    up: float
    seconds: float
    link: LinkProfile | None


class LadderPolicy:
    """Tries download and upload specs in order and takes the first that fit.

    Parameters
    ----------
    store
        The version store (the target and held versions are read from it).
    down_ladder, up_ladder
        Spec texts, least expected error first.
    budget
        Per-edge, per-round budget.
    student_budget
        Per-edge, per-round budget of the edges that train the student track
        (``None``: ``budget``). A student is a fraction of the teacher's size: the
        teacher's budget would give it the top of the ladder and cost nearly a teacher
        round.
    run_budget
        Budget for the whole run (needs ``num_rounds`` and ``clients_per_round``).
    link_of
        ``node_id -> LinkProfile`` (or ``None`` when unknown).
    deadline_s
        Round deadline in seconds (needs ``link_of``).
    round_trips, control_bytes
        Per edge and round: round trips, and Flower control bytes in each direction,
        both counted against the deadline.
    """

    def __init__(
        self,
        store: VersionStore,
        down_ladder: Sequence[str],
        up_ladder: Sequence[str],
        *,
        budget: Budget | None = None,
        student_budget: Budget | None = None,
        run_budget: RunBudget | None = None,
        num_rounds: int = 1,
        clients_per_round: int = 1,
        link_of: Callable[[int], LinkProfile | None] | None = None,
        deadline_s: float | None = None,
        round_trips: int = 5,
        control_bytes: int = 1024,
        progressive: bool = False,
    ) -> None:
        if not down_ladder or not up_ladder:
            raise ValueError("ladders need at least one spec each")
        if progressive and not all(parse_spec(text).levels for text in down_ladder):
            raise ValueError("a progressive policy takes download specs with levels")
        if num_rounds < 1 or clients_per_round < 1:
            raise ValueError("num_rounds and clients_per_round must be >= 1")
        if deadline_s is not None and not deadline_s > 0:
            raise ValueError("deadline_s must be > 0")
        self.store = store
        self.down_ladder = tuple((text, parse_spec(text)) for text in down_ladder)
        self.up_ladder = tuple((text, parse_spec(text)) for text in up_ladder)
        self.budget = budget or Budget()
        self.student_budget = student_budget
        self.run_budget = run_budget
        self.num_rounds = num_rounds
        self.clients_per_round = clients_per_round
        self.link_of = link_of
        self.deadline_s = deadline_s
        self.round_trips = round_trips
        self.control_bytes = control_bytes
        self.progressive = progressive
        self.spent_down = 0
        self.spent_up = 0
        self.compute_s = 0.0
        self._lock = threading.Lock()
        self._sizes: OrderedDict[Hashable, Any] = OrderedDict()
        self._last: dict[int, int] = {}
        self._round = 0
        self._allowance = (math.inf, math.inf)

    @classmethod
    def fixed(
        cls, store: VersionStore, down_spec: str, up_spec: str, **kwargs: Any
    ) -> LadderPolicy:
        """The run's specs for everyone; edges they do not fit are skipped."""
        return cls(store, (down_spec,), (up_spec,), **kwargs)

    # ------------------------------------------------------------------ accounting
    def observe(self, bytes_down: int, bytes_up: int, *, compute_s: float | None = None) -> None:
        """Add spent data-plane bytes; remember the slowest local compute seen."""
        with self._lock:
            self.spent_down += bytes_down
            self.spent_up += bytes_up
            if compute_s is not None:
                self.compute_s = max(self.compute_s, compute_s)

    def _round_allowance(self, server_round: int) -> tuple[float, float]:
        if self.run_budget is None:
            return math.inf, math.inf
        if server_round != self._round:
            self._round = server_round
            rb = self.run_budget
            left = max(1, self.num_rounds - server_round + 1) * self.clients_per_round
            down = rb.total_bytes * rb.down_share - self.spent_down
            up = rb.total_bytes * (1.0 - rb.down_share) - self.spent_up
            self._allowance = (max(0.0, down) / left, max(0.0, up) / left)
        return self._allowance

    def _limits(self, request: EdgeRequest) -> _Limits:
        down, up = self._round_allowance(request.server_round)
        budget = self.budget
        if request.student and self.student_budget is not None:
            budget = self.student_budget
        if budget.down_bytes:
            down = min(down, budget.down_bytes)
        if budget.up_bytes:
            up = min(up, budget.up_bytes)
        link = self.link_of(request.node_id) if self.link_of is not None else None
        seconds = math.inf
        if link is not None and self.deadline_s is not None:
            seconds = (
                self.deadline_s
                - self.compute_s
                - self.round_trips * link.rtt_s
                - link.transfer_s(self.control_bytes, LinkDirection.DOWN)
                - link.transfer_s(self.control_bytes, LinkDirection.UP)
            )
        return _Limits(down, up, seconds, link)

    # ------------------------------------------------------------------ sizes
    def _down_payload(self, request: EdgeRequest, spec: CodecSpec) -> int:
        return self._sized("payload", request, spec, lambda encoded: (encoded.nbytes,))[0]

    def _sized(
        self,
        kind: str,
        request: EdgeRequest,
        spec: CodecSpec,
        measure: Callable[[EncodedModel], tuple[int, ...]],
    ) -> tuple[int, ...]:
        """``measure`` of the download's encoding, computed once per (target, held, spec).

        The encoding is a pure function of those three (its seed is derived from them),
        so edges that hold the same version (every edge new to the run holds the seeded
        initial model) share one trial encode per rung and round instead of one each; a
        size already known loads no tensors.
        """
        held = request.held if request.held is not None and self.store.has(request.held) else None

        def encode() -> tuple[int, ...]:
            target = self.store.get(request.target)
            if target is None:
                raise ValueError(f"target {request.target[:12]} is not in the store")
            base = self.store.get(held) if held is not None else None
            return measure(self._encode_down(request.target, target, held, base, spec))

        return self._cached((kind, request.target, held, spec), encode)

    @staticmethod
    def _encode_down(
        target_digest: str,
        target: dict[str, torch.Tensor],
        held: str | None,
        base: dict[str, torch.Tensor] | None,
        spec: CodecSpec,
    ) -> EncodedModel:
        return encode_state(
            target,
            spec,
            base,
            seed=encode_seed(target_digest, held, spec),
            base_digest=bytes.fromhex(held) if held is not None else None,
        )

    def _up_sizes(self, text: str, spec: CodecSpec, template: dict[str, torch.Tensor]) -> _UpSizes:
        """Wire bytes of an upload with ``spec``: expected, bound, and the shrink floor."""
        # Keyed by the model's shapes too: a student track's edges upload a smaller model.
        shapes = ";".join(f"{k}:{tuple(v.shape)}" for k, v in template.items())
        key = f"{text}@{hash(shapes)}"
        bound = self._cached(key, lambda: _upload_bound(spec, template)) + UP_OVERHEAD_BYTES
        if spec.rank is None or spec.rank == 1:
            return _UpSizes(bound, bound, bound)
        expected = self._cached(f"{key} expected", lambda: _random_upload(spec, template).nbytes)
        one = spec.with_changes(rank=1)
        floor = self._cached(f"{key} rank=1", lambda: _upload_bound(one, template))
        return _UpSizes(
            min(expected + UP_OVERHEAD_BYTES, bound), bound, min(floor + UP_OVERHEAD_BYTES, bound)
        )

    def _cached(self, key: Hashable, compute: Callable[[], _Size]) -> _Size:
        """``compute()``, remembered under ``key`` (the :data:`SIZES_KEPT` latest used)."""
        with self._lock:
            if key in self._sizes:
                self._sizes.move_to_end(key)
                cached: _Size = self._sizes[key]
                return cached
        value = compute()
        with self._lock:
            self._sizes[key] = value
            while len(self._sizes) > SIZES_KEPT:
                self._sizes.popitem(last=False)
        return value

    # ------------------------------------------------------------------ choosing
    def choose(self, request: EdgeRequest) -> Choice | Skip:
        """The first download and upload specs that fit this edge's limits."""
        with self._lock:
            limits = self._limits(request)
        zero = request.held is not None and request.held == request.target
        unlimited = math.isinf(limits.down) and math.isinf(limits.up) and math.isinf(limits.seconds)
        if unlimited and len(self.down_ladder) == 1 and len(self.up_ladder) == 1:
            # Nothing to fit: no sizing (0: unknown, no byte limit for the data plane).
            down = ZERO_DELTA_SPEC if zero else self.down_ladder[0][0]
            return Choice(down, self.up_ladder[0][0], 0, 0, 0)
        template = self.store.get(request.target)
        if template is None:
            raise ValueError(f"target {request.target[:12]} is not in the store")
        ups = [(text, self._up_sizes(text, spec, template)) for text, spec in self.up_ladder]
        link = limits.link
        smallest_up = min(sizes.floor for _, sizes in ups)
        up_s = link.transfer_s(smallest_up, LinkDirection.UP) if link else 0.0
        if self.progressive and not zero:
            return self._progressive(request, limits, ups, up_s)
        downs = self.down_ladder
        if zero:
            downs = ((ZERO_DELTA_SPEC, parse_spec(ZERO_DELTA_SPEC)),)
        picked: tuple[str, int, int, float, int] | None = None
        tried = 0
        # Sizes fall along the ladder, so a binary search finds the first rung that fits;
        # it probes the edge's last rung and its neighbour first, which settles most
        # rounds in two encodings. Only rungs that were encoded and fit are returned.
        hint = min(self._last.get(request.node_id, 0), len(downs) - 1)
        probe: int | None = hint
        lo, hi = 0, len(downs) - 1
        while lo <= hi:
            mid = probe if probe is not None and lo <= probe <= hi else (lo + hi) // 2
            text, spec = downs[mid]
            payload = self._down_payload(request, spec)
            wire = payload + DOWN_OVERHEAD_BYTES + PER_SEGMENT_BYTES * (payload // _SEGMENT)
            tried = wire
            down_s = link.transfer_s(wire, LinkDirection.DOWN) if link else 0.0
            fits = wire <= limits.down and down_s + up_s <= limits.seconds
            if fits:
                picked, hi = (text, payload, wire, down_s, mid), mid - 1
            else:
                lo = mid + 1
            probe = (mid - 1 if fits else mid + 1) if mid == hint else None
        if picked is not None and not zero:
            self._last[request.node_id] = picked[4]
        if picked is None:
            return Skip(
                f"smallest download ({tried} B, then >= {smallest_up} B up) does not fit "
                f"{_fmt(limits.down)} B down / {_fmt(limits.up)} B up / "
                f"{_fmt(limits.seconds)} s of link time"
            )
        down_text, payload, down_wire, down_s, _ = picked
        choice = _pick_upload(limits, ups, down_s, down_text, payload, down_wire)
        return choice or Skip(
            f"smallest upload bound ({smallest_up} B) does not fit {_fmt(limits.up)} B up "
            f"/ {_fmt(limits.seconds - down_s)} s of link time"
        )

    def _progressive(
        self, request: EdgeRequest, limits: _Limits, ups: list[tuple[str, _UpSizes]], up_s: float
    ) -> Choice | Skip:
        """The progressive download truncated to what the limits leave after the smallest
        upload (the densest rung whose base level fits), then the best upload beside it."""
        link = limits.link
        wire = limits.down
        if link is not None and not math.isinf(limits.seconds):
            wire = min(wire, (limits.seconds - up_s) * link.bytes_per_s(LinkDirection.DOWN))
        text = self.down_ladder[0][0]
        payload = down_wire = 0  # unlimited: no byte limit for the data plane
        if not math.isinf(wire):
            down_wire = math.floor(wire)
            room = down_wire - DOWN_OVERHEAD_BYTES
            if len(self.down_ladder) == 1:
                payload = room - PROGRESSIVE_MANIFEST_BYTES
            else:
                text, payload = self._progressive_rung(request, room)
            if payload <= 0:
                return Skip(f"no download bytes left ({_fmt(wire)} B of wire and link time)")
        down_s = link.transfer_s(down_wire, LinkDirection.DOWN) if link and down_wire else 0.0
        choice = _pick_upload(limits, ups, down_s, text, payload, down_wire)
        return choice or Skip(
            f"smallest upload does not fit {_fmt(_up_allowed(limits, down_s))} B up"
        )

    def _progressive_rung(self, request: EdgeRequest, room: int) -> tuple[str, int]:
        """The densest progressive rung whose base level fits ``room`` payload and
        manifest bytes (else the sparsest), and the payload budget it leaves.

        Base-level sizes fall along the ladder, so a binary search finds it (from the
        edge's last rung, as :meth:`choose` does)."""
        downs = self.down_ladder
        payloads: dict[int, int] = {}  # rung → payload budget it leaves
        found: int | None = None
        hint = min(self._last.get(request.node_id, 0), len(downs) - 1)
        probe: int | None = hint
        lo, hi = 0, len(downs) - 1
        while lo <= hi:
            mid = probe if probe is not None and lo <= probe <= hi else (lo + hi) // 2
            base_level, framing = self._progressive_sizes(request, downs[mid][1])
            payloads[mid] = room - framing
            fits = base_level <= payloads[mid]
            if fits:
                found, hi = mid, mid - 1
            else:
                lo = mid + 1
            probe = (mid - 1 if fits else mid + 1) if mid == hint else None
        rung = found if found is not None else len(downs) - 1
        if rung not in payloads:  # none fits and the sparsest was not probed
            payloads[rung] = room - self._progressive_sizes(request, downs[rung][1])[1]
        self._last[request.node_id] = rung
        return downs[rung][0], payloads[rung]

    def _progressive_sizes(self, request: EdgeRequest, spec: CodecSpec) -> tuple[int, int]:
        """Bytes of the stream's base level (header and every level-0 record), and the
        wire bytes its segment list adds beyond a one-segment answer (the data plane cuts
        the stream the same way and lists every segment, sent or not)."""
        base_level, framing = self._sized("progressive", request, spec, _progressive_sizes)
        return base_level, framing


def _progressive_sizes(encoded: EncodedModel) -> tuple[int, int]:
    """:meth:`LadderPolicy._progressive_sizes` of a progressive encoding."""
    base_level = len(encoded.header.to_bytes()) + sum(
        len(r.header_bytes()) + len(r.body) for r in encoded.records if r.level == 0
    )
    target = max(MIN_PROGRESSIVE_SEGMENT_BYTES, encoded.nbytes // PROGRESSIVE_SEGMENTS)
    segments = split_progressive(encoded, min(target, _SEGMENT), _SEGMENT)
    names = sum(len(n.encode()) + 2 for seg in segments for n in seg.tensor_names)
    return base_level, names + PROGRESSIVE_SEGMENT_BYTES * max(0, len(segments) - 1)


def _up_allowed(limits: _Limits, down_s: float) -> float:
    """The most wire bytes the upload may take: the byte limit, and what the link moves in
    the time the download (``down_s``) leaves."""
    link = limits.link
    if link is None or math.isinf(limits.seconds):
        return limits.up
    return min(limits.up, (limits.seconds - down_s) * link.bytes_per_s(LinkDirection.UP))


def _pick_upload(
    limits: _Limits,
    ups: list[tuple[str, _UpSizes]],
    down_s: float,
    down_text: str,
    payload: int,
    down_wire: int,
) -> Choice | None:
    """The first upload rung that fits beside the chosen download, or ``None``."""
    allowed = _up_allowed(limits, down_s)
    for text, sizes in ups:
        if sizes.expected <= allowed and sizes.floor <= allowed:
            # A bound that fits needs no shrinking; otherwise the edge lowers the rank
            # until the update fits what is allowed.
            up_wire = sizes.bound if sizes.bound <= allowed else math.floor(allowed)
            return Choice(down_text, text, payload, down_wire, up_wire)
    return None


def _random_upload(
    spec: CodecSpec, template: dict[str, torch.Tensor], *, entropy: bool = True
) -> EncodedModel:
    """A seeded random update of the model's shapes, encoded with ``spec``.

    Frozen tensors are left out: an update never carries them, and drawing random values
    for a 22.7M-value backbone on every rung cost most of a text sweep's first round.
    """
    gen = torch.Generator().manual_seed(0)
    update = {
        k: torch.randn(v.shape, generator=gen).to(v.dtype) if v.is_floating_point() else v
        for k, v in template.items()
        if not spec.is_frozen(k)
    }
    zeros = {k: torch.zeros_like(v) for k, v in update.items()}
    # Entropy coding off means every coder off: ANS keeps a record only where it is
    # smaller than the raw codes, so the raw codes bound it.
    plain = spec if entropy else spec.with_changes(entropy_level=0, entropy_coder=EntropyCoder.ZSTD)
    return encode_state(update, plain, zeros, seed=0)


def _upload_bound(spec: CodecSpec, template: dict[str, torch.Tensor]) -> int:
    """Most encoded bytes of any update with ``spec`` (see the module's docstring)."""
    # Frozen tensors never travel in an update (the receiver keeps its own): no positions
    # and no record for them, or a 22.7M-value backbone's would swamp a top-k adapter bound.
    sent = {k: v for k, v in template.items() if not spec.is_frozen(k)}
    kept = 0
    if spec.topk is not None or spec.prune.active:
        # Only masked specs send positions; low-rank and dense records have fixed sizes.
        kept = sum(
            math.ceil((spec.topk or 1.0) * v.numel())
            for k, v in sent.items()
            if spec.is_target(k, v.dim(), v.is_floating_point())
        )
    encoded = _random_upload(spec, template, entropy=False)
    return encoded.nbytes + math.ceil(kept / 8) + 8 * len(sent) + 16


def _fmt(value: float) -> str:
    return "unlimited" if math.isinf(value) else f"{value:.0f}" if value >= 10 else f"{value:.2f}"
