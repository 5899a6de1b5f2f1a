"""The encoded-model byte format, versions 1 to 11: one compact header, then tensor records.

Layout (integers are LEB128 varints unless noted)::

    model   = magic "FSQ" · version u8 · flags u8 · [base digest 32 B] · spec · count
              · record* · crc32 u32 (little endian, over everything before it)
    record  = flags u8 · (name · dtype u8 · ndim u8 · dim* | index) · [level] · [rank]
              · value-format · [positions header] · [raw length] · body length · body
    body    = positions payload · values payload     (zstd-compressed when ENTROPY)

A LOWRANK record (rank r) of an ``[m, ...]`` tensor seen as ``m × n`` carries the
``r·(m + n)`` values of two factors, ``A`` (``m × r``, row-major) then ``B`` (``r × n``),
with one value format for both; the tensor is ``A @ B``. It never has positions, and
``r·(m + n) < m·n`` always (the parser's bound on the decoder's work). Records without
the flag are byte-for-byte what they were before it existed.

A record is *named* (self-describing) unless the model is a delta and the tensor exists
in the base with the same dtype and shape: then it is the tensor's index in the base's
sorted names, which saves ~15 bytes a tensor on kilobyte-sized updates. Decoding such a
record needs the base, which a delta needs anyway.

Version 2 adds progressive (level) records, written only for a spec with ``levels``;
every other model is still written as version 1, byte for byte. In version 2 a record
with the LEVEL flag carries its level after the tensor's reference:

* **level 0** (the base level of a progressive tensor): ``level 0 · count u8 · bits u8
  ·count`` (the plan, e.g. 2, 2, 4), then an ordinary quantized record whose quantization
  header describes the full ``sum(plan)``-bit quantizer and whose body holds the
  positions (if sparse), the first plane (``plan[0]`` bits per kept value) and the
  bucket table (``2^plan[0]`` float16 entries);
* **level k ≥ 1** (a refinement): the reference is always an *index into this stream's
  level-0 records* (in their order), then ``level k · [raw length] · body length ·
  body``, the body holding plane ``k`` and, unless it is the last level, the table for
  ``plan[0] + … + plan[k]`` bits. Everything else comes from the level-0 record.

Version 1 decoders refuse version 2 streams by their version byte. See
:mod:`fedsqueeze.codec.progressive` for the numbers.

Version 3 is version 2 plus block-wise and NF4 quantization, written only when some
record uses one of them (every other model keeps its version-1 or -2 bytes). An NF4
record is an ordinary quantized record with scheme 5 in its descriptor. A block-wise
record has an *extended* descriptor: the descriptor byte holds the bits and 0x80 with a
scheme field of 0 (no scheme has that value, so every earlier parser refuses it), then::

    scheme u8 · block size varint (32..4096) · scale format u8 · block count varint
    · params (scales in the scale format, then AFFINE's zero points)

The block count is ``ceil(kept / block size)``, checked by the decoder against the kept
count; the parser bounds it by the element limit before reading the params, whose size
it fixes (:func:`qparams_nbytes`). Per-tensor and per-channel records are the same in
every version. Version 1 and 2 decoders refuse version 3 streams by their version byte.

Version 4 is version 3 plus byte-grouped lossless values (value kinds ``GROUPED`` and
``GROUPED_XOR``, :mod:`fedsqueeze.codec.grouping`), written only when some record uses
them: the encoder picks them for a float tensor only when they are smaller than the
version-1 record, so every other model keeps its earlier bytes. Such a record is never
ENTROPY, SPARSE, QUANT or LOWRANK: its body holds its own per-plane coding, and the
decoder bounds every plane by the element count. Version 1 to 3 decoders refuse version
4 streams by their version byte (and kinds 5 and 6 are unknown to them anyway).

Version 6 is version 5 plus rotated records (:mod:`fedsqueeze.codec.rotation`), written
only when some record is rotated. A rotated record's quantization header starts with a
*rotation prefix*: a descriptor byte with the bits and a scheme field of 0 without 0x80
(no scheme has that value, so every earlier parser refuses it), then ``rotation u8``
(1: Hadamard) · ``seed u32`` (little endian), then the ordinary (or extended)
descriptor and parameters with the same bits. The quantized values are those of the
rotated tensor; the decoder rotates them back before adding a delta's base. A rotated
record is dense: never SPARSE or LOWRANK. Version 1 to 5 decoders refuse version 6
streams by their version byte.

Version 7 is version 6 plus *support levels* (progressive sparsity,
:mod:`fedsqueeze.codec.support_levels`), written only when some tensor's positions
arrive in several groups. Such a tensor's refinements each name what they hold: a
refinement with the QUANT flag carries ``group varint · plane varint`` after its level
(its level is then its step in the tensor's chain, 1, 2, …, whatever it holds), and with
the SPARSE flag as well (exactly when ``plane`` is 0: a new group, ``group`` ≥ 1) the
positions header of the weights it adds, their indices counted among the positions
the earlier groups left free. Its body is those positions, then the group's plane and
table as a level record's. Version 1 to 6 decoders refuse version 7 streams by their
version byte (and such refinements by their flags).

Version 8 is version 7 plus *ANS records* (the spec's ``entropy=ans``,
:mod:`fedsqueeze.codec.ans`), written only when some record is one. An ANS record is a
QUANT record, neither SPARSE nor a level, with the ENTROPY flag and a raw length of 0
(which no zstd record has: :func:`fedsqueeze.codec.entropy.compress` never makes an
empty body): its body is the adaptive rANS coding of its ``kept`` codes (the tensor's
element count, or ``r·(m + n)`` for low-rank factors), which the decoder packs as the
record's plain body would be. Version 1 to 7 decoders refuse version 8 streams by their
version byte (and would refuse the zero raw length when decompressing).

Version 9 is version 8 plus *ANS refinements* (:mod:`fedsqueeze.codec.plane_ans`),
written only when some refinement is one (which only an ``entropy=ans`` spec makes). An
ANS refinement is a refinement (level ≥ 1, either kind: a level of a plain progressive
tensor or a group's plane) with the ENTROPY flag and a raw length of 0: its body is its
positions payload (a group's first plane only), its bucket table (unless it is the last
level) and then the context-adaptive rANS coding of the plane's ``count`` codes, each
coded with the model of the value's coarser code bits (those of its own group) that the
receiver already holds; a group's first plane with one context. Version 1 to 8 decoders
refuse version 9 streams by their version byte (and a raw length of 0 when
decompressing).

A version 8 delta may also leave its base's digest out: model flag 0x02 (*implied
base*) instead of 0x01 and the 32 bytes, for payloads whose carrier names the base
anyway (an inline download's instruction is made for the version the edge holds; an
inline update's receipt names the version it was trained from). Its reader must be told
the digest (:meth:`fedsqueeze.codec.EncodedModel.from_bytes`); every other reader
refuses it.

Version 10 is version 9 plus byte-grouped planes coded in buckets by exponent
(:mod:`fedsqueeze.codec.grouping`), written only when some record has them.

Version 11 is version 10 plus *row tiers* (:mod:`fedsqueeze.codec.row_tiers`), written
only when the encoder split a lookup table's rows into tiers. The header then ends with
the split list, after the base-level record count::

    splits = count · (name · rows · tiers u8 · length · tier map)

where the tier map is a byte per row (the row's tier, every tier from 0 to ``tiers − 1``
holding a row), raw when ``length == rows`` and a zstd frame of it when ``length <
rows``. Each tier's rows are an ordinary tensor of the stream named ``name#tier{k}``;
the decoder splits a delta's base the same way and joins the decoded parts into
``name``. A refinement may also carry its plane in *context order* (the LOWRANK bit,
which no refinement had before): the plane's values sorted, stably, by the coarser code
bits each already holds, which the decoder holds too, so it undoes the order; a byte
coder then sees the bits that depend on those coarser bits in runs (a symmetric code's
second bit is a magnitude bit whose sense flips with the sign: about 1 bit per value in
value order, about 0.6 in context order). Never with ANS or on a group's first plane.
Otherwise records are those of version 10. Version 1 to 10 decoders refuse version 11
streams by their version byte.

Version 12 is version 11 plus byte-grouped bodies whose fp32 or bf16 chunks code the
exponent plane jointly with the top mantissa bits (:mod:`fedsqueeze.codec.plane_joint`,
plane coding 3), written only when some record has them; earlier decoders refuse it by
its version byte.

Version 13 is version 12 plus *deferred tiers* (:mod:`fedsqueeze.codec.row_tiers`): in
a full model's stream the lightest tiers of a split table may send their base-level
record after refinements of other tensors, where the rate-distortion order puts it, and
decode to a fill row (the tier's mean row) until it arrives. Each split of the list
then ends with::

    deferred u8 · [values · fill row (float32 × values) × deferred]

(``values`` present only when ``deferred > 0``; tier 0 is never deferred). The header's
base-level record count counts the other base-level records, which still come first; a
deferred tier's base-level record comes after them, before its own refinements. A delta
has no deferred tier. Earlier decoders refuse version 13 by its version byte.

Version 14 is version 13 with a split of up to 16 tiers instead of 8 (the encoder cuts a
table's lightest band into several deferred tiers, so a prefix can end between their
base levels); the bytes are those of version 13, and the encoder writes 14 only when a
split has more than 8 tiers. Earlier decoders refuse version 14 by its version byte.

Everything here is structure only: the numerical stages live in ``fedsqueeze.codec.model``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import IntEnum, IntFlag

import torch

from fedsqueeze.codec.blockwise import num_blocks, scale_bytes
from fedsqueeze.codec.bytesio import ByteReader, write_varint
from fedsqueeze.codec.checksum import crc32
from fedsqueeze.codec.positions import max_payload_bytes
from fedsqueeze.codec.row_tiers import RowSplit, parse_splits, write_splits
from fedsqueeze.codec.spec import (
    MAX_BLOCK,
    MAX_LEVELS,
    MAX_RANK,
    MIN_BLOCK,
    CodecSpec,
    FloatFormat,
    Granularity,
    QuantScheme,
    ScaleFormat,
)
from fedsqueeze.errors import FormatError, LimitExceededError, UnsupportedVersionError

MAGIC = b"FSQ"
#: The version written for a model without progressive levels.
FORMAT_VERSION = 1
#: The version written when any record has levels.
PROGRESSIVE_VERSION = 2
#: The version written when any record is block-wise or NF4.
BLOCKWISE_VERSION = 3
#: The version written when any record's values are byte-grouped.
GROUPED_VERSION = 4
#: The version written when refinements are not in level order (one rate-distortion
#: order over all tensors' levels, :mod:`fedsqueeze.codec.level_order`).
GLOBAL_ORDER_VERSION = 5
#: The version written when any record is rotated before quantization.
ROTATED_VERSION = 6
#: The version written when a tensor's positions arrive in groups (support levels,
#: :mod:`fedsqueeze.codec.support_levels`).
SUPPORT_LEVELS_VERSION = 7
#: The version written when any record's codes are ANS-coded (``entropy=ans``).
ANS_VERSION = 8
#: The version written when any refinement's plane is ANS-coded with the coarser bits
#: as context (:mod:`fedsqueeze.codec.plane_ans`).
PLANE_ANS_VERSION = 9
#: The version written when a byte-grouped body codes a plane in buckets by exponent
#: (:mod:`fedsqueeze.codec.grouping`).
BUCKETS_VERSION = 10
#: The version written when a lookup table's rows travel in tiers
#: (:mod:`fedsqueeze.codec.row_tiers`): the header lists the splits.
ROW_TIERS_VERSION = 11
#: The version written when a byte-grouped body codes an exponent plane jointly with
#: the top mantissa bits (:mod:`fedsqueeze.codec.plane_joint`).
JOINT_VERSION = 12
#: The version written when a full model's stream defers the base level of a table's
#: lightest row tiers (:mod:`fedsqueeze.codec.row_tiers`).
DEFERRED_VERSION = 13
#: The version written when a table is split into more than 8 tiers (up to 16: its
#: lightest band cut into several deferred tiers, :mod:`fedsqueeze.codec.tier_plan`).
WIDE_TIERS_VERSION = 14
SUPPORTED_VERSIONS = (
    FORMAT_VERSION,
    PROGRESSIVE_VERSION,
    BLOCKWISE_VERSION,
    GROUPED_VERSION,
    GLOBAL_ORDER_VERSION,
    ROTATED_VERSION,
    SUPPORT_LEVELS_VERSION,
    ANS_VERSION,
    PLANE_ANS_VERSION,
    BUCKETS_VERSION,
    ROW_TIERS_VERSION,
    JOINT_VERSION,
    DEFERRED_VERSION,
    WIDE_TIERS_VERSION,
)
#: Most position groups (support levels) one tensor may have.
MAX_GROUPS = 16
_EXTENDED_QUANT = 0x80  # a descriptor with scheme field 0: the extended form follows
_HAS_BASE = 0x01
_IMPLIED_BASE = 0x02  # version 8: a delta whose base digest its carrier gives
_HADAMARD = 1  # the rotation byte of a rotated record (fedsqueeze.codec.spec.Rotation)

# Stable wire codes of dtypes; never renumber (golden vectors pin them).
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float64: 4,
    torch.int64: 5,
    torch.int32: 6,
    torch.int16: 7,
    torch.int8: 8,
    torch.uint8: 9,
    torch.bool: 10,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class RecordFlags(IntFlag):
    """Bits of a record's first byte."""

    NAMED = 0x01  # name, dtype and shape follow (else an index into the base)
    SPARSE = 0x02  # a positions header and payload are present
    QUANT = 0x04  # values are quantization codes
    ENTROPY = 0x08  # the body is zstd-compressed
    DELTA = 0x10  # values are a difference to the base tensor
    LEVEL = 0x20  # a refinement level follows (progressive transmission)
    ZERO = 0x40  # no values: the tensor equals its base (delta) or is all zeros
    LOWRANK = 0x80  # a rank follows; the values are two factors whose product is the tensor


