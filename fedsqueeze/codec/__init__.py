"""The compression codec: pure functions from tensors to bytes and back.

Public entry points: :class:`CodecSpec` (with :class:`PruneSpec`, :class:`QuantSpec`),
:func:`encode_state`, :func:`decode_state`, :class:`EncodedModel`, :func:`state_digest`,
:func:`split_segments` / :func:`join_segments`, :class:`NonFinite` (what ``encode_state``
does with NaN/Inf). Errors are ``fedsqueeze.errors.CodecError`` subclasses.
"""

from fedsqueeze.codec.container import DecodeLimits, TensorRecord
from fedsqueeze.codec.digest import state_digest
from fedsqueeze.codec.finite import NonFinite
from fedsqueeze.codec.model import (
    EncodedModel,
    PrefixDecoded,
    decode_prefix,
    decode_state,
    encode_state,
    smallest_prefix,
)
from fedsqueeze.codec.segments import (
    Segment,
    join_prefix,
    join_segments,
    split_progressive,
    split_segments,
)
from fedsqueeze.codec.spec import (
    PRESETS,
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
    preset,
)

__all__ = [
    "PRESETS",
    "CodecSpec",
    "DecodeLimits",
    "EncodedModel",
    "EntropyCoder",
    "FloatFormat",
    "Granularity",
    "NonFinite",
    "PrefixDecoded",
    "PruneMethod",
    "PruneSpec",
    "QuantScheme",
    "QuantSpec",
    "Rotation",
    "Rounding",
    "ScaleFormat",
    "Segment",
    "TensorRecord",
    "decode_prefix",
    "decode_state",
    "encode_state",
    "join_prefix",
    "join_segments",
    "preset",
    "smallest_prefix",
    "split_progressive",
    "split_segments",
    "state_digest",
]
