"""Where the server gets models from: the :class:`ModelSource` protocol.

The coordinator implements it over its on-disk version store; :class:`InMemoryModelSource`
serves tests, benchmarks and simulations. Digests cross this interface as 64-character
lowercase hex strings.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import torch

from fedsqueeze.codec import CodecSpec, EncodedModel, encode_state, state_digest
from fedsqueeze.codec.stream_encode import EncodedPlan, RecordStore, encode_stream
from fedsqueeze.errors import NotFoundError
from fedsqueeze.wire.types import is_hex_digest


def encode_seed(target: str, base: str | None, spec: CodecSpec) -> int:
    """A seed derived from what is encoded, so stochastic rounding repeats exactly.

    Encoding the same (target, base, spec) again, for instance after a server restart,
    then yields the same bytes and the same manifest, and clients resume.
    """
    h = hashlib.sha256(f"{target}:{base or ''}:".encode() + spec.to_bytes())
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


def held_pair(
    get: Callable[[str], Mapping[str, torch.Tensor] | None], target: str, base: str | None
) -> tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor] | None]:
    """The target's tensors and the base's (``None`` without a base), looked up by ``get``.

    Raises
    ------
    NotFoundError
        Either is no longer held.
    """
    state = get(target)
    if state is None:
        raise NotFoundError(f"model {target[:16]}… is no longer held")
    base_state = get(base) if base is not None else None
    if base is not None and base_state is None:
        raise NotFoundError(f"base {base[:16]}… is no longer held")
    return state, base_state


def without(state: Mapping[str, torch.Tensor], names: frozenset[str]) -> dict[str, torch.Tensor]:
    """``state`` less the tensors ``names`` (a new dict; the tensors are shared)."""
    return {name: t for name, t in state.items() if name not in names}


class ModelSource(Protocol):
    """The models a transfer server can send."""

    def resolve(self, model: str) -> str:
        """The hex digest of a track's current version, or of a digest the source holds.

        Raises
        ------
        NotFoundError
            Unknown track or digest.
        """
        ...

    def get(self, digest: str) -> Mapping[str, torch.Tensor] | None:
        """The model with this hex digest, or ``None`` when not (or no longer) held."""
        ...

    def adopt(self, state: Mapping[str, torch.Tensor]) -> str:
        """Hold ``state`` (a model an edge decoded from a truncated fetch) under its
        digest, so it can be the base of later deltas and updates; returns the hex digest.
        """
        ...

    def encode(
        self,
        target: str,
        base: str | None,
        spec: CodecSpec,
        byte_budget: int | None,
        *,
        leave_out: frozenset[str] = frozenset(),
    ) -> EncodedModel:
        """Encode ``target`` as a delta from ``base`` (or in full when ``base`` is None).

        Parameters
        ----------
        target, base
            Hex digests; the server only passes a ``base`` that :meth:`get` returned.
        spec
            The codec spec the client asked for.
        byte_budget
            The client's limit on encoded bytes, or ``None``; a source may choose a
            stronger encoding to fit it. The server rejects results over budget.
        leave_out
            Names of tensors not to encode: the client holds their exact content
            (:mod:`fedsqueeze.transport.parts`) and adds them to what it decodes.
        """
        ...


class InMemoryModelSource:
    """Models held in memory (or mapped from files): the last ``keep`` published
    versions; thread-safe.

    :meth:`publish` copies a state; :meth:`publish_file` maps a safetensors file without
    copying it (a large model then costs page cache, not memory). :meth:`encode_to`
    lets the server prepare a large model on disk
    (:mod:`fedsqueeze.transport.prepare_spooled`).

    Parameters
    ----------
    keep
        How many versions to hold; older ones are dropped (a client holding one gets the
        full model), except the current version of each track.
    """

    def __init__(self, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.keep = keep
        self._lock = threading.Lock()
        self._versions: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._tracks: dict[str, str] = {}

    def publish(self, state: Mapping[str, torch.Tensor], track: str = "global") -> str:
        """Make ``state`` (copied) the current version of ``track``; returns its hex digest."""
        if is_hex_digest(track):
            raise ValueError("a track name cannot look like a digest")
        return self._hold(state, track)

    def publish_file(self, path: str | Path, track: str = "global") -> str:
        """Make the safetensors file ``path`` the current version of ``track``, mapped,
        not copied (:func:`fedsqueeze.modelfile.map_model`); returns its hex digest.

        The file must not change while it is held.

        Raises
        ------
        fedsqueeze.errors.ConfigError
            Not a readable safetensors file.
        """
        from fedsqueeze.modelfile import map_model

        if is_hex_digest(track):
            raise ValueError("a track name cannot look like a digest")
        return self._keep(map_model(path), track)

    def adopt(self, state: Mapping[str, torch.Tensor]) -> str:
        """See :meth:`ModelSource.adopt` (held like a version, dropped by age like one)."""
        return self._hold(state, None)

    def _hold(self, state: Mapping[str, torch.Tensor], track: str | None) -> str:
        """Hold a CPU copy of ``state`` as the newest version (the head of ``track`` when
        given); drop the oldest beyond ``keep``, never a head nor this one."""
        return self._keep({name: t.detach().to("cpu").clone() for name, t in state.items()}, track)

    def _keep(self, copy: dict[str, torch.Tensor], track: str | None) -> str:
        """Hold ``copy`` (owned from now on) as the newest version."""
        digest = state_digest(copy).hex()
        with self._lock:
            self._versions[digest] = copy
            self._versions.move_to_end(digest)
            if track is not None:
                self._tracks[track] = digest
            heads = set(self._tracks.values())
            for old in list(self._versions):
                if len(self._versions) <= self.keep:
                    break
                if old not in heads and old != digest:
                    del self._versions[old]
        return digest

    def versions(self) -> list[str]:
        """Hex digests held, oldest first."""
        with self._lock:
            return list(self._versions)

    def resolve(self, model: str) -> str:
        """See :meth:`ModelSource.resolve`."""
        with self._lock:
            if model in self._tracks:
                return self._tracks[model]
            if is_hex_digest(model) and model in self._versions:
                return model
        raise NotFoundError(f"no model {model!r}")

    def get(self, digest: str) -> Mapping[str, torch.Tensor] | None:
        """See :meth:`ModelSource.get`."""
        with self._lock:
            return self._versions.get(digest)

    def _held(
        self, target: str, base: str | None
    ) -> tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor] | None]:
        """The target's state and the base's (``None`` without a base).

        Raises
        ------
        NotFoundError
            Either is no longer held.
        """
        state = self.get(target)
        if state is None:
            raise NotFoundError(f"model {target[:16]}… is no longer held")
        base_state = self.get(base) if base is not None else None
        if base is not None and base_state is None:
            raise NotFoundError(f"base {base[:16]}… is no longer held")
        return state, base_state

    def encode(
        self,
        target: str,
        base: str | None,
        spec: CodecSpec,
        byte_budget: int | None,
        *,
        leave_out: frozenset[str] = frozenset(),
    ) -> EncodedModel:
        """See :meth:`ModelSource.encode`; ``byte_budget`` is not used to pick a spec."""
        state, base_state = held_pair(self.get, target, base)
        return encode_state(
            without(state, leave_out),
            spec,
            base_state,
            seed=encode_seed(target, base, spec),
            base_digest=bytes.fromhex(base) if base is not None else None,
        )

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
        """:meth:`encode`, tensor by tensor, each record body into ``store`` as it is
        made (:func:`~fedsqueeze.codec.stream_encode.encode_stream`: the same bytes)."""
        state, base_state = held_pair(self.get, target, base)
        return encode_stream(
            without(state, leave_out),
            spec,
            store,
            base_state,
            seed=encode_seed(target, base, spec),
            base_digest=bytes.fromhex(base) if base is not None else None,
        )
