"""Preparing a large model for the data plane without holding it in memory.

The same segments, digests and manifest as :func:`~fedsqueeze.transport.prepare.prepare_model`
(the same cut points: :func:`~fedsqueeze.transport.spool.plan_segments`), made from a
:class:`~fedsqueeze.transport.spool.SpooledStream`: the record bodies go to a spool file
as they are encoded, tensor by tensor (the source's ``encode_to``), and each segment is
read from it when its digest is taken and when it is sent.

The decoded model's digest (what a client checks after decoding a lossy encoding or a
delta) is taken tensor by tensor in the digest's own order: each record is decoded,
part by part, into a scratch file the size of the largest tensor, hashed, and
overwritten by the next one. Memory: the record heads, a record's decoding chunks and
the encode's working memory (:mod:`fedsqueeze.codec.stream_encode`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch

from fedsqueeze.codec import CodecSpec, state_digest
from fedsqueeze.codec.container import (
    ANS_VERSION,
    BLOCKWISE_VERSION,
    GROUPED_VERSION,
    ContainerHeader,
    TensorRecord,
)
from fedsqueeze.codec.stream_encode import EncodedPlan, RecordStore, StoredRecord
from fedsqueeze.codec.streaming import decode_into
from fedsqueeze.codec.tensor_decode import ProgressiveTensor, TensorDecoder
from fedsqueeze.errors import FormatError
from fedsqueeze.transport.spool import (
    PlannedSegment,
    SpooledStream,
    SpoolFile,
    StreamPiece,
    plan_progressive,
    plan_segments,
)

__all__ = [
    "SpooledEncoding",
    "SpoolingSource",
    "decode_spooled_to_file",
    "decoded_digest",
    "spool_encoding",
]

#: Format versions :func:`~fedsqueeze.codec.streaming.decode_into` reads part by part.
_PART_BY_PART = (1, BLOCKWISE_VERSION, GROUPED_VERSION, ANS_VERSION)


class SpoolingSource(Protocol):
    """A model source that can encode into a record store (bodies spooled as made)."""

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
        """Encode as :meth:`ModelSource.encode` does (the same bytes), bodies into ``store``."""
        ...


@dataclass(frozen=True)
class SpooledEncoding:
    """An encoded model whose bodies are in a spool file.

    Attributes
    ----------
    plan
        The header and the record heads.
    stream
        The stream (header, record heads, bodies) as pieces.
    segments
        Where the stream is cut.
    """

    plan: EncodedPlan
    stream: SpooledStream
    segments: tuple[PlannedSegment, ...]
    smallest_prefix: int = 0
    """For a progressive encoding, the bytes of its smallest decodable prefix (0: not
    progressive)."""

    @property
    def progressive(self) -> bool:
        """Whether any tensor is sent in levels."""
        return any(stored.record.progressive for stored in self.plan.records)

    def payload(self, index: int) -> bytes:
        """The bytes of segment ``index``."""
        seg = self.segments[index]
        return self.stream.read(seg.start, seg.end)


def spool_encoding(
    plan: EncodedPlan,
    file: SpoolFile,
    segment_bytes: int,
    *,
    progressive_segments: int = 8,
    min_progressive_bytes: int = 256,
) -> SpooledEncoding:
    """Lay out the stream of ``plan`` (bodies in ``file``) and cut it into segments.

    A progressive stream is cut as the in-memory path cuts it
    (:func:`~fedsqueeze.codec.segments.split_progressive` with a target of a
    ``progressive_segments``-th of the encoding, at least ``min_progressive_bytes``).
    """
    head = plan.header.to_bytes()
    pieces = [StreamPiece(head, 0, len(head))]
    lengths: list[tuple[str | None, int, int]] = [(None, 0, len(head))]
    for stored in plan.records:
        # split_segments names a segment's tensors by the records' names (none for an
        # index-coded record of a delta): the same here, for the same descriptors.
        name = stored.record.name
        record_head = stored.header_bytes()
        pieces.append(StreamPiece(record_head, 0, len(record_head)))
        pieces.append(StreamPiece(None, stored.token, stored.body_length))
        lengths.append((name, stored.record.level, len(record_head) + stored.body_length))
    stream = SpooledStream(pieces, file)
    if not any(stored.record.progressive for stored in plan.records):
        cuts = plan_segments([(n, length) for n, _level, length in lengths], segment_bytes)
        return SpooledEncoding(plan, stream, tuple(cuts))
    # EncodedModel.nbytes, as the in-memory path sizes it: the stream and its checksum
    target = max(min_progressive_bytes, (stream.nbytes + 4) // progressive_segments)
    cuts = plan_progressive(lengths, min(target, segment_bytes), segment_bytes)
    smallest = len(head)
    if plan.header.base_digest is None:  # a full model: every base level first
        for _name, level, length in lengths[1:]:
            if level > 0:
                break
            smallest += length
    return SpooledEncoding(plan, stream, tuple(cuts), smallest)


def decoded_digest(
    spooled: SpooledEncoding,
    base: Mapping[str, torch.Tensor] | None,
    base_digest: bytes | None,
    held: Mapping[str, torch.Tensor],
    scratch_dir: Path,
) -> bytes:
    """``state_digest`` of the model a client decodes from ``spooled`` (with ``base`` for
    a delta) plus the ``held`` parts, without holding the model: see the module's text.

    Raises
    ------
    fedsqueeze.errors.CodecError
        The stream does not decode.
    OSError
        The scratch file cannot be made.
    """
    state = _lazy(spooled, base, base_digest, held, scratch_dir)
    try:
        return state_digest(state)
    finally:
        del state


def decode_spooled_to_file(
    spooled: SpooledEncoding,
    base: Mapping[str, torch.Tensor] | None,
    base_digest: bytes | None,
    held: Mapping[str, torch.Tensor],
    output: Path,
) -> None:
    """Write the model a client decodes from ``spooled`` (with ``base`` for a delta)
    plus the ``held`` parts to the safetensors file ``output``, record by record into
    the mapped file (nothing of the model held in memory).

    Raises
    ------
    fedsqueeze.errors.CodecError
        The stream does not decode.
    OSError
        The file cannot be written.
    """
    from fedsqueeze.codec.stream_decode import TensorSlot
    from fedsqueeze.modelfile import _write_safetensors

    state = _lazy(spooled, base, base_digest, held, None)
    slots = tuple(TensorSlot(name, *state.slot(name)) for name in state)

    def fill(target: dict[str, torch.Tensor]) -> None:
        for name, out in target.items():
            state.decode_to(name, out)

    _write_safetensors(output, slots, fill)


def _lazy(
    spooled: SpooledEncoding,
    base: Mapping[str, torch.Tensor] | None,
    base_digest: bytes | None,
    held: Mapping[str, torch.Tensor],
    scratch_dir: Path | None,
) -> _DecodedLazily:
    """The decoded model as a lazy mapping (with a scratch file in ``scratch_dir`` for
    its lookups; ``None``: none, only :meth:`_DecodedLazily.decode_to` is used)."""
    header = spooled.plan.header
    delta_base = base if header.base_digest is not None else None
    decoder = TensorDecoder(delta_base, None)
    slots: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
    bases: list[int] = []  # record index of each base-level record
    refinements: dict[int, list[int]] = {}  # by the position of the base-level record
    for i, stored in enumerate(spooled.plan.records):
        if stored.record.level > 0:
            at = stored.record.index if stored.record.index is not None else -1
            refinements.setdefault(at, []).append(i)
            continue
        name, dtype, shape = decoder.resolve(stored.record)
        slots[name] = (i, dtype, shape)
        bases.append(i)
    for at in refinements:
        if not 0 <= at < len(bases) or not spooled.plan.records[bases[at]].record.progressive:
            raise FormatError(f"a refinement of base-level record #{at}, not a progressive one")
    refined = {bases[at]: records for at, records in refinements.items()}
    kept: dict[str, torch.Tensor] = {}
    if delta_base is not None and header.spec.freeze:
        kept = {n: t for n, t in delta_base.items() if n not in slots and header.spec.is_frozen(n)}
    scratch = torch.empty(0, dtype=torch.uint8)
    if scratch_dir is not None:
        largest = max((_nbytes(d, s) for _i, d, s in slots.values()), default=0)
        fd, name = tempfile.mkstemp(prefix="fsq-digest-", suffix=".tmp", dir=scratch_dir)
        try:
            try:  # reserved now: a full disk fails here, not as a bus error on a write
                os.posix_fallocate(fd, 0, max(1, largest))
            except OSError:
                os.ftruncate(fd, max(1, largest))
        finally:
            os.close(fd)
        try:
            scratch = torch.from_file(name, shared=True, size=max(1, largest), dtype=torch.uint8)
        finally:
            os.unlink(name)  # the mapping keeps it until freed
    return _DecodedLazily(
        spooled, slots, refined, kept, dict(held), delta_base, base_digest, scratch
    )


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


class _DecodedLazily(Mapping[str, torch.Tensor]):
    """The decoded model as a mapping whose tensors are decoded when looked up, each into
    the same scratch (valid until the next lookup: ``state_digest`` hashes one tensor
    before it asks for the next)."""

    def __init__(
        self,
        spooled: SpooledEncoding,
        slots: dict[str, tuple[int, torch.dtype, tuple[int, ...]]],
        refined: dict[int, list[int]],
        kept: dict[str, torch.Tensor],
        held: dict[str, torch.Tensor],
        base: Mapping[str, torch.Tensor] | None,
        base_digest: bytes | None,
        scratch: torch.Tensor,
    ) -> None:
        self._spooled = spooled
        self._slots = slots
        self._fixed = {**kept, **held}
        self._base = base
        # What decode_into is given beside the record's tensor: the base's names (an
        # index-coded record is named by its place among them); the values of the others
        # are never read, and a non-contiguous one would be refused, so it is an empty
        # stand-in.
        self._others = (
            {n: t if t.is_contiguous() else t.new_empty(0) for n, t in base.items()}
            if base is not None
            else None
        )
        self._base_digest = base_digest
        self._scratch = scratch
        self._names = list({**slots, **self._fixed})
        # record indices of each progressive tensor's refinements, by its base record's
        self._refined = refined

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def slot(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """The dtype and shape of tensor ``name``."""
        if name in self._fixed:
            t = self._fixed[name]
            return t.dtype, tuple(t.shape)
        _index, dtype, shape = self._slots[name]
        return dtype, shape

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._fixed:
            return self._fixed[name]
        _index, dtype, shape = self._slots[name]
        out = self._scratch[: _nbytes(dtype, shape)].view(dtype).reshape(shape)
        self.decode_to(name, out)
        return out

    def decode_to(self, name: str, out: torch.Tensor) -> None:
        """Write tensor ``name`` into ``out`` (contiguous, of its dtype and shape)."""
        if name in self._fixed:
            out.copy_(self._fixed[name])
            return
        index, dtype, shape = self._slots[name]
        base = self._base
        if base is not None and name in base:
            b = base[name]
            if b.dtype == dtype and tuple(b.shape) == shape:
                out.copy_(b)  # a delta's record applies to the base's value
        self._decode(index, name, out)

    def _decode(self, index: int, name: str, out: torch.Tensor) -> None:
        """Decode record ``index`` into ``out``: as a one-record stream, part by part
        where the format allows, else the record whole (one tensor)."""
        header: ContainerHeader = self._spooled.plan.header
        stored: StoredRecord = self._spooled.plan.records[index]
        base = self._base
        if stored.record.progressive:
            # One tensor's levels: its base level, refined by each later record of it.
            decoder = TensorDecoder(base, None)
            value = decoder.decode(self._with_body(index))[1]
            if not isinstance(value, ProgressiveTensor):
                raise FormatError("a progressive record that decodes to a plain tensor")
            for refinement in self._refined.get(index, []):
                value.refine(self._with_body(refinement))
            out.copy_(value.tensor())
            return
        if header.version in _PART_BY_PART:
            one = replace(header, record_count=1, base_records=1).to_bytes()
            body_start = self._body_start(index)
            chunks: list[bytes] = [one, stored.header_bytes()]
            others = self._others
            target = {**others, name: out} if others is not None else {name: out}
            decode_into(
                _then(
                    chunks, self._spooled.stream.chunks(body_start, body_start + stored.body_length)
                ),
                target,
                base_digest=self._base_digest if header.base_digest is not None else None,
            )
            return
        body_start = self._body_start(index)
        body = self._spooled.stream.read(body_start, body_start + stored.body_length)
        decoder = TensorDecoder(base, None)
        value = decoder.decode(replace(stored.record, body=body))[1]
        if not isinstance(value, torch.Tensor):
            raise FormatError("a progressive record in a whole-model stream")
        out.copy_(value)

    def _with_body(self, index: int) -> TensorRecord:
        """Record ``index`` with its body read from the spool file."""
        stored = self._spooled.plan.records[index]
        start = self._body_start(index)
        body = self._spooled.stream.read(start, start + stored.body_length)
        return replace(stored.record, body=body)

    def _body_start(self, index: int) -> int:
        """Where record ``index``'s body starts in the stream."""
        # pieces: header, then (record head, body) per record
        piece = 2 + 2 * index
        return self._spooled.stream.start_of(piece)


def _then(first: list[bytes], rest: Iterator[bytes]) -> Iterator[bytes]:
    yield from first
    yield from rest
