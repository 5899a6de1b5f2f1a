"""PushUpdate: idempotent by update id; every rejection leaves the server unchanged."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import grpc
import pytest

from fedsqueeze.codec import CodecSpec, encode_state
from fedsqueeze.errors import PreconditionError, ResourceExhaustedError
from fedsqueeze.transport import ServerConfig, UpdateStore
from fedsqueeze.wire import convert
from fedsqueeze.wire import transfer_pb2 as pb
from tests.transport.conftest import make_state, perturb
from tests.transport.rawcalls import meta_for, metadata, push_raw, raw_stub, upload_messages

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def setup(source, store, start_server, connect):
    base = make_state(0)
    digest = bytes.fromhex(source.publish(base))
    update = encode_state(perturb(base, 1), CodecSpec(), base, base_digest=digest)
    server = start_server(source, store, config=ServerConfig(max_update_bytes=8 << 20))
    return server, connect(server), update, digest, base


def _unchanged(store: UpdateStore, before: list[str]) -> None:
    assert [u.update_id for u in store.list()] == before


def test_upload_is_stored_and_decodes(setup, store):
    _, client, update, digest, _ = setup
    result = client.push_update(update, update_id="r1-edge-0", base_digest=digest)
    assert not result.receipt.duplicate
    assert result.receipt.stored_bytes == len(update.to_bytes())
    assert result.stats.wire.sent > result.receipt.stored_bytes
    [stored] = store.list()
    assert stored.update_id == "r1-edge-0" and stored.edge_id == "edge-0"
    assert stored.base_digest == digest
    assert stored.encoded.to_bytes() == update.to_bytes()


def test_retried_upload_is_counted_once(setup, store):
    _, client, update, digest, _ = setup
    first = client.push_update(update, update_id="r1-edge-0", base_digest=digest)
    again = client.push_update(update, update_id="r1-edge-0", base_digest=digest)
    assert not first.receipt.duplicate and again.receipt.duplicate
    assert again.receipt.stored_bytes == first.receipt.stored_bytes
    assert len(store) == 1
    store.pop("r1-edge-0")
    third = client.push_update(update, update_id="r1-edge-0", base_digest=digest)
    assert third.receipt.duplicate and len(store) == 0


def test_concurrent_repeats_store_one(setup, store, connect):
    server, _, _, digest, base = setup
    # No entropy stage: the codec's shared zstd decompressor is not thread-safe yet, and
    # the server decodes concurrent uploads in parallel.
    update = encode_state(perturb(base, 1), CodecSpec(entropy_level=0), base)
    receipts = []

    def push() -> None:
        receipts.append(
            connect(server).push_update(update, update_id="same", base_digest=digest).receipt
        )

    threads = [threading.Thread(target=push) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(receipts) == 6
    assert sum(not r.duplicate for r in receipts) == 1
    assert len(store) == 1


def test_reused_id_with_other_content_is_refused(setup, store):
    _, client, update, digest, base = setup
    client.push_update(update, update_id="r1", base_digest=digest)
    other = encode_state(perturb(base, 2), CodecSpec(), base, base_digest=digest)
    with pytest.raises(PreconditionError):
        client.push_update(other, update_id="r1", base_digest=digest)
    assert len(store) == 1 and store.list()[0].encoded.to_bytes() == update.to_bytes()


def test_unknown_base_is_refused(setup, store):
    _, client, update, _, _ = setup
    with pytest.raises(PreconditionError, match="base"):
        client.push_update(update, update_id="r1", base_digest=b"\x01" * 32)
    _unchanged(store, [])


def test_oversized_upload_is_refused(setup, store):
    _, client, _, digest, _ = setup
    big = encode_state(make_state(5, scale=8), CodecSpec(entropy_level=0))
    with pytest.raises(ResourceExhaustedError):
        client.push_update(big, update_id="big", base_digest=digest)
    _unchanged(store, [])
    assert store.lookup("big") is None


def test_the_uploader_is_the_edge_of_the_credentials(setup, store, connect):
    server, client, update, digest, _ = setup
    client.push_update(update, update_id="r1", base_digest=digest)
    assert store.list()[0].edge_id == "edge-0"
    # Another edge cannot take over (or repeat) an update id that edge-0 used.
    other = connect(server, edge_id="edge-1")
    with pytest.raises(PreconditionError):
        other.push_update(update, update_id="r1", base_digest=digest)
    other.push_update(update, update_id="r1-edge-1", base_digest=digest)
    assert [(u.update_id, u.edge_id) for u in store.list()] == [
        ("r1", "edge-0"),
        ("r1-edge-1", "edge-1"),
    ]


def test_metadata_is_small_and_a_delta_names_its_own_base(setup, store):
    _, client, update, digest, base = setup
    result = client.push_update(update, update_id="r1-edge-0", base_digest=digest)
    # Metadata (id, size, sha256) and chunk prefixes up; the receipt down.
    assert result.stats.wire.sent - result.receipt.stored_bytes < 80
    assert result.stats.wire.received <= 12
    assert store.list()[0].base_digest == digest
    full = encode_state(perturb(base, 3), CodecSpec())  # names no base: the metadata must
    client.push_update(full, update_id="full", base_digest=digest)
    assert store.list()[1].base_digest == digest


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("wrong_sha256", grpc.StatusCode.DATA_LOSS),
        ("malformed_codec_bytes", grpc.StatusCode.INVALID_ARGUMENT),
        ("longer_than_declared", grpc.StatusCode.INVALID_ARGUMENT),
        ("shorter_than_declared", grpc.StatusCode.INVALID_ARGUMENT),
        ("full_model_without_base", grpc.StatusCode.INVALID_ARGUMENT),
        ("delta_from_other_base", grpc.StatusCode.INVALID_ARGUMENT),
        ("delta_from_unknown_base", grpc.StatusCode.FAILED_PRECONDITION),
        ("no_metadata", grpc.StatusCode.INVALID_ARGUMENT),
        ("metadata_twice", grpc.StatusCode.INVALID_ARGUMENT),
        ("oversized_message", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
def test_bad_uploads_are_rejected_and_change_nothing(setup, store, pki, tokens, case, code):
    server, client, update, digest, base = setup
    client.push_update(update, update_id="kept", base_digest=digest)
    payload = update.to_bytes()
    meta = meta_for(payload, None)
    messages = list(upload_messages(meta, payload))
    if case == "wrong_sha256":
        wrong = replace(meta, sha256=hashlib.sha256(b"something else").digest())
        messages = list(upload_messages(wrong, payload))
    elif case == "malformed_codec_bytes":
        junk = os.urandom(len(payload))
        messages = list(upload_messages(meta_for(junk, digest), junk))
    elif case == "longer_than_declared":
        messages.append(convert.update_chunk_to_proto(b"extra"))
    elif case == "shorter_than_declared":
        messages = messages[:-1]
    elif case == "full_model_without_base":
        full = encode_state(perturb(base, 3), CodecSpec()).to_bytes()
        messages = list(upload_messages(meta_for(full, None), full))
    elif case == "delta_from_other_base":
        other_digest = bytes.fromhex(server.service.source.publish(perturb(base, 9)))
        messages = list(upload_messages(meta_for(payload, other_digest), payload))
    elif case == "delta_from_unknown_base":
        stranger = encode_state(perturb(base, 3), CodecSpec(), base, base_digest=b"\x05" * 32)
        data = stranger.to_bytes()
        messages = list(upload_messages(meta_for(data, None), data))
    elif case == "no_metadata":
        messages = messages[1:]
    elif case == "metadata_twice":
        messages.insert(1, messages[0])
    elif case == "oversized_message":
        messages = [messages[0], convert.update_chunk_to_proto(bytes(5 << 20))]
    channel, stub = raw_stub(server, pki)
    with channel, pytest.raises(grpc.RpcError) as info:
        push_raw(stub, messages, metadata("edge-0", tokens[1]["edge-0"]))
    assert info.value.code() is code
    _unchanged(store, ["kept"])
    assert store.lookup("u-1") is None


def test_upload_cancelled_midway_changes_nothing(setup, store, pki, tokens):
    server, _, update, _, _ = setup
    payload = update.to_bytes()
    meta = meta_for(payload, None)
    sent = threading.Event()

    def slow() -> Iterator[pb.PushUpdateRequest]:
        for i, message in enumerate(upload_messages(meta, payload, chunk=1000)):
            if i == 5:
                sent.set()
                time.sleep(0.5)
            yield message

    channel, stub = raw_stub(server, pki)
    with channel:
        call = stub.PushUpdate.future(slow(), metadata=metadata("edge-0", tokens[1]["edge-0"]))
        assert sent.wait(10)
        call.cancel()
        with pytest.raises(grpc.FutureCancelledError):
            call.result()
    time.sleep(0.6)  # let the handler see the cancellation
    _unchanged(store, [])
    assert store.lookup("u-1") is None
