"""Whole-model encoding: :func:`encode_state`, :func:`decode_state` and :class:`EncodedModel`.

The pipeline per tensor (see ``ARCHITECTURE.md``)::

    delta vs base → (+ residual) → prune, top-k or low-rank → quantize → pack bits
        → positions → zstd

Every numerical step runs on the tensor's own device; only the finished payloads are
copied to the host as bytes.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from fedsqueeze.codec import joined
from fedsqueeze.codec.bytesio import ByteReader
from fedsqueeze.codec.checksum import crc32_of
from fedsqueeze.codec.container import (
    ANS_VERSION,
    BLOCKWISE_VERSION,
    BUCKETS_VERSION,
    DEFERRED_VERSION,
    FORMAT_VERSION,
    GLOBAL_ORDER_VERSION,
    GROUPED_VERSION,
    JOINT_VERSION,
    PLANE_ANS_VERSION,
    PROGRESSIVE_VERSION,
    ROTATED_VERSION,
    ROW_TIERS_VERSION,
    SUPPORT_LEVELS_VERSION,
    WIDE_TIERS_VERSION,
    ContainerHeader,
    DecodeLimits,
    QParamsSizer,
    TensorRecord,
    crc32,
    parse_header,
    parse_record,
)
from fedsqueeze.codec.digest import state_digest
from fedsqueeze.codec.finite import NonFinite
from fedsqueeze.codec.level_order import LevelOrder, LevelScore, order_weight, refinement_order
from fedsqueeze.codec.nested_gptq import Calibration
from fedsqueeze.codec.pruning import global_magnitude_masks
from fedsqueeze.codec.row_tiers import (
    BANDS,
    RowSplit,
    deferred_parts,
    join_state,
    split_shapes,
    split_state,
)
from fedsqueeze.codec.spec import DEFAULT_TARGETS, CodecSpec, EntropyCoder, PruneMethod
from fedsqueeze.codec.tensor_decode import ProgressiveTensor, TensorDecoder
from fedsqueeze.codec.tensor_encode import ScoredLevel, TensorEncoder
from fedsqueeze.codec.tier_plan import TierPlan, plan_tiers
from fedsqueeze.codec.workers import ALONE_ABOVE, map_alone_or_parallel
from fedsqueeze.errors import (
    BaseMismatchError,
    CodecWarning,
    FormatError,
    NonFiniteError,
    TruncatedError,
    UnsupportedTensorError,
)

State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class EncodedModel:
    """An encoded state dict: a header and one record per tensor.

    Attributes
    ----------
    spec
        The spec it was encoded with.
    base_digest
        sha256 digest of the base model when this is a delta, else ``None``.
    records
        One record per tensor, in the state's order.
    residual
        The new error-feedback residual (top-k and low-rank specs only), on the tensors'
        devices, for the caller to keep and pass to the next :func:`encode_state`. Never
        serialized.
    splits
        The lookup tables whose rows travel in tiers (:mod:`fedsqueeze.codec.row_tiers`;
        their records are the tiers' parts, format version 11).
    """

    spec: CodecSpec
    base_digest: bytes | None
    records: tuple[TensorRecord, ...]
    residual: dict[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)
    splits: tuple[RowSplit, ...] = ()

    @property
    def progressive(self) -> bool:
        """Whether any tensor is sent in levels (format version 2)."""
        return any(r.progressive for r in self.records)

    @property
    def base_records(self) -> int:
        """How many records are base-level ones a full model needs (they come first): all
        but a deferred tier's (:mod:`fedsqueeze.codec.row_tiers`)."""
        late = deferred_parts(self.splits)
        return sum(1 for r in self.records if r.level == 0 and r.name not in late)

    @property
    def header(self) -> ContainerHeader:
        """The model-level header: version 14 when a table is split into more than 8
        tiers, else 13 when a tier is deferred, else 12 when a byte-grouped body codes planes
        jointly, else 11 when a table's rows travel in tiers or a
        plane in context order, else
        10 when a byte-grouped plane is coded in buckets, else 9 when a refinement's plane
        is ANS-coded,
        else 8 when the spec's coder is ANS, else 7 when a tensor's positions come in groups,
        else 6 when a record is rotated, else 5 when refinements are not in level order,
        else 4 when a record is byte-grouped, else 3 when one is block-wise or NF4, else
        2 when a tensor is sent in levels, else 1."""
        if any(s.count > BANDS for s in self.splits):
            version = WIDE_TIERS_VERSION
        elif any(s.deferred for s in self.splits):
            version = DEFERRED_VERSION
        elif any(r.needs_v12 for r in self.records):
            version = JOINT_VERSION
        elif self.splits or any(r.context_order for r in self.records):
            version = ROW_TIERS_VERSION
        elif any(r.needs_v10 for r in self.records):
            version = BUCKETS_VERSION
        elif any(r.needs_v9 for r in self.records):
            version = PLANE_ANS_VERSION
        elif self.spec.entropy_coder is EntropyCoder.ANS or any(r.ans for r in self.records):
            version = ANS_VERSION
        elif any(r.needs_v7 for r in self.records):
            version = SUPPORT_LEVELS_VERSION
        elif any(r.rotated for r in self.records):
            version = ROTATED_VERSION
        elif not _levels_ascend(self.records):
            version = GLOBAL_ORDER_VERSION
        elif any(r.needs_v4 for r in self.records):
            version = GROUPED_VERSION
        elif any(r.needs_v3 for r in self.records):
            version = BLOCKWISE_VERSION
        elif self.progressive:
            version = PROGRESSIVE_VERSION
        else:
            return ContainerHeader(FORMAT_VERSION, self.base_digest, self.spec, len(self.records))
        return ContainerHeader(
            version,
            self.base_digest,
            self.spec,
            len(self.records),
            self.base_records,
            splits=self.splits,
        )

    def _parts(self, omit_base: bool = False) -> list[bytes | memoryview]:
        parts: list[bytes | memoryview] = [self.header.to_bytes(omit_base)]
        for record in self.records:
            parts.append(record.header_bytes())
            parts.append(record.body)
        return parts

    @property
    def can_omit_base(self) -> bool:
        """Whether :meth:`to_bytes` may leave the base digest out (a version 8 delta)."""
        return self.base_digest is not None and self.header.version >= ANS_VERSION

    def to_bytes(self, *, omit_base: bool = False) -> bytes:
        """The complete encoded model, checksummed.

        ``omit_base``: leave a delta's 32-byte base digest out where the format allows it
        (:attr:`can_omit_base`; elsewhere it stays), for a carrier that names the base
        anyway; :meth:`from_bytes` then needs it as ``base_digest``.
        """
        parts = self._parts(omit_base and self.can_omit_base)
        # Over the parts (the payloads are copied once, by the join), on every core.
        parts.append(crc32_of(parts).to_bytes(4, "little"))
        return joined.join(parts)

    @property
    def nbytes(self) -> int:
        """Length of :meth:`to_bytes` (computed without serializing the payloads)."""
        return sum(len(p) for p in self._parts()) + 4

    @classmethod
    def from_bytes(
        cls, data: bytes, limits: DecodeLimits | None = None, *, base_digest: bytes | None = None
    ) -> EncodedModel:
        """Parse bytes from :meth:`to_bytes`, treating them as hostile.

        ``base_digest`` is the base of a delta written without it (``omit_base``): the
        version its carrier names. It is ignored for a stream that names its own.

        Raises
        ------
        fedsqueeze.errors.CodecError
            A subclass for any truncation, corruption or limit violation, or a stream
            that leaves its base digest out when ``base_digest`` is not given.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"expected bytes, got {type(data).__name__}")
        limits = limits or DecodeLimits()
        view = memoryview(data)
        if len(view) < 8:
            raise FormatError(f"truncated input: {len(view)} bytes is too short for a model")
        stored = int.from_bytes(view[-4:], "little")
        if crc32(view[:-4]) != stored:
            if bytes(view[:3]) != b"FSQ":
                raise FormatError("not a fedsqueeze encoded model (bad magic)")
            raise FormatError("checksum mismatch: the encoded model is corrupted or truncated")
        return cls.parse_stream(view[:-4], limits, base_digest=base_digest)

    @classmethod
    def parse_stream(
        cls,
        stream: bytes | memoryview,
        limits: DecodeLimits | None = None,
        *,
        base_digest: bytes | None = None,
    ) -> EncodedModel:
        """Parse the stream without its checksum (what segments carry: each segment has
        its own sha256, so joining them needs no second integrity pass); ``base_digest``
        as for :meth:`from_bytes`."""
        limits = limits or DecodeLimits()
        view = memoryview(stream)
        reader = ByteReader(view, 0, len(view))
        header = parse_header(reader, limits)
        if header.implied_base:
            if base_digest is None or len(base_digest) != 32:
                raise FormatError(
                    "this delta leaves its base's digest to its carrier: pass base_digest"
                )
            header = replace(header, base_digest=bytes(base_digest))
        sizer = QParamsSizer()
        records = tuple(
            parse_record(reader, limits, sizer, header.version) for _ in range(header.record_count)
        )
        if reader.remaining:
            raise FormatError(f"{reader.remaining} unexpected bytes after the last record")
        model = cls(header.spec, header.base_digest, records, splits=header.splits)
        _check_level_order(
            model.records, header.base_records, header.version, deferred_parts(header.splits)
        )
        if header.base_digest is None:  # a whole full model holds every part, deferred too
            held = {r.name for r in records if r.level == 0}
            for split in header.splits:
                missing = [p for p in split.parts() if p not in held]
                if missing:
                    raise FormatError(f"table {split.name!r} lacks its parts {missing}")
        return model

    @classmethod
    def parse_prefix(
        cls, stream: bytes | memoryview, limits: DecodeLimits | None = None
    ) -> tuple[EncodedModel, int]:
        """Parse the complete records at the start of a stream (without checksum).

        A record cut at the end of ``stream`` is left out. Returns the model those
        records make (possibly with fewer records than its header announced) and the
        number of bytes they take, header included.

        Raises
        ------
        fedsqueeze.errors.TruncatedError
            ``stream`` ends inside the model header.
        fedsqueeze.errors.FormatError
            Malformed records, or records that are not a prefix of one stream (a
            refinement before its base level, base levels after refinements).
        """
        _header, model, used = _parse_prefix(stream, limits)
        return model, used


def prepare_encode(
    state: State,
    spec: CodecSpec,
    base: State | None,
    residual: State | None,
    seed: int | None,
    base_digest: bytes | None,
    nonfinite: NonFinite,
    order: LevelOrder,
    weights: Mapping[str, float] | None = None,
    calibration: Calibration | None = None,
) -> tuple[State, TensorEncoder, bytes | None, TierPlan]:
    """What every encoder of a whole state does first: check the arguments, name the
    base by its digest, warn about unmatched targets, leave out the frozen tensors the
    base already holds, split the tables whose rows travel in tiers (state, base and
    residual alike) and make the :class:`TensorEncoder`.

    Returns the state to encode, its encoder, the base's digest (``None`` without a
    base) and the tier plan. Raises as :func:`encode_state` does.
    """
    if not isinstance(spec, CodecSpec):
        raise TypeError(f"spec must be a CodecSpec, got {type(spec).__name__}")
    if not isinstance(nonfinite, NonFinite):
        raise TypeError(f"nonfinite must be a NonFinite, got {type(nonfinite).__name__}")
    if not isinstance(order, LevelOrder):
        raise TypeError(f"order must be a LevelOrder, got {type(order).__name__}")
    check_weights(order, weights)
    _check_state(state, "state")
    if base is not None:
        _check_state(base, "base")
        _check_shares_tensors(state, base)
        if base_digest is None:
            base_digest = state_digest(base)
    _warn_unmatched_targets(spec, state)
    state = _without_held_frozen(state, spec, base)
    if calibration is not None and not isinstance(calibration, Calibration):
        raise TypeError(f"calibration must be a Calibration, got {type(calibration).__name__}")
    plan = plan_tiers(
        state,
        spec.levels is not None,
        calibration.rows if calibration is not None else {},
        lambda name, t: spec.is_target(name, t.ndim, t.is_floating_point()),
        defer=base is None and (calibration is None or calibration.defer) and _dense(spec),
        tier_costs=calibration.tier_costs if calibration is not None else None,
    )
    if plan.splits:
        state = plan.apply_parts(state)
        base = plan.apply(base)
        residual = plan.apply(residual)
    encoder = TensorEncoder(spec, base, residual, seed, calibration, plan.origins)
    return state, encoder, base_digest, plan


def encode_state(
    state: State,
    spec: CodecSpec,
    base: State | None = None,
    *,
    residual: State | None = None,
    seed: int | None = None,
    base_digest: bytes | None = None,
    nonfinite: NonFinite = NonFinite.REFUSE,
    order: LevelOrder = LevelOrder.RELATIVE,
    weights: Mapping[str, float] | None = None,
    calibration: Calibration | None = None,
) -> EncodedModel:
    """Encode a state dict, as a delta against ``base`` when one is given.

    Parameters
    ----------
    state
        Name → tensor (any dtype, any device). Not modified.
    spec
        What to do; see :class:`CodecSpec`.
    base
        The model the receiver already holds. Tensors present in both with the same
        shape and dtype are sent as differences to it, except frozen ones
        (``spec.freeze``), which are not sent at all: the receiver keeps the base's.
    residual
        Error-feedback residual from the previous call (top-k and low-rank specs), added to
        the delta before selection. Missing entries count as zero.
    seed
        Seed of the stochastic-rounding generator (``None``: nondeterministic).
    base_digest
        ``state_digest(base)`` when the caller already has it (saves hashing the base).
    nonfinite
        What to do with a floating tensor its path cannot encode: NaN or ±Inf in it (or in
        its difference to the base), values beyond ``±2^126`` when quantized, or beyond
        fp16/bf16's range when cast. :attr:`NonFinite.REFUSE` raises; :attr:`NonFinite.CARRY`
        sends such tensors losslessly (bit-exact), whatever the spec.
    order
        How a progressive spec orders its refinements (:mod:`fedsqueeze.codec.level_order`;
        the decoder reads every order). Ignored without ``levels``.
    weights
        With ``order=LevelOrder.WEIGHTED`` (and only then): each progressive tensor's
        sensitivity per unit of squared error (finite, at least 0), e.g. from
        :func:`fedsqueeze.bench.sensitivity.fisher_weights`. The decoder needs nothing
        of it: only the order of the refinements changes.
    calibration
        With a progressive spec (``levels``): the input moments of Linear weights on
        calibration data (:class:`~fedsqueeze.codec.nested_gptq.Calibration`); those
        tensors' codes are chosen by GPTQ at every level (nested, so every prefix still
        decodes) for a lower output error. The stream's format is unchanged and the
        decoder needs nothing of it. Ignored without ``levels`` and for pruned tensors.

    Returns
    -------
    EncodedModel
        With ``residual`` set to the new error-feedback residual for top-k and low-rank
        specs.

    Raises
    ------
    NonFiniteError
        A tensor its path cannot encode, with ``nonfinite=NonFinite.REFUSE`` (the
        default); the message names it.
    UnsupportedTensorError
        A complex, sparse or otherwise unsupported tensor (also a ``TypeError``).
    BaseMismatchError
        A ``base`` that shares no tensor (same name, shape and dtype) with ``state``:
        nothing would be sent as a difference, so it is not this model's base. Or a
        frozen tensor of ``base`` that ``state`` lacks (decoding would bring it back).

    Warns
    -----
    CodecWarning
        A ``targets`` pattern other than the default that matches no tensor name (specs
        are reused across models, so this is not an error).
    """
    state, encoder, base_digest, plan = prepare_encode(
        state, spec, base, residual, seed, base_digest, nonfinite, order, weights, calibration
    )
    # Global pruning cuts over every tensor it may prune, so it needs the carried set
    # first; otherwise each tensor is checked as it is encoded, on the worker that
    # encodes it (TensorEncoder.encode_checked: a lossless fp32 or bf16 tensor by the
    # coder's own pass over it).
    upfront = spec.prune.method is PruneMethod.L1_GLOBAL
    carried = _unencodable(state, encoder, nonfinite) if upfront else frozenset()
    masks = _global_masks(state, spec, encoder, carried) if upfront else {}
    grow_masks: dict[str, list[torch.Tensor]] = {}
    if spec.grow and spec.prune.method is PruneMethod.L1_GLOBAL and spec.levels is not None:
        for sparsity in spec.grow:
            cut = _global_masks(state, spec.with_changes(grow=(), prune=replace(
                spec.prune, sparsity=sparsity)), encoder, carried)  # fmt: skip
            for name, mask in cut.items():
                grow_masks.setdefault(name, []).append(mask)

    def encode_one(name: str) -> tuple[TensorRecord, torch.Tensor | None]:
        tensor = state[name].detach()
        if name in carried:
            return encoder.carry(name, tensor)
        if upfront:
            return encoder.encode(name, tensor, masks.get(name), grow_masks.get(name))
        done = encoder.encode_checked(name, tensor)
        if not isinstance(done, str):
            return done
        if nonfinite is NonFinite.REFUSE:
            raise NonFiniteError(name, done)  # the first in order is raised
        return encoder.carry(name, tensor)

    # Small tensors on every core at once, large ones alone (their chunks use every
    # core): the same records, in the same order (fedsqueeze.codec.workers). Every one
    # alone, in order, where the records depend on it (TensorEncoder.in_parallel).
    names = list(state)
    parallel = encoder.in_parallel
    coded = map_alone_or_parallel(encode_one, names, lambda n: not parallel or _alone(state[n]))
    records = []
    new_residual: dict[str, torch.Tensor] = {}
    for name, (record, res) in zip(names, coded, strict=True):
        records.append(record)
        if res is not None:
            new_residual[name] = res
    if encoder.levels:
        levels, order_weights = plan.weigh(encoder.levels, weights)
        records = progressive_order(records, levels, order, order_weights, plan.deferred)
    if plan.splits and new_residual:
        new_residual = _joined_residual(new_residual, plan.splits, state)
    return EncodedModel(
        spec=spec,
        base_digest=base_digest if base is not None else None,
        records=tuple(records),
        residual=new_residual if spec.feedback else None,
        splits=plan.splits,
    )


def _dense(spec: CodecSpec) -> bool:
    """Whether ``spec`` keeps every value (no pruning, top-k or low rank): only then are
    row tiers deferred, since a deferred tier codes its rows less their mean row and a
    sparse spec's zeros would decode to that mean."""
    return spec.prune.method is PruneMethod.NONE and spec.topk is None and spec.rank is None


