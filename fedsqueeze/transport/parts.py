"""Content-addressed parts: the identity of a tensor by its content, and the design of
fetches that skip the parts an edge already holds (issue 11, "Model splitting").

Built so far: :func:`part_digest`, the name-free identity of one tensor. The rest below is
the design the next slice implements; it extends what frozen parts (the codec spec key
``freeze``) already do for a fixed set of names to any tensor the edge can prove it
holds.

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
(as today: a 2-byte ZERO record when unchanged); nothing again, when the tensor's exact
content is a part of a held version that is not the base (the other track); else a full
record. The stream's records cover only what travels, so the codec's format is unchanged
(no new record kind, no version bump, golden vectors untouched). The manifest grows one
field, ``repeated PartRef held_parts = 14`` with ``PartRef {string tensor_name = 1;
bytes part_digest = 2;}``: the tensors the edge reassembles from its cache, by name and
digest (shape and dtype come with the cached tensor and are checked by the digest). The
manifest key covers them (they are part of what was encoded), so a resumed fetch keeps
them; the encode cache key gains the held set (sorted digests). A second fetch of an
unchanged model still costs the manifest alone (built: held segments of the same
manifest key).

**What the edge does.** Its cache (:mod:`edge.cache`) gains a content-addressed part
store: ``part_digest → tensor`` over the versions it holds (no copies: views of the held
states, indexed once per version). For a manifest with ``held_parts`` it looks each
digest up, decodes the stream against its base as usual, and inserts the held parts by
name; the decoded model's digest
(``decoded_digest``) then checks the whole reassembly, so a wrong cache entry is caught
as an :class:`~fedsqueeze.errors.IntegrityError` and the edge refetches without
``held_digests``. A missing part (evicted) is the same: refetch, naming fewer versions.

**Replicas and caches.** Parts are immutable and content-addressed like segments, so a
data-plane replica that serves a version can compute the same ``held_parts``; nothing
depends on one coordinator's memory.

**Tests to write with it.** A fetch of a track-B model by an edge holding a track-A model
that shares a tensor sends no record for that tensor (counted on the wire); a poisoned
cache entry fails the decoded digest and the refetch succeeds; hostile manifests
(``held_parts`` naming a tensor twice, a digest the edge lacks, a name the stream also
carries) raise before anything is written.
"""

from __future__ import annotations

import hashlib
import struct

import torch

from fedsqueeze.codec.digest import tensor_bytes

__all__ = ["part_digest"]


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
