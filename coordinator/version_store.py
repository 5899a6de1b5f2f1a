"""The coordinator's durable state: model versions, what each edge holds, round progress.

Layout of the state directory (default ``./fedsqueeze-state/``)::

    versions/<digest>.fsq   each version, lossless-encoded (bit-exact, checksummed)
    state.json              tracks, version order, edge holdings, rounds and metrics

Every write goes to a temporary file in the same directory, is fsynced, then renamed
over the old file, so a crash leaves either the old or the new state, never a torn one.
A version file is written before ``state.json`` refers to it.

**What each edge holds.** Besides the version an edge holds now (its next delta's base),
the store records the last :data:`HELD_PER_EDGE` versions each edge confirmed in a
receipt (``edge_held``, oldest first), because an edge keeps about as many in its part
store (:class:`edge.part_store.PartStore`) and names them in its fetches
(``held_digests``). Those versions stay kept while an edge holds them, up to
``max_held`` of them beyond ``keep`` (older ones go first, after every unpinned version):
a version the server no longer has counts for nothing in a fetch, so without this a
coordinator restart or a few rounds of publishing would make the edge download tensors
it holds.

Which record is the truth: the **edge's list** says what it holds *now* (it may have
evicted a version, or lost its cache), so the data plane plans held parts from the
request's ``held_digests`` only, never from this record alone (a stale record would
make the edge refetch everything after a ``HeldPartError``). The record's job is to keep
those versions resolvable across restarts and eviction, so the request can stay short:
it names whole versions (34 B each on the wire, about 100 B for the default three), not
parts (a MiniLM has about 100 tensors: 3.2 kB of part digests per request).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedsqueeze.codec import CodecSpec, EncodedModel, decode_state, encode_state, state_digest
from fedsqueeze.errors import CodecError, ConfigError, NotFoundError
from fedsqueeze.statefile import atomic_path, write_atomic

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_VERSION = 1
#: Versions recorded per edge (the edge's part store keeps 3 by default).
HELD_PER_EDGE = 3
_LOSSLESS = CodecSpec(entropy_level=1)
#: Versions of this many raw bytes and more are written tensor by tensor (the same
#: bytes), not encoded whole in memory (the transfer server's spool threshold).
STREAM_BYTES = 256 << 20


@dataclass
class _Persisted:
    tracks: dict[str, str] = field(default_factory=dict)
    versions: list[str] = field(default_factory=list)  # oldest first
    edges: dict[str, str] = field(default_factory=dict)  # edge id → digest it holds
    # edge id → what it decoded of a truncated progressive fetch: {"bytes": n, "levels": [...]}
    edge_prefixes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # edge id → the versions it confirmed lately, oldest first (the last is ``edges[id]``)
    edge_held: dict[str, list[str]] = field(default_factory=dict)
    completed_round: int = 0
    round_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class VersionStore:
    """Content-addressed model versions on disk, the last ``keep`` of them.

    Parameters
    ----------
    root
        The state directory (created if missing).
    keep
        How many versions to keep besides those a track points at or an edge holds;
        older ones are deleted.
    cache_size
        Decoded versions kept in memory.
    max_held
        How many versions edges hold (besides the one each holds now) may stay beyond
        ``keep`` (see the module's docstring).
    stream_bytes
        Versions of at least this many raw bytes are written tensor by tensor (bounded
        memory, the same file), smaller ones encoded whole.
    """

    def __init__(
        self,
        root: str | Path,
        keep: int = 4,
        cache_size: int = 4,
        *,
        max_held: int = 64,
        stream_bytes: int = STREAM_BYTES,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if max_held < 0:
            raise ValueError(f"max_held must be >= 0, got {max_held}")
        self.root = Path(root)
        self.keep = keep
        self.max_held = max_held
        self.stream_bytes = stream_bytes
        self._lock = threading.RLock()
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._cache_size = max(1, cache_size)
        (self.root / "versions").mkdir(parents=True, exist_ok=True)
        self._state = self._load()

    # ------------------------------------------------------------------ persistence
    def _load(self) -> _Persisted:
        path = self.root / STATE_FILE
        if not path.exists():
            return _Persisted()
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != STATE_VERSION:
                raise ConfigError(f"{path}: unknown state format {raw.get('format')!r}")
            return _Persisted(
                tracks=dict(raw["tracks"]),
                versions=list(raw["versions"]),
                edges=dict(raw["edges"]),
                edge_prefixes=dict(raw.get("edge_prefixes", {})),
                edge_held={k: [str(d) for d in v] for k, v in raw.get("edge_held", {}).items()},
                completed_round=int(raw["completed_round"]),
                round_metrics={k: dict(v) for k, v in raw["round_metrics"].items()},
                meta=dict(raw.get("meta", {})),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: unreadable coordinator state ({exc})") from exc

    def _save(self) -> None:
        s = self._state
        doc = {
            "format": STATE_VERSION,
            "tracks": s.tracks,
            "versions": s.versions,
            "edges": s.edges,
            "edge_prefixes": s.edge_prefixes,
            "edge_held": s.edge_held,
            "completed_round": s.completed_round,
            "round_metrics": s.round_metrics,
            "meta": s.meta,
        }
        write_atomic(self.root / STATE_FILE, json.dumps(doc, indent=1, sort_keys=True).encode())

    def _path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a hex sha256 digest: {digest!r}")
        return self.root / "versions" / f"{digest}.fsq"

    # ------------------------------------------------------------------ versions
    def publish(self, state: Mapping[str, torch.Tensor], track: str | None = "global") -> str:
        """Store ``state`` as a version, point ``track`` at it; returns its hex digest.

        ``track=None`` stores a version no track points at (what an edge decoded).
        """
        digest = state_digest(state).hex()
        with self._lock:
            path = self._path(digest)
            if not path.exists():
                _write_version(path, state, self.stream_bytes)
            if digest in self._state.versions:
                self._state.versions.remove(digest)
            self._state.versions.append(digest)
            if track is not None:
                self._state.tracks[track] = digest
            self._remember(digest, {k: v.detach().to("cpu") for k, v in state.items()})
            self._evict()
            self._save()
        log.debug("published %s on track %s", digest[:12], track)
        return digest

    def _evict(self) -> None:
        # Versions an edge holds stay while it holds them: its next delta is made from one.
        pinned = set(self._state.tracks.values()) | set(self._state.edges.values())
        # Older versions edges hold stay too (their parts need not travel), the most
        # recent max_held of them.
        held = [
            d
            for d in self._state.versions
            if d not in pinned and any(d in ds for ds in self._state.edge_held.values())
        ]
        victims = held[: max(0, len(held) - self.max_held)]
        kept_held = set(held[len(victims) :])
        others = [d for d in self._state.versions if d not in pinned and d not in kept_held]
        extra = (
            len(self._state.versions)
            - len(victims)
            - (self.keep + len(pinned & set(self._state.versions)) + len(kept_held))
        )
        victims += [d for d in others if d not in victims][: max(0, extra)]
        for victim in victims:
            self._state.versions.remove(victim)
            self._cache.pop(victim, None)
            self._path(victim).unlink(missing_ok=True)
            log.debug("evicted version %s", victim[:12])
        if victims:
            gone = set(victims)
            for edge, ds in self._state.edge_held.items():
                self._state.edge_held[edge] = [d for d in ds if d not in gone]

    def _remember(self, digest: str, state: dict[str, torch.Tensor]) -> None:
        self._cache[digest] = state
        self._cache.move_to_end(digest)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def resolve(self, model: str) -> str:
        """A track's head, or a kept digest; raises ``NotFoundError`` otherwise."""
        with self._lock:
            if model in self._state.tracks:
                return self._state.tracks[model]
            if model in self._state.versions:
                return model
        raise NotFoundError(f"no model {model!r} in the version store")

    def has(self, digest: str) -> bool:
        """Whether the version is still kept."""
        with self._lock:
            return digest in self._state.versions

    def get(self, digest: str) -> dict[str, torch.Tensor] | None:
        """The version's tensors (CPU), or ``None`` if it is not kept."""
        with self._lock:
            if digest not in self._state.versions:
                return None
            cached = self._cache.get(digest)
            if cached is not None:
                self._cache.move_to_end(digest)
                return cached
            try:
                data = self._path(digest).read_bytes()
                state = decode_state(EncodedModel.from_bytes(data))
            except (OSError, CodecError) as exc:
                raise ConfigError(f"version {digest[:12]} is unreadable: {exc}") from exc
            if state_digest(state).hex() != digest:
                raise ConfigError(f"version {digest[:12]} on disk does not match its digest")
            self._remember(digest, state)
            return state

    def head(self, track: str = "global") -> str | None:
        """The digest the track points at."""
        with self._lock:
            return self._state.tracks.get(track)

    @property
    def versions(self) -> list[str]:
        """Kept versions, oldest first."""
        with self._lock:
            return list(self._state.versions)

    # ------------------------------------------------------------------ edges and rounds
    def record_edge(
        self, edge_id: str, digest: str, *, decoded_bytes: int = 0, levels: tuple[int, ...] = ()
    ) -> None:
        """Remember which version an edge now holds (what it decoded, not the global).

        ``decoded_bytes`` and ``levels``: what it decoded of a truncated progressive
        fetch (the digest is then that coarse model's, which the data plane kept).
        """
        with self._lock:
            if digest not in self._state.versions:
                raise ValueError(f"version {digest[:12]} is not in the store")
            self._state.edges[edge_id] = digest
            history = [d for d in self._state.edge_held.get(edge_id, []) if d != digest]
            self._state.edge_held[edge_id] = [*history, digest][-HELD_PER_EDGE:]
            if decoded_bytes:
                self._state.edge_prefixes[edge_id] = {
                    "bytes": decoded_bytes,
                    "levels": list(levels),
                }
            else:
                self._state.edge_prefixes.pop(edge_id, None)
            self._evict()
            self._save()

    def edge_prefix(self, edge_id: str) -> tuple[int, tuple[int, ...]] | None:
        """Bytes and levels the edge decoded of a truncated fetch, or ``None`` (whole)."""
        with self._lock:
            entry = self._state.edge_prefixes.get(edge_id)
            if entry is None:
                return None
            return int(entry["bytes"]), tuple(int(v) for v in entry["levels"])

    def edge_holdings(self, edge_id: str) -> tuple[str, ...]:
        """The versions the edge confirmed lately and the store still keeps, oldest first
        (the last is the one it holds now)."""
        with self._lock:
            kept = set(self._state.versions)
            return tuple(d for d in self._state.edge_held.get(edge_id, []) if d in kept)

    def edge_version(self, edge_id: str) -> str | None:
        """The version the edge holds, if still kept."""
        with self._lock:
            digest = self._state.edges.get(edge_id)
            return digest if digest in self._state.versions else None

    def complete_round(self, server_round: int, metrics: Mapping[str, float]) -> None:
        """Mark a round complete with its metrics (the resume point)."""
        with self._lock:
            self._state.completed_round = server_round
            self._state.round_metrics[str(server_round)] = {k: float(v) for k, v in metrics.items()}
            self._save()

    @property
    def completed_round(self) -> int:
        """The last completed round (0 before the first)."""
        with self._lock:
            return self._state.completed_round

    @property
    def round_metrics(self) -> dict[int, dict[str, float]]:
        """Metrics of every completed round."""
        with self._lock:
            return {int(k): dict(v) for k, v in self._state.round_metrics.items()}

    def set_meta(self, key: str, value: Any) -> None:
        """Store a small JSON-able value (run configuration, for example)."""
        with self._lock:
            self._state.meta[key] = value
            self._save()

    def meta(self, key: str, default: Any = None) -> Any:
        """A value stored with :meth:`set_meta`."""
        with self._lock:
            return self._state.meta.get(key, default)


def _write_version(path: Path, state: Mapping[str, torch.Tensor], stream_bytes: int) -> None:
    """Write ``state`` losslessly to ``path`` (atomically): a large one tensor by tensor,
    its record bodies through an unlinked file beside it (the bytes of
    ``encode_state(state, _LOSSLESS).to_bytes()``)."""
    import os
    import tempfile
    import zlib

    from fedsqueeze.codec.stream_encode import encode_stream

    if sum(t.numel() * t.element_size() for t in state.values()) < stream_bytes:
        write_atomic(path, encode_state(dict(state), _LOSSLESS).to_bytes())
        return
    with tempfile.TemporaryFile(dir=path.parent) as bodies:
        fd = bodies.fileno()

        class _Bodies:
            end = 0

            def put(self, body: bytes | memoryview) -> int:
                offset = self.end
                view = memoryview(body)
                while view:
                    written = os.pwrite(fd, view, self.end)
                    self.end += written
                    view = view[written:]
                return offset

        plan = encode_stream(state, _LOSSLESS, _Bodies())
        with atomic_path(path) as tmp, tmp.open("wb") as fh:
            head = plan.header.to_bytes()
            fh.write(head)
            crc = zlib.crc32(head)
            for stored in plan.records:
                head = stored.header_bytes()
                fh.write(head)
                crc = zlib.crc32(head, crc)
                offset, end = stored.token, stored.token + stored.body_length
                while offset < end:
                    piece = os.pread(fd, min(8 << 20, end - offset), offset)
                    if not piece:
                        raise OSError(5, "a version's spooled bodies are shorter than written")
                    fh.write(piece)
                    crc = zlib.crc32(piece, crc)
                    offset += len(piece)
            fh.write((crc & 0xFFFFFFFF).to_bytes(4, "little"))
            fh.flush()
            os.fsync(fh.fileno())