def _joined_residual(
    residual: dict[str, torch.Tensor], splits: Sequence[RowSplit], parts: State
) -> dict[str, torch.Tensor]:
    """The error-feedback residual keyed by the caller's names: a split table's parts
    joined into it (a part without a residual left nothing: zeros)."""
    held = [s for s in splits if any(p in residual for p in s.parts())]
    zeros = {
        p: torch.zeros_like(parts[p], dtype=torch.float32)
        for s in held
        for p in s.parts()
        if p not in residual and p in parts
    }
    return join_state(residual, held, zeros)  # (residuals come of sparse specs: never deferred)


def _alone(t: torch.Tensor) -> bool:
    """Whether a tensor is coded on its own rather than beside others: off the CPU, or
    large enough for its own chunks to use every core."""
    return t.device.type != "cpu" or t.numel() > ALONE_ABOVE


def _without_held_frozen(state: State, spec: CodecSpec, base: State | None) -> State:
    """``state`` less the frozen tensors ``base`` holds (same name, shape and dtype).

    Raises
    ------
    BaseMismatchError
        ``base`` has a frozen tensor that ``state`` lacks: a decoder fills frozen tensors
        in from the base, so the model would come back with a tensor it never had.
    """
    if base is None or not spec.freeze:
        return state
    for name in base:
        if name not in state and spec.is_frozen(name):
            raise BaseMismatchError(
                f"frozen tensor {name!r} of the base is not in the model: a delta leaves "
                "frozen tensors out and the receiver keeps the base's"
            )
    kept = {}
    for name, t in state.items():
        b = base.get(name)
        if b is not None and b.shape == t.shape and b.dtype == t.dtype and spec.is_frozen(name):
            continue
        kept[name] = t
    return kept