# The flags as plain ints, for parsing: IntFlag's operators make enum members (18k calls
# per 20 parses of MiniLM; with the byte reader's inlined reads, 5.2 -> 1.4 ms a parse).
_NAMED = int(RecordFlags.NAMED)
_SPARSE = int(RecordFlags.SPARSE)
_QUANT = int(RecordFlags.QUANT)
_ENTROPY = int(RecordFlags.ENTROPY)
_DELTA = int(RecordFlags.DELTA)
_LEVEL = int(RecordFlags.LEVEL)
_ZERO = int(RecordFlags.ZERO)
_LOWRANK = int(RecordFlags.LOWRANK)


class ValueKind(IntEnum):
    """How unquantized values are stored (the value-format byte when not QUANT)."""

    RAW = 0  # the tensor's own dtype, bit-exact
    XOR = 1  # bit-exact: the bits XOR the base tensor's bits (lossless delta)
    FP32 = 2
    FP16 = 3
    BF16 = 4
    GROUPED = 5  # bit-exact, byte-grouped planes (version 4)
    GROUPED_XOR = 6  # bit-exact: the XOR with the base's bits, byte-grouped (version 4)


#: Value kinds whose body is byte-grouped (:mod:`fedsqueeze.codec.grouping`).
GROUPED_KINDS = (ValueKind.GROUPED, ValueKind.GROUPED_XOR)
FLOAT_KINDS = {
    FloatFormat.FP32: ValueKind.FP32,
    FloatFormat.FP16: ValueKind.FP16,
    FloatFormat.BF16: ValueKind.BF16,
}


