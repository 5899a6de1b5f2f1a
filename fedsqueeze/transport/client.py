"""The edge's side of ``fedsqueeze.v1.ModelTransfer``: fetch models, push updates.

::

    with TransferClient(address, edge_id="edge-0", token=token, tls=ClientTls(root_ca=ca)) as c:
        result = c.fetch("global", spec=preset("int8"), base=held_model)
        model = result.state
        receipt = c.push_update(encoded_update, update_id="r3-edge-0", base_digest=digest)

Every call has a deadline (the operation's :class:`RetryPolicy` deadline); ``UNAVAILABLE``
is retried with exponential backoff and jitter. A fetch is one ``Fetch`` round trip
(manifest and segments in one stream); it resumes from the segments it holds, verifies
every segment's sha256 (together they cover every payload byte) and the decoded model's
digest. Bytes are counted per direction on the wire as serialized messages plus gRPC's
5-byte prefix (see :mod:`fedsqueeze.transport.accounting`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import torch

from fedsqueeze.codec import CodecSpec, EncodedModel, decode_prefix, decode_state, state_digest
from fedsqueeze.errors import HeldPartError, IntegrityError
from fedsqueeze.transport.auth import call_metadata
from fedsqueeze.transport.errors_map import error_from_rpc, status_of
from fedsqueeze.transport.fetch import FetchState
from fedsqueeze.transport.fetch_into import (
    FetchedInto,
    FetchedState,
    decode_fetched,
    decode_spooled_state,
)
from fedsqueeze.transport.operation import (
    FetchResult,
    Operation,
    PrefixUsed,
    PushResult,
    TransferStats,
)
from fedsqueeze.transport.parts import HeldVersions, reassemble, resolve_held_parts
from fedsqueeze.transport.retry import RetryPolicy
from fedsqueeze.transport.server import (
    MAX_MESSAGE_BYTES,
    SEGMENT_BYTES,
    message_size_options,
)
from fedsqueeze.transport.shaping import LinkShaper
from fedsqueeze.transport.spool import SpoolPolicy
from fedsqueeze.transport.tls import ClientTls, check_plaintext_host, split_host_port
from fedsqueeze.wire import convert
from fedsqueeze.wire import transfer_pb2 as pb
from fedsqueeze.wire.digests import SegmentDigest, digest_function, preferred_digest
from fedsqueeze.wire.types import (
    Manifest,
    ManifestRequest,
    SegmentData,
    SegmentRequest,
    UpdateMetadata,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FetchResult",
    "FetchedInto",
    "FetchedState",
    "PrefixUsed",
    "Progress",
    "PushResult",
    "TransferClient",
    "TransferStats",
    "decode_fetched_prefix",
]

#: Threads that verify segments: one per core beyond the receive loop and gRPC's poller
#: (1 to 4). A 1 MiB segment takes about as long to hash as to receive, so with cores to
#: spare the hashing no longer paces the stream.
VERIFIERS = max(1, min(4, (os.cpu_count() or 1) - 2))
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
    segment_digest
        The segment digest to ask for (the server may answer with SHA-256; the manifest
        says which it used). ``None``: BLAKE3 where the ``blake3`` package is installed
        (3 to 4 times as fast to compute), else SHA-256.

    Raises
    ------
    ConfigError
        BLAKE3 asked for and the ``blake3`` package missing.
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
        segment_digest: SegmentDigest | None = None,
    ) -> None:
        if segment_digest is not None and not isinstance(segment_digest, SegmentDigest):
            raise TypeError(f"segment_digest must be a SegmentDigest, not {segment_digest!r}")
        self.segment_digest = segment_digest or preferred_digest()
        digest_function(self.segment_digest)  # a missing blake3 is said here, not mid-fetch
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
        """One ``GetManifest`` call (with retries): the manifest a fetch would start with."""
        op = self._operation()
        call = op.callable("unary_unary", "GetManifest", pb.GetManifestResponse.FromString)
        message = convert.manifest_request_to_proto(request)
        response = op.with_retry("GetManifest", lambda kw: call(message, **kw))
        return convert.manifest_response_from_proto(response, request)

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
        held: HeldVersions | None = None,
    ) -> FetchResult:
        """Fetch ``model`` encoded with ``spec``, as a delta from ``base`` when possible.

        One ``Fetch`` call (one round trip) brings the manifest and the segments. A stream
        that breaks is resumed with ``StreamSegments`` (only the missing segments); if the
        server lost the manifest meanwhile (a restart), ``Fetch`` again names the segments
        held.

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
            Most encoded bytes sent (segments held are free). The server refuses a larger
            encoding, except a progressive one (``levels``), which it truncates to the
            longest prefix of segments that fits; the prefix is decoded
            (:func:`decode_fetched_prefix`) and :attr:`FetchResult.prefix` says what it
            gave. Passing the same ``state`` again fetches the missing refinements.
        state
            Segments held from an earlier, failed fetch; the fetch resumes from them and
            keeps adding to them.
        decode
            Decode the model (with ``base``) and verify its digest.
        progress
            Called after every verified segment.
        held
            Other versions the edge holds (and their tensors): the server leaves out
            tensors whose exact content they hold (``Manifest.held_parts``), and they are
            taken from here. If one is missing or the reassembled model fails its
            digest, the fetch is made again without them (counted in the same stats).

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
        fetched = state if state is not None else FetchState(self.retry.max_segment_refetches)
        digests = held.request_digests(base_digest) if held is not None else ()
        request = ManifestRequest(
            model, base_digest, spec, byte_budget, digests, self.segment_digest
        )
        if digests:
            try:
                return self._fetch(op, request, fetched, base, decode, progress, held)
            except HeldPartError as exc:
                logger.warning("held parts unusable (%s): fetching again without them", exc)
                request = replace(request, held_digests=())
        return self._fetch(op, request, fetched, base, decode, progress, None)

    def _fetch(
        self,
        op: Operation,
        request: ManifestRequest,
        held: FetchState,
        base: Mapping[str, torch.Tensor] | None,
        decode: bool,
        progress: Progress | None,
        parts: HeldVersions | None,
    ) -> FetchResult:
        """The calls of one fetch of ``request`` (see :meth:`fetch`)."""
        self._transfer(op, request, held, progress, parts)
        return self._finish(op, held, request, base, decode, parts)

    def _transfer(
        self,
        op: Operation,
        request: ManifestRequest,
        held: FetchState,
        progress: Progress | None,
        parts: HeldVersions | None,
    ) -> None:
        """The calls that bring every segment of ``request`` into ``held``, verified."""
        fetch_call = op.callable("unary_stream", "Fetch", convert.fetch_part_from_message)
        resume_call = op.callable(
            "unary_stream", "StreamSegments", convert.segment_view_from_message
        )
        refreshes = 0
        need_manifest = True  # the next call is Fetch (no usable manifest yet)
        while need_manifest or not held.complete:
            holding = held.held_ids() if held.manifest is not None else frozenset()
            if op.calls > 0:
                op.resumed += len(holding)
            what = "Fetch" if need_manifest else "StreamSegments"
            started = time.perf_counter()
            try:
                if need_manifest:
                    segments = self._start_fetch(op, fetch_call, request, held, parts)
                    # From here on a broken stream resumes with StreamSegments.
                    need_manifest = False
                    self._receive(held, segments, progress)
                else:
                    self._resume(op, resume_call, held, holding, progress)
            except grpc.RpcError as exc:
                op.stream_s += time.perf_counter() - started
                progressed = len(held.held_ids()) > len(holding)
                code = status_of(exc)
                if code is grpc.StatusCode.UNAVAILABLE:
                    op.unavailable(exc, what, progressed=progressed)
                    continue
                if (
                    code is grpc.StatusCode.NOT_FOUND
                    and not need_manifest
                    and refreshes < self.retry.max_manifest_refreshes
                ):
                    refreshes += 1
                    need_manifest = True
                    continue
                raise error_from_rpc(exc, what) from exc
            op.stream_s += time.perf_counter() - started
            if len(held.held_ids()) == len(holding) and not held.complete:
                # The stream ended without anything usable (every segment failed its
                # check): ask again; accept() gives up after too many failures.
                op.failures_in_a_row += 1
                if op.failures_in_a_row > self.retry.max_segment_refetches + 1:
                    raise IntegrityError("the server keeps sending segments that do not verify")

    @staticmethod
    def _start_fetch(
        op: Operation,
        call: Any,
        request: ManifestRequest,
        held: FetchState,
        parts: HeldVersions | None,
    ) -> Iterator[SegmentData]:
        """Start a ``Fetch`` call and adopt the manifest it begins with; its segments follow.

        The request names the segments ``held`` holds, so a server that answers with the
        same manifest leaves them out. The held parts the manifest names are looked up
        before it is adopted (``HeldPartError`` if one is missing).
        """
        message = convert.fetch_request_to_proto(request, held.held_request())
        stream = iter(call(message, **op.begin_call()))
        first = next(stream, None)
        if not isinstance(first, pb.Manifest):
            raise IntegrityError("the Fetch stream did not start with a manifest")
        manifest = convert.manifest_from_proto(first, request)
        resolve_held_parts(manifest, parts)
        held.adopt(manifest)
        return (_segment_of(part) for part in stream)

    def _resume(
        self,
        op: Operation,
        call: Any,
        held: FetchState,
        holding: frozenset[int],
        progress: Progress | None,
    ) -> None:
        """One ``StreamSegments`` call: the segments of the adopted manifest not held."""
        manifest = held.manifest
        if manifest is None:
            raise RuntimeError("fetch state lost its manifest")
        prefix = manifest.prefix_segments if manifest.truncated else 0
        message = convert.segment_request_to_proto(
            SegmentRequest(manifest.manifest_key, holding, prefix)
        )
        self._receive(held, call(message, **op.begin_call()), progress)

    @staticmethod
    def _receive(
        held: FetchState, segments: Iterable[SegmentData], progress: Progress | None
    ) -> None:
        """Verify and keep what a stream sends.

        Hashing a segment takes about as long as receiving it, so worker threads verify
        (hashlib releases the GIL) while this one receives the next segments; at most one
        more segment than there are workers waits, which bounds the memory in flight.
        """
        manifest = held.manifest
        if manifest is None:
            raise RuntimeError("fetch state lost its manifest")

        def settle(check: Future[bool]) -> None:
            if check.result() and progress is not None:
                progress(held.held_bytes, manifest.encoded_bytes)

        pending: deque[Future[bool]] = deque()
        workers = VERIFIERS
        with ThreadPoolExecutor(workers, thread_name_prefix="fedsqueeze-verify") as verifier:
            try:
                for data in segments:
                    pending.append(verifier.submit(held.accept, data))
                    while pending and (len(pending) > workers + 1 or pending[0].done()):
                        settle(pending.popleft())
            finally:  # keep what verified, even when the stream broke
                while pending:
                    settle(pending.popleft())

    def _finish(
        self,
        op: Operation,
        held: FetchState,
        request: ManifestRequest,
        base: Mapping[str, torch.Tensor] | None,
        decode: bool,
        parts: HeldVersions | None,
    ) -> FetchResult:
        manifest = held.manifest
        if manifest is None:
            raise RuntimeError("fetch state lost its manifest")
        if manifest.truncated:
            return self._finish_prefix(op, held, manifest, base, decode, parts)
        encoded = held.assemble()
        if encoded.base_digest != manifest.base_digest:
            raise IntegrityError("the payload's base digest differs from the manifest's")
        decoded: dict[str, torch.Tensor] | None = None
        if decode:
            decoded = decode_state(
                encoded,
                base if manifest.base_digest is not None else None,
                base_digest=request.base_digest,
            )
            if manifest.held_parts:
                decoded = reassemble(decoded, resolve_held_parts(manifest, parts))
            if state_digest(decoded) != manifest.decoded_digest:
                if manifest.held_parts:  # the stream verified: a held part is wrong
                    raise HeldPartError(
                        "the model reassembled with held parts does not match its digest"
                    )
                raise IntegrityError("the decoded model does not match the manifest's digest")
        stats = op.stats(held.refetched)
        _log_fetched(manifest, stats, "")
        return FetchResult(manifest, encoded, decoded, stats)

    @staticmethod
    def _finish_prefix(
        op: Operation,
        held: FetchState,
        manifest: Manifest,
        base: Mapping[str, torch.Tensor] | None,
        decode: bool,
        parts: HeldVersions | None,
    ) -> FetchResult:
        stream = held.prefix()
        encoded, _used = EncodedModel.parse_prefix(stream)
        if encoded.base_digest != manifest.base_digest:
            raise IntegrityError("the payload's base digest differs from the manifest's")
        state: dict[str, torch.Tensor] | None = None
        prefix: PrefixUsed | None = None
        if decode:
            # A prefix has no digest to check the reassembly against: each held part is
            # checked against its own digest instead.
            held_parts = resolve_held_parts(manifest, parts, verify=True)
            state, prefix = decode_fetched_prefix(stream, manifest, base, held_parts)
        stats = op.stats(held.refetched)
        logger.info(
            "fetched a prefix of %s… (%s): %d of %d B encoded, levels %s, %d B down",
            manifest.model_digest.hex()[:12],
            "delta" if manifest.base_digest is not None else "full",
            len(stream),
            manifest.encoded_bytes,
            list(prefix.levels) if prefix is not None else "?",
            stats.wire.received,
        )
        return FetchResult(manifest, encoded, state, stats, prefix)

    def fetch_bounded(
        self,
        model: str = "global",
        *,
        spec: CodecSpec,
        base: Mapping[str, torch.Tensor] | None = None,
        base_digest: bytes | None = None,
        byte_budget: int | None = None,
        state: FetchState | None = None,
        progress: Progress | None = None,
        held: HeldVersions | None = None,
        spool: SpoolPolicy | None = None,
    ) -> FetchedState:
        """:meth:`fetch` (the same request, bytes and checks), decoding a large model in
        bounded memory: the edge's fetch.

        The manifest says the model's size; one of at least ``spool``'s threshold has its
        verified segments kept in a file-backed mapping and is decoded part by part into
        a file in ``spool``'s folder, returned mapped (the file unlinked at once: page
        cache, not the process's memory). ``base`` is only read, so a fetch that fails
        leaves it unchanged. Smaller models, and truncated progressive prefixes, are
        decoded in memory exactly as :meth:`fetch` does.

        Parameters
        ----------
        model, spec, base, base_digest, byte_budget, progress, held
            As for :meth:`fetch`.
        state
            As for :meth:`fetch`; made with ``spool`` when ``None`` (one passed in
            decides by its own policy).
        spool
            When and where to keep a large model on disk (default ``SpoolPolicy()``:
            256 MiB and more, in the system's temporary folder).

        Raises
        ------
        The errors of :meth:`fetch`; ``fedsqueeze.errors.ConfigError`` when the spool
        folder cannot take the payload or the decoded model.
        """
        if base is not None and base_digest is None:
            base_digest = state_digest(base)
        if base_digest is not None and base is None:
            raise ValueError("decoding a delta needs the base tensors, not only its digest")
        policy = spool if spool is not None else SpoolPolicy()
        op = self._operation()
        fetched = (
            state
            if state is not None
            else FetchState(self.retry.max_segment_refetches, spool=policy)
        )
        digests = held.request_digests(base_digest) if held is not None else ()
        request = ManifestRequest(
            model, base_digest, spec, byte_budget, digests, self.segment_digest
        )
        if digests:
            try:
                return self._fetch_bounded(op, request, fetched, base, progress, held)
            except HeldPartError as exc:
                logger.warning("held parts unusable (%s): fetching again without them", exc)
                request = replace(request, held_digests=())
        return self._fetch_bounded(op, request, fetched, base, progress, None)

    def _fetch_bounded(
        self,
        op: Operation,
        request: ManifestRequest,
        held: FetchState,
        base: Mapping[str, torch.Tensor] | None,
        progress: Progress | None,
        parts: HeldVersions | None,
    ) -> FetchedState:
        """The calls of one :meth:`fetch_bounded` of ``request``."""
        self._transfer(op, request, held, progress, parts)
        manifest = held.manifest
        if manifest is None:
            raise RuntimeError("fetch state lost its manifest")
        if not held.spooled or manifest.truncated or held.spool is None:
            done = self._finish(op, held, request, base, True, parts)
            if done.state is None:
                raise RuntimeError("a decoding fetch returned no model")
            return FetchedState(done.manifest, done.state, done.stats, done.prefix)
        held_parts = resolve_held_parts(manifest, parts)
        decoded = decode_spooled_state(held, manifest, base, held_parts, held.spool.folder)
        stats = op.stats(held.refetched)
        _log_fetched(manifest, stats, " part by part into a mapped file")
        return FetchedState(manifest, decoded, stats, None, True)

    def fetch_into(
        self,
        model: str = "global",
        *,
        spec: CodecSpec,
        output: str | Path | None = None,
        into: Mapping[str, torch.Tensor] | None = None,
        base: Mapping[str, torch.Tensor] | None = None,
        base_digest: bytes | None = None,
        state: FetchState | None = None,
        spool: SpoolPolicy | None = None,
        overwrite: bool = False,
        progress: Progress | None = None,
    ) -> FetchedInto:
        """Fetch ``model`` and decode it part by part into a model file or into tensors,
        in bounded memory: a large model's verified segments go to a file-backed
        mapping (``spool``), and are decoded straight into ``output`` (a mapped
        safetensors file, written atomically) or ``into`` (existing tensors, written in
        place). The decoded model's digest is checked either way.

        Parameters
        ----------
        model, spec, base, base_digest, progress
            As for :meth:`fetch` (``spec`` without levels: a truncated prefix is
            decoded by :meth:`fetch`).
        output
            The model file to write (``.safetensors``; a PyTorch extension decodes in
            memory).
        into
            Tensors to decode into, one per tensor of the model, with its shape and
            dtype (for a delta they are first given the base's values).
        state
            Segments held from an earlier, failed call (made with the same ``spool``);
            resumes from them. Its buffer is unmapped when this call succeeds.
        spool
            When and where to keep the payload on disk (default: ``SpoolPolicy()``: the
            payload of a model of 256 MiB and more, in the system's temporary folder).
        overwrite
            Replace an existing ``output``.

        Raises
        ------
        ValueError
            Neither or both of ``output`` and ``into``, or a spec with levels.
        fedsqueeze.errors.ConfigError
            The spool folder is not writable or has no room.
        IntegrityError
            A segment kept failing verification, or the decoded model does not match
            its digest (``output`` is then not written; ``into`` holds garbage).
        The transport errors of :meth:`fetch`.
        """
        if (output is None) == (into is None):
            raise ValueError("give exactly one of output and into")
        if spec.levels is not None:
            raise ValueError("a spec with levels is fetched with fetch() (prefixes, budgets)")
        if base is not None and base_digest is None:
            base_digest = state_digest(base)
        if base_digest is not None and base is None:
            raise ValueError("decoding a delta needs the base tensors, not only its digest")
        op = self._operation()
        policy = spool if spool is not None else SpoolPolicy()
        held = (
            state
            if state is not None
            else FetchState(self.retry.max_segment_refetches, spool=policy)
        )
        request = ManifestRequest(model, base_digest, spec, None, (), self.segment_digest)
        self._transfer(op, request, held, progress, None)
        manifest = held.manifest
        if manifest is None:
            raise RuntimeError("fetch state lost its manifest")
        result = decode_fetched(held, manifest, output, into, base, overwrite)
        held.close()
        stats = op.stats(held.refetched)
        logger.info(
            "fetched %s… into %s: %d B encoded (%s), %d B down, %.3f s",
            manifest.model_digest.hex()[:12],
            output if output is not None else "tensors",
            manifest.encoded_bytes,
            "spooled" if result.spooled else "in memory",
            stats.wire.received,
            stats.elapsed_s,
        )
        return replace(result, stats=stats)

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
            Digest of the model version the update was trained from (sent only when the
            payload does not name it: a full-model update, or a mismatch for the server
            to refuse).
        chunk_bytes
            Payload bytes per message.
        """
        if not 0 < chunk_bytes <= SEGMENT_BYTES * 2:
            raise ValueError("chunk_bytes must be in (0, 2 MiB]")
        payload = encoded.to_bytes()
        meta = UpdateMetadata(
            update_id=update_id,
            base_digest=None if encoded.base_digest == base_digest else base_digest,
            total_bytes=len(payload),
            sha256=hashlib.sha256(payload).digest(),
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
        if receipt.stored_bytes != len(payload):
            raise IntegrityError("the server's receipt does not match the upload's size")
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


def decode_fetched_prefix(
    stream: bytes | memoryview,
    manifest: Manifest,
    base: Mapping[str, torch.Tensor] | None,
    held_parts: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], PrefixUsed]:
    """Decode the verified prefix of a truncated fetch: the best model it holds.

    Every byte of ``stream`` passed its segment's sha256, but a server can still send a
    stream that is not a valid prefix; that raises, never crashes. ``held_parts`` (the
    tensors ``manifest.held_parts`` names, from the edge's cache) are exact: they replace
    what the prefix decoded for them (a delta's prefix gives every tensor it lacks the
    base's value, and the stream never carries a held part).

    Raises
    ------
    fedsqueeze.errors.CodecError
        ``stream`` is not a decodable prefix of a model (records out of order, a
        refinement without its base level, a full model without every base level), or
        the base is not the manifest's.
    """
    decoded = decode_prefix(
        stream,
        dict(base) if base is not None and manifest.base_digest is not None else None,
        base_digest=manifest.base_digest,
    )
    state = decoded.state
    if held_parts:
        state = reassemble({k: v for k, v in state.items() if k not in held_parts}, held_parts)
    levels = tuple(decoded.levels.values())
    return state, PrefixUsed(decoded.used_bytes, levels, state_digest(state))


def _segment_of(part: SegmentData | pb.Manifest) -> SegmentData:
    if not isinstance(part, SegmentData):
        raise IntegrityError("the Fetch stream sent a second manifest")
    return part


def _log_fetched(manifest: Manifest, stats: TransferStats, how: str) -> None:
    """The INFO line of a finished fetch (``how``: how it was decoded, or empty)."""
    logger.info(
        "fetched %s… (%s)%s: %d B encoded, %d held part(s), %d B down, %d B up, %d call(s), %.3f s",
        manifest.model_digest.hex()[:12],
        "delta" if manifest.base_digest is not None else "full",
        how,
        manifest.encoded_bytes,
        len(manifest.held_parts),
        stats.wire.received,
        stats.wire.sent,
        stats.calls,
        stats.elapsed_s,
    )
