"""Part-by-part decoding into existing parameters, for edges short of memory.

:func:`decode_state` builds a new state dict beside the one an edge holds, and needs the
whole encoded stream in memory: about three copies of the model at the peak. An edge
whose spare memory is smaller than one copy uses :func:`decode_into` instead. It pulls
the stream (the segments' payloads, in order) chunk by chunk and writes every tensor
straight into the caller's tensors, in place:

* a record of raw or XOR bits, fp32/fp16/bf16 values or quantization codes (per tensor,
  per channel, block-wise or NF4, zstd-coded or not) is decoded ``chunk_values`` values
  at a time (block-wise: rounded up to whole blocks): its body is never held whole, so
  the extra memory is a few chunks (the default chunk of
  256 Ki values is at most 2 MiB of fp64 input and 1 MiB of float32 output, about two
  1 MiB segments). A sparse (pruned, top-k) record holds its positions' payload (at
  most one bit per element of the tensor) and decodes the positions chunk by chunk
  beside the values (:mod:`fedsqueeze.codec.position_chunks`);
* a low-rank record is held whole while it is decoded (its factors are small); a stream
  of progressive levels is refused (decode those with
  :func:`~fedsqueeze.codec.model.decode_prefix`).

For a delta the tensors must hold the base (``base_digest`` is its digest, checked
against the stream's before anything is written), and they end up holding the new model.
The input should come from verified segments (every segment's sha256 checked): a
malformed stream raises a :class:`~fedsqueeze.errors.CodecError`, but the tensors it had
reached are then already changed, so the caller must treat its model as lost and fetch
it in full.
"""

from __future__ import annotations

import io
import math
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
import zstandard

from fedsqueeze.codec.bitpack import packed_size, unpack_bits
from fedsqueeze.codec.blockwise import num_blocks
from fedsqueeze.codec.bytesio import ByteReader
from fedsqueeze.codec.container import (
    ANS_VERSION,
    BLOCKWISE_VERSION,
    BUCKETS_VERSION,
    GROUPED_VERSION,
    JOINT_VERSION,
    ROTATED_VERSION,
    DecodeLimits,
    QParamsSizer,
    TensorRecord,
    ValueKind,
    parse_header,
    parse_record,
)
from fedsqueeze.codec.grouping import stream_grouped
from fedsqueeze.codec.kernels import Runs
from fedsqueeze.codec.position_chunks import iter_positions
from fedsqueeze.codec.positions import PositionCoding
from fedsqueeze.codec.quantization import dequantize, qparams_from_bytes
from fedsqueeze.codec.spec import Granularity
from fedsqueeze.codec.tensor_decode import TensorDecoder
from fedsqueeze.codec.tensor_decode import _body_length as body_length
from fedsqueeze.errors import BaseMismatchError, FormatError, TruncatedError

__all__ = ["StreamDecodeStats", "decode_into"]

#: Values decoded at a time (a multiple of 8, so every chunk of codes ends on a byte).
DEFAULT_CHUNK_VALUES = 1 << 18

_FLOAT_KINDS = {
    ValueKind.FP32: torch.float32,
    ValueKind.FP16: torch.float16,
    ValueKind.BF16: torch.bfloat16,
}
_INT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
T = TypeVar("T")


@dataclass(frozen=True)
class StreamDecodeStats:
    """What :func:`decode_into` did.

    Attributes
    ----------
    tensors
        Tensors written.
    streamed
        Of those, the ones decoded chunk by chunk (the others were held whole).
    stream_bytes
        Encoded bytes read.
    largest_held
        The largest record body held whole, in bytes (0 if every record streamed).
    """

    tensors: int
    streamed: int
    stream_bytes: int
    largest_held: int


