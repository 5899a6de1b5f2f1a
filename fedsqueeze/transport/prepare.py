"""Turning a (target, base, spec) request into a :class:`PreparedModel`: encode, segment,
describe.

This is the one expensive step of serving a model; the server runs it through its
:class:`~fedsqueeze.transport.cache.EncodeCache`, so each distinct request runs it once.
A model of at least the spool threshold's raw bytes, from a source that can encode into
a record store, is prepared on disk instead (:mod:`fedsqueeze.transport.prepare_spooled`):
the same segments and manifest, nothing of the model held in memory.
"""

from __future__ import annotations

import hashlib
import logging
import time

from fedsqueeze.codec import (
    decode_state,
    smallest_prefix,
    split_progressive,
    split_segments,
    state_digest,
)
from fedsqueeze.errors import NotFoundError, ResourceExhaustedError
from fedsqueeze.transport.cache import CacheKey, PreparedModel
from fedsqueeze.transport.prepare_spooled import decoded_digest, spool_encoding
from fedsqueeze.transport.source import ModelSource
from fedsqueeze.transport.spool import SpoolDir
from fedsqueeze.wire.convert import segment_message
from fedsqueeze.wire.digests import SegmentDigest, digest_function
from fedsqueeze.wire.types import Manifest, PartRef, SegmentData, SegmentInfo

logger = logging.getLogger(__name__)


#: A progressive stream is cut into about this many segments (at record boundaries, and
#: at every level change), so that a byte budget buys whole records at a fine grain. Each
#: segment costs about 70 wire bytes (its manifest descriptor with its sha256 and tensor
#: names, its message framing and gRPC prefix; tests/transport/test_progressive_fetch.py
#: measures it): with 8 per stream the framing of a 6.5 kB digits delta is about 7%, and
#: a 3.7 kB budget still chooses among 3 to 4 cut points.
PROGRESSIVE_SEGMENTS = 8
#: Smallest progressive segment aimed at, in bytes (below it framing dominates).
MIN_PROGRESSIVE_SEGMENT_BYTES = 256

#: Length of the manifest keys this server makes, in bytes (128 bits: a cache key, not a
#: security boundary; every segment is verified by its own SHA-256).
MANIFEST_KEY_BYTES = 16


def manifest_key_for(
    model_digest: bytes,
    base_digest: bytes | None,
    spec_bytes: bytes,
    segments: list[SegmentInfo],
    held_parts: tuple[PartRef, ...] = (),
    segment_digest: SegmentDigest = SegmentDigest.SHA256,
) -> bytes:
    """The manifest key: a digest of what was encoded and of the result (the segments'
    sizes and digests, which cover every payload byte, and the digests' algorithm).

    The same request encoded to the same bytes gets the same key, on any server process,
    so a client that held segments before a server restart keeps them.
    """
    h = hashlib.sha256(b"fedsqueeze.v1.manifest\x00")
    parts = [model_digest, base_digest or b"", spec_bytes]
    parts += [info.byte_length.to_bytes(8, "little") + info.sha256 for info in segments]
    # Held parts are part of what was encoded (an encoding without them differs anyway:
    # it carries their records); without any, the key is what it always was.
    parts += [ref.tensor_name.encode() + b"\x00" + ref.part_digest for ref in held_parts]
    # Likewise another segment digest than SHA-256 (keys of SHA-256 encodings unchanged).
    if segment_digest is not SegmentDigest.SHA256:
        parts.append(f"segment-digest:{segment_digest.name}".encode())
    for part in parts:
        h.update(len(part).to_bytes(4, "little"))
        h.update(part)
    return h.digest()[:MANIFEST_KEY_BYTES]