def decode_state(
    encoded: EncodedModel,
    base: State | None = None,
    *,
    base_digest: bytes | None = None,
    device: torch.device | str | None = None,
    limits: DecodeLimits | None = None,
) -> dict[str, torch.Tensor]:
    """Decode a model; a delta needs the base it was made against.

    Parameters
    ----------
    encoded
        From :func:`encode_state` or :meth:`EncodedModel.from_bytes`.
    base
        The model the delta applies to (ignored for a full model).
    base_digest
        The caller's known ``state_digest(base)``; hashed here when omitted.
    device
        Where the decoded tensors go (default: the base's device, else the CPU).
    limits
        Bounds on what the records may claim.

    Returns
    -------
    dict[str, torch.Tensor]
        The full model (base + delta for a delta), in record order, original dtypes.

    Raises
    ------
    BaseMismatchError
        A delta without its base, or against another base.
    FormatError, LimitExceededError
        Malformed records.
    """
    limits = limits or DecodeLimits()
    if encoded.base_digest is not None:
        if base is None:
            raise BaseMismatchError(
                f"this is a delta against {encoded.base_digest.hex()[:16]}…; pass its base"
            )
        _check_state(base, "base")
        digest = base_digest if base_digest is not None else state_digest(base)
        if digest != encoded.base_digest:
            raise BaseMismatchError(
                f"delta made against {encoded.base_digest.hex()[:16]}…, "
                f"base given is {digest.hex()[:16]}…"
            )
    else:
        base = None
    parts = split_state(base, encoded.splits) if base is not None else None
    decoder = TensorDecoder(parts, torch.device(device) if device is not None else None)
    if not encoded.progressive:
        out = _decode_records(encoded.records, decoder, limits, device, parts)
    else:
        out = _decode_progressive(encoded.records, decoder, limits)
    out = join_state(out, encoded.splits, parts)
    if base is not None and encoded.spec.freeze:
        # A delta carries no frozen tensor the base holds: the receiver keeps its own.
        for name, tensor in base.items():
            if name not in out and encoded.spec.is_frozen(name):
                out[name] = tensor.detach().to(_device_for(device, tensor)).clone()
    return out


