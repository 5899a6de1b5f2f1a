"""Where verified uploads go: the :class:`UpdateSink` protocol and :class:`UpdateStore`.

Uploads are idempotent by update id: the first complete, verified upload of an id is
stored; a repeat with the same content is acknowledged as a duplicate and counted once,
even after the coordinator has taken the update out of the store; a repeat with other
content is refused.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from fedsqueeze.codec import EncodedModel
from fedsqueeze.errors import PreconditionError


@dataclass(frozen=True)
class ReceivedUpdate:
    """One verified upload.

    Attributes
    ----------
    update_id, edge_id
        Who sent what.
    base_digest
        Digest (32 bytes) of the model version the update was trained from.
    sha256
        SHA-256 of the uploaded payload.
    nbytes
        Payload size, in bytes.
    encoded
        The parsed update.
    received_at
        Wall-clock time of arrival (``time.time()``).
    """

    update_id: str
    edge_id: str
    base_digest: bytes
    sha256: bytes
    nbytes: int
    encoded: EncodedModel
    received_at: float


@dataclass(frozen=True)
class UpdateRecord:
    """What is remembered of every stored update, to answer repeats."""

    edge_id: str
    sha256: bytes
    nbytes: int


class AddResult(Enum):
    """What :meth:`UpdateSink.add` did."""

    STORED = 1
    DUPLICATE = 2


class UpdateSink(Protocol):
    """Receives verified uploads."""

    def lookup(self, update_id: str) -> UpdateRecord | None:
        """What was stored under ``update_id``, or ``None``."""
        ...

    def add(self, update: ReceivedUpdate) -> AddResult:
        """Store ``update`` unless its id is taken.

        Raises
        ------
        PreconditionError
            The id is taken by an update with other content or from another edge.
        """
        ...


class UpdateStore:
    """Thread-safe in-memory :class:`UpdateSink` for the coordinator to drain.

    Parameters
    ----------
    remember
        How many update ids are remembered (to recognize repeats) after the updates
        themselves were popped.
    """

    def __init__(self, remember: int = 100_000) -> None:
        self._lock = threading.Lock()
        self._updates: OrderedDict[str, ReceivedUpdate] = OrderedDict()
        self._seen: OrderedDict[str, UpdateRecord] = OrderedDict()
        self._remember = remember

    def lookup(self, update_id: str) -> UpdateRecord | None:
        """See :meth:`UpdateSink.lookup`."""
        with self._lock:
            return self._seen.get(update_id)

    def add(self, update: ReceivedUpdate) -> AddResult:
        """See :meth:`UpdateSink.add`."""
        record = UpdateRecord(update.edge_id, update.sha256, update.nbytes)
        with self._lock:
            seen = self._seen.get(update.update_id)
            if seen is not None:
                if seen != record:
                    raise PreconditionError(
                        f"update id {update.update_id!r} already holds other content"
                    )
                return AddResult.DUPLICATE
            self._updates[update.update_id] = update
            self._seen[update.update_id] = record
            while len(self._seen) > max(self._remember, len(self._updates)):
                self._seen.popitem(last=False)
        return AddResult.STORED

    def pop(self, update_id: str) -> ReceivedUpdate | None:
        """Take one update out (its id stays remembered)."""
        with self._lock:
            return self._updates.pop(update_id, None)

    def pop_all(self) -> list[ReceivedUpdate]:
        """Take every stored update out, oldest first."""
        with self._lock:
            out = list(self._updates.values())
            self._updates.clear()
            return out

    def list(self) -> list[ReceivedUpdate]:
        """The stored updates, oldest first, without taking them out."""
        with self._lock:
            return list(self._updates.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._updates)

    def __contains__(self, update_id: object) -> bool:
        with self._lock:
            return update_id in self._updates


def now() -> float:
    """Wall-clock seconds, for :attr:`ReceivedUpdate.received_at`."""
    return time.time()
