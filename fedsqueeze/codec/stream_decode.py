"""Decoding a whole encoded model into tensors the caller provides, one tensor at a time.

:func:`~fedsqueeze.codec.model.decode_state` builds every tensor in memory.
:func:`scan_stream` reads only the record heads of an encoded stream (a memory-mapped
file, say) and says which tensors it decodes to, so the caller can lay out an output
(a memory-mapped safetensors file); :func:`decode_stream_into` then fills it:

* a stream without progressive levels goes through
  :func:`~fedsqueeze.codec.streaming.decode_into`, part by part;
* a progressive stream is decoded tensor by tensor: each base-level record with its
  refinements (found by the scan), so one tensor's codes are held at a time; so is a
  stream with rotated records (format version 6: a rotation mixes a whole row, so it is
  undone on the whole tensor).

For a delta the targets must hold the base when called (copy it in first); frozen
tensors a delta leaves out (:attr:`StreamLayout.kept_from_base`) are the caller's to copy.
A table whose rows travel in tiers (format version 11, :mod:`fedsqueeze.codec.row_tiers`)
is one slot: its parts are decoded apart and joined into it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import torch

from fedsqueeze.codec.bytesio import ByteReader
from fedsqueeze.codec.container import (
    ROTATED_VERSION,
    ContainerHeader,
    DecodeLimits,
    QParamsSizer,
    TensorRecord,
    parse_header,
    parse_record,
)
from fedsqueeze.codec.model import _check_level_order
from fedsqueeze.codec.row_tiers import deferred_parts, split_shapes, split_state
from fedsqueeze.codec.streaming import DEFAULT_CHUNK_VALUES, decode_into
from fedsqueeze.codec.tensor_decode import ProgressiveTensor, TensorDecoder
from fedsqueeze.errors import BaseMismatchError, FormatError

__all__ = ["StreamLayout", "TensorSlot", "decode_stream_into", "scan_stream"]

#: Bytes handed to the part-by-part decoder at a time.
_CHUNK = 1 << 20


@dataclass(frozen=True)
class TensorSlot:
    """One tensor the stream decodes to."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded tensor."""
        n = torch.empty((), dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class _Located:
    """A record (empty body) and where its body lies in the stream."""

    record: TensorRecord
    offset: int
    length: int


@dataclass(frozen=True)
class StreamLayout:
    """What :func:`scan_stream` found.

    Attributes
    ----------
    header
        The model header.
    tensors
        The tensors the records decode to, in record order.
    kept_from_base
        Frozen tensors of the base that a delta leaves out (the receiver keeps its own).
    """

    header: ContainerHeader
    tensors: tuple[TensorSlot, ...]
    kept_from_base: tuple[TensorSlot, ...]
    _records: tuple[_Located, ...]

    @property
    def progressive(self) -> bool:
        """Whether some tensor is sent in levels."""
        return any(r.record.progressive for r in self._records)


class _SkippingReader(ByteReader):
    """Parses record heads and steps over bodies, noting where each one lies."""

    __slots__ = ("last_body",)

    def __init__(self, data: memoryview) -> None:
        super().__init__(data)
        self.last_body = (0, 0)

    def body(self, count: int) -> memoryview:
        start = self.pos
        self.take(count, "record body")  # a view, not a copy: only bounds-checked
        self.last_body = (start, count)
        return memoryview(b"")


def scan_stream(
    stream: memoryview | bytes,
    base: Mapping[str, torch.Tensor] | None = None,
    limits: DecodeLimits | None = None,
) -> StreamLayout:
    """Read the heads of a whole encoded stream (without its checksum).

    Parameters
    ----------
    stream
        The model's bytes without the trailing checksum (check it first).
    base
        The base, for a delta (its index-coded records name base tensors); only its
        names, shapes and dtypes are read.
    limits
        Bounds on what the records may claim.

    Raises
    ------
    FormatError, LimitExceededError, BaseMismatchError
        Malformed records, or a delta without a base that has its tensors.
    """
    limits = limits or DecodeLimits()
    reader = _SkippingReader(memoryview(stream))
    header = parse_header(reader, limits)
    if header.implied_base:
        raise FormatError("a delta without its base's digest is read whole (from_bytes)")
    if header.base_digest is not None and base is None:
        raise BaseMismatchError(
            f"this is a delta against {header.base_digest.hex()[:16]}…; pass its base"
        )
    delta_base = base if header.base_digest is not None else None
    decoder = TensorDecoder(
        split_shapes(delta_base, header.splits) if delta_base is not None else None, None
    )
    owner = {p: (s, k) for s in header.splits for k, p in enumerate(s.parts())}
    sizer = QParamsSizer()
    located: list[_Located] = []
    slots: list[TensorSlot] = []
    seen: set[str] = set()
    total = 0
    for _ in range(header.record_count):
        record = parse_record(reader, limits, sizer, header.version)
        offset, length = reader.last_body
        located.append(_Located(record, offset, length))
        if record.level > 0:
            continue
        name, dtype, shape = decoder.resolve(record)
        if name in seen:
            raise FormatError(f"tensor {name!r} appears twice")
        seen.add(name)
        total = limits.count(name, shape, total)
        if name in owner:
            split, tier = owner[name]
            if tier == 0:  # the table's slot, where its first tier is
                if not shape:
                    raise FormatError(f"part {name!r} of a table has no rows")
                slots.append(TensorSlot(split.name, dtype, (split.rows, *shape[1:])))
            continue
        slots.append(TensorSlot(name, dtype, shape))
    if reader.remaining:
        raise FormatError(f"{reader.remaining} unexpected bytes after the last record")
    for split in header.splits:
        missing = [p for p in split.parts() if p not in seen]
        if missing:
            raise FormatError(f"table {split.name!r} lacks its parts {missing}")
        if split.name in seen:
            raise FormatError(f"table {split.name!r} is both split and whole")
        seen.add(split.name)
    _check_level_order(
        [loc.record for loc in located],
        header.base_records,
        header.version,
        deferred_parts(header.splits),
    )
    kept: list[TensorSlot] = []
    if base is not None and header.base_digest is not None and header.spec.freeze:
        for name, t in base.items():
            if name not in seen and header.spec.is_frozen(name):
                kept.append(TensorSlot(name, t.dtype, tuple(t.shape)))
    return StreamLayout(header, tuple(slots), tuple(kept), tuple(located))


def decode_stream_into(
    stream: memoryview | bytes,
    layout: StreamLayout,
    target: Mapping[str, torch.Tensor],
    *,
    base_digest: bytes | None = None,
    limits: DecodeLimits | None = None,
) -> None:
    """Decode ``stream`` (scanned as ``layout``) into ``target``'s tensors, in place.

    Parameters
    ----------
    stream
        What :func:`scan_stream` read.
    layout
        Its result.
    target
        Contiguous tensors for every slot of ``layout.tensors`` (for a delta, holding
        the base); written in place.
    base_digest
        ``state_digest`` of the base ``target`` holds, for a delta.

    Raises
    ------
    BaseMismatchError
        A delta against another base, or a tensor ``target`` lacks.
    FormatError, LimitExceededError
        Malformed records.
    """
    view = memoryview(stream)
    header = layout.header
    if header.implied_base:
        raise FormatError("a delta without its base's digest is read whole (from_bytes)")
    if header.base_digest is not None and header.base_digest != base_digest:
        raise BaseMismatchError(
            f"this is a delta against {header.base_digest.hex()[:16]}…; the tensors given "
            "hold another model (or base_digest was not passed)"
        )
    for slot in layout.tensors:
        out = target.get(slot.name)
        if out is None or tuple(out.shape) != slot.shape or out.dtype != slot.dtype:
            raise BaseMismatchError(f"the stream's tensor {slot.name!r} is not in target")
        if not out.is_contiguous():
            raise ValueError(f"target[{slot.name!r}] is not contiguous")
    if not layout.progressive and header.version != ROTATED_VERSION:
        # Chunks of about 1/128 of the model (at least decode_into's default): per-chunk
        # overheads stay small on large models, the working memory a small fraction.
        total = sum(s.nbytes for s in layout.tensors) // 4
        step = min(max(total // 128, DEFAULT_CHUNK_VALUES), 1 << 24)
        decode_into(
            _chunks(view), target, base_digest=base_digest, limits=limits, chunk_values=step
        )
        return
    _decode_levels(view, layout, target)


def _chunks(view: memoryview) -> Iterator[memoryview]:
    for start in range(0, len(view), _CHUNK):
        yield view[start : start + _CHUNK]


def _decode_levels(
    view: memoryview, layout: StreamLayout, target: Mapping[str, torch.Tensor]
) -> None:
    """A progressive stream, tensor by tensor: each base-level record with its
    refinements (a split table's parts into copies of its rows, then joined in)."""
    splits = layout.header.splits
    whole = target
    if splits:
        target = split_state(target, splits)
    base = target if layout.header.base_digest is not None else None
    decoder = TensorDecoder(base, None)
    bases = [loc for loc in layout._records if loc.record.level == 0]
    refinements: dict[int, list[_Located]] = {}
    for loc in layout._records:
        if loc.record.level > 0:
            index = loc.record.index if loc.record.index is not None else -1
            if not 0 <= index < len(bases) or not bases[index].record.levels:
                raise FormatError(
                    f"a level-{loc.record.level} record refines base-level record #{index}, "
                    "which is not a progressive tensor held before it"
                )
            refinements.setdefault(index, []).append(loc)
    for position, loc in enumerate(bases):
        name, value = decoder.decode(_with_body(view, loc))
        if isinstance(value, ProgressiveTensor):
            for refinement in refinements.get(position, []):
                value.refine(_with_body(view, refinement))
            value = value.tensor()
        target[name].copy_(value)
    for split in splits:
        split.join(target, out=whole[split.name])


def _with_body(view: memoryview, loc: _Located) -> TensorRecord:
    return replace(loc.record, body=bytes(view[loc.offset : loc.offset + loc.length]))