def _decode_records(
    records: Sequence[TensorRecord],
    decoder: TensorDecoder,
    limits: DecodeLimits,
    device: torch.device | str | None,
    base: State | None,
) -> dict[str, torch.Tensor]:
    """The tensors of a model without levels: every record is checked (names, sizes
    against ``limits``) before any is decoded, then decoded on every core
    (:mod:`fedsqueeze.codec.workers`; the CPU only: elsewhere one after the other)."""
    total = 0
    names: list[str] = []
    seen: set[str] = set()
    sizes: list[int] = []
    for record in records:
        name, _dtype, shape = decoder.resolve(record)
        total = limits.count(name, shape, total)
        if name in seen:
            raise FormatError(f"tensor {name!r} appears twice")
        seen.add(name)
        names.append(name)
        sizes.append(math.prod(shape))
    on_cpu = (device is None or torch.device(device).type == "cpu") and (
        base is None or all(t.device.type == "cpu" for t in base.values())
    )
    decoded = map_alone_or_parallel(
        lambda i: _plain(decoder.decode(records[i])[1]),
        range(len(records)),
        lambda i: not on_cpu or sizes[i] > ALONE_ABOVE,
    )
    return dict(zip(names, decoded, strict=True))


def _plain(decoded: torch.Tensor | ProgressiveTensor) -> torch.Tensor:
    if isinstance(decoded, ProgressiveTensor):  # only a record with levels decodes to one
        raise FormatError("a record in levels in a model without levels")
    return decoded