#: Widest element a body stores (float64, int64).
_MAX_ITEMSIZE = 8


def max_body_bytes(numel: int) -> int:
    """The longest body (before entropy coding) any record of ``numel`` elements has.

    Dense values take at most ``8·numel`` bytes; sparse ones at most ``4·numel`` (float32)
    plus the positions, which never exceed :func:`max_payload_bytes`.
    """
    return _MAX_ITEMSIZE * numel + max_payload_bytes(numel)


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds that hostile input cannot make the decoder exceed (checked before allocating)."""

    max_tensors: int = 100_000
    max_elements: int = 1 << 28  # per tensor: 1 GiB of fp32
    max_total_elements: int = 1 << 30
    max_name_bytes: int = 1024
    max_ndim: int = 8
    max_rank: int = MAX_RANK

    def count(self, name: str, shape: tuple[int, ...], total: int) -> int:
        """The model's element count with tensor ``name`` of ``shape`` added to ``total``.

        Raises
        ------
        LimitExceededError
            If the tensor or the model would pass the limits.
        """
        numel = 1
        for d in shape:
            numel *= d
        total += numel
        if numel > self.max_elements or total > self.max_total_elements:
            raise LimitExceededError(
                f"tensor {name!r} brings the model to {total} elements (limits: "
                f"{self.max_elements} per tensor, {self.max_total_elements} in all)"
            )
        return total


@dataclass(frozen=True)
class QuantHeader:
    """The quantization part of a record header."""

    bits: int
    scheme: QuantScheme
    granularity: Granularity
    params: bytes  # the serialized QuantParams (see fedsqueeze.codec.quantization)
    block_size: int = 0  # PER_BLOCK: values per block
    scale_format: ScaleFormat = ScaleFormat.FP32  # PER_BLOCK: how the scales are stored
    blocks: int = 0  # PER_BLOCK: number of blocks (parameter sets)
    rotation_seed: int | None = None  # rotated values (Hadamard, version 6): their seed

    @property
    def needs_v3(self) -> bool:
        """Whether this header exists only in format version 3 (block-wise or NF4)."""
        return self.granularity is Granularity.PER_BLOCK or self.scheme is QuantScheme.NF4


@dataclass(frozen=True)
class PositionsHeader:
    """The sparse-positions part of a record header."""

    coding: int  # fedsqueeze.codec.positions.PositionCoding value (< 8)
    rice_k: int  # Golomb-Rice parameter (< 32); shares one byte with ``coding``
    count: int  # number of kept values
    payload_bytes: int


@dataclass(frozen=True)
class TensorRecord:
    """One encoded tensor: its header fields and its (possibly compressed) body."""

    name: str | None  # None until an index-coded record is resolved against its base
    index: int | None  # index in the base's sorted names, when not named
    dtype: torch.dtype | None
    shape: tuple[int, ...] | None
    delta: bool
    level: int
    quant: QuantHeader | None
    value_kind: ValueKind  # meaningful when quant is None
    positions: PositionsHeader | None
    raw_length: int | None  # body length before entropy coding, when compressed
    body: bytes | memoryview  # parsed from bytes: a read-only view into them
    zero: bool = False  # no values at all: base unchanged (delta) or zeros
    rank: int = 0  # > 0: the values are low-rank factors (LOWRANK)
    levels: tuple[int, ...] = ()  # level 0 of a progressive tensor: bits per level
    group: int | None = None  # a refinement of a grown tensor: its position group
    plane: int = 0  # ... and the group's plane it holds (0: the group's positions too)
    ans: bool = False  # the body is the rANS coding of the codes (version 8; of a
    # refinement's plane, after its positions and table: version 9)
    #: A refinement whose plane is in *context order* (version 11): its values sorted,
    #: stably, by the coarser code bits each already holds, so the plane's bits that
    #: depend on them come in runs a byte coder sees (written as the LOWRANK bit, which
    #: a refinement never has otherwise).
    context_order: bool = False
    # A byte-grouped body that codes a plane in buckets (version 10); when parsed: one
    # that may (the container is version 10 or later). Not part of equality.
    buckets: bool = field(default=False, compare=False)
    # A byte-grouped body that codes planes jointly (version 12); when parsed: one that
    # may. Not part of equality.
    joint: bool = field(default=False, compare=False)

    @property
    def progressive(self) -> bool:
        """Whether this record is a level of a progressive tensor (needs version 2)."""
        return bool(self.levels) or self.level > 0

    @property
    def needs_v7(self) -> bool:
        """Whether this record needs format version 7 (a refinement of a grown tensor)."""
        return self.group is not None

    @property
    def needs_v10(self) -> bool:
        """Whether this record needs format version 10 (a grouped plane in buckets)."""
        return self.buckets and self.quant is None and self.value_kind in GROUPED_KINDS

    @property
    def needs_v12(self) -> bool:
        """Whether this record needs format version 12 (grouped planes coded jointly)."""
        return self.joint and self.quant is None and self.value_kind in GROUPED_KINDS

    @property
    def needs_v9(self) -> bool:
        """Whether this record needs format version 9 (an ANS-coded refinement)."""
        return self.ans and self.level > 0

    @property
    def needs_v3(self) -> bool:
        """Whether this record needs format version 3 (block-wise or NF4 quantization)."""
        return self.quant is not None and self.quant.needs_v3

    @property
    def needs_v4(self) -> bool:
        """Whether this record needs format version 4 (byte-grouped values)."""
        return self.quant is None and self.value_kind in GROUPED_KINDS

    @property
    def rotated(self) -> bool:
        """Whether this record's values are rotated (needs format version 6)."""
        return self.quant is not None and self.quant.rotation_seed is not None

    @property
    def numel(self) -> int:
        """Number of elements of the decoded tensor (shape must be known)."""
        if self.shape is None:
            raise FormatError("record is not resolved against its base")
        n = 1
        for d in self.shape:
            n *= d
        return n

    def to_bytes(self) -> bytes:
        """The record's bytes in the container."""
        return self.header_bytes() + self.body

    def header_bytes(self, body_length: int | None = None) -> bytes:
        """The record's bytes before its body (the body follows unchanged).

        ``body_length`` stands for ``len(self.body)`` when the body is kept elsewhere
        (a streaming encoder spools bodies and keeps records without them).
        """
        length = len(self.body) if body_length is None else body_length
        out = bytearray()
        flags = RecordFlags(0)
        if self.index is None:
            flags |= RecordFlags.NAMED
        if self.positions is not None:
            flags |= RecordFlags.SPARSE
        if self.quant is not None or (self.level > 0 and self.group is not None):
            flags |= RecordFlags.QUANT
        if self.raw_length is not None or self.ans:
            flags |= RecordFlags.ENTROPY
        if self.delta:
            flags |= RecordFlags.DELTA
        if self.progressive:
            flags |= RecordFlags.LEVEL
        if self.zero:
            flags |= RecordFlags.ZERO
        if self.rank or (self.level > 0 and self.context_order):
            flags |= RecordFlags.LOWRANK
        out.append(int(flags))
        if self.index is None:
            if self.name is None or self.dtype is None or self.shape is None:
                raise ValueError("a named record needs name, dtype and shape")
            raw_name = self.name.encode()
            write_varint(out, len(raw_name))
            out += raw_name
            out.append(DTYPE_CODES[self.dtype])
            out.append(len(self.shape))
            for dim in self.shape:
                write_varint(out, dim)
        else:
            write_varint(out, self.index)
        if self.progressive:
            write_varint(out, self.level)
            if self.level == 0:
                out.append(len(self.levels))
                out += bytes(self.levels)
        if self.zero:
            return bytes(out)
        if self.level > 0:  # a refinement: everything else is in its level-0 record
            if self.group is not None:
                write_varint(out, self.group)
                write_varint(out, self.plane)
                if self.positions is not None:
                    p = self.positions
                    out.append((p.coding << 5) | p.rice_k)
                    write_varint(out, p.count)
                    write_varint(out, p.payload_bytes)
            if self.ans:
                out.append(0)  # a raw length of 0: the ANS coder's body (version 9)
            elif self.raw_length is not None:
                write_varint(out, self.raw_length)
            write_varint(out, length)
            return bytes(out)
        if self.rank:
            write_varint(out, self.rank)
        if self.quant is not None:
            q = self.quant
            if q.rotation_seed is not None:
                out.append(q.bits)  # scheme field 0, no 0x80: the rotation prefix
                out.append(_HADAMARD)
                out += q.rotation_seed.to_bytes(4, "little")
            if q.granularity is Granularity.PER_BLOCK:
                out.append(q.bits | _EXTENDED_QUANT)
                out.append(q.scheme.value)
                write_varint(out, q.block_size)
                out.append(q.scale_format.value)
                write_varint(out, q.blocks)
            else:
                per_channel = 0x80 if q.granularity is Granularity.PER_CHANNEL else 0
                out.append(q.bits | (q.scheme.value << 4) | per_channel)
            out += q.params
        else:
            out.append(int(self.value_kind))
        if self.positions is not None:
            p = self.positions
            out.append((p.coding << 5) | p.rice_k)
            write_varint(out, p.count)
            write_varint(out, p.payload_bytes)
        if self.ans:
            out.append(0)  # a raw length of 0: the ANS coder's body
        elif self.raw_length is not None:
            write_varint(out, self.raw_length)
        write_varint(out, length)
        return bytes(out)


