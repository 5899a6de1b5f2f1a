"""No token, a wrong token or another edge's token gets no data."""

from __future__ import annotations

import grpc
import pytest

from fedsqueeze.codec import CodecSpec
from fedsqueeze.errors import AuthError
from fedsqueeze.transport import TokenTable
from fedsqueeze.transport.auth import AUTHORIZATION_KEY, EDGE_ID_KEY
from fedsqueeze.wire import convert
from fedsqueeze.wire.types import ManifestRequest, SegmentRequest
from tests.transport.conftest import make_state
from tests.transport.rawcalls import metadata, raw_stub

pytestmark = pytest.mark.timeout(60)


def _manifest_request() -> object:
    return convert.manifest_request_to_proto(ManifestRequest("global", None, CodecSpec()))


def _fetch_request() -> object:
    return convert.fetch_request_to_proto(ManifestRequest("global", None, CodecSpec()))


@pytest.fixture
def served(source, store, start_server):
    source.publish(make_state(0))
    return start_server(source, store)


def test_wrong_token_is_unauthenticated(served, connect):
    client = connect(served, token="not-the-right-token-at-all")
    with pytest.raises(AuthError) as info:
        client.fetch(spec=CodecSpec())
    assert isinstance(info.value.__cause__, grpc.RpcError)


def test_another_edges_token_is_unauthenticated(served, connect, tokens):
    client = connect(served, edge_id="edge-0", token=tokens[1]["edge-1"])
    with pytest.raises(AuthError):
        client.fetch(spec=CodecSpec())


def test_unknown_edge_is_unauthenticated(served, connect, tokens):
    client = connect(served, edge_id="edge-99", token=tokens[1]["edge-0"])
    with pytest.raises(AuthError):
        client.fetch(spec=CodecSpec())


@pytest.mark.parametrize(("edge_id", "token"), [(None, None), ("edge-0", None), (None, "x" * 43)])
def test_missing_credentials_are_unauthenticated(served, pki, tokens, edge_id, token):
    token = tokens[1]["edge-0"] if token is not None else None
    channel, stub = raw_stub(served, pki)
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            stub.GetManifest(_manifest_request(), metadata=metadata(edge_id, token), timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Fetch(_fetch_request(), metadata=metadata(edge_id, token), timeout=5))
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_segments_need_credentials_too(served, pki, tokens):
    channel, stub = raw_stub(served, pki)
    with channel:
        own = metadata("edge-0", tokens[1]["edge-0"])
        manifest_key = stub.GetManifest(
            _manifest_request(), metadata=own, timeout=5
        ).manifest.manifest_key
        request = convert.segment_request_to_proto(SegmentRequest(manifest_key, frozenset()))
        for md in (metadata(None, None), metadata("edge-0", "w" * 43)):
            with pytest.raises(grpc.RpcError) as info:
                list(stub.StreamSegments(request, metadata=md, timeout=5))
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert len(list(stub.StreamSegments(request, metadata=own, timeout=5))) > 0
        # Another edge's valid credentials work too: a manifest is no edge's secret.
        other = metadata("edge-1", tokens[1]["edge-1"])
        assert len(list(stub.StreamSegments(request, metadata=other, timeout=5))) > 0


def test_token_table():
    table = TokenTable({"edge-0": "a" * 20})
    good = ((EDGE_ID_KEY, "edge-0"), (AUTHORIZATION_KEY, "Bearer " + "a" * 20))
    assert table.authenticate(good) == "edge-0"
    for bad in (
        ((EDGE_ID_KEY, "edge-0"), (AUTHORIZATION_KEY, "Bearer " + "a" * 19)),
        ((EDGE_ID_KEY, "edge-0"), (AUTHORIZATION_KEY, "a" * 20)),
        ((AUTHORIZATION_KEY, "Bearer " + "a" * 20),),
        ((EDGE_ID_KEY, "edge-1"), (AUTHORIZATION_KEY, "Bearer " + "a" * 20)),
    ):
        with pytest.raises(AuthError):
            table.authenticate(bad)
    with pytest.raises(ValueError):
        TokenTable({"edge-0": "short"})
    with pytest.raises(ValueError):
        TokenTable({"bad id!": "a" * 20})
    generated, handed_out = TokenTable.generate(["a", "b"])
    assert len(generated) == 2 and "a" in generated and len(set(handed_out.values())) == 2


def test_new_tokens_never_start_with_a_dash(monkeypatch):
    """A token pasted into a command line must not read as an option."""
    import secrets

    from fedsqueeze.transport import auth

    drawn = iter(["-dash-first-then-fine-0123456789abcdefghijklmnopq", "x" * 43])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: next(drawn))
    assert auth.new_token() == "x" * 43
    monkeypatch.undo()
    tokens = {auth.new_token() for _ in range(2000)}
    assert len(tokens) == 2000 and not any(t.startswith("-") for t in tokens)
