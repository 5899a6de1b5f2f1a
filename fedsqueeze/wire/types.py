"""Python values of the ``fedsqueeze.v1`` wire messages (frozen, validated on creation).

:mod:`fedsqueeze.wire.convert` turns them into protobuf messages and back; everything
above the wire (server, client, coordinator, edge) works with these values only. Digests
are raw 32-byte SHA-256 values; ``bytes.hex()`` them for display.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fedsqueeze.codec.spec import CodecSpec
from fedsqueeze.wire.digests import SegmentDigest

#: Length of every digest on the wire (SHA-256), in bytes.
DIGEST_BYTES = 32
#: Longest update id, edge id or model name, in characters.
MAX_ID_CHARS = 128
#: Longest manifest key, in bytes (fedsqueeze servers make 16-byte keys).
MAX_MANIFEST_KEY_BYTES = 32
#: Most segments one manifest may list.
MAX_SEGMENTS = 1 << 16
#: Most other versions a request may say it holds (``held_digests``).
MAX_HELD_VERSIONS = 16

_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_HEX_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


def check_digest(value: bytes, what: str) -> bytes:
    """``value`` if it is a 32-byte digest; ``ValueError`` otherwise."""
    if not isinstance(value, bytes) or len(value) != DIGEST_BYTES:
        raise ValueError(f"{what} must be {DIGEST_BYTES} bytes")
    return value


def check_id(value: str, what: str) -> str:
    """``value`` if it is 1..128 characters of ``[A-Za-z0-9._:-]``; ``ValueError`` otherwise."""
    if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
        raise ValueError(f"{what} must be 1..{MAX_ID_CHARS} characters of [A-Za-z0-9._:-]")
    return value


def is_hex_digest(model: str) -> bool:
    """Whether ``model`` names a digest (64 lowercase hex characters) rather than a track."""
    return _HEX_DIGEST_RE.fullmatch(model) is not None


def check_manifest_key(value: bytes) -> bytes:
    """``value`` if it is a manifest key (1..32 bytes); ``ValueError`` otherwise."""
    if not isinstance(value, bytes) or not 1 <= len(value) <= MAX_MANIFEST_KEY_BYTES:
        raise ValueError(f"manifest key must be 1..{MAX_MANIFEST_KEY_BYTES} bytes")
    return value


def _check_optional_digest(value: bytes | None, what: str) -> None:
    if value is not None:
        check_digest(value, what)


@dataclass(frozen=True)
class SegmentInfo:
    """One segment as a manifest lists it.

    Parameters
    ----------
    segment_id
        Position of the segment in the encoded payload (0, 1, ... without gaps).
    tensor_names
        State-dict keys whose records the segment carries; empty when it carries every
        tensor of the model.
    priority
        Sending priority (the manifest's order is the sending order).
    level
        Refinement level: 0 for the base layer.
    byte_length
        Payload size, in bytes.
    sha256
        Digest of the payload (32 bytes) by the manifest's ``segment_digest``: SHA-256
        unless it says BLAKE3 (the name is the wire field's).
    """

    segment_id: int
    tensor_names: tuple[str, ...]
    priority: int
    level: int
    byte_length: int
    sha256: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.segment_id < MAX_SEGMENTS:
            raise ValueError(f"segment_id out of range: {self.segment_id}")
        if self.level < 0 or self.byte_length < 0:
            raise ValueError("level and byte_length must be >= 0")
        check_digest(self.sha256, "segment sha256")


@dataclass(frozen=True)
class PartRef:
    """A tensor the client takes from its cache instead of the stream.

    Parameters
    ----------
    tensor_name
        Its name (state-dict key) in the model being fetched.
    part_digest
        :func:`~fedsqueeze.transport.parts.part_digest` of its content (32 bytes).
    """

    tensor_name: str
    part_digest: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.tensor_name, str) or not self.tensor_name:
            raise ValueError("a held part needs a tensor name")
        check_digest(self.part_digest, "part_digest")


@dataclass(frozen=True)
class Manifest:
    """Everything a client needs to fetch, verify and reassemble one encoded model.

    The wire form leaves out what the request it answers already says
    (:func:`fedsqueeze.wire.convert.manifest_to_proto`); this value holds everything.

    Parameters
    ----------
    manifest_key
        Opaque key of this encoding (1..32 bytes; names it in segment requests).
    model_digest
        Digest of the target model version.
    base_digest
        Digest of the base the payload is a delta from; ``None`` for a full model.
    spec
        How the payload was encoded.
    raw_bytes
        Size of the target model's tensors in their own dtypes, in bytes.
    decoded_digest
        Digest of the model a client obtains by decoding (``model_digest`` when lossless).
    segments
        The segments in sending (priority) order; ids are exactly ``0..n-1``. Their
        sha256 digests cover every byte of the encoded payload.
    prefix_segments
        A progressive encoding truncated to a byte budget: the client gets (and decodes)
        only segments ``0..prefix_segments-1``; 0 means every segment.
    smallest_prefix_bytes
        Progressive encodings: payload bytes of the smallest decodable prefix (0: not
        progressive).
    held_parts
        Tensors the payload leaves out because the client holds their content (each name
        once, and in no segment's ``tensor_names``).
    segment_digest
        The algorithm of the segments' digests (``SegmentInfo.sha256``).
    """

    manifest_key: bytes
    model_digest: bytes
    base_digest: bytes | None
    spec: CodecSpec
    raw_bytes: int
    decoded_digest: bytes
    segments: tuple[SegmentInfo, ...]
    prefix_segments: int = 0
    smallest_prefix_bytes: int = 0
    held_parts: tuple[PartRef, ...] = ()
    segment_digest: SegmentDigest = SegmentDigest.SHA256
    _by_id: dict[int, SegmentInfo] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_manifest_key(self.manifest_key)
        check_digest(self.model_digest, "model_digest")
        _check_optional_digest(self.base_digest, "base_digest")
        check_digest(self.decoded_digest, "decoded_digest")
        if self.raw_bytes < 0:
            raise ValueError("raw_bytes must be >= 0")
        if not self.segments or len(self.segments) > MAX_SEGMENTS:
            raise ValueError(f"a manifest lists 1..{MAX_SEGMENTS} segments")
        by_id = {info.segment_id: info for info in self.segments}
        if sorted(by_id) != list(range(len(self.segments))):
            raise ValueError("segment ids must be 0..n-1, each once")
        if not 0 <= self.prefix_segments <= len(self.segments):
            raise ValueError("prefix_segments must be in 0..number of segments")
        if self.prefix_segments and [s.segment_id for s in self.segments] != sorted(by_id):
            raise ValueError("a truncated manifest sends its segments in id order")
        if self.smallest_prefix_bytes < 0:
            raise ValueError("smallest_prefix_bytes must be >= 0")
        held_names = [ref.tensor_name for ref in self.held_parts]
        if len(set(held_names)) != len(held_names):
            raise ValueError("held_parts names a tensor twice")
        streamed = {name for info in self.segments for name in info.tensor_names}
        both = sorted(streamed.intersection(held_names))
        if both:
            raise ValueError(f"held_parts names tensors the stream also carries: {both[:3]}")
        object.__setattr__(self, "_by_id", by_id)

    @property
    def truncated(self) -> bool:
        """Whether the client gets only a prefix of the segments."""
        return 0 < self.prefix_segments < len(self.segments)

    @property
    def wanted(self) -> tuple[SegmentInfo, ...]:
        """The segments the client is to hold at the end (all, or the prefix)."""
        return self.segments[: self.prefix_segments] if self.truncated else self.segments

    @property
    def wanted_bytes(self) -> int:
        """Payload bytes of :attr:`wanted`."""
        return sum(info.byte_length for info in self.wanted)

    @property
    def encoded_bytes(self) -> int:
        """Sum of all segments' sizes, in bytes."""
        return sum(info.byte_length for info in self.segments)

    def segment(self, segment_id: int) -> SegmentInfo:
        """The descriptor of ``segment_id``; ``KeyError`` if the manifest has none."""
        return self._by_id[segment_id]

    def has_segment(self, segment_id: int) -> bool:
        """Whether the manifest lists ``segment_id``."""
        return segment_id in self._by_id


@dataclass(frozen=True)
class ManifestRequest:
    """What a client asks for (``Fetch``, ``GetManifest``); the calling edge is the one
    its credentials name.

    Parameters
    ----------
    model
        A track name such as ``"global"``, or a model digest as 64 lowercase hex chars
        (sent as 32 raw bytes).
    base_digest
        Digest of the model the client holds, or ``None``.
    spec
        How the client wants the model encoded.
    byte_budget
        Most encoded bytes the client accepts, or ``None`` for no limit.
    held_digests
        Digests of other versions the client holds besides its base (at most
        :data:`MAX_HELD_VERSIONS`, sorted, none repeated, not the base): their tensors
        need not travel (:mod:`fedsqueeze.transport.parts`).
    segment_digest
        The segment digest the client would rather verify with (the server may answer
        with SHA-256; the manifest says).
    """

    model: str
    base_digest: bytes | None
    spec: CodecSpec
    byte_budget: int | None = None
    held_digests: tuple[bytes, ...] = ()
    segment_digest: SegmentDigest = SegmentDigest.SHA256

    def __post_init__(self) -> None:
        check_id(self.model, "model")
        _check_optional_digest(self.base_digest, "base_digest")
        if self.byte_budget is not None and self.byte_budget <= 0:
            raise ValueError("byte_budget must be > 0")
        if len(self.held_digests) > MAX_HELD_VERSIONS:
            raise ValueError(f"at most {MAX_HELD_VERSIONS} held_digests")
        for digest in self.held_digests:
            check_digest(digest, "held digest")
        if list(self.held_digests) != sorted(set(self.held_digests)):
            raise ValueError("held_digests must be sorted, each once")
        if self.base_digest is not None and self.base_digest in self.held_digests:
            raise ValueError("held_digests repeats the base")


@dataclass(frozen=True)
class SegmentRequest:
    """Segments of one manifest a client holds (verified): what ``StreamSegments`` leaves
    out, or what a ``Fetch`` after a lost manifest names."""

    manifest_key: bytes
    held: frozenset[int]
    prefix_segments: int = 0

    def __post_init__(self) -> None:
        check_manifest_key(self.manifest_key)
        if len(self.held) > MAX_SEGMENTS or any(not 0 <= i < MAX_SEGMENTS for i in self.held):
            raise ValueError("held segment ids out of range")
        if not 0 <= self.prefix_segments <= MAX_SEGMENTS:
            raise ValueError("prefix_segments out of range")


@dataclass(frozen=True)
class SegmentData:
    """One segment's bytes as streamed (the stream is bound to one manifest).

    ``payload`` is a read-only ``memoryview`` into the received message when read
    without copying (:func:`fedsqueeze.wire.convert.segment_view_from_message`).
    """

    segment_id: int
    payload: bytes | memoryview


@dataclass(frozen=True)
class UpdateMetadata:
    """First message of an upload: what follows (the uploading edge is the caller).

    Parameters
    ----------
    update_id
        Client-chosen id; an upload is stored once per id.
    base_digest
        Digest of the model version the update was trained from; ``None`` when the
        payload is a delta (its header names the base).
    total_bytes
        Size of the whole encoded payload, in bytes (> 0).
    sha256
        SHA-256 of the whole encoded payload.
    """

    update_id: str
    base_digest: bytes | None
    total_bytes: int
    sha256: bytes

    def __post_init__(self) -> None:
        check_id(self.update_id, "update_id")
        _check_optional_digest(self.base_digest, "base_digest")
        check_digest(self.sha256, "sha256")
        if self.total_bytes <= 0:
            raise ValueError("total_bytes must be > 0")


@dataclass(frozen=True)
class UpdateReceipt:
    """The server's acknowledgement of the update a ``PushUpdate`` call described.

    The server answers only after the payload matched the metadata's sha256, so the
    receipt needs no echo of the id or the digest.
    """

    stored_bytes: int
    duplicate: bool

    def __post_init__(self) -> None:
        if self.stored_bytes <= 0:
            raise ValueError("stored_bytes must be > 0")