def _decode_progressive(
    records: Sequence[TensorRecord], decoder: TensorDecoder, limits: DecodeLimits
) -> dict[str, torch.Tensor]:
    """The tensors of a model in levels, record by record (refinements complete their
    base-level record's tensor)."""
    total = 0
    out: dict[str, torch.Tensor] = {}
    base_level: list[str] = []  # names of the base-level records, in order
    pending: dict[int, ProgressiveTensor] = {}
    for record in records:
        if record.level > 0:
            index = record.index if record.index is not None else -1
            if index not in pending:
                raise FormatError(
                    f"a level-{record.level} record refines base-level record #{index}, "
                    "which is not a progressive tensor held before it"
                )
            pending[index].refine(record)
            continue
        name, _dtype, shape = decoder.resolve(record)
        total = limits.count(name, shape, total)
        if name in out:
            raise FormatError(f"tensor {name!r} appears twice")
        decoded = decoder.decode(record)[1]
        if isinstance(decoded, ProgressiveTensor):
            pending[len(base_level)] = decoded
            out[name] = torch.empty(0)  # placeholder, keeps the record order
        else:
            out[name] = decoded
        base_level.append(name)
    for index, state in pending.items():
        out[base_level[index]] = state.tensor()
    return out


def _device_for(device: torch.device | str | None, tensor: torch.Tensor) -> torch.device:
    """Where a tensor taken from the base goes: ``device`` if given, else its own."""
    return torch.device(device) if device is not None else tensor.device