def _read_body(
    reader: ByteReader, flags: int, limits: DecodeLimits
) -> tuple[int | None, bytes | memoryview]:
    """A record's tail: the raw body length (entropy-coded bodies only) and the body.

    The body of a record parsed from immutable ``bytes`` is a view into them (bodies
    are nearly all of a model's bytes, and copying them cost a third of decoding a
    large lossless model); from anything writable it is a copy, so that later writes
    to the caller's buffer cannot change a parsed record.
    """
    raw_length: int | None = None
    if flags & _ENTROPY:
        raw_length = reader.varint("raw body length", max_body_bytes(limits.max_elements))
    # Bounded by what is left: take() refuses more (a prefix ends in TruncatedError).
    body_len = reader.varint("body length")
    view = reader.body(body_len)
    return raw_length, view if isinstance(view.obj, bytes) else bytes(view)


def parse_record(
    reader: ByteReader,
    limits: DecodeLimits,
    qparams_size: QParamsSizer,
    version: int = FORMAT_VERSION,
) -> TensorRecord:
    """Read one record at the reader's position (``version`` from the model's header)."""
    flags = reader.u8("record flags")
    name: str | None = None
    index: int | None = None
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] | None = None
    if flags & _NAMED:
        name_len = reader.varint("name length", limits.max_name_bytes)
        try:
            name = bytes(reader.take(name_len, "tensor name")).decode()
        except UnicodeDecodeError as exc:
            raise FormatError("tensor name is not UTF-8") from exc
        code = reader.u8("dtype")
        if code not in CODE_DTYPES:
            raise FormatError(f"unknown dtype code {code}")
        dtype = CODE_DTYPES[code]
        ndim = reader.u8("ndim")
        if ndim > limits.max_ndim:
            raise LimitExceededError(f"tensor {name!r} has {ndim} dims (max {limits.max_ndim})")
        dims = tuple(reader.varint("dimension", limits.max_elements) for _ in range(ndim))
        numel = 1
        for d in dims:
            numel *= d
        if numel > limits.max_elements:
            raise LimitExceededError(
                f"tensor {name!r} claims {numel} elements (max {limits.max_elements})"
            )
        shape = dims
    else:
        index = reader.varint("tensor index", limits.max_tensors)
    level = 0
    plan: tuple[int, ...] = ()
    if flags & _LEVEL:
        if version < PROGRESSIVE_VERSION:
            raise FormatError(f"a level record in a version {version} stream")
        # From version 6 a grown tensor's level is its step in a chain of groups' planes.
        most = MAX_GROUPS * MAX_LEVELS if version >= SUPPORT_LEVELS_VERSION else MAX_LEVELS
        level = reader.varint("level", most - 1)
        if level == 0:
            count = reader.u8("level count")
            if not 2 <= count <= MAX_LEVELS:
                raise FormatError(f"a progressive tensor of {count} levels")
            plan = tuple(bytes(reader.take(count, "level bits")))
            if any(not 1 <= b <= 4 for b in plan) or sum(plan) not in (2, 3, 4, 8):
                raise FormatError(f"invalid levels {'+'.join(map(str, plan))}")
        else:
            return _parse_refinement(reader, flags, index, level, limits, version)
    if flags & _ZERO:
        if flags & (_SPARSE | _QUANT | _ENTROPY | _LOWRANK):
            raise FormatError("a zero record carries no values")
        return TensorRecord(
            name,
            index,
            dtype,
            shape,
            bool(flags & _DELTA),
            level,
            None,
            ValueKind.RAW,
            None,
            None,
            b"",
            zero=True,
        )
    if plan and flags & (_ZERO | _LOWRANK):
        raise FormatError("a progressive tensor's base level is neither zero nor low-rank")
    if plan and not flags & _QUANT:
        raise FormatError("levels refine quantization codes: the base level must be QUANT")
    rank = 0
    if flags & _LOWRANK:
        if flags & _SPARSE:
            raise FormatError("a low-rank record has no positions")
        rank = reader.varint("rank", limits.max_rank)
        if rank < 1:
            raise FormatError("a low-rank record of rank 0")
    quant: QuantHeader | None = None
    value_kind = ValueKind.RAW
    if flags & _QUANT:
        desc = reader.u8("quantization descriptor")
        seed: int | None = None
        if desc & 0xF0 == 0:  # the rotation prefix
            if version < ROTATED_VERSION:
                raise FormatError(f"a rotated record in a version {version} stream")
            if flags & (_SPARSE | _LOWRANK):
                raise FormatError("a rotated record is dense and full rank")
            kind = reader.u8("rotation")
            if kind != _HADAMARD:
                raise FormatError(f"unknown rotation {kind}")
            seed = int.from_bytes(reader.take(4, "rotation seed"), "little")
            inner = reader.u8("quantization descriptor")
            if inner & 0x0F != desc & 0x0F or inner & 0xF0 == 0:
                raise FormatError("a rotation prefix and its descriptor disagree")
            desc = inner
        bits = desc & 0x0F
        if bits not in (2, 3, 4, 8):
            raise FormatError(f"unsupported quantization bit width {bits}")
        if plan and sum(plan) != bits:
            raise FormatError(f"levels {'+'.join(map(str, plan))} do not add up to {bits} bits")
        if desc & 0xF0 == _EXTENDED_QUANT:
            if version < BLOCKWISE_VERSION:
                raise FormatError(f"a block-wise record in a version {version} stream")
            if rank:
                raise FormatError("low-rank factors are quantized per tensor")
            quant = _parse_blocks(reader, bits, limits)
        else:
            try:
                scheme = QuantScheme((desc >> 4) & 0x07)
            except ValueError as exc:
                raise FormatError(f"unknown quantization scheme in 0x{desc:02x}") from exc
            if scheme is QuantScheme.NF4 and (version < BLOCKWISE_VERSION or bits != 4):
                raise FormatError(f"an NF4 record of {bits} bits in a version {version} stream")
            granularity = Granularity.PER_CHANNEL if desc & 0x80 else Granularity.PER_TENSOR
            if granularity is Granularity.PER_CHANNEL and rank:
                raise FormatError("low-rank factors are quantized per tensor")
            if granularity is Granularity.PER_CHANNEL and (shape is None and index is None):
                raise FormatError("per-channel record without a shape")
            size = qparams_size(bits, scheme, granularity, shape, index)
            params = bytes(reader.take(size, "quantization parameters")) if size >= 0 else b""
            if size < 0:
                # Shape unknown until resolved: the sizer cannot know the channel count.
                raise FormatError("per-channel index-coded record cannot be parsed without base")
            quant = QuantHeader(bits, scheme, granularity, params)
        if seed is not None:
            quant = replace(quant, rotation_seed=seed)
    else:
        kind = reader.u8("value kind")
        last = ValueKind.GROUPED_XOR if version >= GROUPED_VERSION else ValueKind.BF16
        if kind > int(last):
            raise FormatError(f"unknown value kind {kind} in a version {version} stream")
        value_kind = ValueKind(kind)
        if rank and value_kind in (ValueKind.RAW, ValueKind.XOR, *GROUPED_KINDS):
            raise FormatError("low-rank factors are floats or quantization codes")
        others = _SPARSE | _ENTROPY | _LEVEL
        if value_kind in GROUPED_KINDS and flags & others:
            raise FormatError("byte-grouped values are dense, their own entropy coding, unleveled")
        if (value_kind is ValueKind.GROUPED_XOR) != bool(
            value_kind in GROUPED_KINDS and flags & _DELTA
        ):
            raise FormatError("byte-grouped XOR values are exactly the delta grouped records")
    positions: PositionsHeader | None = None
    if flags & _SPARSE:
        packed = reader.u8("position coding")
        coding, rice_k = packed >> 5, packed & 0x1F
        count = reader.varint("kept count", limits.max_elements)
        # Measured in the body *before* entropy coding, so it may exceed what is left of
        # a compressed body (an all-zero bitmap shrinks to a few bytes); the decoder checks
        # it against the record's own element count before decompressing.
        pos_bytes = reader.varint("positions length", max_payload_bytes(limits.max_elements))
        positions = PositionsHeader(coding, rice_k, count, pos_bytes)
    raw_length, body = _read_body(reader, flags, limits)
    ans = version >= ANS_VERSION and raw_length == 0
    if ans:
        if quant is None or flags & (_SPARSE | _LEVEL):
            raise FormatError("an ANS body holds a dense record's quantization codes only")
        raw_length = None
    return TensorRecord(
        name=name,
        index=index,
        dtype=dtype,
        shape=shape,
        delta=bool(flags & _DELTA),
        level=level,
        quant=quant,
        value_kind=value_kind,
        positions=positions,
        raw_length=raw_length,
        body=body,
        rank=rank,
        levels=plan,
        ans=ans,
        buckets=version >= BUCKETS_VERSION and quant is None and value_kind in GROUPED_KINDS,
        joint=version >= JOINT_VERSION and quant is None and value_kind in GROUPED_KINDS,
    )


