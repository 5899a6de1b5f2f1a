"""The only conversions between ``fedsqueeze.v1`` protobuf messages and Python values.

Every ``x_to_proto`` has an ``x_from_proto`` inverse. The ``_from_proto`` functions treat
their input as hostile: any message that does not describe a valid value raises
:class:`~fedsqueeze.errors.InvalidRequestError` (which the server reports as
``INVALID_ARGUMENT``), never a bare ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from google.protobuf.message import DecodeError

from fedsqueeze.errors import InvalidRequestError
from fedsqueeze.wire import transfer_pb2 as pb
from fedsqueeze.wire.segment_reader import read_segment_response
from fedsqueeze.wire.spec_convert import codec_spec_from_proto, codec_spec_to_proto
from fedsqueeze.wire.types import (
    Manifest,
    ManifestRequest,
    SegmentData,
    SegmentInfo,
    SegmentRequest,
    UpdateMetadata,
    UpdateReceipt,
)

__all__ = [
    "codec_spec_from_proto",
    "codec_spec_to_proto",
    "manifest_from_proto",
    "manifest_request_from_proto",
    "manifest_request_to_proto",
    "manifest_response_from_proto",
    "manifest_response_to_proto",
    "manifest_to_proto",
    "receipt_from_proto",
    "receipt_to_proto",
    "segment_from_message",
    "segment_from_proto",
    "segment_info_from_proto",
    "segment_info_to_proto",
    "segment_message",
    "segment_request_from_proto",
    "segment_request_to_proto",
    "segment_to_proto",
    "segment_view_from_message",
    "update_chunk_from_proto",
    "update_chunk_to_proto",
    "update_metadata_from_proto",
    "update_metadata_to_proto",
]

_T = TypeVar("_T")


def _valid(what: str, build: Callable[[], _T]) -> _T:
    """Run a value constructor, turning its ``ValueError`` into ``InvalidRequestError``."""
    try:
        return build()
    except (ValueError, TypeError) as exc:
        raise InvalidRequestError(f"invalid {what}: {exc}") from exc


def _optional_digest(value: bytes) -> bytes | None:
    return value if value else None


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
    payload = data.payload if isinstance(data.payload, bytes) else bytes(data.payload)
    return pb.StreamSegmentsResponse(
        segment=pb.Segment(
            manifest_id=data.manifest_id, segment_id=data.segment_id, payload=payload
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
    fast = read_segment_response(message, copy=True)
    if fast is not None:
        return fast
    return _parse_segment_response(message)


def segment_view_from_message(message: bytes) -> SegmentData:
    """Like :func:`segment_from_message`, with the payload as a view into ``message``.

    The client's receive path: the payload is hashed and copied once, into the buffer
    that holds the model, straight from the received message.
    """
    fast = read_segment_response(message, copy=False)
    if fast is not None:
        return fast
    return _parse_segment_response(message)


def _parse_segment_response(message: bytes) -> SegmentData:
    try:
        parsed = pb.StreamSegmentsResponse.FromString(message)
    except DecodeError as exc:
        raise InvalidRequestError("malformed StreamSegments response") from exc
    return segment_from_proto(parsed)


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
