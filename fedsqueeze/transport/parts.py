"""Content-addressed parts: the identity of a tensor by its content, and the design of
fetches that skip the parts an edge already holds (issue 11, "Model splitting").

This module holds the identity (:func:`part_digest`), the server's choice of what need
not travel (:class:`PartDigests`, :func:`plan_held_parts`) and the client's reassembly
(:class:`HeldVersions`, :func:`resolve_held_parts`, :func:`reassemble`). It extends what
frozen parts (the codec spec key ``freeze``) do for a fixed set of names to any tensor
the edge can prove it holds.

Design
------
**What a part is.** One tensor of a model version, named by ``part_digest``: the sha256
of its dtype, shape and little-endian bytes, *without its name*, so the same embedding
under another name (a student of the distillation track, a renamed layer) is the same
part. Segments keep their own sha256 (integrity of bytes on the wire); a part digest is
the identity of a decoded tensor, so it survives any encoding.

**What the edge says it holds.** Not a list of part digests (a MiniLM has about 100
tensors: 3.2 kB in every request), but the model versions it holds, one per track: a new
``repeated bytes held_digests`` in ``FetchRequest`` / ``GetManifestRequest`` beside
``base_digest`` (which stays the delta base). The server knows those versions' tensors
(the version store keeps them, content-addressed), computes their part digests once per
version (cached beside the encoded-delta cache) and so knows every part the edge holds,
at 32 bytes per held version.

**What the server sends.** For each target tensor, in order of preference: nothing, when
it is frozen and the base holds it (frozen parts, built); a delta record against the base
(as today: a 2-byte ZERO record when unchanged: cheaper than naming the part); nothing
again, when the tensor's exact content is a part of a held version or of the base under
another name, and its raw size is at least :data:`MIN_PART_BYTES` (a reference costs
about 40 bytes of manifest: a small bias is cheaper to send); else a record as today.
Held parts are only planned for requests that name ``held_digests`` (other clients see
nothing new), and not when what remains of the model would share no tensor with the base
(the codec refuses such a delta; the fetch then sends everything).

**Progressive encodings** (``levels``) combine with held parts: the stream carries the
levels of what the edge lacks, and a truncated prefix is budgeted over those alone. The
edge decodes the prefix (a tensor the prefix has not reached keeps the base's value)
and puts the held parts in exactly, in place of anything the prefix gave them; the server
does the same when it keeps the decoded prefix as a version
(:class:`~fedsqueeze.transport.truncate.PrefixModels`), so both name the same model. A
prefix's manifest has no decoded digest to check the reassembly against, so there each
held part is hashed against its own digest before use. So an edge holding some tensors
at full precision gets none of their bytes, and one holding a coarse prefix of the same
stream (its ``FetchState``) gets only the refinements it lacks.

The stream's records cover only what travels, so the codec's format is unchanged (no new
record kind, no version bump, golden vectors untouched). The manifest grows one
field, ``repeated PartRef held_parts = 14`` with ``PartRef {string tensor_name = 1;
bytes part_digest = 2;}``: the tensors the edge reassembles from its cache, by name and
digest (shape and dtype come with the cached tensor and are checked by the digest). The
manifest key covers them (they are part of what was encoded), so a resumed fetch keeps
them; the encode cache key gains the planned held parts (so edges holding different
versions that leave out the same parts share one encoding). A second fetch of an
unchanged model still costs the manifest alone (built: held segments of the same
manifest key).

**What the edge does.** Its cache (:class:`edge.cache.PartStore`) gains a
content-addressed part store: ``part_digest → tensor`` over the last few versions it
held (no copies: the held states' tensors, indexed once per version; kept in memory, so
an edge restart only costs the parts it would have saved). For a manifest with
``held_parts`` it looks each digest up, decodes the stream against its base as usual,
and inserts the held parts by name; the decoded model's digest (``decoded_digest``) then
checks the whole reassembly, so a wrong cache entry is caught
as a :class:`~fedsqueeze.errors.HeldPartError` and the client refetches without
``held_digests``. A missing part (evicted, or a hostile manifest) is the same, raised as
soon as the manifest arrives, before any segment is kept.

**Replicas and caches.** Parts are immutable and content-addressed like segments, so a
data-plane replica that serves a version can compute the same ``held_parts``; nothing
depends on one coordinator's memory.

**Tests** (``tests/transport/test_held_parts.py``): a fetch of a track-B model by an edge
holding a track-A model that shares a tensor sends no record for that tensor (counted
on the wire); a poisoned cache entry fails the decoded digest and the refetch succeeds;
hostile manifests (``held_parts`` naming a tensor twice, a digest the edge lacks, a name
the stream also carries) raise before anything is written.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedsqueeze.codec.digest import tensor_bytes
from fedsqueeze.codec.spec import CodecSpec
from fedsqueeze.errors import HeldPartError
from fedsqueeze.wire.types import Manifest, PartRef

logger = logging.getLogger(__name__)

__all__ = [
    "MIN_PART_BYTES",
    "HeldVersions",
    "PartDigests",
    "part_digest",
    "plan_held_parts",
    "reassemble",
    "resolve_held_parts",
]

#: Smallest tensor (raw bytes) worth naming as a held part: a reference costs about 40
#: manifest bytes, and a small tensor's record not much more.
MIN_PART_BYTES = 256

State = Mapping[str, torch.Tensor]


def part_digest(tensor: torch.Tensor) -> bytes:
    """The 32-byte identity of a tensor's content, whatever its name.

    The sha256 of its dtype name, shape and little-endian contiguous bytes, each field
    length-prefixed (as :func:`~fedsqueeze.codec.state_digest` does for whole states).

    Parameters
    ----------
    tensor
        Any dense tensor, on any device.
    """
    h = hashlib.sha256(b"fedsqueeze.v1.part\x00")
    meta = f"{str(tensor.dtype).removeprefix('torch.')}\x00{tuple(tensor.shape)}".encode()
    h.update(struct.pack("<Q", len(meta)))
    h.update(meta)
    data = tensor_bytes(tensor)
    h.update(struct.pack("<Q", len(data)))
    h.update(data)
    return h.digest()


class PartDigests:
    """The part digests of each model version, computed once per version; thread-safe.

    Versions are immutable (named by their digest), so an entry never goes stale; the
    least recently used are dropped beyond ``max_versions``.
    """

    def __init__(self, max_versions: int = 64) -> None:
        if max_versions < 1:
            raise ValueError("max_versions must be >= 1")
        self.max_versions = max_versions
        self._lock = threading.Lock()
        self._by_version: OrderedDict[str, dict[str, bytes]] = OrderedDict()

    def of(self, version: str, state: State) -> Mapping[str, bytes]:
        """Name → part digest of ``state``, the version with hex digest ``version``."""
        with self._lock:
            found = self._by_version.get(version)
            if found is not None:
                self._by_version.move_to_end(version)
                return found
        digests = {name: part_digest(t) for name, t in state.items()}  # outside the lock
        with self._lock:
            self._by_version[version] = digests
            while len(self._by_version) > self.max_versions:
                self._by_version.popitem(last=False)
        return digests


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype


def plan_held_parts(
    target: State,
    target_parts: Mapping[str, bytes],
    base: State | None,
    base_parts: Mapping[str, bytes],
    held: frozenset[bytes],
    spec: CodecSpec,
) -> tuple[PartRef, ...]:
    """The target's tensors that need not travel: their exact content is held.

    Parameters
    ----------
    target, target_parts
        The model to send and its part digests.
    base, base_parts
        The delta base (``None`` and empty for a full model) and its part digests.
    held
        Part digests of every version the client holds, its base's included.
    spec
        The codec spec (frozen tensors the base holds are the codec's business).

    Returns
    -------
    tuple[PartRef, ...]
        In the target's order; empty when a delta of what remains would share no tensor
        with the base.
    """
    refs: list[PartRef] = []
    for name, tensor in target.items():
        digest = target_parts[name]
        below = base.get(name) if base is not None else None
        if (
            below is not None
            and _same_layout(below, tensor)
            and (spec.is_frozen(name) or base_parts.get(name) == digest)
        ):
            continue  # the codec leaves it out, or sends a 2-byte ZERO record
        if digest in held and tensor.numel() * tensor.element_size() >= MIN_PART_BYTES:
            refs.append(PartRef(name, digest))
    if refs and base is not None:
        left = {ref.tensor_name for ref in refs}
        rest = [n for n in target if n not in left]
        shared = any(n in base and _same_layout(base[n], target[n]) for n in rest)
        if rest and not shared:
            return ()
    return tuple(refs)


@dataclass(frozen=True)
class HeldVersions:
    """What a client says it holds besides its base, and the tensors behind it.

    Attributes
    ----------
    digests
        Model digests of the versions, sorted (sent as ``held_digests``).
    parts
        Part digest → tensor over those versions and the base.
    """

    digests: tuple[bytes, ...]
    parts: Mapping[bytes, torch.Tensor]

    @classmethod
    def of(cls, versions: Mapping[bytes, State]) -> HeldVersions:
        """Index ``versions`` (model digest → state); the base may be one of them."""
        parts: dict[bytes, torch.Tensor] = {}
        for state in versions.values():
            for tensor in state.values():
                parts.setdefault(part_digest(tensor), tensor)
        return cls(tuple(sorted(versions)), parts)

    def request_digests(self, base_digest: bytes | None) -> tuple[bytes, ...]:
        """The ``held_digests`` of a request from ``base_digest``: every version but it."""
        return tuple(d for d in self.digests if d != base_digest)


def resolve_held_parts(
    manifest: Manifest, held: HeldVersions | None, *, verify: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors ``manifest.held_parts`` names, from ``held``: checked when the manifest
    arrives, before any segment is kept.

    ``verify``: hash each part and compare it with its digest (for a truncated
    progressive fetch, whose reassembled model has no digest in the manifest to check).

    Raises
    ------
    HeldPartError
        A part ``held`` lacks (evicted, or never held: a hostile manifest), or, with
        ``verify``, one whose content is not its digest's.
    """
    if not manifest.held_parts:
        return {}
    if held is None:
        raise HeldPartError("the manifest names held parts, but this fetch holds none")
    out: dict[str, torch.Tensor] = {}
    for ref in manifest.held_parts:
        tensor = held.parts.get(ref.part_digest)
        if tensor is None:
            raise HeldPartError(
                f"the manifest says tensor {ref.tensor_name!r} is held as part "
                f"{ref.part_digest.hex()[:16]}…, which this edge does not hold"
            )
        if verify and part_digest(tensor) != ref.part_digest:
            raise HeldPartError(
                f"the held part for tensor {ref.tensor_name!r} does not match its digest"
            )
        out[ref.tensor_name] = tensor
    return out


def reassemble(
    decoded: Mapping[str, torch.Tensor], parts: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The model: ``decoded`` (from the stream) with the held ``parts`` added, copied
    to ``decoded``'s device (the caller checks the result's digest).

    Raises
    ------
    HeldPartError
        A held part's name is also in the stream.
    """
    both = sorted(set(decoded).intersection(parts))
    if both:
        raise HeldPartError(f"tensors both in the stream and held: {both[:3]}")
    device = next(iter(decoded.values())).device if decoded else None
    out = dict(decoded)
    for name, tensor in parts.items():
        out[name] = tensor.detach().to(device).clone() if device else tensor.detach().clone()
    return out