def _parse_blocks(reader: ByteReader, bits: int, limits: DecodeLimits) -> QuantHeader:
    """The rest of an extended (block-wise) quantization header, after its descriptor."""
    code = reader.u8("quantization scheme")
    try:
        scheme = QuantScheme(code)
    except ValueError as exc:
        raise FormatError(f"unknown quantization scheme {code}") from exc
    if scheme is QuantScheme.KMEANS or (scheme is QuantScheme.NF4 and bits != 4):
        raise FormatError(f"{scheme.name} with {bits} bits is not block-wise")
    block_size = reader.varint("block size", MAX_BLOCK)
    if block_size < MIN_BLOCK:
        raise FormatError(f"block size {block_size} (at least {MIN_BLOCK})")
    fmt_code = reader.u8("scale format")
    try:
        scale_format = ScaleFormat(fmt_code)
    except ValueError as exc:
        raise FormatError(f"unknown scale format {fmt_code}") from exc
    # Bounded before the params are sized: the element limit caps the block count.
    blocks = reader.varint("block count", num_blocks(limits.max_elements, block_size))
    if blocks < 1:
        raise FormatError("a block-wise record of no blocks")
    size = qparams_nbytes(bits, scheme, blocks, scale_format)
    params = bytes(reader.take(size, "block quantization parameters"))
    return QuantHeader(
        bits, scheme, Granularity.PER_BLOCK, params, block_size, scale_format, blocks
    )


