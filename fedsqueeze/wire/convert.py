"""The only conversions between ``fedsqueeze.v1`` protobuf messages and Python values.

Every ``x_to_proto`` has an ``x_from_proto`` inverse. The ``_from_proto`` functions treat
their input as hostile: any message that does not describe a valid value raises
:class:`~fedsqueeze.errors.InvalidRequestError` (which the server reports as
``INVALID_ARGUMENT``), never a bare ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

from google.protobuf.message import DecodeError

from fedsqueeze.codec.spec import (
    CodecSpec,
    FloatFormat,
    Granularity,
    PruneMethod,
    PruneSpec,
    QuantScheme,
    QuantSpec,
    Rounding,
)
from fedsqueeze.errors import InvalidRequestError
from fedsqueeze.wire import transfer_pb2 as pb
from fedsqueeze.wire.types import (
    Manifest,
    ManifestRequest,
    SegmentData,
    SegmentInfo,
    SegmentRequest,
    UpdateMetadata,
    UpdateReceipt,
)

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
}
_GRANULARITIES: dict[Granularity, pb.Granularity.ValueType] = {
    Granularity.PER_TENSOR: pb.GRANULARITY_PER_TENSOR,
    Granularity.PER_CHANNEL: pb.GRANULARITY_PER_CHANNEL,
}
_ROUNDINGS: dict[Rounding, pb.Rounding.ValueType] = {
    Rounding.NEAREST: pb.ROUNDING_NEAREST,
    Rounding.STOCHASTIC: pb.ROUNDING_STOCHASTIC,
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


def _valid(what: str, build: Callable[[], _T]) -> _T:
    """Run a value constructor, turning its ``ValueError`` into ``InvalidRequestError``."""
    try:
        return build()
    except (ValueError, TypeError) as exc:
        raise InvalidRequestError(f"invalid {what}: {exc}") from exc


def _optional_digest(value: bytes) -> bytes | None:
    return value if value else None


# --------------------------------------------------------------------------- codec spec
def codec_spec_to_proto(spec: CodecSpec) -> pb.CodecSpec:
    """The wire form of a :class:`CodecSpec` (every field set explicitly)."""
    msg = pb.CodecSpec(
        prune=pb.PruneSpec(
            method=_PRUNE_METHODS[spec.prune.method],
            sparsity=spec.prune.sparsity,
            threshold=spec.prune.threshold,
        ),
        float_format=_FLOAT_FORMATS[spec.float_format],
        entropy_level=spec.entropy_level,
        targets=list(spec.targets),
        min_ndim=spec.min_ndim,
    )
    if spec.topk is not None:
        msg.topk = spec.topk
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
    return msg


def codec_spec_from_proto(msg: pb.CodecSpec) -> CodecSpec:
    """Inverse of :func:`codec_spec_to_proto`; an absent ``prune`` means no pruning."""
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
        quant = _valid(
            "quant spec", lambda: QuantSpec(msg.quant.bits, scheme, granularity, rounding)
        )
    float_format = _float_format_from_proto(msg.float_format)
    topk = msg.topk if msg.HasField("topk") else None
    return _valid(
        "codec spec",
        lambda: CodecSpec(
            prune=prune,
            topk=topk,
            quant=quant,
            float_format=float_format,
            entropy_level=msg.entropy_level,
            targets=tuple(msg.targets),
            min_ndim=msg.min_ndim,
        ),
    )


# --------------------------------------------------------------------------- manifest
def segment_info_to_proto(info: SegmentInfo) -> pb.SegmentDescriptor:
    """The wire form of one segment descriptor."""
    return pb.SegmentDescriptor(
        segment_id=info.segment_id,
        tensor_names=list(info.tensor_names),
        priority=info.priority,
        level=info.level,
        byte_length=info.byte_length,
        sha256=info.sha256,
    )


def segment_info_from_proto(msg: pb.SegmentDescriptor) -> SegmentInfo:
    """Inverse of :func:`segment_info_to_proto`."""
    return _valid(
        "segment descriptor",
        lambda: SegmentInfo(
            segment_id=msg.segment_id,
            tensor_names=tuple(msg.tensor_names),
            priority=msg.priority,
            level=msg.level,
            byte_length=msg.byte_length,
            sha256=msg.sha256,
        ),
    )


def manifest_to_proto(manifest: Manifest) -> pb.Manifest:
    """The wire form of a :class:`Manifest`."""
    return pb.Manifest(
        manifest_id=manifest.manifest_id,
        model_digest=manifest.model_digest,
        base_digest=manifest.base_digest or b"",
        codec_spec=codec_spec_to_proto(manifest.spec),
        encoded_bytes=manifest.encoded_bytes,
        raw_bytes=manifest.raw_bytes,
        encoded_sha256=manifest.encoded_sha256,
        decoded_digest=manifest.decoded_digest,
        segments=[segment_info_to_proto(info) for info in manifest.segments],
    )


def manifest_from_proto(msg: pb.Manifest) -> Manifest:
    """Inverse of :func:`manifest_to_proto`; checks that the sizes add up."""
    segments = tuple(segment_info_from_proto(s) for s in msg.segments)
    spec = codec_spec_from_proto(msg.codec_spec)
    manifest = _valid(
        "manifest",
        lambda: Manifest(
            manifest_id=msg.manifest_id,
            model_digest=msg.model_digest,
            base_digest=_optional_digest(msg.base_digest),
            spec=spec,
            raw_bytes=msg.raw_bytes,
            encoded_sha256=msg.encoded_sha256,
            decoded_digest=msg.decoded_digest,
            segments=segments,
        ),
    )
    if manifest.encoded_bytes != msg.encoded_bytes:
        raise InvalidRequestError("manifest: encoded_bytes is not the sum of segment sizes")
    return manifest


def manifest_response_to_proto(manifest: Manifest) -> pb.GetManifestResponse:
    """The ``GetManifest`` response carrying ``manifest``."""
    return pb.GetManifestResponse(manifest=manifest_to_proto(manifest))


def manifest_response_from_proto(msg: pb.GetManifestResponse) -> Manifest:
    """Inverse of :func:`manifest_response_to_proto`."""
    if not msg.HasField("manifest"):
        raise InvalidRequestError("GetManifest response without a manifest")
    return manifest_from_proto(msg.manifest)


# --------------------------------------------------------------------------- requests
def manifest_request_to_proto(request: ManifestRequest) -> pb.GetManifestRequest:
    """The wire form of a :class:`ManifestRequest`."""
    msg = pb.GetManifestRequest(
        model=request.model,
        base_digest=request.base_digest or b"",
        edge_id=request.edge_id,
        codec_spec=codec_spec_to_proto(request.spec),
    )
    if request.byte_budget is not None:
        msg.byte_budget = request.byte_budget
    return msg


def manifest_request_from_proto(msg: pb.GetManifestRequest) -> ManifestRequest:
    """Inverse of :func:`manifest_request_to_proto`; the codec spec is required."""
    if not msg.HasField("codec_spec"):
        raise InvalidRequestError("GetManifest request without a codec spec")
    spec = codec_spec_from_proto(msg.codec_spec)
    budget = msg.byte_budget if msg.HasField("byte_budget") else None
    return _valid(
        "manifest request",
        lambda: ManifestRequest(
            model=msg.model,
            base_digest=_optional_digest(msg.base_digest),
            edge_id=msg.edge_id,
            spec=spec,
            byte_budget=budget,
        ),
    )


def segment_request_to_proto(request: SegmentRequest) -> pb.StreamSegmentsRequest:
    """The wire form of a :class:`SegmentRequest` (held ids sorted, so it is canonical)."""
    return pb.StreamSegmentsRequest(
        manifest_id=request.manifest_id,
        held_segment_ids=sorted(request.held),
        edge_id=request.edge_id,
    )


def segment_request_from_proto(msg: pb.StreamSegmentsRequest) -> SegmentRequest:
    """Inverse of :func:`segment_request_to_proto`."""
    return _valid(
        "segment request",
        lambda: SegmentRequest(
            manifest_id=msg.manifest_id,
            held=frozenset(msg.held_segment_ids),
            edge_id=msg.edge_id,
        ),
    )


# --------------------------------------------------------------------------- segments
def segment_to_proto(data: SegmentData) -> pb.StreamSegmentsResponse:
    """One ``StreamSegments`` response message."""
    return pb.StreamSegmentsResponse(
        segment=pb.Segment(
            manifest_id=data.manifest_id, segment_id=data.segment_id, payload=data.payload
        )
    )


def segment_message(data: SegmentData) -> bytes:
    """The serialized ``StreamSegments`` response message carrying ``data``.

    Servers build it once per segment and stream the same bytes to every client.
    """
    return segment_to_proto(data).SerializeToString()


def segment_from_message(message: bytes) -> SegmentData:
    """Inverse of :func:`segment_message`, reading the payload with one copy.

    A segment message is tiny apart from its payload, so this reads the protobuf wire
    format directly (skipping unknown fields, as protobuf does) instead of parsing into a
    message and copying the payload out of it again. Anything it does not expect (a
    field repeated, groups, a field of another wire type) goes to the protobuf parser.

    Raises
    ------
    InvalidRequestError
        The bytes are not a ``StreamSegmentsResponse`` carrying a segment.
    """
    try:
        fast = _read_segment_response(message)
    except (_WireFormatError, IndexError, UnicodeDecodeError):
        fast = None
    if fast is not None:
        return fast
    try:
        parsed = pb.StreamSegmentsResponse.FromString(message)
    except DecodeError as exc:
        raise InvalidRequestError("malformed StreamSegments response") from exc
    return segment_from_proto(parsed)


class _WireFormatError(Exception):
    """Input the fast reader leaves to the protobuf parser."""


_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise _WireFormatError("varint too long")


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start, end) of each field; varints as (value, -1)."""
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = _varint(buf, pos)
            yield number, wire_type, value, -1
        elif wire_type == _LEN:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise _WireFormatError("field runs past the message")
            yield number, wire_type, pos, pos + length
            pos += length
        elif wire_type in (_I64, _I32):
            pos += 8 if wire_type == _I64 else 4
        else:
            raise _WireFormatError(f"wire type {wire_type}")
    if pos != end:
        raise _WireFormatError("truncated field")