@dataclass(frozen=True)
class PrefixDecoded:
    """What :func:`decode_prefix` made of a stream's prefix.

    Attributes
    ----------
    state
        The best model the prefix holds (for a delta: base tensors with no record yet keep
        the base's value).
    used_bytes
        Bytes of the prefix that went into ``state`` (complete records and the header).
    levels
        For each progressive tensor in ``state``, the highest level it holds (0-based;
        for a tensor with support levels, the number of its records held after the
        first).
    complete
        Whether every record of the stream was there.
    """

    state: dict[str, torch.Tensor]
    used_bytes: int
    levels: dict[str, int]
    complete: bool


def decode_prefix(
    stream: bytes | memoryview,
    base: State | None = None,
    *,
    base_digest: bytes | None = None,
    device: torch.device | str | None = None,
    limits: DecodeLimits | None = None,
) -> PrefixDecoded:
    """Decode the best model the first bytes of an encoded stream hold (anytime decoding).

    ``stream`` is a prefix of the segments' joined payloads (the model's bytes without
    its checksum). Missing refinements decode at the coarser level held; a full model
    needs every tensor's base level (:func:`smallest_prefix` bytes), a delta decodes from
    its header on (tensors not reached yet keep the base's value).

    Raises
    ------
    fedsqueeze.errors.TruncatedError
        The prefix is shorter than the smallest decodable one.
    fedsqueeze.errors.FormatError, BaseMismatchError
        Bytes that are not a prefix of a valid stream, or the wrong base.
    """
    header, encoded, used = _parse_prefix(stream, limits)
    complete = len(encoded.records) == header.record_count
    present = encoded.base_records
    if not complete and encoded.base_digest is None and present < header.base_records:
        raise TruncatedError(
            f"a prefix of {len(memoryview(stream))} bytes holds the base level of "
            f"{present} of {header.base_records} tensors; a full model needs all of them"
        )
    state = decode_state(encoded, base, base_digest=base_digest, device=device, limits=limits)
    if not complete and base is not None and encoded.base_digest is not None:
        dev = torch.device(device) if device is not None else None
        for name, tensor in base.items():
            if name not in state:
                state[name] = tensor.detach().to(dev or tensor.device).clone()
    return PrefixDecoded(state, used, _held_levels(encoded, base), complete)


def smallest_prefix(encoded: EncodedModel) -> int:
    """Bytes (from the stream's start, without checksum) of the smallest decodable prefix:
    the header and, for a full model, every base-level record but a deferred tier's
    (they come first)."""
    size = len(encoded.header.to_bytes())
    if encoded.base_digest is not None:
        return size
    for record in encoded.records[: encoded.base_records]:
        size += len(record.header_bytes()) + len(record.body)
    return size


