"""Literal-only zstd frames: compressed in pieces on every core, decoded in pieces on
every core, and still one ordinary zstd frame for any decoder.

Why: the entropy stage of a large dense record (int8, block-wise 4-bit...) was one zstd
stream at the record's level, on one core, in both directions: about 30 of int8's 45 ms
encode and 30 ms of its decode on a 100 MB tensor (BENCHMARKS, "A 100 MB fp32 tensor").
Quantization codes have next to no repeats; what zstd gains on them is its Huffman
coding of literals. Measured side by side on the 25 MB of int8 codes of a 100 MB
standard normal tensor: level 3 makes 20,943,407 bytes in 36 ms, level 1 the same in
25 ms, the literal-only parameters below 20,943,403 bytes in 24 ms; block-wise 4-bit
codes 10,993,746 / 10,993,651 / 10,993,647 bytes in 15 / 12 / 12 ms.

A frame of blocks that carry no sequences (no matches: each block is Huffman-coded
literals with its own table, or the repeat of the previous block's table, or raw, or
RLE) has a property a general frame lacks: a block that brings its own table decodes
without anything before it. So

* the encoder compresses each chunk of codes as its own frame (:func:`compress_piece`,
  on the worker that has just made the codes, while they are in its cache), checks
  that every block is literal-only, and :func:`write_spliced` joins the pieces' blocks
  under one frame header: an ordinary frame, which the decoders of every earlier
  version read as one stream (no format change, no version bump);
* the decoder walks the block headers (:func:`plan`), cuts the frame at blocks that
  bring their own table, and decodes the pieces on all cores (:func:`decode_piece`),
  each wrapped as a frame of its own. A frame with any sequence, or that cannot be
  walked, gets ``None`` from :func:`plan` and is decoded as one stream as before (with
  that path's checks and error messages).

zstd has no setting that forbids matches: these parameters (the shortest search,
matches of at least 7 bytes) only make them rare on quantization codes. A piece that
has one makes :func:`compress_piece` return ``None``; the encoder then falls back to
one stream.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, cast

import zstandard

from fedsqueeze.errors import FormatError

__all__ = [
    "LITERAL_PARAMS",
    "Piece",
    "Plan",
    "Segment",
    "Writer",
    "compress_piece",
    "decode_piece",
    "emit_piece",
    "plan",
    "write_spliced",
]

_FORMAT = zstandard.FORMAT_ZSTD1_MAGICLESS
#: Literals only, in effect: the shortest hash and search, matches of at least 7 bytes
#: (as the exponent planes of :mod:`fedsqueeze.codec.grouping`).
LITERAL_PARAMS = zstandard.ZstdCompressionParameters(
    window_log=17,
    hash_log=6,
    chain_log=6,
    search_log=1,
    min_match=7,
    target_length=0,
    strategy=zstandard.STRATEGY_FAST,
    format=_FORMAT,
    write_content_size=False,
    write_checksum=False,
    write_dict_id=False,
)
#: zstd's largest block (a block's output never exceeds it).
_MAX_BLOCK = 128 << 10
#: Blocks :func:`plan` walks at most (plus one per 64 KiB of output), as
#: :func:`~fedsqueeze.codec.entropy.frame_length`.
_MAX_WALKED_BLOCKS = 4096
#: A last, empty raw block: ends a piece cut out of a frame.
_END = b"\x01\x00\x00"
_MAGIC = b"\x28\xb5\x2f\xfd"
_RAW, _RLE, _COMPRESSED = 0, 1, 2
_TREELESS = 3
_local = threading.local()
#: Where spliced frames go, part by part.
Writer = Callable[[bytes | memoryview], None]


@dataclass(frozen=True)
class Piece:
    """A chunk compressed as a frame of literal-only blocks.

    Attributes
    ----------
    frame
        The magicless frame.
    header
        Length of its frame header (the blocks follow).
    window
        The window size its header states.
    last
        Offset of its last block's header in ``frame``.
    """

    frame: bytes
    header: int
    window: int
    last: int


@dataclass(frozen=True)
class Segment:
    """A run of blocks of a frame that decodes on its own.

    Attributes
    ----------
    start, stop
        Its blocks' bytes in the body.
    out_start, out_stop
        The bytes they decode to.
    final
        Whether it ends with the frame's last block.
    """

    start: int
    stop: int
    out_start: int
    out_stop: int
    final: bool


@dataclass(frozen=True)
class Plan:
    """Where a literal-only frame can be cut: its header and its segments in order."""

    header: bytes
    segments: tuple[Segment, ...]


def compress_piece(data: memoryview) -> Piece | None:
    """``data`` (non-empty) compressed with :data:`LITERAL_PARAMS` as a frame of its own;
    ``None`` when a block holds a sequence (a match), which a splice cannot carry."""
    compressor = getattr(_local, "compressor", None)
    if compressor is None:
        compressor = _local.compressor = zstandard.ZstdCompressor(compression_params=LITERAL_PARAMS)
    frame = compressor.compress(data)
    header, window = _frame_header(frame)
    pos, last, out = header, header, 0
    while True:
        walked = _block(frame, pos)
        if walked is None:
            return None
        size, regen, _, is_last = walked
        last, pos, out = pos, pos + 3 + size, out + regen
        if is_last:
            break
    if pos != len(frame) or out != len(data):
        return None
    return Piece(frame, header, window, last)


def write_spliced(pieces: Sequence[Piece], write: Writer) -> bool:
    """Write the frame made of ``pieces``' blocks, in order, through ``write`` (a
    callable taking bytes-like parts): the header of the first piece, every piece's
    blocks with the last-block flag cleared on all but the last piece. ``False``
    (nothing written) when a piece's window is larger than the first's."""
    emit = write
    if not pieces or any(p.window > pieces[0].window for p in pieces):
        return False
    first = pieces[0]
    emit(memoryview(first.frame)[: first.header])
    for i, piece in enumerate(pieces):
        emit_piece(piece, i == len(pieces) - 1, emit)
    return True


def emit_piece(piece: Piece, final: bool, write: Writer) -> None:
    """Write ``piece``'s blocks through ``write``; unless ``final``, with its last block's
    flag cleared (a later piece continues the frame)."""
    emit = write
    view = memoryview(piece.frame)
    if final:
        emit(view[piece.header :])
        return
    emit(view[piece.header : piece.last])
    emit(bytes((view[piece.last] & 0xFE,)))
    emit(view[piece.last + 1 :])


def plan(body: bytes | memoryview, size: int, target: int) -> Plan | None:
    """How to decode ``body`` (one magicless frame of ``size`` bytes) in pieces of about
    ``target`` bytes of output: ``None`` unless every block is literal-only and the
    frame is one that :func:`decode_piece` may decode (no checksum or dictionary, a
    window no larger than ``max(size, 2 MiB)``, a declared size of ``size`` if any,
    blocks that decode to exactly ``size`` bytes and end where the body ends)."""
    view = memoryview(body)
    try:
        params = zstandard.get_frame_parameters(view, format=_FORMAT)
    except zstandard.ZstdError:
        return None
    if (
        params.has_checksum
        or params.dict_id
        or params.content_size not in (zstandard.CONTENTSIZE_UNKNOWN, size)
        or params.window_size > max(size, 2 << 20)
    ):
        return None
    header, _ = _frame_header(view)
    segments: list[Segment] = []
    seg_start, seg_out = header, 0
    pos, out = header, 0
    for _ in range(_MAX_WALKED_BLOCKS + size // (64 << 10)):
        walked = _block(view, pos)
        if walked is None:
            return None
        length, regen, own_table, last = walked
        if own_table and out - seg_out >= target:
            segments.append(Segment(seg_start, pos, seg_out, out, False))
            seg_start, seg_out = pos, out
        pos, out = pos + 3 + length, out + regen
        if out > size:
            return None
        if last:
            if pos != len(view) or out != size:
                return None
            segments.append(Segment(seg_start, pos, seg_out, out, True))
            return Plan(bytes(view[:header]), tuple(segments))
    return None


def decode_piece(
    body: bytes | memoryview, header: bytes, segment: Segment, out: memoryview
) -> None:
    """Decode ``segment`` of ``body`` into ``out`` (exactly its ``out_stop − out_start``
    bytes), as a frame of its own: ``header``, its blocks, and an empty last block
    unless it has the frame's.

    Raises
    ------
    FormatError
        The blocks are corrupt or decode to more or fewer bytes than planned.
    """
    want = segment.out_stop - segment.out_start
    if len(out) != want:
        raise ValueError(f"out holds {len(out)} bytes, the segment {want}")
    view = memoryview(body)
    parts: list[bytes | memoryview] = [_MAGIC + header, view[segment.start : segment.stop]]
    if not segment.final:
        parts.append(memoryview(_END))
    decompressor = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    source = cast(IO[bytes], _Parts(parts))
    filled = 0
    try:
        reader = decompressor.stream_reader(source, read_size=1 << 20)
        while filled < want:
            got = reader.readinto(out[filled:])
            if got == 0:
                break
            filled += got
        if filled != want or reader.read(1):
            raise FormatError(f"zstd block run decodes to other than the {want} bytes planned")
    except zstandard.ZstdError as exc:
        raise FormatError(f"corrupt zstd stream: {exc}") from exc


class _Parts:
    """A file-like source reading ``parts`` one after the other."""

    def __init__(self, parts: list[bytes | memoryview]) -> None:
        self._parts = parts
        self._i = 0
        self._pos = 0

    def read(self, n: int = -1) -> bytes | memoryview:
        while self._i < len(self._parts):
            part = self._parts[self._i]
            if self._pos < len(part):
                stop = len(part) if n < 0 else min(len(part), self._pos + n)
                start, self._pos = self._pos, stop
                return part[start:stop]
            self._i, self._pos = self._i + 1, 0
        return b""


def _frame_header(frame: bytes | memoryview) -> tuple[int, int]:
    """Length of a magicless frame header and the window size it states."""
    fhd = frame[0]
    fcs_flag, single, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    length = 1 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    length += (1 if single else 0, 2, 4, 8)[fcs_flag]
    if single:
        return length, 0
    exponent, mantissa = frame[1] >> 3, frame[1] & 7
    base = 1 << (10 + exponent)
    return length, base + (base >> 3) * mantissa


def _block(data: bytes | memoryview, pos: int) -> tuple[int, int, bool, bool] | None:
    """The block at ``pos``: (its content's length, what it decodes to, whether it brings
    its own table, whether it is the last); ``None`` when it holds a sequence, is
    truncated or malformed (left to zstd to report)."""
    if pos + 3 > len(data):
        return None
    head = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
    last, kind, size = bool(head & 1), (head >> 1) & 3, head >> 3
    if size > _MAX_BLOCK:
        return None
    if kind == _RAW:
        return (size, size, True, last) if pos + 3 + size <= len(data) else None
    if kind == _RLE:
        return (1, size, True, last) if pos + 4 <= len(data) else None
    if kind != _COMPRESSED or pos + 3 + size > len(data) or size < 2:
        return None
    literals = _literals(data, pos + 3, size)
    if literals is None:
        return None
    used, regen, own_table = literals
    # nbSeq = 0: a single zero byte ends the block.
    if used + 1 != size or data[pos + 3 + used] != 0:
        return None
    return size, regen, own_table, last


def _literals(data: bytes | memoryview, at: int, size: int) -> tuple[int, int, bool] | None:
    """A literals section (RFC 8878, 3.1.1.3.1): (its length, its regenerated size,
    whether it is not treeless)."""
    b0 = data[at]
    kind, fmt = b0 & 3, (b0 >> 2) & 3
    if kind in (_RAW, _RLE):
        hl = (1, 2, 1, 3)[fmt]
        if hl > size:
            return None
        value = int.from_bytes(bytes(data[at : at + hl]), "little")
        regen = value >> (3 if fmt in (0, 2) else 4)
        content = regen if kind == _RAW else 1
        return hl + content, regen, True
    hl, width = ((3, 10), (3, 10), (4, 14), (5, 18))[fmt]
    if hl > size:
        return None
    value = int.from_bytes(bytes(data[at : at + hl]), "little") >> 4
    mask = (1 << width) - 1
    regen, compressed = value & mask, (value >> width) & mask
    return hl + compressed, regen, kind != _TREELESS
