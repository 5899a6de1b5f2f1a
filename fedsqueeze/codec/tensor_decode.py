"""Decoding of one :class:`~fedsqueeze.codec.container.TensorRecord` back into a tensor.

Every size is checked against the record's header before anything is allocated: a
record can only produce a tensor whose element count it declared and the limits allow,
and its body must be exactly as long as its header implies.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import torch

from fedsqueeze.codec import ans, dense_decode, entropy, fused, jit, plane_ans
from fedsqueeze.codec.bitpack import pack_bits, packed_size, unpack_bits
from fedsqueeze.codec.bits import xor_bits, xor_into
from fedsqueeze.codec.blockwise import num_blocks
from fedsqueeze.codec.container import (
    CODE_DTYPES,
    DTYPE_CODES,
    GROUPED_KINDS,
    TensorRecord,
    ValueKind,
)
from fedsqueeze.codec.grouping import decode_grouped
from fedsqueeze.codec.kernels import scatter
from fedsqueeze.codec.lowrank import factor_count, matrix_shape, pays_off
from fedsqueeze.codec.positions import PositionCoding, decode_positions, max_payload_bytes
from fedsqueeze.codec.progressive import (
    cumulative_bits,
    reconstruct,
    table_entries,
    table_from_bytes,
)
from fedsqueeze.codec.quantization import QuantParams, Runs, dequantize, qparams_from_bytes
from fedsqueeze.codec.rotation import unrotate
from fedsqueeze.codec.spec import Granularity
from fedsqueeze.errors import BaseMismatchError, FormatError

_VALUE_DTYPES = {
    ValueKind.FP32: torch.float32,
    ValueKind.FP16: torch.float16,
    ValueKind.BF16: torch.bfloat16,
}


def _read_only_uint8(data: bytes | memoryview) -> torch.Tensor:
    """A uint8 tensor over ``data`` without copying it.

    Only for inputs that are consumed into new tensors (codes, positions): the result
    aliases immutable memory and must never be written to or returned to a caller.
    """
    if not len(data):
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8)


def _bytes_to_tensor(
    data: bytes | memoryview, dtype: torch.dtype, count: int, device: torch.device
) -> torch.Tensor:
    """``count`` elements of ``dtype`` from exactly matching bytes."""
    width = torch.empty((), dtype=dtype).element_size()
    if len(data) != count * width:
        raise FormatError(
            f"value payload is {len(data)} bytes, expected {count} × {width} for {dtype}"
        )
    raw = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.empty(0, dtype=torch.uint8)
    )
    view_dtype = torch.uint8 if dtype == torch.bool else dtype
    out = raw.view(view_dtype)
    if dtype == torch.bool:
        if bool((out > 1).any()):
            raise FormatError("boolean tensor holds values other than 0 and 1")
        out = out.to(torch.bool)
    return out.to(device)


def _spread(
    values: torch.Tensor, indices: torch.Tensor, numel: int, device: torch.device
) -> torch.Tensor:
    """A dense float32 ``[numel]`` of zeros with ``values`` at ``indices``. On the CPU, large:
    NumPy's zeroed memory (huge pages: torch's 4 KiB pages cost 36 ms of first touches
    on a 100 MB tensor) and the compiled scatter (:func:`~fedsqueeze.codec.kernels.scatter`)."""
    if (
        device.type == values.device.type == indices.device.type == "cpu"
        and values.dtype == torch.float32
        and jit.use(indices.numel())
    ):
        dense = torch.from_numpy(np.zeros(numel, dtype=np.float32))
        scatter(dense, indices, values)
        return dense
    out = torch.zeros(numel, dtype=torch.float32, device=device)
    out[indices] = values
    return out


class TensorDecoder:
    """Decodes the records of one model against an optional base."""

    def __init__(
        self, base: Mapping[str, torch.Tensor] | None, device: torch.device | None
    ) -> None:
        self._base = base or {}
        self._names = sorted(self._base)
        self._device = device

    def resolve(self, record: TensorRecord) -> tuple[str, torch.dtype, tuple[int, ...]]:
        """Name, dtype and shape of a record (index-coded ones from the base)."""
        if record.index is None:
            if record.name is None or record.dtype is None or record.shape is None:
                raise FormatError("named record without name, dtype or shape")
            return record.name, record.dtype, record.shape
        if record.index >= len(self._names):
            raise BaseMismatchError(
                f"record refers to base tensor #{record.index}, the base has {len(self._names)}"
            )
        name = self._names[record.index]
        b = self._base[name]
        return name, b.dtype, tuple(b.shape)

    def decode(self, record: TensorRecord) -> tuple[str, torch.Tensor | ProgressiveTensor]:
        """Decode one record into (name, tensor); a progressive tensor's base level gives a
        :class:`ProgressiveTensor` for its refinements to complete."""
        name, dtype, shape = self.resolve(record)
        if dtype not in DTYPE_CODES:
            raise FormatError(f"unsupported dtype {dtype}")
        numel = 1
        for d in shape:
            numel *= d
        base = self._base.get(name) if record.delta else None
        if record.delta:
            if base is None:
                raise BaseMismatchError(f"delta record {name!r} but the base has no such tensor")
            if tuple(base.shape) != shape or base.dtype != dtype:
                raise BaseMismatchError(f"base tensor {name!r} does not match the record")
        device = self._device or (base.device if base is not None else torch.device("cpu"))
        if record.zero:
            if base is not None:
                return name, base.to(device).clone()
            return name, torch.zeros(shape, dtype=dtype, device=device)
        if record.quant is None and record.value_kind in GROUPED_KINDS:
            # Its own table bounds every plane by numel (checked in decode_grouped).
            xor = record.value_kind is ValueKind.GROUPED_XOR
            if xor and base is None:
                raise FormatError(f"record {name!r}: XOR values without a delta flag")
            # A delta's XOR with a base in host memory: chunk by chunk, inside the decode;
            # with one on a device, there, after the copy (never the base copied back).
            inside = base if xor and base is not None and base.device.type == "cpu" else None
            values = decode_grouped(record.body, dtype, numel, record.buckets, record.joint, inside)
            values = values.reshape(shape).to(device)
            if xor and inside is None and base is not None:
                xor_into(values, base.to(device))  # values are fresh: no second buffer
            return name, values
        if record.ans:
            record = _unans(record, name, shape, numel)
        # The header fixes the body's exact length: check it before decompressing, so a
        # hostile length never drives an allocation.
        expected = _body_length(record, name, dtype, shape, numel)
        actual = len(record.body) if record.raw_length is None else record.raw_length
        if actual != expected:
            raise FormatError(
                f"record {name!r}: body is {actual} bytes, its header implies {expected}"
            )
        body: bytes | memoryview = record.body
        seed = None if record.quant is None else record.quant.rotation_seed
        dense = self._dense(record, name, shape, numel, device)
        if dense is not None:
            return name, _finish(dense, shape, base, dtype, device, name, seed)
        if record.raw_length is not None:
            body = entropy.decompress(body, record.raw_length)
        if record.rank:
            return name, self._lowrank(record, name, body, shape, dtype, base, device)
        indices, kept, body = _positions(record, name, body, numel, device)
        if record.levels:
            return name, self._progressive(record, name, body, kept, shape, indices, dtype, device)
        values = self._values(record, name, body, kept, shape, indices, dtype, device)
        if record.quant is None and record.value_kind in (ValueKind.RAW, ValueKind.XOR):
            if indices is not None:
                raise FormatError(f"record {name!r}: raw values cannot be sparse")
            out = values.reshape(shape)
            if record.value_kind is ValueKind.XOR:
                if base is None:
                    raise FormatError(f"record {name!r}: XOR values without a delta flag")
                out = _xor(out, base.to(device))
            return name, out
        if indices is not None:
            values = _spread(values, indices, numel, device)
        return name, _finish(values, shape, base, dtype, device, name, seed)

    def _dense(
        self,
        record: TensorRecord,
        name: str,
        shape: tuple[int, ...],
        numel: int,
        device: torch.device,
    ) -> torch.Tensor | None:
        """The values of a large dense quantized record, decoded while its body is
        decompressed (:mod:`fedsqueeze.codec.dense_decode`); ``None`` for any other."""
        length = len(record.body) if record.raw_length is None else record.raw_length
        if (
            record.quant is None
            or length < dense_decode.PIPELINE_ABOVE
            or record.rank
            or record.positions is not None
            or record.levels
            or device.type != "cpu"
        ):
            return None
        qp, channels = _qparams(record, name, shape, numel, None, device)
        if not dense_decode.pipelines(qp, channels, length):
            return None
        runs = channels if isinstance(channels, Runs) else None
        return dense_decode.decode_dense(record.body, record.raw_length, numel, qp, runs)

    def _progressive(
        self,
        record: TensorRecord,
        name: str,
        body: bytes | memoryview,
        kept: int,
        shape: tuple[int, ...],
        indices: torch.Tensor | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> ProgressiveTensor:
        if record.quant is None or not dtype.is_floating_point:
            raise FormatError(f"record {name!r}: levels of a tensor that is not quantized")
        qp, channels = _qparams(record, name, shape, kept, indices, device)
        # The level tables gather per value.
        channels_of = channels.index(kept, device) if isinstance(channels, Runs) else channels
        base = self._base.get(name) if record.delta else None
        state = ProgressiveTensor(
            name, record.levels, qp, shape, dtype, kept, indices, channels_of,
            None if base is None else base.to(device), device, record.quant.rotation_seed,
            blocks=record.quant.granularity is Granularity.PER_BLOCK,
        )  # fmt: skip
        state.add_plane(0, body)
        return state

    def _lowrank(
        self,
        record: TensorRecord,
        name: str,
        body: bytes | memoryview,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        base: torch.Tensor | None,
        device: torch.device,
    ) -> torch.Tensor:
        if not dtype.is_floating_point:
            raise FormatError(f"record {name!r}: low-rank values for a {dtype} tensor")
        m, n = matrix_shape(shape)  # _body_length has checked the shape and the rank
        rank = record.rank
        values = self._values(
            record, name, body, factor_count(m, n, rank), shape, None, dtype, device
        )
        split = m * rank
        x = (values[:split].reshape(m, rank) @ values[split:].reshape(rank, n)).reshape(shape)
        if base is not None:
            x = base.to(device=device, dtype=torch.float32) + x
        return x.to(dtype)

    def _values(
        self,
        record: TensorRecord,
        name: str,
        body: bytes | memoryview,
        kept: int,
        shape: tuple[int, ...],
        indices: torch.Tensor | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> torch.Tensor:
        if record.quant is None:
            kind = record.value_kind
            stored = dtype if kind in (ValueKind.RAW, ValueKind.XOR) else _VALUE_DTYPES[kind]
            return _bytes_to_tensor(body, stored, kept, device).to(
                stored if kind in (ValueKind.RAW, ValueKind.XOR) else torch.float32
            )
        qp, channels_of = _qparams(record, name, shape, kept, indices, device)
        packed = _read_only_uint8(body)
        if fused.active(device) and fused.supports_decode(qp, channels_of):
            return fused.dequantize_packed(packed.to(device), qp, kept, channels_of)
        codes = unpack_bits(packed.to(device), record.quant.bits, kept)
        return dequantize(codes, qp, channels_of)


class _Group:
    """One position group of a progressive tensor: its values' code bits held so far."""

    __slots__ = ("channels_of", "count", "indices", "plane", "table", "top")

    def __init__(
        self, indices: torch.Tensor | None, channels_of: torch.Tensor | None, count: int
    ) -> None:
        self.indices = indices
        self.channels_of = channels_of
        self.count = count
        # Codes are at most 8 bits (QuantParams.bits): a byte per value, not int64.
        self.top = torch.zeros(count, dtype=torch.uint8, device=_device_of(indices))
        self.table: torch.Tensor | None = None
        self.plane = -1  # the highest plane held


