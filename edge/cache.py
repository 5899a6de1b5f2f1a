"""Where an edge keeps what must survive between rounds.

Two things: the model it holds (the base of the next delta, and what its update is made
against) and its error-feedback residual. Besides, a :class:`~edge.part_store.PartStore`:
the last few versions it held, by content, so that tensors they share with a later model
need not travel again (:mod:`fedsqueeze.transport.parts`). In simulation they live in
Flower's ``Context.state`` (kept per node across rounds) and the part store in the
connector's memory; deployed, in a local directory (the part store under ``parts/``,
bounded and verified on load), written atomically so a crash leaves the previous round's
state intact.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from edge.part_store import DEFAULT_PART_CACHE_BYTES, PartStore
from fedsqueeze.codec import state_digest
from fedsqueeze.errors import ConfigError
from fedsqueeze.statefile import load_state, save_state, write_atomic

State = dict[str, torch.Tensor]
log = logging.getLogger(__name__)

__all__ = [
    "ContextCache",
    "DirectoryCache",
    "EdgeCache",
    "EdgeMemory",
]

#: Part stores opened by this process, by directory: a ClientApp process that serves
#: several rounds loads and verifies its store once.
_OPEN_PART_STORES: dict[Path, PartStore] = {}


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
    """An :class:`EdgeCache` in a local directory (deployed edges).

    Parameters
    ----------
    root
        The directory (created if missing).
    part_bytes
        Bound of its part store (:meth:`part_store`), in bytes.
    """

    def __init__(self, root: str | Path, *, part_bytes: int = DEFAULT_PART_CACHE_BYTES) -> None:
        if part_bytes < 1:
            raise ValueError("part_bytes must be >= 1")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.part_bytes = part_bytes

    def part_store(self, max_versions: int = 3) -> PartStore:
        """The persisted part store under ``ROOT/parts`` (opened once per process and
        directory; a new bound applies from the next version added)."""
        directory = (self.root / "parts").resolve()
        store = _OPEN_PART_STORES.get(directory)
        if store is None:
            store = PartStore(max_versions, directory=directory, max_bytes=self.part_bytes)
            _OPEN_PART_STORES[directory] = store
        store.max_bytes = self.part_bytes
        return store

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
