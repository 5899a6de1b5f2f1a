"""The edge's content-addressed part store: the versions it held lately, by content.

Tensors a later model shares with these versions need not travel again
(:mod:`fedsqueeze.transport.parts`). In simulation the store lives in memory; a deployed
edge keeps it in a directory (``CACHE-DIR/parts``) so that it survives an edge restart
(and Flower's per-run ClientApp processes):

::

    parts/index.json             versions, least recently used first, and their parts
    parts/<part digest>.safetensors   one tensor each (key "part")

Bounded twice: at most ``max_versions`` versions, and at most ``max_bytes`` of distinct
parts (:data:`DEFAULT_PART_CACHE_BYTES` by default; the edge's ``--part-cache-mb``). The
least recently used version goes first, with the parts no other version has; a version
larger than the whole bound is not kept at all.

Every write is atomic (temp file, fsync, rename): part files first, the index that names
them last, so a crash leaves the old index (and perhaps an unnamed part file, removed at
the next load). Loading **verifies** every part file against its digest: a corrupt or
truncated file is dropped with a warning, and so is every version that needed it, so a
fetch never names a version whose parts the edge cannot produce. (The reassembled
model's digest checks everything once more, so even a file altered after loading is
caught and refetched.)
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from fedsqueeze.statefile import write_atomic
from fedsqueeze.transport.parts import HeldVersions, part_digest

__all__ = ["DEFAULT_PART_CACHE_BYTES", "PartStore"]

log = logging.getLogger(__name__)

#: Default bound on the distinct parts an edge keeps: 512 MiB (a few versions of a
#: 100 MB model, less what they share).
DEFAULT_PART_CACHE_BYTES = 512 << 20
INDEX = "index.json"
INDEX_FORMAT = 1
_KEY = "part"
_PART_FILE = re.compile(r"^[0-9a-f]{64}\.safetensors$")


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class PartStore:
    """The versions an edge held lately, as content-addressed parts.

    Each version is indexed once (its tensors by :func:`part_digest`); a tensor shared by
    several versions is kept once. In memory the parts are the held states' own tensors
    (no copies).

    Parameters
    ----------
    max_versions
        How many versions to keep.
    directory
        Where to persist them (created if missing; loaded and verified now); ``None``:
        in memory only.
    max_bytes
        Most bytes of distinct parts kept.
    """

    def __init__(
        self,
        max_versions: int = 3,
        *,
        directory: str | Path | None = None,
        max_bytes: int = DEFAULT_PART_CACHE_BYTES,
    ) -> None:
        if max_versions < 1:
            raise ValueError("max_versions must be >= 1")
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self.max_versions = max_versions
        self.max_bytes = max_bytes
        self.directory = Path(directory) if directory is not None else None
        self._versions: OrderedDict[bytes, tuple[bytes, ...]] = OrderedDict()
        self._parts: dict[bytes, torch.Tensor] = {}
        self._users: dict[bytes, int] = {}
        self._bytes = 0
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._load()

    # ------------------------------------------------------------------ queries
    @property
    def nbytes(self) -> int:
        """Bytes of the distinct parts kept."""
        return self._bytes

    def versions(self) -> tuple[bytes, ...]:
        """Digests of the versions kept, least recently used first."""
        return tuple(self._versions)

    def held(self) -> HeldVersions:
        """What a fetch may name as held (a snapshot)."""
        return HeldVersions(tuple(sorted(self._versions)), dict(self._parts))

    # ------------------------------------------------------------------ changes
    def add(self, digest: bytes, state: Mapping[str, torch.Tensor]) -> None:
        """Keep ``state`` (whose model digest is ``digest``, not checked) as held; an
        already kept version becomes the most recently used."""
        if digest in self._versions:
            self._versions.move_to_end(digest)
            self._save_index()
            return
        by_digest: dict[bytes, torch.Tensor] = {}
        for tensor in state.values():
            by_digest.setdefault(part_digest(tensor), tensor)
        if sum(_nbytes(t) for t in by_digest.values()) > self.max_bytes:
            log.warning(
                "version %s… is larger than the part store's bound (%d B): not kept",
                digest.hex()[:12],
                self.max_bytes,
            )
            return
        for d, tensor in by_digest.items():
            if d not in self._parts:
                self._parts[d] = tensor
                self._bytes += _nbytes(tensor)
                self._write_part(d, tensor)
            self._users[d] = self._users.get(d, 0) + 1
        self._versions[digest] = tuple(by_digest)
        self._shrink()
        self._save_index()

    def drop(self, digest: bytes) -> None:
        """Forget version ``digest`` (and the parts only it had); nothing if not held."""
        self._forget(digest)
        self._save_index()

    def _forget(self, digest: bytes) -> None:
        for d in self._versions.pop(digest, ()):
            self._users[d] -= 1
            if self._users[d] == 0:
                del self._users[d]
                self._bytes -= _nbytes(self._parts.pop(d))
                if self.directory is not None:
                    self._part_path(d).unlink(missing_ok=True)

    def _shrink(self) -> None:
        while len(self._versions) > self.max_versions or (
            self._bytes > self.max_bytes and len(self._versions) > 1
        ):
            self._forget(next(iter(self._versions)))

    # ------------------------------------------------------------------ disk
    def _part_path(self, digest: bytes) -> Path:
        if self.directory is None:
            raise RuntimeError("an in-memory part store has no files")
        return self.directory / f"{digest.hex()}.safetensors"

    def _write_part(self, digest: bytes, tensor: torch.Tensor) -> None:
        if self.directory is None:
            return
        from safetensors.torch import save

        data = save({_KEY: tensor.detach().to("cpu").contiguous()})
        write_atomic(self._part_path(digest), data)

    def _save_index(self) -> None:
        if self.directory is None:
            return
        doc = {
            "format": INDEX_FORMAT,
            "versions": [
                {"digest": v.hex(), "parts": [p.hex() for p in parts]}
                for v, parts in self._versions.items()
            ],
        }
        write_atomic(self.directory / INDEX, json.dumps(doc, indent=1).encode())

    def _read_index(self) -> list[tuple[bytes, tuple[bytes, ...]]]:
        if self.directory is None:
            return []
        path = self.directory / INDEX
        if not path.exists():
            return []
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != INDEX_FORMAT:
                raise ValueError(f"unknown format {doc.get('format')!r}")
            return [
                (bytes.fromhex(v["digest"]), tuple(bytes.fromhex(p) for p in v["parts"]))
                for v in doc["versions"]
            ]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s is unreadable (%s): the part store starts empty", path, exc)
            return []

    def _read_part(self, digest: bytes) -> torch.Tensor | None:
        """The part from its file, or ``None`` (with a warning) when missing or corrupt."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        path = self._part_path(digest)
        try:
            loaded = load(path.read_bytes())
            tensor = loaded[_KEY]
        except (OSError, SafetensorError, KeyError, ValueError) as exc:
            log.warning("part file %s is unreadable (%s): dropped", path.name, exc)
            return None
        if len(loaded) != 1 or part_digest(tensor) != digest:
            log.warning("part file %s does not match its digest: dropped", path.name)
            return None
        return tensor

    def _load(self) -> None:
        """Load and verify the persisted versions; remove files nothing names."""
        if self.directory is None:
            return
        entries = self._read_index()
        bad: set[bytes] = set()
        for version, parts in entries:
            tensors: dict[bytes, torch.Tensor] = {}
            for d in parts:
                tensor = self._parts.get(d)
                if tensor is None and d not in bad:
                    tensor = self._read_part(d)
                if tensor is None:
                    bad.add(d)
                    break
                tensors[d] = tensor
            if len(tensors) != len(parts):
                log.warning(
                    "held version %s… lost a part: no longer named as held", version.hex()[:12]
                )
                continue
            for d, tensor in tensors.items():
                if d not in self._parts:
                    self._parts[d] = tensor
                    self._bytes += _nbytes(tensor)
                self._users[d] = self._users.get(d, 0) + 1
            self._versions[version] = parts
        for path in self.directory.iterdir():
            stray = path.name.startswith(".") and path.name.endswith(".tmp")
            unnamed = _PART_FILE.match(path.name) and bytes.fromhex(path.stem) not in self._parts
            if stray or unnamed:
                path.unlink(missing_ok=True)
        self._shrink()
        if bad or len(self._versions) != len(entries):
            self._save_index()
        if self._versions:
            log.info(
                "part store %s: %d version(s), %d part(s), %d B, verified",
                self.directory,
                len(self._versions),
                len(self._parts),
                self._bytes,
            )