def _parse_refinement(
    reader: ByteReader,
    flags: int,
    index: int | None,
    level: int,
    limits: DecodeLimits,
    version: int,
) -> TensorRecord:
    """The rest of a refinement record (level ≥ 1), after its level."""
    allowed = _LEVEL | _ENTROPY
    if version >= SUPPORT_LEVELS_VERSION:
        allowed |= _QUANT | _SPARSE
    if version >= ROW_TIERS_VERSION:
        allowed |= _LOWRANK  # a plane in context order
    if index is None or flags & ~allowed:
        raise FormatError(
            f"a level-{level} record refers to its base level by index and has no "
            f"flags but ENTROPY (got 0x{int(flags):02x})"
        )
    group: int | None = None
    plane = 0
    positions: PositionsHeader | None = None
    if flags & _QUANT:
        group = reader.varint("position group", MAX_GROUPS - 1)
        plane = reader.varint("plane", MAX_LEVELS - 1)
        if (plane == 0) != bool(flags & _SPARSE) or (plane == 0 and group == 0):
            raise FormatError(
                "a refinement brings positions exactly when it opens a new group (plane 0 "
                "of a group after the first)"
            )
        if flags & _SPARSE:
            packed = reader.u8("position coding")
            count = reader.varint("kept count", limits.max_elements)
            pos_bytes = reader.varint("positions length", max_payload_bytes(limits.max_elements))
            positions = PositionsHeader(packed >> 5, packed & 0x1F, count, pos_bytes)
    elif flags & _SPARSE:
        raise FormatError("a refinement with positions names its group (QUANT flag)")
    raw_length, body = _read_body(reader, flags, limits)
    ans = version >= PLANE_ANS_VERSION and raw_length == 0
    ordered = bool(flags & _LOWRANK)
    if ordered and (ans or positions is not None):
        raise FormatError("a plane in context order is neither ANS-coded nor a group's first plane")
    return TensorRecord(
        None, index, None, None, False, level, None, ValueKind.RAW, positions,
        None if ans else raw_length, body, group=group, plane=plane, ans=ans,
        context_order=ordered,
    )  # fmt: skip


