"""Real models through server and client over TLS on 127.0.0.1, full and as deltas."""

from __future__ import annotations

import pytest
import torch

from fedsqueeze.codec import CodecSpec, preset, state_digest
from fedsqueeze.errors import AuthError, NotFoundError, ResourceExhaustedError, TransportError
from fedsqueeze.transport import GRPC_PREFIX_BYTES, ClientTls, ServerConfig, TokenTable
from fedsqueeze.wire.convert import (
    fetch_manifest_message,
    fetch_request_to_proto,
    segment_to_proto,
)
from fedsqueeze.wire.types import ManifestRequest, SegmentData
from tests.transport.conftest import make_state, perturb

pytestmark = pytest.mark.timeout(60)


def test_full_model_round_trip_is_exact(source, store, start_server, connect):
    state = make_state(0)
    digest = source.publish(state)
    server = start_server(source, store)
    result = connect(server).fetch("global", spec=CodecSpec())
    assert result.manifest.base_digest is None
    assert result.manifest.model_digest.hex() == digest
    assert result.digest == bytes.fromhex(digest)
    assert result.state is not None
    assert state_digest(result.state) == bytes.fromhex(digest)
    for name, tensor in state.items():
        assert torch.equal(result.state[name], tensor)


def test_delta_from_held_base_is_small_and_exact(source, store, start_server, connect):
    old = make_state(0)
    source.publish(old)
    server = start_server(source, store)
    client = connect(server)
    first = client.fetch(spec=CodecSpec())
    new = perturb(old, seed=1, amount=0.0)  # only metadata-free copy: identical values
    new["fc.bias"] = old["fc.bias"] + 1.0
    digest = source.publish(new)
    second = client.fetch(spec=CodecSpec(), base=first.state)
    assert second.manifest.base_digest == first.digest
    assert second.manifest.encoded_bytes < first.manifest.encoded_bytes / 10
    assert second.state is not None
    assert state_digest(second.state) == bytes.fromhex(digest)


def test_lossy_spec_is_verified_against_decoded_digest(source, store, start_server, connect):
    state = make_state(3)
    source.publish(state)
    server = start_server(source, store)
    result = connect(server).fetch(spec=preset("int8"))
    assert result.manifest.decoded_digest != result.manifest.model_digest
    assert result.state is not None
    assert state_digest(result.state) == result.manifest.decoded_digest
    assert result.manifest.raw_bytes > 3 * result.manifest.encoded_bytes


def test_unknown_base_gets_the_full_model(source, store, start_server, connect):
    source.publish(make_state(0))
    server = start_server(source, store)
    stranger = make_state(42)
    result = connect(server).fetch(spec=CodecSpec(), base=stranger)
    assert result.manifest.base_digest is None
    assert result.state is not None


def test_too_old_base_gets_the_full_model(source, store, start_server, connect):
    old = make_state(0)
    source.publish(old)
    for seed in range(1, 5):  # keep=3: the first version is dropped
        source.publish(perturb(old, seed))
    server = start_server(source, store)
    result = connect(server).fetch(spec=CodecSpec(), base=old)
    assert result.manifest.base_digest is None


def test_fetch_by_digest_and_unknown_model(source, store, start_server, connect):
    first = source.publish(make_state(0))
    source.publish(make_state(1))
    server = start_server(source, store)
    client = connect(server)
    assert client.fetch(first, spec=CodecSpec()).manifest.model_digest.hex() == first
    with pytest.raises(NotFoundError):
        client.fetch("no-such-track", spec=CodecSpec())
    with pytest.raises(NotFoundError):
        client.fetch("ab" * 32, spec=CodecSpec())


def test_bytes_are_counted_as_messages_plus_prefix(source, store, start_server, connect):
    source.publish(make_state(0, scale=4))
    server = start_server(source, store, config=ServerConfig(segment_bytes=256 * 1024))
    client = connect(server)
    result = client.fetch(spec=CodecSpec(), decode=False)
    manifest = result.manifest
    request = ManifestRequest("global", None, CodecSpec(), segment_digest=client.segment_digest)
    expected = len(fetch_manifest_message(manifest, request)) + GRPC_PREFIX_BYTES
    for info in manifest.segments:
        message = segment_to_proto(SegmentData(info.segment_id, bytes(info.byte_length)))
        expected += message.ByteSize() + GRPC_PREFIX_BYTES
    wire = result.stats.wire
    assert wire.received == expected
    assert wire.messages_received == 1 + len(manifest.segments)
    assert wire.messages_sent == 1 and result.stats.calls == 1  # one round trip
    assert wire.sent == fetch_request_to_proto(request).ByteSize() + GRPC_PREFIX_BYTES
    # The server counted the same bytes the other way round.
    server_wire = server.stats().wire
    assert (server_wire.sent, server_wire.received) == (wire.received, wire.sent)


def test_get_manifest_describes_what_fetch_sends(source, store, start_server, connect):
    source.publish(make_state(0))
    server = start_server(source, store)
    client = connect(server)
    asked = ManifestRequest("global", None, preset("int8"), segment_digest=client.segment_digest)
    manifest = client.get_manifest(asked)
    assert client.fetch(spec=preset("int8"), decode=False).manifest == manifest
    assert server.stats().cache.encodes == 1


def test_byte_budget_is_enforced(source, store, start_server, connect):
    source.publish(make_state(0))
    server = start_server(source, store)
    with pytest.raises(ResourceExhaustedError):
        connect(server).fetch(spec=CodecSpec(), byte_budget=10_000)
    small = connect(server).fetch(spec=preset("int4"), byte_budget=2_000_000)
    assert small.manifest.encoded_bytes <= 2_000_000


def test_mutual_tls(pki, source, store, start_server, connect):
    from fedsqueeze.transport import ServerTls

    source.publish(make_state(0))
    server = start_server(
        source, store, tls=ServerTls(pki.server.cert, pki.server.key, client_ca=pki.ca)
    )
    with_cert = ClientTls(root_ca=pki.ca, cert_chain=pki.client.cert, private_key=pki.client.key)
    assert connect(server, tls=with_cert).fetch(spec=CodecSpec()).state is not None
    without_cert = connect(server, tls=ClientTls(root_ca=pki.ca))
    with pytest.raises(TransportError):
        without_cert.fetch(spec=CodecSpec())


def test_client_refuses_a_server_it_does_not_trust(source, store, start_server, connect):
    from tests.transport.certs import make_pki

    source.publish(make_state(0))
    server = start_server(source, store)
    other_ca = make_pki("some other CA").ca
    with pytest.raises(TransportError) as info:
        connect(server, tls=ClientTls(root_ca=other_ca)).fetch(spec=CodecSpec())
    assert not isinstance(info.value, AuthError)


def test_plaintext_only_on_loopback_and_only_when_asked(source, store, start_server, connect):
    from fedsqueeze.transport import TransferClient, TransferServer

    with pytest.raises(ValueError, match="plaintext"):
        TransferServer(source, store, _table())
    with pytest.raises(ValueError, match="loopback"):
        TransferServer(source, store, _table(), config=ServerConfig(host="0.0.0.0"), plaintext=True)
    with pytest.raises(ValueError, match="loopback"):
        TransferClient("10.1.2.3:5000", edge_id="edge-0", token="t" * 20, plaintext=True)
    source.publish(make_state(0))
    server = start_server(source, store, plaintext=True)
    assert connect(server, plaintext=True).fetch(spec=CodecSpec()).state is not None


def _table() -> TokenTable:
    return TokenTable({"edge-0": "t" * 20})
