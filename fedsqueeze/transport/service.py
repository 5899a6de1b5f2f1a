"""The handlers of ``fedsqueeze.v1.ModelTransfer``: authentication, validation, status codes.

Each handler authenticates the call first, converts the request with
:mod:`fedsqueeze.wire.convert`, and reports any :class:`~fedsqueeze.errors.FedsqueezeError`
with its status code (:mod:`fedsqueeze.transport.errors_map`). Nothing is stored until an
upload has been received in full and verified, so a rejected call leaves the server's
state as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import NoReturn

import grpc

from fedsqueeze.codec import EncodedModel, decode_state
from fedsqueeze.errors import (
    FedsqueezeError,
    IntegrityError,
    InvalidRequestError,
    NotFoundError,
    PreconditionError,
    ResourceExhaustedError,
    UnavailableError,
)
from fedsqueeze.transport.auth import TokenTable
from fedsqueeze.transport.cache import CacheKey, EncodeCache, PreparedModel
from fedsqueeze.transport.errors_map import status_for
from fedsqueeze.transport.faults import FaultInjector, StreamAction
from fedsqueeze.transport.parts import PartDigests, plan_held_parts
from fedsqueeze.transport.prepare import prepare_model
from fedsqueeze.transport.source import ModelSource
from fedsqueeze.transport.spool import SpoolDir
from fedsqueeze.transport.truncate import PrefixModels, plan_prefix
from fedsqueeze.transport.updates import AddResult, ReceivedUpdate, UpdateSink, now
from fedsqueeze.wire import convert
from fedsqueeze.wire import transfer_pb2 as pb
from fedsqueeze.wire.digests import supported_digest
from fedsqueeze.wire.types import (
    Manifest,
    ManifestRequest,
    PartRef,
    UpdateMetadata,
    UpdateReceipt,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceLimits:
    """Sizes the service enforces.

    Parameters
    ----------
    segment_bytes
        Largest segment payload, in bytes.
    max_update_bytes
        Largest upload, in bytes.
    verify_updates
        Decode every upload in full before storing it (not only parse its headers).
    """

    segment_bytes: int = 1 << 20
    max_update_bytes: int = 512 << 20
    verify_updates: bool = True


class TransferService:
    """The four RPC handlers, over a model source, an update sink and a token table."""

    def __init__(
        self,
        source: ModelSource,
        updates: UpdateSink,
        tokens: TokenTable,
        cache: EncodeCache,
        limits: ServiceLimits,
        faults: FaultInjector | None = None,
        spool: SpoolDir | None = None,
    ) -> None:
        self.source = source
        self.spool = spool
        self.updates = updates
        self.tokens = tokens
        self.cache = cache
        self.limits = limits
        self.faults = faults
        self.prefixes = PrefixModels(source)
        self.part_digests = PartDigests()

    # ------------------------------------------------------------------ helpers
    def _authenticate(self, context: grpc.ServicerContext) -> str:
        return self.tokens.authenticate(context.invocation_metadata())

    @staticmethod
    def _abort(context: grpc.ServicerContext, rpc: str, exc: Exception) -> NoReturn:
        if isinstance(exc, FedsqueezeError):
            code = status_for(exc)
            denied = code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
            level = logging.WARNING if denied else logging.INFO
            logger.log(level, "%s refused: %s: %s", rpc, code.name, exc)
            context.abort(code, str(exc))
        if isinstance(exc, grpc.RpcError) or not context.is_active():
            logger.info("%s ended: the client cancelled or went away", rpc)
            context.abort(grpc.StatusCode.CANCELLED, "cancelled")
        logger.exception("%s failed on an unexpected error", rpc)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
        raise RuntimeError("grpc's context.abort() returned") from exc

    def _prepare(self, edge: str, req: ManifestRequest) -> PreparedModel:
        """The encoding ``req`` asks for, from the cache or encoded now."""
        target = self.source.resolve(req.model)
        base = req.base_digest.hex() if req.base_digest is not None else None
        if base is not None and self.source.get(base) is None:
            logger.info("edge %s holds unknown or old base %s…: full model", edge, base[:12])
            base = None
        held_base = base  # its parts are held even where it cannot be the delta's base
        if base is not None and not self._related(target, base):
            # Another track's model (a student): no delta from it, but its parts count.
            logger.info("edge %s holds %s…, unrelated to the target: full model", edge, base[:12])
            base = None
        # A progressive encoding is truncated per answer, not re-encoded per budget.
        budget = None if req.spec.levels else req.byte_budget
        refs = self._held_parts(edge, target, base, held_base, req)
        # The digest the client asked for, or SHA-256 when this server cannot make it.
        key = CacheKey(target, base, req.spec, budget, refs, supported_digest(req.segment_digest))
        return self.cache.get_or_build(
            key, lambda: prepare_model(self.source, key, self.limits.segment_bytes, self.spool)
        )

    def _related(self, target: str, base: str) -> bool:
        """Whether ``base`` shares a tensor (name, shape, dtype) with ``target``: whether
        a delta from it is possible at all."""
        target_state, base_state = self.source.get(target), self.source.get(base)
        if target_state is None or base_state is None or not target_state:
            return True  # let the encoder report it
        return any(
            name in base_state
            and base_state[name].shape == t.shape
            and base_state[name].dtype == t.dtype
            for name, t in target_state.items()
        )

    def _held_parts(
        self,
        edge: str,
        target: str,
        base: str | None,
        held_base: str | None,
        req: ManifestRequest,
    ) -> tuple[PartRef, ...]:
        """The target's tensors the edge holds exactly, in its versions or its base
        (``held_base``, the delta's ``base`` or unrelated). Only for requests naming
        ``held_digests``; versions this server does not hold count for nothing. Progressive
        encodings too: a truncated prefix then holds the held parts exactly
        (:class:`~fedsqueeze.transport.truncate.PrefixModels` adds them as the edge does)."""
        if not req.held_digests:
            return ()
        target_state = self.source.get(target)
        if target_state is None:
            return ()  # dropped meanwhile: prepare_model reports it
        held: set[bytes] = set()
        if held_base is not None and (held_state := self.source.get(held_base)) is not None:
            held.update(self.part_digests.of(held_base, held_state).values())
        base_state = self.source.get(base) if base is not None else None
        base_parts = self.part_digests.of(base, base_state) if base and base_state else {}
        known = 0
        for digest in req.held_digests:
            version = digest.hex()
            state = self.source.get(version)
            if state is not None:
                held.update(self.part_digests.of(version, state).values())
                known += 1
        refs = plan_held_parts(
            target_state,
            self.part_digests.of(target, target_state),
            base_state,
            base_parts,
            frozenset(held),
            req.spec,
        )
        logger.info(
            "edge %s holds %d of %d named version(s): %d part(s) of %s… need not travel",
            edge,
            known,
            len(req.held_digests),
            len(refs),
            target[:12],
        )
        return refs

    # ------------------------------------------------------------------ Fetch
    def fetch(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Handler of ``Fetch``: yields serialized response messages (manifest, segments)."""
        try:
            edge = self._authenticate(context)
            req, held = convert.fetch_request_from_proto(request)
            prepared = self._prepare(edge, req)
            manifest = prepared.manifest
            skip: frozenset[int] = frozenset()
            if held is not None and held.manifest_key == manifest.manifest_key:
                self._check_held(prepared, held.held)
                skip = held.held
            manifest = self._truncated(prepared, skip, req.byte_budget)
            yield convert.fetch_manifest_message(manifest, req)
            yield from self._segments(prepared, skip, context, manifest.prefix_segments)
        except Exception as exc:
            self._abort(context, "Fetch", exc)

    # ------------------------------------------------------------------ GetManifest
    def get_manifest(
        self, request: pb.GetManifestRequest, context: grpc.ServicerContext
    ) -> pb.GetManifestResponse:
        """Handler of ``GetManifest``."""
        try:
            edge = self._authenticate(context)
            req = convert.manifest_request_from_proto(request)
            prepared = self._prepare(edge, req)
            manifest = self._truncated(prepared, frozenset(), req.byte_budget)
            return convert.manifest_response_to_proto(manifest, req)
        except Exception as exc:
            self._abort(context, "GetManifest", exc)

    # ------------------------------------------------------------------ StreamSegments
    def stream_segments(
        self, request: pb.StreamSegmentsRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Handler of ``StreamSegments``: yields serialized response messages."""
        try:
            self._authenticate(context)
            req = convert.segment_request_from_proto(request)
            prepared = self.cache.by_manifest_key(req.manifest_key)
            if prepared is None:
                raise NotFoundError(
                    f"manifest {req.manifest_key.hex()[:16]}… is not cached; Fetch again"
                )
            self._check_held(prepared, req.held)
            yield from self._segments(prepared, req.held, context, req.prefix_segments)
        except Exception as exc:
            self._abort(context, "StreamSegments", exc)

    @staticmethod
    def _check_held(prepared: PreparedModel, held: frozenset[int]) -> None:
        unknown = sorted(i for i in held if not prepared.manifest.has_segment(i))
        if unknown:
            raise InvalidRequestError(f"held segment ids not in the manifest: {unknown[:5]}")

    def _truncated(
        self, prepared: PreparedModel, held: frozenset[int], byte_budget: int | None
    ) -> Manifest:
        """The manifest of the answer: for a progressive encoding over ``byte_budget``, the
        longest prefix that fits, whose decoded model is kept as a possible base."""
        prefix = plan_prefix(prepared.manifest, held, byte_budget)
        if not prefix:
            return prepared.manifest
        self.prefixes.ensure(prepared, prefix)
        return replace(prepared.manifest, prefix_segments=prefix)

    def _segments(
        self,
        prepared: PreparedModel,
        held: frozenset[int],
        context: grpc.ServicerContext,
        prefix_segments: int = 0,
    ) -> Iterator[bytes]:
        with contextlib.ExitStack() as stack:
            if prepared.spooled is not None:  # its file stays open until this stream ends
                stack.enter_context(prepared.spooled.stream.file.hold())
            try:
                yield from self._segments_of(prepared, held, context, prefix_segments)
            except IntegrityError:
                # The spool file was damaged on disk: never serve it again.
                logger.error(
                    "spool file of %s… damaged: dropped", prepared.manifest.manifest_key.hex()[:12]
                )
                self.cache.discard(prepared)
                raise

    def _segments_of(
        self,
        prepared: PreparedModel,
        held: frozenset[int],
        context: grpc.ServicerContext,
        prefix_segments: int,
    ) -> Iterator[bytes]:
        sent = 0
        for info in prepared.manifest.segments:
            if info.segment_id in held:
                continue
            if prefix_segments and info.segment_id >= prefix_segments:
                break
            message = prepared.message(info.segment_id)
            if self.faults is not None:
                if self.faults.before_segment(sent) is StreamAction.CUT:
                    raise UnavailableError(f"injected fault: stream cut after {sent} segments")
                if self.faults.take_corruption(info.segment_id):
                    data = convert.segment_from_message(message)
                    bad = replace(data, payload=self.faults.corrupted(data.payload))
                    message = convert.segment_message(bad)
            if not context.is_active():
                return
            yield message
            sent += 1

    # ------------------------------------------------------------------ PushUpdate
    def push_update(
        self, request_iterator: Iterator[pb.PushUpdateRequest], context: grpc.ServicerContext
    ) -> pb.PushUpdateResponse:
        """Handler of ``PushUpdate``."""
        try:
            edge = self._authenticate(context)
            first = next(request_iterator, None)
            if first is None:
                raise InvalidRequestError("empty PushUpdate stream")
            meta = convert.update_metadata_from_proto(first)
            return convert.receipt_to_proto(self._receive(edge, meta, request_iterator))
        except Exception as exc:
            self._abort(context, "PushUpdate", exc)

    def _known_base(self, digest: bytes) -> bytes:
        if self.source.get(digest.hex()) is None:
            raise PreconditionError(f"base {digest.hex()[:16]}… is unknown or no longer held")
        return digest

    def _receive(
        self, edge: str, meta: UpdateMetadata, chunks: Iterator[pb.PushUpdateRequest]
    ) -> UpdateReceipt:
        seen = self.updates.lookup(meta.update_id)
        if seen is not None:
            if seen.sha256 != meta.sha256 or seen.edge_id != edge:
                raise PreconditionError(f"update id {meta.update_id!r} was used for other content")
            logger.info("update %s from %s repeated: counted once", meta.update_id, edge)
            return UpdateReceipt(seen.nbytes, duplicate=True)
        if meta.total_bytes > self.limits.max_update_bytes:
            raise ResourceExhaustedError(
                f"update of {meta.total_bytes} bytes is over the limit of "
                f"{self.limits.max_update_bytes}"
            )
        if meta.base_digest is not None:  # refuse before receiving, where the base is named
            self._known_base(meta.base_digest)
        parts: list[bytes] = []
        received = 0
        digest = hashlib.sha256()
        for msg in chunks:
            chunk = convert.update_chunk_from_proto(msg)
            received += len(chunk)
            if received > meta.total_bytes:
                raise InvalidRequestError("upload is longer than its declared total_bytes")
            parts.append(chunk)
            digest.update(chunk)
        if received != meta.total_bytes:
            raise InvalidRequestError(
                f"upload ended after {received} of {meta.total_bytes} declared bytes"
            )
        if digest.digest() != meta.sha256:
            raise IntegrityError("upload does not match its declared sha256")
        payload = b"".join(parts)
        encoded = EncodedModel.from_bytes(payload)
        if meta.base_digest is None:
            if encoded.base_digest is None:
                raise InvalidRequestError("a full-model update must name its base_digest")
            base_digest = self._known_base(encoded.base_digest)
        elif encoded.base_digest not in (None, meta.base_digest):
            raise InvalidRequestError("payload is a delta from another base than declared")
        else:
            base_digest = meta.base_digest
        if self.limits.verify_updates:
            base = self.source.get(base_digest.hex())
            if base is None:  # dropped since the check above
                raise PreconditionError(f"base {base_digest.hex()[:16]}… is no longer held")
            decode_state(encoded, base, base_digest=base_digest)
        update = ReceivedUpdate(
            update_id=meta.update_id,
            edge_id=edge,
            base_digest=base_digest,
            sha256=meta.sha256,
            nbytes=len(payload),
            encoded=encoded,
            received_at=now(),
        )
        result = self.updates.add(update)
        logger.info(
            "update %s from %s: %d B, %s",
            meta.update_id,
            edge,
            len(payload),
            "stored" if result is AddResult.STORED else "duplicate",
        )
        return UpdateReceipt(len(payload), duplicate=result is AddResult.DUPLICATE)