def prepare_model(
    source: ModelSource, key: CacheKey, segment_bytes: int, spool: SpoolDir | None = None
) -> PreparedModel:
    """Encode ``key`` with ``source``, cut it into segments and build its manifest.

    The decoded model's digest is computed here by decoding once (skipped for a lossless
    full model, whose decoded digest is the model's own), so every client can check the
    model it rebuilds. With ``spool``, a model of at least its threshold (raw bytes) is
    prepared on disk when the source has ``encode_to``.

    Raises
    ------
    NotFoundError
        The target (or base) is no longer held.
    ResourceExhaustedError
        The encoded model is larger than ``key.byte_budget`` (not progressive encodings:
        the server truncates those, :mod:`fedsqueeze.transport.truncate`).
    """
    started = time.perf_counter()
    target_state = source.get(key.target)
    if target_state is None:
        raise NotFoundError(f"model {key.target[:16]}… is no longer held")
    base_state = source.get(key.base) if key.base is not None else None
    if key.base is not None and base_state is None:
        raise NotFoundError(f"base {key.base[:16]}… is no longer held")
    leave_out = frozenset(ref.tensor_name for ref in key.held_parts)
    raw_bytes = sum(t.numel() * t.element_size() for t in target_state.values())
    if spool is not None and spool.policy.applies(raw_bytes) and hasattr(source, "encode_to"):
        return _prepare_spooled(source, key, segment_bytes, spool, raw_bytes, started)
    encoded = source.encode(key.target, key.base, key.spec, key.byte_budget, leave_out=leave_out)
    progressive = encoded.progressive
    if progressive:
        target = max(MIN_PROGRESSIVE_SEGMENT_BYTES, encoded.nbytes // PROGRESSIVE_SEGMENTS)
        segments = split_progressive(encoded, min(target, segment_bytes), segment_bytes)
    else:
        segments = split_segments(encoded, segment_bytes)
    encoded_bytes = sum(len(s.payload) for s in segments)
    if not progressive and key.byte_budget is not None and encoded_bytes > key.byte_budget:
        raise ResourceExhaustedError(
            f"the encoded model has {encoded_bytes} bytes, over the budget of "
            f"{key.byte_budget}; ask for a stronger codec spec"
        )
    model_digest = bytes.fromhex(key.target)
    base_digest = bytes.fromhex(key.base) if key.base is not None else None
    if encoded.spec.lossless and base_state is None:
        decoded_digest = model_digest
    else:
        decoded = decode_state(encoded, base_state, base_digest=base_digest)
        decoded.update({name: target_state[name] for name in leave_out})
        decoded_digest = state_digest(decoded)
    every_tensor = {record.name for record in encoded.records}
    digest = digest_function(key.segment_digest)
    infos = [
        SegmentInfo(
            s.index,
            # Empty for "every tensor" (a one-segment model): the payload names them.
            () if set(s.tensor_names) == every_tensor else s.tensor_names,
            s.priority,
            s.level,
            len(s.payload),
            digest(s.payload),
        )
        for s in segments
    ]
    manifest_key = manifest_key_for(
        model_digest,
        base_digest,
        encoded.spec.to_bytes(),
        infos,
        key.held_parts,
        key.segment_digest,
    )
    messages = tuple(
        segment_message(SegmentData(s.index, s.payload))
        for s in sorted(segments, key=lambda s: s.index)
    )
    manifest = Manifest(
        manifest_key=manifest_key,
        model_digest=model_digest,
        base_digest=base_digest,
        spec=encoded.spec,
        raw_bytes=raw_bytes,
        decoded_digest=decoded_digest,
        segments=tuple(infos),
        smallest_prefix_bytes=smallest_prefix(encoded) if progressive else 0,
        held_parts=key.held_parts,
        segment_digest=key.segment_digest,
    )
    logger.info(
        "encoded %s… (%s): raw %d B, encoded %d B in %d segments, %d held part(s), "
        "ratio %.2f, %.3f s",
        key.target[:12],
        "delta from " + key.base[:12] + "…" if key.base else "full",
        raw_bytes,
        encoded_bytes,
        len(infos),
        len(key.held_parts),
        raw_bytes / max(encoded_bytes, 1),
        time.perf_counter() - started,
    )
    return PreparedModel(manifest, messages)


def _prepare_spooled(
    source: ModelSource,
    key: CacheKey,
    segment_bytes: int,
    spool: SpoolDir,
    raw_bytes: int,
    started: float,
) -> PreparedModel:
    """:func:`prepare_model` on disk: bodies spooled, segments read back to be digested,
    the decoded digest taken tensor by tensor. The spool file is deleted on any error."""
    target_state = source.get(key.target)
    base_state = source.get(key.base) if key.base is not None else None
    if target_state is None or (key.base is not None and base_state is None):
        raise NotFoundError(f"model {key.target[:16]}… or its base is no longer held")
    leave_out = frozenset(ref.tensor_name for ref in key.held_parts)
    file = spool.new_file(".stream")
    try:
        plan = source.encode_to(  # type: ignore[attr-defined]
            file, key.target, key.base, key.spec, key.byte_budget, leave_out=leave_out
        )
        spooled = spool_encoding(
            plan,
            file,
            segment_bytes,
            progressive_segments=PROGRESSIVE_SEGMENTS,
            min_progressive_bytes=MIN_PROGRESSIVE_SEGMENT_BYTES,
        )
        encoded_bytes = spooled.stream.nbytes
        progressive = spooled.progressive
        if not progressive and key.byte_budget is not None and encoded_bytes > key.byte_budget:
            raise ResourceExhaustedError(
                f"the encoded model has {encoded_bytes} bytes, over the budget of "
                f"{key.byte_budget}; ask for a stronger codec spec"
            )
        model_digest = bytes.fromhex(key.target)
        base_digest = bytes.fromhex(key.base) if key.base is not None else None
        if plan.header.spec.lossless and base_state is None:
            decoded = model_digest
        else:
            folder = spool.path or spool.policy.folder
            held = {name: target_state[name] for name in leave_out}
            decoded = decoded_digest(spooled, base_state, base_digest, held, folder)
        every_tensor = {stored.record.name for stored in plan.records}
        digest = digest_function(key.segment_digest)
        infos = [
            SegmentInfo(
                s.index,
                () if set(s.tensor_names) == every_tensor else s.tensor_names,
                s.index,
                s.level,
                s.end - s.start,
                digest(spooled.payload(s.index)),
            )
            for s in spooled.segments
        ]
        manifest = Manifest(
            manifest_key=manifest_key_for(
                model_digest,
                base_digest,
                plan.header.spec.to_bytes(),
                infos,
                key.held_parts,
                key.segment_digest,
            ),
            model_digest=model_digest,
            base_digest=base_digest,
            spec=plan.header.spec,
            raw_bytes=raw_bytes,
            decoded_digest=decoded,
            segments=tuple(infos),
            smallest_prefix_bytes=spooled.smallest_prefix,
            held_parts=key.held_parts,
            segment_digest=key.segment_digest,
        )
    except BaseException:
        file.release()
        raise
    logger.info(
        "encoded %s… (%s) to spool file %s: raw %d B, encoded %d B in %d segments, "
        "ratio %.2f, %.3f s",
        key.target[:12],
        "delta from " + key.base[:12] + "…" if key.base else "full",
        file.path.name,
        raw_bytes,
        encoded_bytes,
        len(infos),
        raw_bytes / max(encoded_bytes, 1),
        time.perf_counter() - started,
    )
    return PreparedModel(manifest, (), spooled)
