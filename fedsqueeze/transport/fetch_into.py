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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fedsqueeze.codec import state_digest
from fedsqueeze.codec.stream_decode import decode_stream_into, scan_stream
from fedsqueeze.errors import BaseMismatchError, IntegrityError
from fedsqueeze.transport.fetch import FetchState
from fedsqueeze.transport.operation import TransferStats
from fedsqueeze.wire.types import Manifest

__all__ = ["FetchedInto", "decode_fetched"]


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
