"""Segment digests: BLAKE3 when both sides can, SHA-256 with every older peer.

The manifest says which algorithm its segments were digested with; a client asks for
one; a server that cannot (no ``blake3`` package, or an older build that does not know
the field) answers with SHA-256. SHA-256 manifests and requests keep their exact bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import torch

from fedsqueeze.codec import CodecSpec, state_digest
from fedsqueeze.errors import ConfigError, IntegrityError, InvalidRequestError
from fedsqueeze.transport import FetchState, service
from fedsqueeze.wire import digests
from fedsqueeze.wire import transfer_pb2 as pb
from fedsqueeze.wire.convert import (
    fetch_request_from_proto,
    fetch_request_to_proto,
    manifest_from_proto,
    manifest_to_proto,
)
from fedsqueeze.wire.digests import SegmentDigest, segment_digest
from fedsqueeze.wire.spec_convert import codec_spec_to_proto
from fedsqueeze.wire.types import Manifest, ManifestRequest, SegmentData, SegmentInfo
from tests.transport.conftest import make_state

blake3 = pytest.importorskip("blake3")
Fixture = Callable[..., Any]
pytestmark = pytest.mark.timeout(60)

#: BLAKE3's published test vector: the digest of no bytes.
BLAKE3_EMPTY = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


def _manifest(algorithm: SegmentDigest, payload: bytes) -> Manifest:
    info = SegmentInfo(0, (), 0, 0, len(payload), segment_digest(algorithm, payload))
    return Manifest(
        manifest_key=b"k" * 16,
        model_digest=b"m" * 32,
        base_digest=None,
        spec=CodecSpec(),
        raw_bytes=len(payload),
        decoded_digest=b"m" * 32,
        segments=(info,),
        segment_digest=algorithm,
    )


def test_the_algorithms_are_the_published_ones() -> None:
    assert segment_digest(SegmentDigest.BLAKE3, b"").hex() == BLAKE3_EMPTY
    data = bytes(range(256)) * 4096
    assert segment_digest(SegmentDigest.SHA256, data) == hashlib.sha256(data).digest()
    assert segment_digest(SegmentDigest.BLAKE3, memoryview(data)) == blake3.blake3(data).digest()


def test_sha256_messages_keep_their_bytes_and_blake3_adds_one_field() -> None:
    request = ManifestRequest("global", None, CodecSpec())
    old = fetch_request_to_proto(request).SerializeToString()
    new = fetch_request_to_proto(
        ManifestRequest("global", None, CodecSpec(), segment_digest=SegmentDigest.BLAKE3)
    ).SerializeToString()
    # Field 9, varint 2: two bytes more; a SHA-256 request is what older clients send.
    assert new == old + bytes([9 << 3, 2])
    sha = manifest_to_proto(_manifest(SegmentDigest.SHA256, b"x" * 100), request)
    assert not sha.HasField("codec_spec") and sha.segment_digest == 0
    assert b"\x78" not in sha.SerializeToString()[-2:]  # field 15 left out
    fast = manifest_to_proto(_manifest(SegmentDigest.BLAKE3, b"x" * 100), request)
    assert fast.SerializeToString().endswith(bytes([15 << 3, 2]))
    # SHA-256 said explicitly (SEGMENT_DIGEST_SHA256) is read as SHA-256 too.
    sha.segment_digest = pb.SEGMENT_DIGEST_SHA256
    assert manifest_from_proto(sha, request).segment_digest is SegmentDigest.SHA256


def test_what_older_peers_send_means_sha256() -> None:
    # An older client's request: no segment_digest field.
    old = pb.FetchRequest(model="global", codec_spec=codec_spec_to_proto(CodecSpec()))
    request, _ = fetch_request_from_proto(pb.FetchRequest.FromString(old.SerializeToString()))
    assert request.segment_digest is SegmentDigest.SHA256
    # An older server's manifest: no segment_digest field either.
    wire = manifest_to_proto(_manifest(SegmentDigest.SHA256, b"y" * 10), request)
    wire.ClearField("segment_digest")
    assert manifest_from_proto(wire, request).segment_digest is SegmentDigest.SHA256


def test_unknown_algorithms_are_answered_with_sha256_and_refused_in_a_manifest() -> None:
    future = pb.FetchRequest(model="global", codec_spec=codec_spec_to_proto(CodecSpec()))
    future.segment_digest = 7  # type: ignore[assignment]  # a newer client's algorithm
    request, _ = fetch_request_from_proto(future)
    assert request.segment_digest is SegmentDigest.SHA256
    wire = manifest_to_proto(_manifest(SegmentDigest.SHA256, b"z"), request)
    wire.segment_digest = 7  # type: ignore[assignment]
    with pytest.raises(InvalidRequestError, match="unknown algorithm"):
        manifest_from_proto(wire, request)


def test_a_segment_is_checked_with_its_manifests_algorithm() -> None:
    payload = b"p" * 5000
    state = FetchState(max_segment_refetches=0)
    state.adopt(_manifest(SegmentDigest.BLAKE3, payload))
    assert state.accept(SegmentData(0, payload))
    # The same bytes listed with a SHA-256 digest but a BLAKE3 manifest do not verify.
    wrong = _manifest(SegmentDigest.BLAKE3, payload)
    sha_info = SegmentInfo(0, (), 0, 0, len(payload), hashlib.sha256(payload).digest())
    other = FetchState(max_segment_refetches=0)
    other.adopt(replace(wrong, segments=(sha_info,)))
    with pytest.raises(IntegrityError):
        other.accept(SegmentData(0, payload))


def test_held_segments_are_kept_only_under_the_same_algorithm() -> None:
    payload = b"q" * 3000
    state = FetchState()
    state.adopt(_manifest(SegmentDigest.SHA256, payload))
    assert state.accept(SegmentData(0, payload))
    assert state.adopt(_manifest(SegmentDigest.SHA256, payload)) == 1
    assert state.adopt(_manifest(SegmentDigest.BLAKE3, payload)) == 0


@pytest.mark.parametrize("algorithm", list(SegmentDigest))
def test_a_fetch_verifies_with_what_it_asked_for(
    algorithm: SegmentDigest, source: Any, store: Any, start_server: Fixture, connect: Fixture
) -> None:
    state = make_state(5)
    digest = source.publish(state)
    server = start_server(source, store)
    result = connect(server, segment_digest=algorithm).fetch(spec=CodecSpec(entropy_level=0))
    assert result.manifest.segment_digest is algorithm
    assert result.state is not None and state_digest(result.state).hex() == digest
    for name, tensor in state.items():
        assert torch.equal(result.state[name], tensor)


def test_the_two_algorithms_make_two_manifests(
    source: Any, store: Any, start_server: Fixture, connect: Fixture
) -> None:
    source.publish(make_state(6))
    server = start_server(source, store)
    spec = CodecSpec(entropy_level=0)
    sha = connect(server, segment_digest=SegmentDigest.SHA256).fetch(spec=spec, decode=False)
    fast = connect(server, segment_digest=SegmentDigest.BLAKE3).fetch(spec=spec, decode=False)
    assert sha.manifest.manifest_key != fast.manifest.manifest_key
    assert [s.byte_length for s in sha.manifest.segments] == [
        s.byte_length for s in fast.manifest.segments
    ]
    pairs = zip(sha.manifest.segments, fast.manifest.segments, strict=True)
    assert all(a.sha256 != b.sha256 for a, b in pairs)


def test_a_server_that_cannot_answers_with_sha256(
    monkeypatch: pytest.MonkeyPatch,
    source: Any,
    store: Any,
    start_server: Fixture,
    connect: Fixture,
) -> None:
    # As an older server (or one without blake3) answers: SHA-256, said in the manifest.
    monkeypatch.setattr(service, "supported_digest", lambda wanted: SegmentDigest.SHA256)
    digest = source.publish(make_state(7))
    server = start_server(source, store)
    result = connect(server, segment_digest=SegmentDigest.BLAKE3).fetch(spec=CodecSpec())
    assert result.manifest.segment_digest is SegmentDigest.SHA256
    assert result.digest.hex() == digest


def test_without_blake3_the_client_asks_for_sha256_and_refuses_blake3(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(digests, "blake3_available", lambda: False)
    assert digests.preferred_digest() is SegmentDigest.SHA256
    assert digests.supported_digest(SegmentDigest.BLAKE3) is SegmentDigest.SHA256
    with pytest.raises(ConfigError, match="pip install"):
        digests.digest_function(SegmentDigest.BLAKE3)
    from fedsqueeze.transport import TransferClient

    with pytest.raises(ConfigError, match="blake3"):
        TransferClient(
            "127.0.0.1:1", edge_id="e", token="t", plaintext=True,
            segment_digest=SegmentDigest.BLAKE3,
        )  # fmt: skip
    with pytest.raises(TypeError):
        TransferClient("127.0.0.1:1", edge_id="e", token="t", plaintext=True, segment_digest="b")  # type: ignore[arg-type]
