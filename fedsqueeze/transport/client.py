"""The edge's side of ``fedsqueeze.v1.ModelTransfer``: fetch models, push updates.

::

    with TransferClient(address, edge_id="edge-0", token=token, tls=ClientTls(root_ca=ca)) as c:
        result = c.fetch("global", spec=preset("int8"), base=held_model)
        model = result.state
        receipt = c.push_update(encoded_update, update_id="r3-edge-0", base_digest=digest)

Every call has a deadline (the operation's :class:`RetryPolicy` deadline); ``UNAVAILABLE``
is retried with exponential backoff and jitter; a fetch resumes from the segments it
holds, verifies every segment's sha256, the whole payload's sha256 and the decoded
model's digest. Bytes are counted per direction on the wire as serialized messages plus
gRPC's 5-byte prefix (see :mod:`fedsqueeze.transport.accounting`).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

import grpc
import torch

from fedsqueeze.codec import CodecSpec, EncodedModel, decode_state, state_digest
from fedsqueeze.errors import IntegrityError
from fedsqueeze.transport.auth import call_metadata
from fedsqueeze.transport.errors_map import error_from_rpc, status_of
from fedsqueeze.transport.fetch import FetchState
from fedsqueeze.transport.operation import FetchResult, Operation, PushResult, TransferStats
from fedsqueeze.transport.retry import RetryPolicy
from fedsqueeze.transport.server import (
    MAX_MESSAGE_BYTES,
    SEGMENT_BYTES,
    message_size_options,
)
from fedsqueeze.transport.shaping import LinkShaper
from fedsqueeze.transport.tls import ClientTls, check_plaintext_host, split_host_port
from fedsqueeze.wire import convert
from fedsqueeze.wire import transfer_pb2 as pb
from fedsqueeze.wire.types import (
    Manifest,
    ManifestRequest,
    SegmentRequest,
    UpdateMetadata,
)

logger = logging.getLogger(__name__)

__all__ = ["FetchResult", "Progress", "PushResult", "TransferClient", "TransferStats"]

#: Segments received but not yet verified, at most (bounds the memory in flight).
_VERIFY_AHEAD = 2
#: Progress callback: (payload bytes held, payload bytes in all).
Progress = Callable[[int, int], None]


class TransferClient:
    """A connection to a transfer server, for one edge.

    Parameters
    ----------
    target
        ``host:port`` of the server.
    edge_id, token
        The edge's identity and bearer token.
    tls
        What to trust (and the client certificate for mutual TLS).
    plaintext
        Dial without TLS; only allowed for a loopback target, and only without ``tls``.
    retry
        Deadlines and retries of each operation.
    link
        Link emulation for experiments (one shaper per connection).
    max_message_bytes
        Message-size limit in both directions, in bytes.
    seed
        Seed of the backoff jitter (``None``: random).
    """

    def __init__(
        self,
        target: str,
        *,
        edge_id: str,
        token: str,
        tls: ClientTls | None = None,
        plaintext: bool = False,
        retry: RetryPolicy | None = None,
        link: LinkShaper | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        seed: int | None = None,
    ) -> None:
        if tls is None and not plaintext:
            raise ValueError("give TLS settings, or plaintext=True for a loopback experiment")
        if tls is not None and plaintext:
            raise ValueError("give either TLS settings or plaintext=True, not both")
        options: list[tuple[str, Any]] = [
            *message_size_options(max_message_bytes),
            # Reconnect soon after a server restart. (Not grpc.min_reconnect_backoff_ms:
            # it is also the connect timeout, and TLS handshakes under load need more.)
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if plaintext:
            check_plaintext_host(split_host_port(target)[0])
            self.channel: Any = grpc.insecure_channel(target, options=options)
        else:
            if tls is None:  # excluded above; keeps the type checker informed
                raise ValueError("TLS settings are required")
            options += tls.channel_options()
            self.channel = grpc.secure_channel(target, tls.credentials(), options=options)
        self.target = target
        self.edge_id = edge_id
        self.metadata = call_metadata(edge_id, token)
        self.retry = retry or RetryPolicy()
        self.link = link
        self.rng = random.Random(seed)

    def _operation(self) -> Operation:
        return Operation(self.channel, self.metadata, self.retry, self.link, self.rng)

    # ------------------------------------------------------------------ fetch
    def get_manifest(self, request: ManifestRequest) -> Manifest:
        """One ``GetManifest`` call (with retries)."""
        return self._get_manifest(self._operation(), request)

    def _get_manifest(self, op: Operation, request: ManifestRequest) -> Manifest:
        call = op.callable("unary_unary", "GetManifest", pb.GetManifestResponse.FromString)
        message = convert.manifest_request_to_proto(request)
        response = op.with_retry("GetManifest", lambda kw: call(message, **kw))
        manifest = convert.manifest_response_from_proto(response)
        if manifest.base_digest is not None and manifest.base_digest != request.base_digest:
            raise IntegrityError("the server sent a delta from a base the client does not hold")
        return manifest

    def fetch(
        self,
        model: str = "global",
        *,
        spec: CodecSpec,
        base: Mapping[str, torch.Tensor] | None = None,
        base_digest: bytes | None = None,
        byte_budget: int | None = None,
        state: FetchState | None = None,
        decode: bool = True,
        progress: Progress | None = None,
    ) -> FetchResult:
        """Fetch ``model`` encoded with ``spec``, as a delta from ``base`` when possible.

        Parameters
        ----------
        model
            A track name (``"global"``) or a hex model digest.
        spec
            The codec spec wanted.
        base
            The model the edge holds, or ``None``.
        base_digest
            ``state_digest(base)`` if already known (saves hashing ``base``).
        byte_budget
            Most encoded bytes accepted (the server refuses a larger encoding).
        state
            Segments held from an earlier, failed fetch; the fetch resumes from them and
            keeps adding to them.
        decode
            Decode the model (with ``base``) and verify its digest.
        progress
            Called after every verified segment.

        Raises
        ------
        IntegrityError
            A segment kept failing verification, or the model does not match its digest.
        UnavailableError
            The server stayed unreachable, or the deadline passed.
        fedsqueeze.errors.TransportError
            The server refused (subclass per status code).
        """
        if base is not None and base_digest is None:
            base_digest = state_digest(base)
        if decode and base_digest is not None and base is None:
            raise ValueError("decoding a delta needs the base tensors, not only its digest")
        op = self._operation()
        held = state if state is not None else FetchState(self.retry.max_segment_refetches)
        request = ManifestRequest(model, base_digest, self.edge_id, spec, byte_budget)
        held.adopt(self._get_manifest(op, request))
        stream = op.callable("unary_stream", "StreamSegments", convert.segment_view_from_message)
        refreshes = 0
        while not held.complete:
            manifest = held.manifest
            if manifest is None:
                raise RuntimeError("fetch state lost its manifest")
            holding = held.held_ids()
            if op.calls > 1:
                op.resumed += len(holding)
            started = time.perf_counter()
            try:
                self._stream(op, stream, held, holding, progress)
            except grpc.RpcError as exc:
                op.stream_s += time.perf_counter() - started
                progressed = len(held.held_ids()) > len(holding)
                code = status_of(exc)
                if code is grpc.StatusCode.UNAVAILABLE:
                    op.unavailable(exc, "StreamSegments", progressed=progressed)
                    continue
                if (
                    code is grpc.StatusCode.NOT_FOUND
                    and refreshes < self.retry.max_manifest_refreshes
                ):
                    refreshes += 1
                    held.adopt(self._get_manifest(op, request))
                    continue
                raise error_from_rpc(exc, "StreamSegments") from exc
            op.stream_s += time.perf_counter() - started
            if len(held.held_ids()) == len(holding) and not held.complete:
                # The stream ended without anything usable (every segment failed its
                # check): ask again; accept() gives up after too many failures.
                op.failures_in_a_row += 1
                if op.failures_in_a_row > self.retry.max_segment_refetches + 1:
                    raise IntegrityError("the server keeps sending segments that do not verify")
        return self._finish(op, held, base, base_digest, decode)

    def _stream(
        self,
        op: Operation,
        stream: Any,
        held: FetchState,
        holding: frozenset[int],
        progress: Progress | None,
    ) -> None:
        """One ``StreamSegments`` call: receive and verify what the server sends.

        Hashing a segment takes about as long as receiving it, so a worker thread verifies
        (hashlib releases the GIL) while this one receives the next segment.
        """
        manifest = held.manifest
        if manifest is None:
            raise RuntimeError("fetch state lost its manifest")
        message = convert.segment_request_to_proto(
            SegmentRequest(manifest.manifest_id, holding, self.edge_id)
        )

        def settle(check: Future[bool]) -> None:
            if check.result() and progress is not None:
                progress(held.held_bytes, manifest.encoded_bytes)

        pending: deque[Future[bool]] = deque()
        with ThreadPoolExecutor(1, thread_name_prefix="fedsqueeze-verify") as verifier:
            try:
                for data in stream(message, **op.begin_call()):
                    pending.append(verifier.submit(held.accept, data))
                    while pending and (len(pending) > _VERIFY_AHEAD or pending[0].done()):
                        settle(pending.popleft())
            finally:  # keep what verified, even when the stream broke
                while pending:
                    settle(pending.popleft())

    def _finish(
        self,
        op: Operation,
        held: FetchState,
        base: Mapping[str, torch.Tensor] | None,
        base_digest: bytes | None,
        decode: bool,
    ) -> FetchResult:
        manifest = held.manifest
        if manifest is None:
            raise RuntimeError("fetch state lost its manifest")
        encoded = held.assemble()
        if encoded.base_digest != manifest.base_digest:
            raise IntegrityError("the payload's base digest differs from the manifest's")
        decoded: dict[str, torch.Tensor] | None = None
        if decode:
            decoded = decode_state(
                encoded, base if manifest.base_digest is not None else None, base_digest=base_digest
            )
            if state_digest(decoded) != manifest.decoded_digest:
                raise IntegrityError("the decoded model does not match the manifest's digest")
        stats = op.stats(held.refetched)
        logger.info(
            "fetched %s… (%s): %d B encoded, %d B down, %d B up, %d call(s), %.3f s",
            manifest.model_digest.hex()[:12],
            "delta" if manifest.base_digest is not None else "full",
            manifest.encoded_bytes,
            stats.wire.received,
            stats.wire.sent,
            stats.calls,
            stats.elapsed_s,
        )
        return FetchResult(manifest, encoded, decoded, stats)

    # ------------------------------------------------------------------ push
    def push_update(
        self,
        encoded: EncodedModel,
        *,
        update_id: str,
        base_digest: bytes,
        chunk_bytes: int = SEGMENT_BYTES,
    ) -> PushResult:
        """Upload ``encoded`` (idempotent: retried with the same ``update_id``).

        Parameters
        ----------
        encoded
            The encoded update.
        update_id
            Unique per update; a repeat is counted once by the server.
        base_digest
            Digest of the model version the update was trained from.
        chunk_bytes
            Payload bytes per message.
        """
        if not 0 < chunk_bytes <= SEGMENT_BYTES * 2:
            raise ValueError("chunk_bytes must be in (0, 2 MiB]")
        payload = encoded.to_bytes()
        meta = UpdateMetadata(
            update_id=update_id,
            edge_id=self.edge_id,
            base_digest=base_digest,
            total_bytes=len(payload),
            sha256=hashlib.sha256(payload).digest(),
            spec=encoded.spec,
        )
        op = self._operation()
        call = op.callable("stream_unary", "PushUpdate", pb.PushUpdateResponse.FromString)

        def messages() -> Iterator[pb.PushUpdateRequest]:
            yield convert.update_metadata_to_proto(meta)
            view = memoryview(payload)
            for offset in range(0, len(payload), chunk_bytes):
                yield convert.update_chunk_to_proto(bytes(view[offset : offset + chunk_bytes]))

        response = op.with_retry("PushUpdate", lambda kw: call(messages(), **kw))
        receipt = convert.receipt_from_proto(response)
        if receipt.sha256 != meta.sha256 or receipt.update_id != update_id:
            raise IntegrityError("the server's receipt does not match the upload")
        return PushResult(receipt, op.stats(0))

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the connection."""
        self.channel.close()

    def __enter__(self) -> TransferClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
