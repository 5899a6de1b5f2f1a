"""The only conversions between ``fedsqueeze.v1`` protobuf messages and Python values.

Every ``x_to_proto`` has an ``x_from_proto`` inverse. The ``_from_proto`` functions treat
their input as hostile: any message that does not describe a valid value raises
:class:`~fedsqueeze.errors.InvalidRequestError` (which the server reports as
``INVALID_ARGUMENT``), never a bare ``ValueError``.

A manifest is converted relative to the request it answers: its wire form leaves out
what that request already says (the model's digest when it was asked for by digest, the
base, the codec spec when it is the one asked for), so both directions take the request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from google.protobuf.message import DecodeError

from fedsqueeze.errors import InvalidRequestError
from fedsqueeze.wire import transfer_pb2 as pb
from fedsqueeze.wire.digests import SegmentDigest
from fedsqueeze.wire.segment_reader import read_segment_response
from fedsqueeze.wire.spec_convert import codec_spec_from_proto, codec_spec_to_proto
from fedsqueeze.wire.types import (
    DIGEST_BYTES,
    Manifest,
    ManifestRequest,
    PartRef,
    SegmentData,
    SegmentInfo,
    SegmentRequest,
    UpdateMetadata,
    UpdateReceipt,
    is_hex_digest,
)

__all__ = [
    "codec_spec_from_proto",
    "codec_spec_to_proto",
    "fetch_manifest_message",
    "fetch_part_from_message",
    "fetch_request_from_proto",
    "fetch_request_to_proto",
    "manifest_from_proto",
    "manifest_request_from_proto",
    "manifest_request_to_proto",
    "manifest_response_from_proto",
    "manifest_response_to_proto",
    "manifest_to_proto",
    "part_ref_from_proto",
    "part_ref_to_proto",
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
#: SHA-256 goes as "unset", as older peers send it: their messages keep their bytes.
_DIGEST_TO_WIRE = {
    SegmentDigest.SHA256: pb.SEGMENT_DIGEST_UNSPECIFIED,
    SegmentDigest.BLAKE3: pb.SEGMENT_DIGEST_BLAKE3,
}
_DIGEST_FROM_WIRE = {
    pb.SEGMENT_DIGEST_UNSPECIFIED: SegmentDigest.SHA256,
    pb.SEGMENT_DIGEST_SHA256: SegmentDigest.SHA256,
    pb.SEGMENT_DIGEST_BLAKE3: SegmentDigest.BLAKE3,
}


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


def part_ref_to_proto(ref: PartRef) -> pb.PartRef:
    """The wire form of one held part."""
    return pb.PartRef(tensor_name=ref.tensor_name, part_digest=ref.part_digest)


def part_ref_from_proto(msg: pb.PartRef) -> PartRef:
    """Inverse of :func:`part_ref_to_proto`."""
    return _valid("held part", lambda: PartRef(msg.tensor_name, msg.part_digest))


def manifest_to_proto(manifest: Manifest, request: ManifestRequest) -> pb.Manifest:
    """The wire form of ``manifest`` as the answer to ``request``.

    Raises
    ------
    ValueError
        ``manifest`` is a delta from another base than the request's (a server bug).
    """
    if manifest.base_digest is not None and manifest.base_digest != request.base_digest:
        raise ValueError("a manifest can only be a delta from the base the request named")
    asked_by_digest = request.model == manifest.model_digest.hex()
    msg = pb.Manifest(
        manifest_key=manifest.manifest_key,
        model_digest=b"" if asked_by_digest else manifest.model_digest,
        delta=manifest.base_digest is not None,
        raw_bytes=manifest.raw_bytes,
        decoded_digest=(
            b"" if manifest.decoded_digest == manifest.model_digest else manifest.decoded_digest
        ),
        segments=[segment_info_to_proto(info) for info in manifest.segments],
        prefix_segments=manifest.prefix_segments if manifest.truncated else 0,
        smallest_prefix_bytes=manifest.smallest_prefix_bytes,
        held_parts=[part_ref_to_proto(ref) for ref in manifest.held_parts],
        segment_digest=_DIGEST_TO_WIRE[manifest.segment_digest],
    )
    if manifest.spec != request.spec:
        msg.codec_spec.CopyFrom(codec_spec_to_proto(manifest.spec))
    return msg


def manifest_from_proto(msg: pb.Manifest, request: ManifestRequest) -> Manifest:
    """Inverse of :func:`manifest_to_proto`: what was left out is taken from ``request``."""
    segments = tuple(segment_info_from_proto(s) for s in msg.segments)
    spec = codec_spec_from_proto(msg.codec_spec) if msg.HasField("codec_spec") else request.spec
    model_digest = msg.model_digest
    if not model_digest:
        if not is_hex_digest(request.model):
            raise InvalidRequestError("manifest without the digest of the track's model")
        model_digest = bytes.fromhex(request.model)
    if msg.delta and request.base_digest is None:
        raise InvalidRequestError("manifest of a delta, but the request named no base")
    base_digest = request.base_digest if msg.delta else None
    if msg.held_parts and not request.held_digests:
        raise InvalidRequestError(
            "manifest names held parts, but the request named no held versions"
        )
    held_parts = tuple(part_ref_from_proto(ref) for ref in msg.held_parts)
    algorithm = _DIGEST_FROM_WIRE.get(msg.segment_digest)
    if algorithm is None:
        raise InvalidRequestError(
            f"manifest with segment digests of an unknown algorithm ({msg.segment_digest})"
        )
    return _valid(
        "manifest",
        lambda: Manifest(
            manifest_key=msg.manifest_key,
            model_digest=model_digest,
            base_digest=base_digest,
            spec=spec,
            raw_bytes=msg.raw_bytes,
            decoded_digest=msg.decoded_digest or model_digest,
            segments=segments,
            prefix_segments=msg.prefix_segments,
            smallest_prefix_bytes=msg.smallest_prefix_bytes,
            held_parts=held_parts,
            segment_digest=algorithm,
        ),
    )


def manifest_response_to_proto(
    manifest: Manifest, request: ManifestRequest
) -> pb.GetManifestResponse:
    """The ``GetManifest`` response carrying ``manifest``."""
    return pb.GetManifestResponse(manifest=manifest_to_proto(manifest, request))


def manifest_response_from_proto(msg: pb.GetManifestResponse, request: ManifestRequest) -> Manifest:
    """Inverse of :func:`manifest_response_to_proto`."""
    if not msg.HasField("manifest"):
        raise InvalidRequestError("GetManifest response without a manifest")
    return manifest_from_proto(msg.manifest, request)


def fetch_manifest_message(manifest: Manifest, request: ManifestRequest) -> bytes:
    """The serialized first ``Fetch`` response message: ``manifest``, answering ``request``."""
    message: bytes = pb.FetchResponse(
        manifest=manifest_to_proto(manifest, request)
    ).SerializeToString()
    return message


# --------------------------------------------------------------------------- requests
def _set_model(msg: pb.FetchRequest | pb.GetManifestRequest, request: ManifestRequest) -> None:
    if is_hex_digest(request.model):
        msg.model_digest = bytes.fromhex(request.model)  # 32 bytes instead of 64
    else:
        msg.model = request.model
    if request.base_digest is not None:
        msg.base_digest = request.base_digest
    msg.codec_spec.CopyFrom(codec_spec_to_proto(request.spec))
    if request.byte_budget is not None:
        msg.byte_budget = request.byte_budget
    msg.held_digests.extend(request.held_digests)
    msg.segment_digest = _DIGEST_TO_WIRE[request.segment_digest]


def _request_from(msg: pb.FetchRequest | pb.GetManifestRequest, what: str) -> ManifestRequest:
    if not msg.HasField("codec_spec"):
        raise InvalidRequestError(f"{what} without a codec spec")
    if msg.model and msg.model_digest:
        raise InvalidRequestError(f"{what} names the model twice: give model or model_digest")
    model = msg.model
    if msg.model_digest:
        if len(msg.model_digest) != DIGEST_BYTES:
            raise InvalidRequestError(f"{what}: model_digest must be {DIGEST_BYTES} bytes")
        model = msg.model_digest.hex()
    spec = codec_spec_from_proto(msg.codec_spec)
    budget = msg.byte_budget if msg.HasField("byte_budget") else None
    # A digest this build does not know (a newer client's): answer with SHA-256, which
    # the manifest then names.
    wanted = _DIGEST_FROM_WIRE.get(msg.segment_digest, SegmentDigest.SHA256)
    return _valid(
        what,
        lambda: ManifestRequest(
            model=model,
            base_digest=_optional_digest(msg.base_digest),
            spec=spec,
            byte_budget=budget,
            held_digests=tuple(msg.held_digests),
            segment_digest=wanted,
        ),
    )


def manifest_request_to_proto(request: ManifestRequest) -> pb.GetManifestRequest:
    """The ``GetManifest`` request for ``request``."""
    msg = pb.GetManifestRequest()
    _set_model(msg, request)
    return msg


def manifest_request_from_proto(msg: pb.GetManifestRequest) -> ManifestRequest:
    """Inverse of :func:`manifest_request_to_proto`; the codec spec is required."""
    return _request_from(msg, "GetManifest request")


def fetch_request_to_proto(
    request: ManifestRequest, held: SegmentRequest | None = None
) -> pb.FetchRequest:
    """The ``Fetch`` request for ``request``, naming the segments ``held`` (held ids sorted,
    so the message is canonical)."""
    msg = pb.FetchRequest()
    _set_model(msg, request)
    if held is not None and held.held:
        msg.held_manifest_key = held.manifest_key
        msg.held_segment_ids.extend(sorted(held.held))
    return msg


def fetch_request_from_proto(
    msg: pb.FetchRequest,
) -> tuple[ManifestRequest, SegmentRequest | None]:
    """Inverse of :func:`fetch_request_to_proto`."""
    request = _request_from(msg, "Fetch request")
    if not msg.held_segment_ids:
        return request, None
    if not msg.held_manifest_key:
        raise InvalidRequestError("Fetch request names held segments but not their manifest")
    held = _valid(
        "held segments",
        lambda: SegmentRequest(msg.held_manifest_key, frozenset(msg.held_segment_ids)),
    )
    return request, held


def segment_request_to_proto(request: SegmentRequest) -> pb.StreamSegmentsRequest:
    """The wire form of a :class:`SegmentRequest` (held ids sorted, so it is canonical)."""
    return pb.StreamSegmentsRequest(
        manifest_key=request.manifest_key,
        held_segment_ids=sorted(request.held),
        prefix_segments=request.prefix_segments,
    )


def segment_request_from_proto(msg: pb.StreamSegmentsRequest) -> SegmentRequest:
    """Inverse of :func:`segment_request_to_proto`."""
    return _valid(
        "segment request",
        lambda: SegmentRequest(
            manifest_key=msg.manifest_key,
            held=frozenset(msg.held_segment_ids),
            prefix_segments=msg.prefix_segments,
        ),
    )


# --------------------------------------------------------------------------- segments
def segment_to_proto(data: SegmentData) -> pb.StreamSegmentsResponse:
    """One ``StreamSegments`` response message."""
    payload = data.payload if isinstance(data.payload, bytes) else bytes(data.payload)
    return pb.StreamSegmentsResponse(
        segment=pb.Segment(segment_id=data.segment_id, payload=payload)
    )


def segment_message(data: SegmentData) -> bytes:
    """The serialized segment message carrying ``data``: a ``StreamSegments`` response, and
    byte for byte a ``Fetch`` response (both carry the segment in field 1).

    Servers build it once per segment and stream the same bytes to every client.
    """
    message: bytes = segment_to_proto(data).SerializeToString()
    return message


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


def fetch_part_from_message(message: bytes) -> SegmentData | pb.Manifest:
    """One ``Fetch`` response message: a segment (payload as a view, like
    :func:`segment_view_from_message`) or the manifest, still in its wire form (convert
    it with :func:`manifest_from_proto` and the request).

    Raises
    ------
    InvalidRequestError
        The bytes are not a ``FetchResponse`` carrying a segment or a manifest.
    """
    fast = read_segment_response(message, copy=False)
    if fast is not None:
        return fast
    try:
        parsed = pb.FetchResponse.FromString(message)
    except DecodeError as exc:
        raise InvalidRequestError("malformed Fetch response") from exc
    part = parsed.WhichOneof("part")
    if part == "manifest":
        return parsed.manifest
    if part == "segment":
        return SegmentData(parsed.segment.segment_id, parsed.segment.payload)
    raise InvalidRequestError("Fetch response without a segment or a manifest")


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
    return SegmentData(segment_id=seg.segment_id, payload=seg.payload)


# --------------------------------------------------------------------------- updates
def update_metadata_to_proto(meta: UpdateMetadata) -> pb.PushUpdateRequest:
    """The first ``PushUpdate`` message, carrying ``meta``."""
    return pb.PushUpdateRequest(
        metadata=pb.UpdateMetadata(
            update_id=meta.update_id,
            base_digest=meta.base_digest or b"",
            total_bytes=meta.total_bytes,
            sha256=meta.sha256,
        )
    )


def update_metadata_from_proto(msg: pb.PushUpdateRequest) -> UpdateMetadata:
    """Inverse of :func:`update_metadata_to_proto`; the message must carry metadata."""
    if msg.WhichOneof("part") != "metadata":
        raise InvalidRequestError("the first PushUpdate message must carry metadata")
    meta = msg.metadata
    return _valid(
        "update metadata",
        lambda: UpdateMetadata(
            update_id=meta.update_id,
            base_digest=_optional_digest(meta.base_digest),
            total_bytes=meta.total_bytes,
            sha256=meta.sha256,
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
        receipt=pb.UpdateReceipt(stored_bytes=receipt.stored_bytes, duplicate=receipt.duplicate)
    )


def receipt_from_proto(msg: pb.PushUpdateResponse) -> UpdateReceipt:
    """Inverse of :func:`receipt_to_proto`."""
    if not msg.HasField("receipt"):
        raise InvalidRequestError("PushUpdate response without a receipt")
    r = msg.receipt
    return _valid(
        "update receipt",
        lambda: UpdateReceipt(stored_bytes=r.stored_bytes, duplicate=r.duplicate),
    )
