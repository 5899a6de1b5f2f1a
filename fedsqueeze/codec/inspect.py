"""A per-tensor description of an encoded model: what each stage did and what it cost."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from fedsqueeze.codec.container import TensorRecord, ValueKind
from fedsqueeze.codec.grouping import holds_buckets, holds_joint
from fedsqueeze.codec.model import EncodedModel
from fedsqueeze.codec.positions import PositionCoding
from fedsqueeze.codec.row_tiers import deferred_parts, split_shapes
from fedsqueeze.codec.spec import Granularity
from fedsqueeze.codec.tensor_decode import TensorDecoder


@dataclass(frozen=True)
class RecordInfo:
    """One row of ``fedsqueeze codec inspect``."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    stages: str
    raw_bytes: int  # numel × the original dtype's size
    encoded_bytes: int  # the whole record: header and body
    payload_bytes: int  # the body alone


def stages_of(record: TensorRecord) -> str:
    """Human-readable stages, in pipeline order."""
    if record.zero:
        return "unchanged" if record.delta else "zeros"
    parts = []
    if record.delta:
        parts.append("xor-delta" if record.value_kind is ValueKind.XOR else "delta")
    if record.positions is not None:
        coding = str(PositionCoding(record.positions.coding).name or "?").lower()
        parts.append(f"sparse {record.positions.count} kept ({coding})")
    if record.rank:
        parts.append(f"rank {record.rank}")
    if record.quant is not None:
        q = record.quant
        gran = "per-channel" if q.granularity is Granularity.PER_CHANNEL else "per-tensor"
        if q.granularity is Granularity.PER_BLOCK:
            gran = f"{q.blocks} blocks of {q.block_size}, {q.scale_format.name.lower()} scales"
        parts.append(f"{q.scheme.name.lower()} {q.bits}-bit {gran}")
        if q.rotation_seed is not None:
            parts.append(f"hadamard-rotated (seed {q.rotation_seed})")
    elif record.value_kind not in (ValueKind.RAW, ValueKind.XOR):
        parts.append(record.value_kind.name.lower())
        if _in_buckets(record):
            parts.append("planes in buckets by exponent (v10)")
        if _joint(record):
            parts.append("exponent coded with the top mantissa bits (v12)")
    if record.raw_length is not None:
        parts.append("zstd")
    elif record.ans:
        parts.append("ans")
    return ", ".join(parts) or "raw"


def _in_buckets(record: TensorRecord) -> bool:
    """Whether a grouped record's body codes a plane in buckets (format version 10)."""
    if not record.buckets or record.dtype is None or record.shape is None:
        return False
    return holds_buckets(record.body, record.dtype, math.prod(record.shape))


def _joint(record: TensorRecord) -> bool:
    """Whether a grouped record's body codes planes jointly (format version 12)."""
    if not record.joint or record.dtype is None or record.shape is None:
        return False
    return holds_joint(record.body, record.dtype, math.prod(record.shape))


def describe(
    encoded: EncodedModel, base: Mapping[str, torch.Tensor] | None = None
) -> list[RecordInfo]:
    """One :class:`RecordInfo` per tensor of the stream (index-coded records need ``base``
    for names): a progressive tensor's refinements count in its row's bytes, and a table
    whose rows travel in tiers has a row per tier (``name#tier{k}``)."""
    resolving = split_shapes(base, encoded.splits) if base else None
    decoder = TensorDecoder(resolving, None)
    rows: list[RecordInfo] = []
    late = deferred_parts(encoded.splits)
    level_zero: list[int] = []  # the row of each level-0 record, in stream order
    for record in encoded.records:
        index = record.index if record.index is not None else -1
        if record.level > 0 and 0 <= index < len(level_zero):
            row = rows[level_zero[index]]
            rows[level_zero[index]] = replace(
                row,
                encoded_bytes=row.encoded_bytes + len(record.to_bytes()),
                payload_bytes=row.payload_bytes + len(record.body),
            )
            continue
        shape: tuple[int, ...]
        if record.index is not None and not base:
            name, dtype, shape = f"#{record.index} (pass --base)", torch.float32, ()
            numel = 0
        else:
            name, dtype, shape = decoder.resolve(record)
            numel = 1
            for d in shape:
                numel *= d
        width = torch.empty((), dtype=dtype).element_size()
        if record.level == 0:
            level_zero.append(len(rows))
        rows.append(
            RecordInfo(
                name=name,
                shape=shape,
                dtype=dtype,
                stages=stages_of(record)
                + (", deferred (its mean row until its base level)" if name in late else ""),
                raw_bytes=numel * width,
                encoded_bytes=len(record.to_bytes()),
                payload_bytes=len(record.body),
            )
        )
    return rows