class _Input:
    """The stream, pulled from an iterator of chunks, with a small look-ahead buffer."""

    def __init__(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        self._chunks: Iterator[bytes | bytearray | memoryview] = iter(chunks)
        self._buf = bytearray()
        self.consumed = 0

    def more(self) -> bool:
        """Pull one more chunk into the buffer; ``False`` at the end of the stream."""
        for chunk in self._chunks:
            if len(chunk):
                self._buf += chunk
                return True
        return False

    def window(self, size: int) -> tuple[memoryview, bool]:
        """A copy of the first ``size`` buffered bytes, and whether that is all of them.

        A copy, so that the buffer can shrink while a parsed record still refers to it.
        """
        return memoryview(bytes(self._buf[:size])), size >= len(self._buf)

    def drop(self, count: int) -> None:
        del self._buf[:count]
        self.consumed += count

    def read(self, count: int) -> bytes:
        """Up to ``count`` bytes (fewer only at the end of the stream)."""
        while len(self._buf) < count and self.more():
            pass
        out = bytes(self._buf[:count])
        self.drop(len(out))
        return out

    def exact(self, count: int, what: str) -> bytes:
        out = self.read(count)
        if len(out) != count:
            raise TruncatedError(f"the stream ends inside {what}")
        return out

    @property
    def empty(self) -> bool:
        return not self._buf and not self.more()


class _Body(io.RawIOBase):
    """A record's body as a file, for zstd's streaming reader."""

    def __init__(self, source: _Input, length: int) -> None:
        self._source = source
        self.left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = min(len(buffer), self.left)
        if not count:
            return 0
        data = self._source.read(min(count, 1 << 20))
        if not data:
            raise TruncatedError("the stream ends inside a record body")
        buffer[: len(data)] = data
        self.left -= len(data)
        return len(data)


class _HeadReader(ByteReader):
    """Parses a record's head and leaves its body in the stream (notes its length)."""

    __slots__ = ("body_length",)

    def __init__(self, data: memoryview) -> None:
        super().__init__(data)
        self.body_length = -1

    def body(self, count: int) -> memoryview:
        self.body_length = count
        return memoryview(b"")


def decode_into(
    chunks: Iterable[bytes | bytearray | memoryview],
    target: Mapping[str, torch.Tensor],
    *,
    base_digest: bytes | None = None,
    limits: DecodeLimits | None = None,
    chunk_values: int = DEFAULT_CHUNK_VALUES,
) -> StreamDecodeStats:
    """Decode an encoded stream into ``target``'s tensors, in place, part by part.

    Parameters
    ----------
    chunks
        The stream without its checksum (the segments' payloads in order), in pieces of
        any size.
    target
        The tensors to write (contiguous, on any device); every tensor of the stream must
        be there with its shape and dtype. For a delta they hold the base.
    base_digest
        ``state_digest`` of ``target`` as it is now, for a delta.
    limits
        Bounds on what the records may claim.
    chunk_values
        Values decoded at a time (rounded up to a multiple of 8).

    Raises
    ------
    BaseMismatchError
        A delta against another base, or a tensor ``target`` lacks.
    FormatError, TruncatedError, LimitExceededError
        Malformed or short input, or a progressive stream.
    """
    limits = limits or DecodeLimits()
    step = max(8, (chunk_values + 7) // 8 * 8)
    source = _Input(chunks)
    header = _parse(source, ByteReader, lambda r: parse_header(r, limits))
    # Versions 3 and 4 add block-wise and byte-grouped records (both streamed below);
    # they may also carry levels, refused record by record.
    if header.version == ROTATED_VERSION:
        raise FormatError(
            "part-by-part decoding does not undo rotations (a rotation mixes a whole row); "
            "decode rotated models with decode_stream_into or decode_state"
        )
    # Version 8 adds ANS-coded records (held whole, like low-rank and rotated ones);
    # version 10 grouped planes in buckets (streamed chunk by chunk as the others).
    # Version 12 adds grouped planes coded jointly (streamed too); its header may list
    # row tiers (version 11), which are joined whole.
    streamable = (
        1,
        BLOCKWISE_VERSION,
        GROUPED_VERSION,
        ANS_VERSION,
        BUCKETS_VERSION,
        JOINT_VERSION,
    )
    if header.version not in streamable or header.splits:
        raise FormatError(
            "part-by-part decoding reads whole-model streams; decode progressive levels "
            "with decode_prefix"
        )
    if header.implied_base:
        raise FormatError("a delta without its base's digest is read whole (from_bytes)")
    if header.base_digest is not None and header.base_digest != base_digest:
        raise BaseMismatchError(
            f"this is a delta against {header.base_digest.hex()[:16]}…; the tensors given "
            "hold another model (or base_digest was not passed)"
        )
    for name, tensor in target.items():
        if not tensor.is_contiguous():
            raise ValueError(f"target[{name!r}] is not contiguous")
    decoder = TensorDecoder(target if header.base_digest is not None else None, None)
    sizer = QParamsSizer()
    seen: set[str] = set()
    streamed = held = 0
    total = 0
    heads: list[_HeadReader] = []

    def head_reader(view: memoryview) -> _HeadReader:
        heads.append(_HeadReader(view))
        return heads[-1]

    for _ in range(header.record_count):
        record = _parse(
            source, head_reader, lambda r: parse_record(r, limits, sizer, header.version)
        )
        length = heads[-1].body_length
        heads.clear()
        if record.progressive:
            raise FormatError(
                "part-by-part decoding reads whole-model streams; decode progressive levels "
                "with decode_prefix"
            )
        name, dtype, shape = decoder.resolve(record)
        out = target.get(name)
        if out is None or tuple(out.shape) != shape or out.dtype != dtype:
            raise BaseMismatchError(
                f"the stream's tensor {name!r} {shape} {dtype} is not in target"
            )
        if name in seen:
            raise FormatError(f"tensor {name!r} appears twice")
        seen.add(name)
        total += out.numel()
        if record.zero:  # unchanged (a delta keeps the base the tensor holds) or zeros
            if not record.delta:
                out.zero_()
            continue
        if out.numel() > limits.max_elements or total > limits.max_total_elements:
            raise FormatError(f"tensor {name!r} takes the model past the decoding limits")
        if _streamable(record):
            _stream_record(source, record, length, out, name, step)
            streamed += 1
            continue
        body = source.exact(length, f"the body of {name!r}")
        held = max(held, len(body))
        value = decoder.decode(replace(record, body=body))[1]
        if not isinstance(value, torch.Tensor):
            raise FormatError("a progressive record in a whole-model stream")
        out.copy_(value)
    if not source.empty:
        raise FormatError("unexpected bytes after the last record")
    return StreamDecodeStats(len(seen), streamed, source.consumed, held)


def _parse(
    source: _Input,
    make_reader: Callable[[memoryview], ByteReader],
    parse: Callable[[ByteReader], T],
) -> T:
    """Run ``parse`` on the buffered bytes, pulling more until it does not run short.

    Heads are small: parsing looks at a window of the buffer that doubles while it is
    too short, so a head is never parsed over a copy of a whole segment.
    """
    size = 1 << 12
    while True:
        view, whole = source.window(size)
        reader = make_reader(view)
        try:
            result = parse(reader)
        except TruncatedError:
            if not whole:
                size *= 2
            elif not source.more():
                raise
            continue
        source.drop(reader.pos)
        return result


def _streamable(record: TensorRecord) -> bool:
    """Dense and sparse records decode chunk by chunk (a sparse one holds its positions),
    block-wise and NF4 codes too (their scales are in the head); so do byte-grouped
    planes; low-rank factors and ANS-coded codes (at most a megabyte) are held whole (and
    rotated records are refused before)."""
    return not (record.rank or record.levels or record.rotated or record.ans)


def _stream_grouped(
    source: _Input, record: TensorRecord, length: int, out: torch.Tensor, name: str
) -> None:
    """A byte-grouped record, one chunk of planes at a time."""
    flat = out.view(-1)
    chunks = stream_grouped(
        lambda n: source.exact(n, f"the body of {name!r}"),
        length,
        out.dtype,
        out.numel(),
        record.buckets,
        record.joint,
    )
    for start, values in chunks:
        part = flat[start : start + values.numel()]
        if record.value_kind is ValueKind.GROUPED_XOR:
            view = _INT_VIEWS[out.element_size()]
            bits = part.view(view)
            bits ^= values.view(view)
        else:
            part.copy_(values)


def _stream_record(
    source: _Input,
    record: TensorRecord,
    length: int,
    out: torch.Tensor,
    name: str,
    step: int,
) -> None:
    numel = out.numel()
    if record.needs_v4:
        _stream_grouped(source, record, length, out, name)
        return
    expected = body_length(record, name, out.dtype, tuple(out.shape), numel)
    if record.raw_length is not None:
        if record.raw_length != expected:
            raise FormatError(
                f"record {name!r}: body is {record.raw_length} bytes, expected {expected}"
            )
        body = _Body(source, length)
        decompressor = zstandard.ZstdDecompressor(format=zstandard.FORMAT_ZSTD1_MAGICLESS)
        reader = decompressor.stream_reader(
            typing.cast("typing.IO[bytes]", body), read_across_frames=False, closefd=False
        )

        def take(count: int) -> bytes:
            data = bytearray()
            while len(data) < count:
                try:
                    piece = reader.read(count - len(data))
                except zstandard.ZstdError as exc:
                    raise FormatError(f"record {name!r}: corrupt zstd stream: {exc}") from exc
                if not piece:
                    raise FormatError(f"record {name!r}: zstd stream shorter than its header says")
                data += piece
            return bytes(data)

    else:
        if length != expected:
            raise FormatError(f"record {name!r}: body is {length} bytes, expected {expected}")
        body = None

        def take(count: int) -> bytes:
            return source.exact(count, f"the body of {name!r}")

    flat = out.view(-1)
    q = record.quant
    qp = None
    stride = 1
    block = 0
    if q is not None:
        per_channel = q.granularity is Granularity.PER_CHANNEL
        channels = int(out.shape[0]) if per_channel and out.dim() else 1
        if q.granularity is Granularity.PER_BLOCK:
            # Blocks run over the values the record holds (the kept ones when sparse).
            kept_values = numel if record.positions is None else record.positions.count
            if q.blocks != num_blocks(kept_values, q.block_size):
                raise FormatError(
                    f"record {name!r}: {q.blocks} blocks of {q.block_size} for {kept_values} values"
                )
            channels, block = q.blocks, q.block_size
            # Chunks of whole blocks (and whole bytes of codes): each takes a slice of the
            # scales and the same kernel as a whole record.
            unit = math.lcm(block, 8)
            step = -(-step // unit) * unit
        qp, end = qparams_from_bytes(q.params, 0, q.bits, q.scheme, channels, q.scale_format)
        if end != len(q.params):
            raise FormatError(f"record {name!r}: quantization parameters have trailing bytes")
        stride = max(1, numel // max(1, channels))
        if not out.dtype.is_floating_point:
            raise FormatError(f"record {name!r}: lossy values for a {out.dtype} tensor")
    where_chunks: Iterator[torch.Tensor] | None = None
    kept = numel
    if record.positions is not None:
        p = record.positions
        try:
            coding = PositionCoding(p.coding)
        except ValueError as exc:
            raise FormatError(f"record {name!r}: unknown position coding {p.coding}") from exc
        if q is None and record.value_kind not in _FLOAT_KINDS:
            raise FormatError(f"record {name!r}: raw values cannot be sparse")
        payload = _uint8(take(p.payload_bytes), flat.device)
        where_chunks = iter_positions(coding, p.count, p.rice_k, payload, numel, step)
        kept = p.count
        if not record.delta:
            flat.zero_()
    for start in range(0, kept, step):
        stop = min(kept, start + step)
        count = stop - start
        part = flat[start:stop]
        where = None if where_chunks is None else next(where_chunks)
        if q is not None and qp is not None:
            data = take(packed_size(count, q.bits))
            codes = unpack_bits(_uint8(data, part.device), q.bits, count)
            channels_of: torch.Tensor | Runs | None = None
            params = qp
            if block and qp.scale.dim() == 1:  # one block parses as per-tensor params
                sets = slice(start // block, -(-stop // block))
                params = replace(
                    qp,
                    scale=qp.scale[sets],
                    zero_point=qp.zero_point[sets],
                    shift=None if qp.shift is None else qp.shift[sets],
                )
                channels_of = Runs(block)
            elif qp.scale.dim() == 1:
                source_index = (
                    where if where is not None else torch.arange(start, stop, device=part.device)
                )
                channels_of = torch.div(source_index, stride, rounding_mode="floor")
            values = dequantize(codes, params, channels_of)
            _write_float(flat, start, stop, where, values, record.delta)
            continue
        kind = record.value_kind
        if kind in _FLOAT_KINDS:
            stored = _FLOAT_KINDS[kind]
            width = torch.empty((), dtype=stored).element_size()
            values = _uint8(take(count * width), part.device).view(stored).to(torch.float32)
            if not out.dtype.is_floating_point:
                raise FormatError(f"record {name!r}: float values for a {out.dtype} tensor")
            _write_float(flat, start, stop, where, values, record.delta)
            continue
        width = out.element_size()
        raw = _uint8(take(count * width), part.device)
        if kind is ValueKind.XOR:
            if not record.delta:
                raise FormatError(f"record {name!r}: XOR values without a delta flag")
            view = _INT_VIEWS[width]
            bits = part.view(torch.uint8) if out.dtype == torch.bool else part.view(view)
            bits ^= raw.view(bits.dtype)
            if out.dtype == torch.bool and bool((part.view(torch.uint8) > 1).any()):
                raise FormatError(
                    f"record {name!r}: boolean tensor holds values other than 0 and 1"
                )
            continue
        if kind is not ValueKind.RAW:
            raise FormatError(f"record {name!r}: value kind {kind} cannot be streamed")
        if out.dtype == torch.bool:
            if bool((raw > 1).any()):
                raise FormatError(
                    f"record {name!r}: boolean tensor holds values other than 0 and 1"
                )
            part.copy_(raw.to(torch.bool))
        else:
            part.copy_(raw.view(out.dtype))
    if where_chunks is not None and next(where_chunks, None) is not None:
        raise FormatError(f"record {name!r}: more positions than values")
    if body is not None:
        try:
            extra = reader.read(1)
        except zstandard.ZstdError as exc:
            raise FormatError(f"record {name!r}: corrupt zstd stream: {exc}") from exc
        if extra or body.left:
            raise FormatError(f"record {name!r}: zstd stream longer than its header says")


def _uint8(data: bytes, device: torch.device) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=torch.uint8, device=device)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)


def _write_float(
    flat: torch.Tensor,
    start: int,
    stop: int,
    where: torch.Tensor | None,
    values: torch.Tensor,
    delta: bool,
) -> None:
    """Values ``start:stop`` of a record into ``flat`` (at ``where`` when sparse): the
    base plus them for a delta, else them, computed as decode_state does."""
    if where is None:
        part = flat[start:stop]
        part.copy_((part.to(torch.float32) + values).to(part.dtype) if delta else values)
        return
    if delta:
        flat[where] = (flat[where].to(torch.float32) + values).to(flat.dtype)
    else:
        flat[where] = values.to(flat.dtype)