def _read_segment_response(buf: bytes) -> SegmentData | None:
    outer = [(s, e) for n, t, s, e in _fields(buf, 0, len(buf)) if n == 1 and t == _LEN]
    if len(outer) != 1:
        return None
    manifest_id, segment_id, payload = "", 0, b""
    seen: set[int] = set()
    for number, wire_type, start, end in _fields(buf, *outer[0]):
        if number in seen and number in (1, 2, 3):
            return None
        seen.add(number)
        if number == 1 and wire_type == _LEN:
            manifest_id = buf[start:end].decode("utf-8")
        elif number == 2 and wire_type == _VARINT:
            segment_id = start & 0xFFFFFFFF
        elif number == 3 and wire_type == _LEN:
            payload = buf[start:end]
        elif number in (1, 2, 3):
            return None
    return SegmentData(manifest_id=manifest_id, segment_id=segment_id, payload=payload)


def segment_from_proto(msg: pb.StreamSegmentsResponse) -> SegmentData:
    """Inverse of :func:`segment_to_proto`."""
    if not msg.HasField("segment"):
        raise InvalidRequestError("StreamSegments response without a segment")
    seg = msg.segment
    return SegmentData(manifest_id=seg.manifest_id, segment_id=seg.segment_id, payload=seg.payload)


