"""The data plane's model source over the coordinator's version store.

Besides encoding, it adopts what each encoding decodes to as a version of its own: an
edge that received a lossy delta holds *that* model, not the global one, and names it
as the base of its next request and of its update. Keeping it lets the next delta
correct what this one dropped, so no error accumulates on the edge.

A large model is encoded with :meth:`StoreModelSource.encode_to` (the transfer server
calls it for a model of at least its :class:`~fedsqueeze.transport.spool.SpoolPolicy`
threshold): record bodies go to the server's spool file as they are made, and the model
the edge will decode is written record by record to a file beside it, mapped and kept
(:meth:`VersionStore.publish` writes a large version tensor by tensor), so neither the
encoding nor the decoded model is held in memory.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping

import torch

from coordinator.version_store import VersionStore
from fedsqueeze.codec import CodecSpec, EncodedModel, decode_state, encode_state, state_digest
from fedsqueeze.codec.stream_encode import EncodedPlan, RecordStore, encode_stream
from fedsqueeze.transport.source import encode_seed, held_pair, without
from fedsqueeze.transport.spool import SpoolFile

log = logging.getLogger(__name__)


class StoreModelSource:
    """A :class:`fedsqueeze.transport.source.ModelSource` backed by a :class:`VersionStore`."""

    def __init__(self, store: VersionStore) -> None:
        self.store = store

    def resolve(self, model: str) -> str:
        """A track's head or a kept digest (``NotFoundError`` otherwise)."""
        return self.store.resolve(model)

    def get(self, digest: str) -> Mapping[str, torch.Tensor] | None:
        """A kept version, or ``None``."""
        try:
            return self.store.get(digest)
        except ValueError:
            return None  # not a digest at all

    def adopt(self, state: Mapping[str, torch.Tensor]) -> str:
        """Keep a model an edge decoded from a truncated fetch (a version without track)."""
        return self.store.publish(state, track=None)

    def encode(
        self,
        target: str,
        base: str | None,
        spec: CodecSpec,
        byte_budget: int | None,
        *,
        leave_out: frozenset[str] = frozenset(),
    ) -> EncodedModel:
        """Encode ``target`` from ``base`` and keep the model the edge will decode."""
        return self.encode_decoded(target, base, spec, leave_out=leave_out)[0]

    def encode_decoded(
        self,
        target: str,
        base: str | None,
        spec: CodecSpec,
        *,
        leave_out: frozenset[str] = frozenset(),
    ) -> tuple[EncodedModel, str]:
        """:meth:`encode`, and the hex digest of the model the edge will decode (the
        target itself when the encoding is exact)."""
        state, base_state = held_pair(self.get, target, base)
        encoded = encode_state(
            without(state, leave_out),
            spec,
            base_state,
            seed=encode_seed(target, base, spec),
            base_digest=bytes.fromhex(base) if base is not None else None,
        )
        held = target
        frozen_delta = bool(spec.freeze) and base_state is not None
        if not spec.lossless or frozen_delta:
            # A lossless delta with frozen parts decodes to the target only where the
            # base's frozen tensors are the target's (not after a lossy first download).
            decoded = decode_state(
                encoded, base_state, base_digest=bytes.fromhex(base) if base else None
            )
            # The edge adds the held parts (exact copies of the target's) to what it decodes.
            decoded.update({name: state[name] for name in leave_out})
            if not spec.lossless or state_digest(decoded).hex() != target:
                held = self.store.publish(decoded, track=None)
                log.debug("edge-side version %s adopted for %s…", held[:12], target[:12])
        return encoded, held

    def encode_to(
        self,
        store: RecordStore,
        target: str,
        base: str | None,
        spec: CodecSpec,
        byte_budget: int | None,
        *,
        leave_out: frozenset[str] = frozenset(),
    ) -> EncodedPlan:
        """:meth:`encode` tensor by tensor, each record body into ``store`` (a
        :class:`~fedsqueeze.transport.spool.SpoolFile`) as it is made: the same bytes.

        The model the edge will decode, when it is not the target, is decoded record by
        record from ``store`` into a file beside it and kept, as :meth:`encode_decoded`
        keeps it.

        Raises
        ------
        TypeError
            A lossy (or frozen delta) encoding into a store that is not a spool file
            (its bodies must be read back to decode them).
        """
        state, base_state = held_pair(self.get, target, base)
        base_digest = bytes.fromhex(base) if base is not None else None
        plan = encode_stream(
            without(state, leave_out),
            spec,
            store,
            base_state,
            seed=encode_seed(target, base, spec),
            base_digest=base_digest,
        )
        frozen_delta = bool(spec.freeze) and base_state is not None
        if spec.lossless and not frozen_delta:
            return plan
        if not isinstance(store, SpoolFile):
            raise TypeError("a lossy encode_to needs a SpoolFile to decode what it wrote")
        from fedsqueeze.modelfile import map_model
        from fedsqueeze.transport.prepare_spooled import decode_spooled_to_file, spool_encoding

        spooled = spool_encoding(plan, store, 1 << 20)
        output = store.path.parent / f"fsq-adopt-{secrets.token_hex(8)}.safetensors"
        try:
            held = {name: state[name] for name in leave_out}
            decode_spooled_to_file(spooled, base_state, base_digest, held, output)
            decoded = map_model(output)
        finally:
            output.unlink(missing_ok=True)  # the mapping keeps its pages
        digest = state_digest(decoded).hex()
        if digest != target:
            self.store.publish(decoded, track=None)
            log.debug("edge-side version %s adopted for %s… (spooled)", digest[:12], target[:12])
        return plan