def _device_of(t: torch.Tensor | None) -> torch.device:
    return t.device if t is not None else torch.device("cpu")


class ProgressiveTensor:
    """A progressive tensor being received: the code bits held so far and their table.

    Built from the base-level record by :meth:`TensorDecoder.decode`; each refinement
    record adds the next level (:meth:`refine`); :meth:`tensor` decodes what is held.
    With support levels (format version 7) the values come in position groups, each
    with its own planes and tables (:mod:`fedsqueeze.codec.support_levels`); a position
    no group holds yet decodes to zero (the base's value in a delta).
    """

    def __init__(
        self,
        name: str,
        levels: tuple[int, ...],
        qp: QuantParams,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        kept: int,
        indices: torch.Tensor | None,
        channels_of: torch.Tensor | None,
        base: torch.Tensor | None,
        device: torch.device,
        rotation_seed: int | None = None,
        *,
        blocks: bool = False,
    ) -> None:
        self.name = name
        self._rotation_seed = rotation_seed
        self.levels = levels
        self._blocks = blocks
        self._qp = qp
        self._shape = shape
        self._dtype = dtype
        self._device = device
        self._base = base
        self._numel = 1
        for d in shape:
            self._numel *= d
        self._groups = [_Group(indices, channels_of, kept)]
        self._groups[0].top = self._groups[0].top.to(device)
        self._held: torch.Tensor | None = None  # positions some group holds (grown only)
        #: The highest level held (−1 before the base level): the step in the chain.
        self.level = -1

    def refine(self, record: TensorRecord) -> None:
        """Add a refinement record; it must be the next level of this tensor."""
        if record.level != self.level + 1:
            raise FormatError(
                f"tensor {self.name!r}: level {record.level} after level {self.level}"
            )
        group, plane = (0, record.level) if record.group is None else (record.group, record.plane)
        if plane == 0:
            self._open_group(record, group)
            return
        if group >= len(self._groups) or plane != self._groups[group].plane + 1:
            raise FormatError(
                f"tensor {self.name!r}: plane {plane} of group {group}, which holds "
                f"{len(self._groups)} groups"
                + (
                    ""
                    if group >= len(self._groups)
                    else f", its group at plane {self._groups[group].plane}"
                )
            )
        if plane >= len(self.levels):
            raise FormatError(
                f"tensor {self.name!r}: level {plane} of a {len(self.levels)}-level plan"
            )
        g = self._groups[group]
        bits = self.levels[plane]
        table_bytes = 2 * table_entries(self.levels, plane)
        if record.ans:
            # The plane's contexts: the coarser bits this group's values hold.
            codes = self._ans_plane(record, table_bytes, bits, g.top, g.count)
            self._add_codes(g, plane, codes, memoryview(record.body)[:table_bytes])
        else:
            expected = packed_size(g.count, bits) + table_bytes
            body = _refinement_body(record, expected, self.name)
            self._add_plane(g, plane, body, record.context_order)
        self.level = record.level

    def _ans_plane(
        self, record: TensorRecord, head: int, bits: int, held: torch.Tensor | None, count: int
    ) -> torch.Tensor:
        """The codes of an ANS refinement's plane, whose rANS bytes follow ``head`` bytes
        of positions and table (:mod:`fedsqueeze.codec.plane_ans`)."""
        if len(record.body) < head:
            raise FormatError(
                f"tensor {self.name!r} level {record.level}: ANS body of "
                f"{len(record.body)} bytes, its positions and table take {head}"
            )
        coded = memoryview(record.body)[head:]
        return plane_ans.decode_plane(coded, bits, held, count, self._device)

    def _open_group(self, record: TensorRecord, group: int) -> None:
        """A refinement that adds positions: the next group with its first plane."""
        p = record.positions
        if group != len(self._groups) or p is None:
            raise FormatError(
                f"tensor {self.name!r}: group {group} opened after {len(self._groups)} groups"
            )
        first = self._groups[0]
        if first.indices is None or self._blocks:
            raise FormatError(
                f"tensor {self.name!r}: a dense or block-wise tensor has no later groups"
            )
        held = self._held_mask()
        free = self._numel - sum(g.count for g in self._groups)
        if not 1 <= p.count <= free or p.payload_bytes > max_payload_bytes(free):
            raise FormatError(
                f"tensor {self.name!r}: group {group} claims {p.count} of {free} free positions"
            )
        try:
            coding = PositionCoding(p.coding)
        except ValueError as exc:
            raise FormatError(f"tensor {self.name!r}: unknown position coding {p.coding}") from exc
        bits = self.levels[0]
        table_bytes = 2 * table_entries(self.levels, 0)
        if record.ans:
            # Checked (and decoded, one context) before the positions: a hostile count
            # costs nothing past the coder's bound.
            codes = self._ans_plane(record, p.payload_bytes + table_bytes, bits, None, p.count)
            body = memoryview(record.body)
        else:
            expected = p.payload_bytes + packed_size(p.count, bits) + table_bytes
            body = memoryview(_refinement_body(record, expected, self.name))
        payload = _read_only_uint8(body[: p.payload_bytes]).to(self._device)
        ranks = decode_positions(coding, p.count, p.rice_k, payload, free)
        indices = torch.nonzero(~held).reshape(-1)[ranks]
        channels_of = None
        if self._qp.scale.dim() == 1:  # per channel (blocks do not combine with groups)
            stride = max(1, self._numel // max(1, self._shape[0] if self._shape else 1))
            channels_of = torch.div(indices, stride, rounding_mode="floor")
        g = _Group(indices, channels_of, p.count)
        g.top = g.top.to(self._device)
        self._held = held.index_fill_(0, indices, True)
        self._groups.append(g)
        rest = body[p.payload_bytes :]
        if record.ans:
            self._add_codes(g, 0, codes, rest[:table_bytes])
        else:
            self._add_plane(g, 0, rest)
        self.level = record.level

    def _held_mask(self) -> torch.Tensor:
        if self._held is None:
            held = torch.zeros(self._numel, dtype=torch.bool, device=self._device)
            first = self._groups[0].indices
            if first is not None:
                held[first] = True
            self._held = held
        return self._held

    def add_plane(self, level: int, body: bytes | memoryview) -> None:
        """Unpack plane ``level`` of the first group (and its table) from its
        decompressed body."""
        self._add_plane(self._groups[0], level, body)
        self.level = level

    def _add_plane(
        self, g: _Group, level: int, body: bytes | memoryview, context_order: bool = False
    ) -> None:
        """Unpack a plane (and its table) into the group; ``context_order``: its values
        come sorted, stably, by the coarser code bits the group holds (version 11)."""
        bits = self.levels[level]
        view = memoryview(body)
        plane_bytes = packed_size(g.count, bits)
        plane = unpack_bits(_read_only_uint8(view[:plane_bytes]).to(self._device), bits, g.count)
        if context_order:
            in_order = torch.empty_like(plane)
            in_order[torch.argsort(g.top, stable=True)] = plane
            plane = in_order
        self._add_codes(g, level, plane, view[plane_bytes:])

    def _add_codes(
        self, g: _Group, level: int, plane: torch.Tensor, table: bytes | memoryview
    ) -> None:
        """Append plane ``level``'s codes (uint8 ``[g.count]``) to the group's bits, with
        the level's bucket table from ``table`` (its float16 bytes, checked)."""
        bits = self.levels[level]
        entries = table_entries(self.levels, level)
        new_table = None
        if entries:
            shift = self._qp.bits - cumulative_bits(self.levels, level)
            new_table = table_from_bytes(table, entries, self._qp.scheme, shift).to(self._device)
        # In place, in uint8: the bits held never exceed the code's 8 (the plan's sum).
        g.top.bitwise_left_shift_(bits).bitwise_or_(plane.to(torch.uint8))
        g.table = new_table
        g.plane = level

    @property
    def groups(self) -> int:
        """How many position groups are held."""
        return len(self._groups)

    def tensor(self) -> torch.Tensor:
        """The best tensor the levels held so far give."""
        first = self._groups[0]
        if first.indices is None:
            values = self._values(first)
        else:
            values = torch.zeros(self._numel, dtype=torch.float32, device=self._device)
            for g in self._groups:
                values[g.indices] = self._values(g)
        if self._rotation_seed is not None:
            x = unrotate(values, self._rotation_seed, self._shape)
        else:
            x = values.reshape(self._shape)
        if self._base is not None:
            x = self._base.to(torch.float32) + x
        return x.to(self._dtype)

    def _values(self, g: _Group) -> torch.Tensor:
        held = cumulative_bits(self.levels, g.plane)
        return reconstruct(g.top, self._qp, held, g.table, g.channels_of)


def _refinement_body(record: TensorRecord, expected: int, name: str) -> bytes | memoryview:
    """A refinement's decompressed body, checked to be ``expected`` bytes long first."""
    actual = len(record.body) if record.raw_length is None else record.raw_length
    if actual != expected:
        raise FormatError(
            f"tensor {name!r} level {record.level}: body is {actual} bytes, expected {expected}"
        )
    if record.raw_length is not None:
        return entropy.decompress(record.body, record.raw_length)
    return record.body


def _qparams(
    record: TensorRecord,
    name: str,
    shape: tuple[int, ...],
    kept: int,
    indices: torch.Tensor | None,
    device: torch.device,
) -> tuple[QuantParams, torch.Tensor | Runs | None]:
    """A quantized record's params and the parameter set of each kept value (``None``
    per tensor; :class:`Runs` for blocks and dense channels)."""
    q = record.quant
    if q is None:
        raise FormatError(f"record {name!r} is not quantized")
    channels = 1
    if q.granularity is Granularity.PER_CHANNEL:
        if not shape:
            raise FormatError(f"record {name!r}: per-channel quantization of a scalar")
        channels = shape[0]
    elif q.granularity is Granularity.PER_BLOCK:
        # The parser bounded the block count; here it must match the values it covers.
        if q.blocks != num_blocks(kept, q.block_size):
            raise FormatError(
                f"record {name!r}: {q.blocks} blocks of {q.block_size} for {kept} values"
            )
        channels = q.blocks
    qp, end = qparams_from_bytes(q.params, 0, q.bits, q.scheme, channels, q.scale_format)
    if end != len(q.params):
        raise FormatError(f"record {name!r}: quantization parameters have trailing bytes")
    if q.granularity is Granularity.PER_BLOCK:
        return qp, Runs(q.block_size)
    if q.granularity is not Granularity.PER_CHANNEL:
        return qp, None
    numel = 1
    for d in shape:
        numel *= d
    stride = max(1, numel // max(1, channels))
    if indices is None:
        return qp, Runs(stride)  # dense: rows of stride values
    return qp, torch.div(indices, stride, rounding_mode="floor")


def _finish(
    values: torch.Tensor,
    shape: tuple[int, ...],
    base: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
    name: str,
    rotation_seed: int | None = None,
) -> torch.Tensor:
    """Lossy values (float32 ``[numel]``) as the tensor: rotated back (``rotation_seed``
    given), plus the base, in its dtype."""
    if rotation_seed is not None:
        x = unrotate(values, rotation_seed, shape)
    else:
        x = values.reshape(shape)
    if base is not None:
        x = base.to(device=device, dtype=torch.float32) + x
    if not dtype.is_floating_point:
        raise FormatError(f"record {name!r}: lossy values for a {dtype} tensor")
    return x.to(dtype)


def _positions(
    record: TensorRecord, name: str, body: bytes | memoryview, numel: int, device: torch.device
) -> tuple[torch.Tensor | None, int, bytes | memoryview]:
    """The kept positions (``None``: dense), how many values follow, and the rest of the body."""
    if record.positions is None:
        return None, numel, body
    p = record.positions
    try:
        coding = PositionCoding(p.coding)
    except ValueError as exc:
        raise FormatError(f"record {name!r}: unknown position coding {p.coding}") from exc
    view = memoryview(body)
    pos_payload = _read_only_uint8(view[: p.payload_bytes])
    indices = decode_positions(coding, p.count, p.rice_k, pos_payload.to(device), numel)
    return indices, p.count, view[p.payload_bytes :]


def _body_length(
    record: TensorRecord, name: str, dtype: torch.dtype, shape: tuple[int, ...], numel: int
) -> int:
    """Bytes the record's body must have before entropy coding, from its header alone."""
    kept, positions_bytes = numel, 0
    if record.rank:
        if len(shape) < 2:
            raise FormatError(f"record {name!r}: low-rank record of a {len(shape)}-D tensor")
        m, n = matrix_shape(shape)
        if not pays_off(m, n, record.rank):
            raise FormatError(
                f"record {name!r}: rank {record.rank} factors of a {m}×{n} matrix are not "
                "smaller than it"
            )
        kept = factor_count(m, n, record.rank)
    if record.positions is not None:
        p = record.positions
        if p.count > numel or p.payload_bytes > max_payload_bytes(numel):
            raise FormatError(f"record {name!r}: positions header out of range")
        kept, positions_bytes = p.count, p.payload_bytes
    if record.quant is not None and record.levels:
        return (
            positions_bytes
            + packed_size(kept, record.levels[0])
            + 2 * table_entries(record.levels, 0)
        )
    if record.quant is not None:
        return positions_bytes + packed_size(kept, record.quant.bits)
    kind = record.value_kind
    stored = dtype if kind in (ValueKind.RAW, ValueKind.XOR) else _VALUE_DTYPES[kind]
    width = torch.empty((), dtype=stored).element_size()
    return positions_bytes + kept * width


def _unans(record: TensorRecord, name: str, shape: tuple[int, ...], numel: int) -> TensorRecord:
    """``record`` with its ANS-coded codes decoded and packed as a plain body would be.

    The code count comes from the header and the shape (the element count, or the
    factors' for a low-rank record), bounded by :data:`fedsqueeze.codec.ans.MAX_CODES`
    before any decoding work.
    """
    if record.quant is None or record.positions is not None or record.levels:
        raise FormatError(f"record {name!r}: an ANS body holds dense quantization codes only")
    kept = numel
    if record.rank:
        if len(shape) < 2:
            raise FormatError(f"record {name!r}: low-rank record of a {len(shape)}-D tensor")
        m, n = matrix_shape(shape)
        if not pays_off(m, n, record.rank):
            raise FormatError(f"record {name!r}: rank {record.rank} factors do not pay off")
        kept = factor_count(m, n, record.rank)
    if not 0 < kept <= ans.MAX_CODES:
        raise FormatError(f"record {name!r}: {kept} ANS-coded codes (1..{ans.MAX_CODES})")
    bits = record.quant.bits
    codes = ans.decode_codes(record.body, kept, bits)
    packed = pack_bits(torch.from_numpy(codes.copy()), bits)
    return replace(record, body=bytes(packed.numpy()), raw_length=None, ans=False)


def _xor(bits: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    if base.dtype == torch.bool:
        return (bits.to(torch.uint8) ^ base.to(torch.uint8)).to(torch.bool)
    out = xor_bits(bits, base)  # in NumPy on the CPU (torch's threads stall when shared)
    return out.view(base.dtype) if base.is_floating_point() else out


__all__ = ["CODE_DTYPES", "ProgressiveTensor", "TensorDecoder"]