class QParamsSizer:
    """Tells the parser how many bytes a record's quantization parameters take.

    Per-channel parameters depend on the channel count, so index-coded records need the
    base's shapes: ``base_shapes`` gives them in the base's sorted-name order.
    """

    def __init__(self, base_shapes: list[tuple[int, ...]] | None = None) -> None:
        self._base_shapes = base_shapes

    def __call__(
        self,
        bits: int,
        scheme: QuantScheme,
        granularity: Granularity,
        shape: tuple[int, ...] | None,
        index: int | None,
    ) -> int:
        channels = 1
        if granularity is Granularity.PER_CHANNEL:
            if shape is None:
                if self._base_shapes is None or index is None:
                    return -1
                if index >= len(self._base_shapes):
                    raise FormatError(f"tensor index {index} beyond the base's tensors")
                shape = self._base_shapes[index]
            if not shape:
                raise FormatError("per-channel quantization of a scalar")
            channels = shape[0]
        return qparams_nbytes(bits, scheme, channels)


def qparams_nbytes(
    bits: int, scheme: QuantScheme, channels: int, scale_format: ScaleFormat = ScaleFormat.FP32
) -> int:
    """Serialized size of quantization parameters (see ``qparams_to_bytes``)."""
    if scheme is QuantScheme.KMEANS:
        return 2 << bits  # float16 codebook of 2^bits entries
    if scheme is QuantScheme.POW2:
        return channels  # int8 shifts
    scales = scale_bytes(scale_format, channels)
    # AFFINE adds a u8 zero point per parameter set
    return scales + channels if scheme is QuantScheme.AFFINE else scales


