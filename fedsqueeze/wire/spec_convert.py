"""Conversions of :class:`~fedsqueeze.codec.spec.CodecSpec` to and from its wire message.

Part of :mod:`fedsqueeze.wire.convert` (which re-exports both functions). Enum values are
mapped by explicit tables, never by arithmetic on values: the wire enums have
``*_UNSPECIFIED`` zero values that the Python enums do not, and each side may grow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from fedsqueeze.codec.spec import (
    DEFAULT_TARGETS,
    CodecSpec,
    EntropyCoder,
    FloatFormat,
    Granularity,
    PruneMethod,
    PruneSpec,
    QuantScheme,
    QuantSpec,
    Rotation,
    Rounding,
    ScaleFormat,
)
from fedsqueeze.errors import InvalidRequestError
from fedsqueeze.wire import transfer_pb2 as pb

_T = TypeVar("_T")
_E = TypeVar("_E")
_V = TypeVar("_V", bound=int)

_PRUNE_METHODS: dict[PruneMethod, pb.PruneMethod.ValueType] = {
    PruneMethod.NONE: pb.PRUNE_METHOD_NONE,
    PruneMethod.L1_UNSTRUCTURED: pb.PRUNE_METHOD_L1_UNSTRUCTURED,
    PruneMethod.L1_GLOBAL: pb.PRUNE_METHOD_L1_GLOBAL,
    PruneMethod.LN_STRUCTURED: pb.PRUNE_METHOD_LN_STRUCTURED,
    PruneMethod.THRESHOLD: pb.PRUNE_METHOD_THRESHOLD,
}
_QUANT_SCHEMES: dict[QuantScheme, pb.QuantScheme.ValueType] = {
    QuantScheme.AFFINE: pb.QUANT_SCHEME_AFFINE,
    QuantScheme.SYMMETRIC: pb.QUANT_SCHEME_SYMMETRIC,
    QuantScheme.POW2: pb.QUANT_SCHEME_POW2,
    QuantScheme.KMEANS: pb.QUANT_SCHEME_KMEANS,
    QuantScheme.NF4: pb.QUANT_SCHEME_NF4,
}
_GRANULARITIES: dict[Granularity, pb.Granularity.ValueType] = {
    Granularity.PER_TENSOR: pb.GRANULARITY_PER_TENSOR,
    Granularity.PER_CHANNEL: pb.GRANULARITY_PER_CHANNEL,
    Granularity.PER_BLOCK: pb.GRANULARITY_PER_BLOCK,
}
_SCALE_FORMATS: dict[ScaleFormat, pb.ScaleFormat.ValueType] = {
    ScaleFormat.FP32: pb.SCALE_FORMAT_FP32,
    ScaleFormat.FP16: pb.SCALE_FORMAT_FP16,
    ScaleFormat.BF16: pb.SCALE_FORMAT_BF16,
    ScaleFormat.DQ8: pb.SCALE_FORMAT_DQ8,
}
_ROUNDINGS: dict[Rounding, pb.Rounding.ValueType] = {
    Rounding.NEAREST: pb.ROUNDING_NEAREST,
    Rounding.STOCHASTIC: pb.ROUNDING_STOCHASTIC,
}
_ROTATIONS: dict[Rotation, pb.Rotation.ValueType] = {
    Rotation.NONE: pb.ROTATION_UNSPECIFIED,
    Rotation.HADAMARD: pb.ROTATION_HADAMARD,
}
_CODERS: dict[EntropyCoder, pb.EntropyCoder.ValueType] = {
    EntropyCoder.ZSTD: pb.ENTROPY_CODER_UNSPECIFIED,
    EntropyCoder.ANS: pb.ENTROPY_CODER_ANS,
}
_FLOAT_FORMATS: dict[FloatFormat, pb.FloatFormat.ValueType] = {
    FloatFormat.FP32: pb.FLOAT_FORMAT_FP32,
    FloatFormat.FP16: pb.FLOAT_FORMAT_FP16,
    FloatFormat.BF16: pb.FLOAT_FORMAT_BF16,
}


def _inverse(table: dict[_E, _V], what: str) -> Callable[[int], _E]:
    back: dict[int, _E] = {int(value): key for key, value in table.items()}

    def lookup(value: int) -> _E:
        try:
            return back[value]
        except KeyError:
            raise InvalidRequestError(f"{what}: unknown or unspecified value {value}") from None

    return lookup


_prune_method_from_proto = _inverse(_PRUNE_METHODS, "prune method")
_quant_scheme_from_proto = _inverse(_QUANT_SCHEMES, "quant scheme")
_granularity_from_proto = _inverse(_GRANULARITIES, "granularity")
_rounding_from_proto = _inverse(_ROUNDINGS, "rounding")
_float_format_from_proto = _inverse(_FLOAT_FORMATS, "float format")
_scale_format_from_proto = _inverse(_SCALE_FORMATS, "scale format")
_rotation_from_proto = _inverse(_ROTATIONS, "rotation")
_coder_from_proto = _inverse(_CODERS, "entropy coder")


def _valid(what: str, build: Callable[[], _T]) -> _T:
    """Run a value constructor, turning its ``ValueError`` into ``InvalidRequestError``."""
    try:
        return build()
    except (ValueError, TypeError) as exc:
        raise InvalidRequestError(f"invalid {what}: {exc}") from exc


def codec_spec_to_proto(spec: CodecSpec) -> pb.CodecSpec:
    """The wire form of a :class:`CodecSpec`.

    What the message's documentation gives a default is left out: no ``prune`` for no
    pruning, no ``targets`` for :data:`~fedsqueeze.codec.spec.DEFAULT_TARGETS`.
    """
    msg = pb.CodecSpec(
        float_format=_FLOAT_FORMATS[spec.float_format],
        entropy_level=spec.entropy_level,
        entropy_coder=_CODERS[spec.entropy_coder],
        targets=list(spec.targets) if spec.targets != DEFAULT_TARGETS else [],
        min_ndim=spec.min_ndim,
    )
    if spec.prune != PruneSpec():
        msg.prune.CopyFrom(
            pb.PruneSpec(
                method=_PRUNE_METHODS[spec.prune.method],
                sparsity=spec.prune.sparsity,
                threshold=spec.prune.threshold,
            )
        )
    if spec.topk is not None:
        msg.topk = spec.topk
    if spec.rank is not None:
        msg.rank = spec.rank
    if spec.levels is not None:
        msg.levels.extend(spec.levels)
    if spec.freeze:
        msg.freeze.extend(spec.freeze)
    if spec.grow:
        msg.grow.extend(spec.grow)
    if spec.quant is not None:
        q = spec.quant
        msg.quant.CopyFrom(
            pb.QuantSpec(
                bits=q.bits,
                scheme=_QUANT_SCHEMES[q.scheme],
                granularity=_GRANULARITIES[q.granularity],
                rounding=_ROUNDINGS[q.rounding],
            )
        )
        if q.block_size is not None:
            # Only block-wise specs carry these, so older peers see the same message.
            msg.quant.block_size = q.block_size
            msg.quant.scale_format = _SCALE_FORMATS[q.scales]
        if q.rotation is not Rotation.NONE:
            msg.quant.rotation = _ROTATIONS[q.rotation]
    return msg


def codec_spec_from_proto(msg: pb.CodecSpec) -> CodecSpec:
    """Inverse of :func:`codec_spec_to_proto`; an absent ``prune`` means no pruning, empty
    ``targets`` the default ones."""
    prune = PruneSpec()
    if msg.HasField("prune"):
        method = _prune_method_from_proto(msg.prune.method)
        prune = _valid(
            "prune spec", lambda: PruneSpec(method, msg.prune.sparsity, msg.prune.threshold)
        )
    quant: QuantSpec | None = None
    if msg.HasField("quant"):
        scheme = _quant_scheme_from_proto(msg.quant.scheme)
        granularity = _granularity_from_proto(msg.quant.granularity)
        rounding = _rounding_from_proto(msg.quant.rounding)
        block = msg.quant.block_size if msg.quant.HasField("block_size") else None
        scales = (
            _scale_format_from_proto(msg.quant.scale_format)
            if msg.quant.scale_format != pb.SCALE_FORMAT_UNSPECIFIED
            else None
        )
        rotation = _rotation_from_proto(msg.quant.rotation)
        quant = _valid(
            "quant spec",
            lambda: QuantSpec(
                msg.quant.bits, scheme, granularity, rounding, block, scales, rotation
            ),
        )
    float_format = _float_format_from_proto(msg.float_format)
    topk = msg.topk if msg.HasField("topk") else None
    rank = msg.rank if msg.HasField("rank") else None
    levels = tuple(msg.levels) or None
    coder = _coder_from_proto(msg.entropy_coder)
    return _valid(
        "codec spec",
        lambda: CodecSpec(
            prune=prune,
            topk=topk,
            rank=rank,
            levels=levels,
            quant=quant,
            float_format=float_format,
            entropy_level=msg.entropy_level,
            entropy_coder=coder,
            targets=tuple(msg.targets) or DEFAULT_TARGETS,
            min_ndim=msg.min_ndim,
            freeze=tuple(msg.freeze),
            grow=tuple(msg.grow),
        ),
    )