def _parse_prefix(
    stream: bytes | memoryview, limits: DecodeLimits | None
) -> tuple[ContainerHeader, EncodedModel, int]:
    """:meth:`EncodedModel.parse_prefix`, also returning the header it read (whose counts
    tell what the whole stream holds)."""
    limits = limits or DecodeLimits()
    view = memoryview(stream)
    reader = ByteReader(view, 0, len(view))
    header = parse_header(reader, limits)
    if header.implied_base:
        raise FormatError("a delta without its base's digest is read whole (from_bytes)")
    sizer = QParamsSizer()
    records: list[TensorRecord] = []
    used = reader.pos
    for _ in range(header.record_count):
        try:
            records.append(parse_record(reader, limits, sizer, header.version))
        except TruncatedError:
            break
        used = reader.pos
    else:
        if reader.remaining:
            raise FormatError(f"{reader.remaining} unexpected bytes after the last record")
    _check_level_order(records, header.base_records, header.version, deferred_parts(header.splits))
    model = EncodedModel(header.spec, header.base_digest, tuple(records), splits=header.splits)
    return header, model, used


def _held_levels(encoded: EncodedModel, base: State | None) -> dict[str, int]:
    """The highest level each progressive tensor of ``encoded`` holds."""
    base_names = (
        sorted(split_shapes(base, encoded.splits))
        if base is not None and encoded.base_digest is not None
        else []
    )
    names: list[str] = []
    held: dict[str, int] = {}
    for record in encoded.records:
        if record.level == 0:
            if record.name is not None:
                names.append(record.name)
            elif record.index is not None and record.index < len(base_names):
                names.append(base_names[record.index])
            else:
                names.append(f"#{record.index}")
            if record.levels:
                held[names[-1]] = 0
        elif record.index is not None and record.index < len(names):
            held[names[record.index]] = record.level
    return held


def _check_level_order(
    records: tuple[TensorRecord, ...] | list[TensorRecord],
    bases: int,
    version: int,
    deferred: frozenset[str] = frozenset(),
) -> None:
    """Base-level records first (``bases`` of them), then refinements: in level order
    up to version 4; from version 5 in any order that keeps each tensor's levels in
    order (:meth:`~fedsqueeze.codec.tensor_decode.ProgressiveTensor.refine` checks that
    each is the next level of a progressive tensor). From version 13 the base-level
    records of ``deferred`` parts (and only theirs) come after the first ``bases``
    records, each before its refinements."""
    last_level = 0  # > 0 once a refinement has been seen
    held: dict[int | None, int] = {}
    for position, record in enumerate(records):
        if record.level == 0:
            late = record.name in deferred
            if late != (position >= bases) or (last_level and not late):
                raise FormatError("a base-level record after a refinement: not one stream")
            continue
        if version < GLOBAL_ORDER_VERSION and record.level < last_level:
            raise FormatError("refinement levels out of order: not one stream")
        if record.level != held.get(record.index, 0) + 1:
            raise FormatError(
                f"level {record.level} of tensor #{record.index} after level "
                f"{held.get(record.index, 0)}: not one stream"
            )
        held[record.index] = record.level
        last_level = max(last_level, record.level)


def _levels_ascend(records: tuple[TensorRecord, ...]) -> bool:
    """Whether the refinements are in level order (as versions 2-4 require)."""
    last = 0
    for record in records:
        if record.level < last:
            return False
        last = record.level
    return True


def check_weights(order: LevelOrder, weights: Mapping[str, float] | None) -> None:
    """Refuse ``weights`` that ``order`` does not use, or that it needs and lacks, and
    weights that are not finite numbers of at least 0 (``ValueError``, ``TypeError``)."""
    if order is not LevelOrder.WEIGHTED:
        if weights is not None:
            raise ValueError(f"weights are for the weighted order, not {order.value!r}")
        return
    if weights is None:
        raise ValueError("the weighted order needs weights (a sensitivity per tensor)")
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping, got {type(weights).__name__}")
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise TypeError(f"weight of {name!r} must be a number, got {type(w).__name__}")
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weight of {name!r} must be finite and at least 0, got {w}")