@dataclass(frozen=True)
class ContainerHeader:
    """The model-level header."""

    version: int
    base_digest: bytes | None
    spec: CodecSpec
    record_count: int
    #: Version 2: how many of the records are base-level (level 0) ones; they come first.
    base_records: int = 0
    #: Version 8: a delta whose base digest is left out (``base_digest`` is then
    #: ``None`` when parsed, until the reader supplies it).
    implied_base: bool = False
    #: Version 11: the lookup tables whose rows travel in tiers, each tier a tensor of
    #: the stream (:mod:`fedsqueeze.codec.row_tiers`).
    splits: tuple[RowSplit, ...] = ()

    def to_bytes(self, omit_base: bool = False) -> bytes:
        """Header bytes: magic, version, flags, [base digest], spec, record count and, in
        version 2, the count of base-level records. ``omit_base``: a version 8 delta
        leaves its base digest out (the *implied base* flag instead)."""
        out = bytearray(MAGIC)
        out.append(self.version)
        implied = self.implied_base or (omit_base and self.base_digest is not None)
        if implied and self.version < ANS_VERSION:
            raise ValueError(f"a version {self.version} stream names its base")
        if implied:
            out.append(_IMPLIED_BASE)
        else:
            out.append(_HAS_BASE if self.base_digest is not None else 0)
        if self.base_digest is not None and not implied:
            out += self.base_digest
        out += self.spec.to_bytes()
        write_varint(out, self.record_count)
        if self.version >= PROGRESSIVE_VERSION:
            write_varint(out, self.base_records)
        if self.version >= ROW_TIERS_VERSION:
            if self.base_digest is not None and any(s.deferred for s in self.splits):
                raise ValueError("a delta has no deferred tiers")
            write_splits(
                out,
                self.splits,
                deferring=self.version >= DEFERRED_VERSION,
                wide=self.version >= WIDE_TIERS_VERSION,
            )
        elif self.splits:
            raise ValueError(f"a version {self.version} stream has no row tiers")
        return bytes(out)


def parse_header(reader: ByteReader, limits: DecodeLimits) -> ContainerHeader:
    """Read the model-level header."""
    if bytes(reader.take(3, "magic")) != MAGIC:
        raise FormatError("not a fedsqueeze encoded model (bad magic)")
    version = reader.u8("format version")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersionError(
            f"format version {version}; this build reads versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}"
        )
    flags = reader.u8("model flags")
    known = _HAS_BASE | (_IMPLIED_BASE if version >= ANS_VERSION else 0)
    if flags & ~known or flags == _HAS_BASE | _IMPLIED_BASE:
        raise FormatError(f"unknown model flags 0x{flags:02x}")
    base = bytes(reader.take(32, "base digest")) if flags & _HAS_BASE else None
    data = bytes(reader.take(min(reader.remaining, 1 << 16), "spec"))
    spec, used = CodecSpec.parse(data, 0)
    reader.pos -= len(data) - used
    per_tensor = MAX_LEVELS * (MAX_GROUPS if version >= SUPPORT_LEVELS_VERSION else 1)
    count = reader.varint("record count", limits.max_tensors * (per_tensor + 1))
    base_records = count
    if version >= PROGRESSIVE_VERSION:
        base_records = reader.varint("base-level record count", min(count, limits.max_tensors))
    elif count > limits.max_tensors:
        raise FormatError(f"record count {count} exceeds the limit {limits.max_tensors}")
    splits: tuple[RowSplit, ...] = ()
    if version >= ROW_TIERS_VERSION:
        splits = parse_splits(
            reader, min(base_records, limits.max_tensors), limits.max_elements,
            limits.max_name_bytes, deferring=version >= DEFERRED_VERSION,
            wide=version >= WIDE_TIERS_VERSION,
        )  # fmt: skip
        if flags & (_HAS_BASE | _IMPLIED_BASE) and any(s.deferred for s in splits):
            raise FormatError("a delta with deferred tiers")
    return ContainerHeader(
        version,
        base,
        spec,
        count,
        base_records,
        implied_base=bool(flags & _IMPLIED_BASE),
        splits=splits,
    )


__all__ = [
    "ANS_VERSION",
    "BLOCKWISE_VERSION",
    "BUCKETS_VERSION",
    "CODE_DTYPES",
    "DEFERRED_VERSION",
    "DTYPE_CODES",
    "FLOAT_KINDS",
    "FORMAT_VERSION",
    "GLOBAL_ORDER_VERSION",
    "GROUPED_KINDS",
    "GROUPED_VERSION",
    "JOINT_VERSION",
    "MAX_GROUPS",
    "PLANE_ANS_VERSION",
    "PROGRESSIVE_VERSION",
    "ROTATED_VERSION",
    "ROW_TIERS_VERSION",
    "SUPPORTED_VERSIONS",
    "SUPPORT_LEVELS_VERSION",
    "WIDE_TIERS_VERSION",
    "ContainerHeader",
    "DecodeLimits",
    "PositionsHeader",
    "QParamsSizer",
    "QuantHeader",
    "RecordFlags",
    "TensorRecord",
    "ValueKind",
    "crc32",
    "max_body_bytes",
    "parse_header",
    "parse_record",
    "qparams_nbytes",
]