# --------------------------------------------------------------------------- updates
def update_metadata_to_proto(meta: UpdateMetadata) -> pb.PushUpdateRequest:
    """The first ``PushUpdate`` message, carrying ``meta``."""
    return pb.PushUpdateRequest(
        metadata=pb.UpdateMetadata(
            update_id=meta.update_id,
            edge_id=meta.edge_id,
            base_digest=meta.base_digest,
            total_bytes=meta.total_bytes,
            sha256=meta.sha256,
            codec_spec=codec_spec_to_proto(meta.spec),
        )
    )


def update_metadata_from_proto(msg: pb.PushUpdateRequest) -> UpdateMetadata:
    """Inverse of :func:`update_metadata_to_proto`; the message must carry metadata."""
    if msg.WhichOneof("part") != "metadata":
        raise InvalidRequestError("the first PushUpdate message must carry metadata")
    meta = msg.metadata
    if not meta.HasField("codec_spec"):
        raise InvalidRequestError("update metadata without a codec spec")
    spec = codec_spec_from_proto(meta.codec_spec)
    return _valid(
        "update metadata",
        lambda: UpdateMetadata(
            update_id=meta.update_id,
            edge_id=meta.edge_id,
            base_digest=meta.base_digest,
            total_bytes=meta.total_bytes,
            sha256=meta.sha256,
            spec=spec,
        ),
    )


def update_chunk_to_proto(chunk: bytes) -> pb.PushUpdateRequest:
    """A ``PushUpdate`` message carrying the next payload bytes."""
    return pb.PushUpdateRequest(chunk=chunk)


def update_chunk_from_proto(msg: pb.PushUpdateRequest) -> bytes:
    """Inverse of :func:`update_chunk_to_proto`; the message must carry a chunk."""
    if msg.WhichOneof("part") != "chunk":
        raise InvalidRequestError("PushUpdate messages after the first must carry chunks")
    return msg.chunk


def receipt_to_proto(receipt: UpdateReceipt) -> pb.PushUpdateResponse:
    """The ``PushUpdate`` response carrying ``receipt``."""
    return pb.PushUpdateResponse(
        receipt=pb.UpdateReceipt(
            update_id=receipt.update_id,
            stored_bytes=receipt.stored_bytes,
            sha256=receipt.sha256,
            duplicate=receipt.duplicate,
        )
    )


def receipt_from_proto(msg: pb.PushUpdateResponse) -> UpdateReceipt:
    """Inverse of :func:`receipt_to_proto`."""
    if not msg.HasField("receipt"):
        raise InvalidRequestError("PushUpdate response without a receipt")
    r = msg.receipt
    return _valid(
        "update receipt",
        lambda: UpdateReceipt(
            update_id=r.update_id,
            stored_bytes=r.stored_bytes,
            sha256=r.sha256,
            duplicate=r.duplicate,
        ),
    )
