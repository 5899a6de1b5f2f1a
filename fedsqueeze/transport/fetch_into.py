"""Decoding a verified fetch part by part: into a model file or into existing tensors.

:meth:`TransferClient.fetch <fedsqueeze.transport.client.TransferClient.fetch>` parses
the whole payload and decodes it into new tensors: the encoded model and the decoded one
in memory at once. :meth:`~fedsqueeze.transport.client.TransferClient.fetch_into` ends
with :func:`decode_fetched` instead: the verified stream, lent by the
:class:`~fedsqueeze.transport.fetch.FetchState` (a file-backed mapping for a large
model), is scanned for its record heads and decoded part by part
(:func:`~fedsqueeze.codec.stream_decode.decode_stream_into`) into a mapped safetensors
file (:func:`fedsqueeze.modelfile.write_decoded`) or the caller's tensors; the decoded
model's digest is then taken from them and checked against the manifest's.

:meth:`~fedsqueeze.transport.client.TransferClient.fetch_bounded` (the edge's fetch)
ends with :func:`decode_spooled_state` when the payload was spooled: the model is decoded
part by part into a safetensors file in the spool folder, checked, mapped and the file
unlinked (:func:`fedsqueeze.modelfile.map_model`: its pages are page cache, not the
process's memory). The model the edge held (a delta's base) is only read, never written:
a fetch that fails its check leaves it as it was, and leaves no file behind.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fedsqueeze.codec import state_digest
from fedsqueeze.codec.stream_decode import decode_stream_into, scan_stream
from fedsqueeze.errors import BaseMismatchError, HeldPartError, IntegrityError
from fedsqueeze.transport.fetch import FetchState
from fedsqueeze.transport.operation import PrefixUsed, TransferStats
from fedsqueeze.wire.types import Manifest

__all__ = ["FetchedInto", "FetchedState", "decode_fetched", "decode_spooled_state"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchedInto:
    """A model fetched, verified and decoded into a file or tensors.

    Attributes
    ----------
    manifest
        What was fetched; ``manifest.decoded_digest`` is the model's digest, checked.
    output
        The model file written, or ``None`` (decoded into tensors).
    tensors, nbytes
        Tensors written and their bytes.
    spooled
        Whether the payload was kept in a file-backed mapping.
    stats
        What it cost on the wire (``None`` until the client fills it in).
    """

    manifest: Manifest
    output: Path | None
    tensors: int
    nbytes: int
    spooled: bool
    stats: TransferStats | None = None


@dataclass(frozen=True)
class FetchedState:
    """A model fetched, verified and decoded (:meth:`TransferClient.fetch_bounded
    <fedsqueeze.transport.client.TransferClient.fetch_bounded>`).

    Attributes
    ----------
    manifest
        What was fetched.
    state
        The decoded model: tensors in memory, or (``spooled``) read-only tensors mapped
        from an unlinked file, plus the held parts the edge already had.
    stats
        What it cost on the wire.
    prefix
        For a truncated progressive fetch, what the prefix gave; else ``None``.
    spooled
        Whether the payload was kept on disk and decoded part by part.
    """

    manifest: Manifest
    state: dict[str, torch.Tensor]
    stats: TransferStats
    prefix: PrefixUsed | None = None
    spooled: bool = False

    @property
    def digest(self) -> bytes:
        """Digest of the decoded model: what the client holds now."""
        return self.prefix.digest if self.prefix is not None else self.manifest.decoded_digest


def decode_spooled_state(
    held: FetchState,
    manifest: Manifest,
    base: Mapping[str, torch.Tensor] | None,
    held_parts: Mapping[str, torch.Tensor],
    folder: Path,
) -> dict[str, torch.Tensor]:
    """Decode the complete fetch ``held`` part by part into a file in ``folder`` and
    return its tensors mapped (the file unlinked), with the ``held_parts`` added (shared,
    not copied: they are exact).

    ``base`` is only read. The decoded model's digest is checked before the file is
    moved into place: on any error no file is left and nothing the caller holds changed.

    Raises
    ------
    HeldPartError
        The model with the held parts does not match its digest (the stream verified: a
        held part is wrong; the caller fetches again without them).
    IntegrityError
        The stream is not the manifest's model (another base), or the decoded model does
        not match the manifest's digest.
    fedsqueeze.errors.CodecError
        The verified bytes do not decode (the server encoded garbage).
    fedsqueeze.errors.ConfigError
        The folder cannot take the file.
    """
    from fedsqueeze.modelfile import map_model, write_decoded

    delta_base = base if manifest.base_digest is not None else None

    def check(decoded: Mapping[str, torch.Tensor]) -> None:
        whole = {**decoded, **held_parts} if held_parts else decoded
        if state_digest(whole) == manifest.decoded_digest:
            return
        if held_parts:
            raise HeldPartError("the model reassembled with held parts does not match its digest")
        raise IntegrityError("the decoded model does not match the manifest's digest")

    path = folder / f"fsq-model-{secrets.token_hex(8)}.safetensors"
    with held.stream() as view:
        layout = scan_stream(view, delta_base)
        if layout.header.base_digest != manifest.base_digest:
            raise IntegrityError("the payload's base digest differs from the manifest's")
        clash = sorted({s.name for s in layout.tensors}.intersection(held_parts))
        if clash:
            raise HeldPartError(f"tensors both in the stream and held: {clash[:3]}")
        write_decoded(
            view,
            layout,
            path,
            base=delta_base,
            base_digest=manifest.base_digest,
            overwrite=False,
            check=check,
        )
    try:
        state = map_model(path)
    finally:
        path.unlink(missing_ok=True)  # the mapping keeps the pages; nothing is left behind
    state.update(held_parts)
    logger.debug("decoded %d tensors part by part into a mapped file", len(state))
    return state


def decode_fetched(
    held: FetchState,
    manifest: Manifest,
    output: str | Path | None,
    into: Mapping[str, torch.Tensor] | None,
    base: Mapping[str, torch.Tensor] | None,
    overwrite: bool = False,
) -> FetchedInto:
    """Decode the complete fetch ``held`` into ``output`` or ``into`` and check the
    decoded model's digest.

    Raises
    ------
    IntegrityError
        The stream is not the manifest's model (another base), or the decoded model does
        not match the manifest's digest.
    BaseMismatchError
        ``into`` lacks a tensor of the model, or has it with another shape or dtype.
    fedsqueeze.errors.CodecError
        The verified bytes do not decode (the server encoded garbage).
    """
    from fedsqueeze.modelfile import write_decoded

    if manifest.held_parts:
        raise IntegrityError("a fetch into a file names no held parts; the server sent some")
    delta_base = base if manifest.base_digest is not None else None

    def check(decoded: Mapping[str, torch.Tensor]) -> None:
        if state_digest(decoded) != manifest.decoded_digest:
            raise IntegrityError("the decoded model does not match the manifest's digest")

    with held.stream() as view:
        layout = scan_stream(view, delta_base)
        if layout.header.base_digest != manifest.base_digest:
            raise IntegrityError("the payload's base digest differs from the manifest's")
        slots = layout.tensors + layout.kept_from_base
        if output is not None:
            done = write_decoded(
                view,
                layout,
                output,
                base=delta_base,
                base_digest=manifest.base_digest,
                overwrite=overwrite,
                check=check,
            )
            return FetchedInto(manifest, Path(output), done.tensors, done.nbytes, held.spooled)
        if into is None:
            raise ValueError("give output or into")
        target: dict[str, torch.Tensor] = {}
        for slot in slots:
            out = into.get(slot.name)
            if out is None or tuple(out.shape) != slot.shape or out.dtype != slot.dtype:
                raise BaseMismatchError(
                    f"the model's tensor {slot.name!r} {slot.shape} {slot.dtype} is not in into"
                )
            target[slot.name] = out
        if delta_base is not None:
            for name, out in target.items():
                b = delta_base.get(name)
                fits = b is not None and b.dtype == out.dtype and b.shape == out.shape
                if fits and b is not None and b.data_ptr() != out.data_ptr():
                    out.copy_(b)
            decode_stream_into(
                view, layout, {**delta_base, **target}, base_digest=manifest.base_digest
            )
        else:
            decode_stream_into(view, layout, target)
        check(target)
        nbytes = sum(s.nbytes for s in slots)
        return FetchedInto(manifest, None, len(slots), nbytes, held.spooled)
