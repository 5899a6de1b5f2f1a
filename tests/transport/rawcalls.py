"""Hand-made calls through the generated stub, for requests our client never sends."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import grpc

from fedsqueeze.transport import TransferServer
from fedsqueeze.transport.auth import call_metadata
from fedsqueeze.transport.server import message_size_options
from fedsqueeze.wire import convert
from fedsqueeze.wire import transfer_pb2 as pb
from fedsqueeze.wire import transfer_pb2_grpc as pb_grpc
from fedsqueeze.wire.types import UpdateMetadata
from tests.transport.certs import Pki


def raw_stub(server: TransferServer, pki: Pki) -> tuple[grpc.Channel, pb_grpc.ModelTransferStub]:
    """A TLS channel to ``server`` and the generated stub on it (close the channel)."""
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca)
    channel = grpc.secure_channel(
        server.address, credentials, options=message_size_options(4 << 20)
    )
    return channel, pb_grpc.ModelTransferStub(channel)


def metadata(edge_id: str | None, token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata, possibly incomplete."""
    if edge_id is None or token is None:
        return tuple(
            (k, v) for k, v in call_metadata(edge_id or "", token or "") if v and v != "Bearer "
        )
    return call_metadata(edge_id, token)


def upload_messages(
    meta: UpdateMetadata, payload: bytes, chunk: int = 64 * 1024
) -> Iterator[pb.PushUpdateRequest]:
    """The messages of an upload: metadata, then chunks."""
    yield convert.update_metadata_to_proto(meta)
    for offset in range(0, len(payload), chunk):
        yield convert.update_chunk_to_proto(payload[offset : offset + chunk])


def meta_for(payload: bytes, base_digest: bytes | None, update_id: str = "u-1") -> UpdateMetadata:
    """Truthful metadata for ``payload`` (``base_digest`` None: the payload's own base)."""
    return UpdateMetadata(
        update_id=update_id,
        base_digest=base_digest,
        total_bytes=len(payload),
        sha256=hashlib.sha256(payload).digest(),
    )


def push_raw(
    stub: pb_grpc.ModelTransferStub,
    messages: Iterable[pb.PushUpdateRequest],
    md: tuple[tuple[str, str], ...],
) -> pb.PushUpdateResponse:
    """One PushUpdate call with hand-made messages."""
    response: pb.PushUpdateResponse = stub.PushUpdate(iter(list(messages)), metadata=md, timeout=10)
    return response