def progressive_order(
    records: list[TensorRecord],
    levels: Mapping[str, Sequence[ScoredLevel]],
    order: LevelOrder,
    weights: Mapping[str, float] | None = None,
    deferred: frozenset[str] = frozenset(),
) -> list[TensorRecord]:
    """The stream order of a progressive model's records: base levels first, then the
    refinements in ``order``.

    Plain records (biases, non-targets) lead the base level in state order; they are
    small and every decodable prefix needs them. The progressive base levels follow by
    falling score (what a delta's prefix buys first; ``RELATIVE`` weighs it by the
    tensor's energy as it does the refinements). The base level of a ``deferred`` part
    (a full model's light row tier, :mod:`fedsqueeze.codec.row_tiers`) is ordered with
    the refinements instead, as its tensor's first level (its gain: what it removes
    from the fill rows' error), and numbered after the other base levels in the order
    it comes.

    Parameters
    ----------
    records
        One record per tensor, in state order (a progressive tensor's base level).
    levels
        For each progressive tensor its levels, base level first (the very record object
        found in ``records``), with their gains, energies and sizes.
    order
        How the refinements are ordered (:func:`refinement_order`).
    weights
        Each progressive tensor's weight, for :attr:`LevelOrder.WEIGHTED`.
    deferred
        Names of progressive tensors whose base level may come late.

    Raises
    ------
    ValueError
        The weighted order and a progressive tensor without a weight.
    """
    weight_of: dict[str, float] = {}
    for name in levels:
        if order is LevelOrder.WEIGHTED:
            if weights is None or name not in weights:
                raise ValueError(f"the weighted order has no weight for tensor {name!r}")
            weight_of[name] = float(weights[name])
        else:
            weight_of[name] = 1.0
    name_of = {id(lv[0].record): name for name, lv in levels.items()}
    # a deferred part carried whole (not progressive) follows the other base levels
    late = [r for r in records if r.levels and r.name in deferred]
    late_plain = [r for r in records if not r.levels and r.name in deferred]
    plain = [r for r in records if not r.levels and r.name not in deferred]
    progressive = [r for r in records if r.levels and r.name not in deferred]

    def base_score(r: TensorRecord) -> float:
        name = name_of[id(r)]
        first = levels[name][0]
        return -order_weight(order, first.energy, weight_of[name]) * first.score

    progressive.sort(key=base_score)
    ordered = plain + progressive + late_plain
    position = {name_of[id(r)]: i for i, r in enumerate(ordered) if id(r) in name_of}
    for j, r in enumerate(late):  # tensor keys for the order only; renumbered below
        position[name_of[id(r)]] = len(ordered) + j
    chained: list[tuple[str, ScoredLevel]] = []
    scores: list[LevelScore] = []
    for name in sorted(levels, key=position.__getitem__):
        first = 0 if name in deferred else 1
        for level, scored in enumerate(levels[name][first:], start=1):
            chained.append((name, scored))
            scores.append(
                LevelScore(
                    position[name],
                    level,
                    scored.gain,
                    scored.size,
                    scored.energy,
                    weight_of[name],
                )
            )
    bases = len(ordered)
    for i in refinement_order(scores, order):
        name, scored = chained[i]
        if scored.record.level == 0:  # a deferred base level: the next base number
            position[name] = bases
            bases += 1
            ordered.append(scored.record)
        else:
            ordered.append(replace(scored.record, index=position[name]))
    return ordered


def _unencodable(state: State, encoder: TensorEncoder, nonfinite: NonFinite) -> frozenset[str]:
    """The tensors to carry losslessly; raises for the first one under ``REFUSE``."""
    carried = []
    for name, t in state.items():
        problem = encoder.problem(name, t.detach())
        if problem is None:
            continue
        if nonfinite is NonFinite.REFUSE:
            raise NonFiniteError(name, problem)
        carried.append(name)
    return frozenset(carried)


def _check_shares_tensors(state: State, base: State) -> None:
    """A base must share at least one tensor (name, shape, dtype) with a non-empty state."""
    if not state:
        return
    for name, t in state.items():
        b = base.get(name)
        if b is not None and b.shape == t.shape and b.dtype == t.dtype:
            return
    raise BaseMismatchError(
        f"the base shares no tensor (same name, shape and dtype) with the model "
        f"({len(base)} tensors in the base, {len(state)} in the model): it is not its base"
    )


def _warn_unmatched_targets(spec: CodecSpec, state: State) -> None:
    """Warn about each chosen ``targets`` pattern that matches no tensor name."""
    if spec.targets == DEFAULT_TARGETS or not state:
        return
    for pattern in spec.targets:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in state):
            warnings.warn(
                f"codec spec targets pattern {pattern!r} matches no tensor of the model",
                CodecWarning,
                stacklevel=3,
            )


def _global_masks(
    state: State, spec: CodecSpec, encoder: TensorEncoder, carried: frozenset[str]
) -> dict[str, torch.Tensor]:
    work = {
        name: encoder.lossy_input(name, t.detach())
        for name, t in state.items()
        if name not in carried and encoder.is_lossy(name, t)
    }
    if not work:
        return {}
    return global_magnitude_masks(work, spec.prune.sparsity)


def _check_state(state: State, what: str) -> None:
    if not isinstance(state, Mapping):
        raise TypeError(f"{what} must be a mapping of names to tensors")
    for name, t in state.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"{what} has a non-string or empty key {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{name!r}] is {type(t).__name__}, not a tensor")
        if t.is_complex():
            raise UnsupportedTensorError(
                f"{what} tensor {name!r} is complex ({t.dtype}): the codec encodes real "
                f"tensors only (store real and imaginary parts as two tensors)"
            )
        if t.is_sparse or t.dtype not in _SUPPORTED:
            raise UnsupportedTensorError(
                f"{what} tensor {name!r} has unsupported dtype/layout {t.dtype}/{t.layout}"
            )


_SUPPORTED = {
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
}

__all__ = [
    "EncodedModel",
    "PrefixDecoded",
    "decode_prefix",
    "decode_state",
    "encode_state",
    "smallest_prefix",
]
