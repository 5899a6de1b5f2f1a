"""Truncating progressive encodings to a byte budget, and what an edge then holds.

A fetch with a byte budget of an encoding that is **not** progressive is all or nothing:
RESOURCE_EXHAUSTED when it does not fit. A **progressive** encoding (codec spec
``levels``) is cut instead: the answer carries the longest prefix of segments that fits
(:func:`plan_prefix`), and its manifest says so (``prefix_segments``). The segments go in
the stream's order (base levels first, then every tensor's refinements in one order of
falling distortion removed per byte, :mod:`fedsqueeze.codec.level_order`), so every
byte bought is the best next byte, and the
client decodes what it got with :func:`~fedsqueeze.codec.decode_prefix`.

What an edge holding a prefix is served next (the design, and why it is the simplest
correct one):

* **The same target again** (a resumed fetch, a retry, a larger budget, or a round
  that left the model unchanged): the edge names the manifest and the segments it holds
  (``held_manifest_key``, ``held_segment_ids``, kept in its
  :class:`~fedsqueeze.transport.fetch.FetchState`); the same (target, base, spec) encodes
  to the same bytes and the same manifest key, so the server leaves those segments out and
  sends the missing refinements, in order: no byte twice. Holding every segment, the
  answer is the manifest alone.
* **A new target**: the delta's base is the coarse model the edge holds. The server
  decodes each prefix it sends once (:class:`PrefixModels`), exactly as the edge will,
  and keeps the result in its model source under its digest, so that the edge's next
  fetch can be a delta from it and its update (a delta from it too) can be decoded. What
  the coarse model lacks stays in the next delta: the refinement the edge missed travels
  as part of the next model's difference instead of as stale planes of an old model.

The edge reports the bytes and levels it decoded in its receipt, and the coordinator
records them beside the digest it holds (:meth:`coordinator.version_store.VersionStore.
record_edge`).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from fedsqueeze.codec import decode_prefix
from fedsqueeze.errors import NotFoundError, ResourceExhaustedError
from fedsqueeze.transport.cache import PreparedModel
from fedsqueeze.transport.source import ModelSource
from fedsqueeze.wire.convert import segment_from_message
from fedsqueeze.wire.types import Manifest

logger = logging.getLogger(__name__)

__all__ = ["PrefixModels", "plan_prefix"]


def plan_prefix(manifest: Manifest, held: frozenset[int], byte_budget: int | None) -> int:
    """How many leading segments a budgeted answer gives the client (0: all of them).

    The budget counts the payload bytes *sent*: segments the client holds cost nothing.
    The prefix ends before the first segment that neither is held nor fits.

    Raises
    ------
    ResourceExhaustedError
        Not even the smallest decodable prefix fits (progressive encodings), or the
        encoding does not fit (others; normally refused when it was prepared).
    """
    if byte_budget is None:
        return 0
    if manifest.smallest_prefix_bytes == 0:  # not progressive: all or nothing
        missing = sum(s.byte_length for s in manifest.segments if s.segment_id not in held)
        if missing > byte_budget:
            raise ResourceExhaustedError(
                f"the encoded model needs {missing} more bytes, over the budget of {byte_budget}"
            )
        return 0
    spent = prefix_bytes = count = 0
    for info in manifest.segments:
        if info.segment_id not in held:
            if spent + info.byte_length > byte_budget:
                break
            spent += info.byte_length
        prefix_bytes += info.byte_length
        count += 1
    if prefix_bytes < manifest.smallest_prefix_bytes:
        raise ResourceExhaustedError(
            f"the smallest decodable prefix takes {manifest.smallest_prefix_bytes} bytes; "
            f"a budget of {byte_budget} buys {prefix_bytes}"
        )
    return 0 if count == len(manifest.segments) else count


class PrefixModels:
    """The models edges hold after truncated fetches, decoded once each and kept in the
    model source (so they can be delta bases and update bases); thread-safe.

    Parameters
    ----------
    source
        Where the decoded prefixes are kept (:meth:`ModelSource.adopt`).
    max_entries
        (manifest key, prefix) pairs remembered as already kept.
    """

    def __init__(self, source: ModelSource, max_entries: int = 1024) -> None:
        self.source = source
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._done: OrderedDict[tuple[bytes, int], str] = OrderedDict()

    def ensure(self, prepared: PreparedModel, prefix_segments: int) -> str:
        """Keep the model the first ``prefix_segments`` segments decode to; its hex digest."""
        manifest = prepared.manifest
        key = (manifest.manifest_key, prefix_segments)
        with self._lock:
            digest = self._done.get(key)
            if digest is not None and self.source.get(digest) is not None:
                self._done.move_to_end(key)
                return digest
        base = None
        if manifest.base_digest is not None:
            base = self.source.get(manifest.base_digest.hex())
            if base is None:
                raise NotFoundError(f"base {manifest.base_digest.hex()[:16]}… is no longer held")
        spooled = prepared.spooled
        stream = b"".join(
            spooled.payload(i)
            if spooled is not None
            else bytes(segment_from_message(prepared.messages[i]).payload)
            for i in range(prefix_segments)
        )
        decoded = decode_prefix(stream, base, base_digest=manifest.base_digest)
        state = decoded.state
        if manifest.held_parts:
            # The edge adds the held parts (exact copies of the target's) to what it decodes.
            target = self.source.get(manifest.model_digest.hex())
            if target is None:
                raise NotFoundError(f"model {manifest.model_digest.hex()[:16]}… is no longer held")
            names = {ref.tensor_name for ref in manifest.held_parts}
            state = {k: v for k, v in state.items() if k not in names}
            state.update({name: target[name] for name in names})
        digest = self.source.adopt(state)  # hashes the state: its digest
        logger.info(
            "prefix of %s… (%d of %d segments, %d B) decodes to %s…",
            manifest.model_digest.hex()[:12],
            prefix_segments,
            len(manifest.segments),
            decoded.used_bytes,
            digest[:12],
        )
        with self._lock:
            self._done[key] = digest
            while len(self._done) > self.max_entries:
                self._done.popitem(last=False)
        return digest
