"""Where an edge keeps what must survive between rounds.

Two things: the model it holds (the base of the next delta, and what its update is made
against) and its error-feedback residual. Besides, in memory, a :class:`PartStore`: the
last few versions it held, by content, so that tensors they share with a later model
need not travel again (:mod:`fedsqueeze.transport.parts`). In simulation they live in Flower's
``Context.state`` (kept per node across rounds); deployed, in a local directory, written
atomically so a crash leaves the previous round's state intact.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedsqueeze.codec import state_digest
from fedsqueeze.errors import ConfigError
from fedsqueeze.statefile import load_state, save_state, write_atomic
from fedsqueeze.transport.parts import HeldVersions, part_digest

State = dict[str, torch.Tensor]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeMemory:
    """The held model (with its digest) and the error-feedback residual."""

    held_digest: str | None
    held: State | None
    residual: State | None


class EdgeCache(Protocol):
    """Loads and saves an :class:`EdgeMemory`."""

    def load(self) -> EdgeMemory:
        """What was saved last (empty on first contact)."""
        ...

    def save(self, memory: EdgeMemory) -> None:
        """Persist ``memory``."""
        ...


class ContextCache:
    """An :class:`EdgeCache` in a Flower ``Context.state`` (simulation)."""

    _HELD, _RESIDUAL, _META = "fedsqueeze.held", "fedsqueeze.residual", "fedsqueeze.meta"

    def __init__(self, state: RecordDict) -> None:
        self._state = state

    def load(self) -> EdgeMemory:
        meta = self._state.config_records.get(self._META)
        held = self._state.array_records.get(self._HELD)
        residual = self._state.array_records.get(self._RESIDUAL)
        digest = str(meta["held"]) if meta is not None and "held" in meta else None
        return EdgeMemory(
            held_digest=digest if held is not None else None,
            held=held.to_torch_state_dict() if held is not None else None,
            residual=residual.to_torch_state_dict() if residual is not None else None,
        )

    def save(self, memory: EdgeMemory) -> None:
        if memory.held is not None and memory.held_digest is not None:
            self._state[self._HELD] = ArrayRecord(memory.held)
            self._state[self._META] = ConfigRecord({"held": memory.held_digest})
        if memory.residual is not None:
            self._state[self._RESIDUAL] = ArrayRecord(memory.residual)


class DirectoryCache:
    """An :class:`EdgeCache` in a local directory (deployed edges)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def load(self) -> EdgeMemory:
        meta_path = self.root / "edge.json"
        if not meta_path.exists():
            return EdgeMemory(None, None, None)
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{meta_path}: unreadable edge cache ({exc})") from exc
        held_path, res_path = self.root / "held.pt", self.root / "residual.pt"
        held = load_state(held_path) if held_path.exists() else None
        digest = meta.get("held") if held is not None else None
        if held is not None and state_digest(held).hex() != digest:
            # Torn write or tampering: fetch a full model rather than trust it.
            log.warning("%s does not match its recorded digest; ignoring it", held_path)
            held, digest = None, None
        return EdgeMemory(
            held_digest=digest,
            held=held,
            residual=load_state(res_path) if res_path.exists() else None,
        )

    def save(self, memory: EdgeMemory) -> None:
        # Model first, then the metadata that names it: a crash in between leaves a
        # model whose digest no longer matches, which the next fetch detects.
        if memory.held is not None:
            save_state(memory.held, self.root / "held.pt")
        if memory.residual is not None:
            save_state(memory.residual, self.root / "residual.pt")
        write_atomic(self.root / "edge.json", json.dumps({"held": memory.held_digest}).encode())


class PartStore:
    """The versions an edge held lately, as content-addressed parts; in memory.

    Each version is indexed once (its tensors by :func:`part_digest`); a tensor shared by
    several versions is kept once. The least recently added or used version is dropped
    beyond ``max_versions``, with the parts no other version has.

    Parameters
    ----------
    max_versions
        How many versions to keep (the memory of about that many models, less what they
        share).
    """

    def __init__(self, max_versions: int = 3) -> None:
        if max_versions < 1:
            raise ValueError("max_versions must be >= 1")
        self.max_versions = max_versions
        self._versions: OrderedDict[bytes, tuple[bytes, ...]] = OrderedDict()
        self._parts: dict[bytes, torch.Tensor] = {}
        self._users: dict[bytes, int] = {}

    def add(self, digest: bytes, state: Mapping[str, torch.Tensor]) -> None:
        """Keep ``state`` (whose model digest is ``digest``, not checked) as held."""
        if digest in self._versions:
            self._versions.move_to_end(digest)
            return
        by_digest: dict[bytes, torch.Tensor] = {}
        for tensor in state.values():
            by_digest.setdefault(part_digest(tensor), tensor)
        for d, tensor in by_digest.items():
            self._parts.setdefault(d, tensor)
            self._users[d] = self._users.get(d, 0) + 1
        self._versions[digest] = tuple(by_digest)
        while len(self._versions) > self.max_versions:
            self.drop(next(iter(self._versions)))

    def drop(self, digest: bytes) -> None:
        """Forget version ``digest`` (and the parts only it had); nothing if not held."""
        for d in self._versions.pop(digest, ()):
            self._users[d] -= 1
            if self._users[d] == 0:
                del self._users[d], self._parts[d]

    def versions(self) -> tuple[bytes, ...]:
        """Digests of the versions kept, oldest first."""
        return tuple(self._versions)

    def held(self) -> HeldVersions:
        """What a fetch may name as held (a snapshot)."""
        return HeldVersions(tuple(sorted(self._versions)), dict(self._parts))
