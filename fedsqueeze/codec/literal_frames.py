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
matches of at least 7 bytes) only make them rare on quantization codes. A block with
sequences depends on the repeat offsets left by earlier sequences, which a piece
compressed alone does not know; before the first such piece there are none (the offsets
are still the frame's initial ones), so a splice carries **one** piece with matches, and
:func:`plan` puts it in a segment of its own whose output is what the literal-only
segments leave. With two or more the encoder falls back to one stream; before that,
:func:`compress_piece` remakes a piece whose matches are incidental (they save nothing
worth having) without them, so on quantization codes that fallback is rare. A segment that
fails to decode on its own (a corrupt or hostile body) sends the decoder back to one
stream too, so the pieces never decode a body to anything the one-stream decoder would
not.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, cast

import numpy as np
import zstandard

from fedsqueeze.codec.plane_buckets import entropy_bits
from fedsqueeze.codec.workers import parallel_map
from fedsqueeze.errors import FormatError

__all__ = [
    "LITERAL_PARAMS",
    "MATCHES_PAY",
    "MIN_SPLIT",
    "Piece",
    "Plan",
    "Segment",
    "Writer",
    "compress_piece",
    "compress_spliced",
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
    matches
        Whether a block holds sequences (matches): a splice carries one such piece at
        most (see the module docstring).
    """

    frame: bytes
    header: int
    window: int
    last: int
    matches: bool


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
    ``None`` when zstd's frame is not one this module can walk (never seen).

    zstd's fastest search steps over most positions of data without repeats, and now
    and then lands on a short one (two of the 96 pieces of a 100 MB tensor's 4-bit
    codes): a match, which made such a piece one a splice may carry only once. Where
    the matches save nothing worth having (the frame is not :data:`MATCHES_PAY` below
    the data's order-0 entropy), the piece is made again without them: its halves
    compressed anew (the search then starts elsewhere and mostly finds none), each
    again where it still holds one, down to :data:`MIN_SPLIT` bytes, and a part that
    small that still matches stored as a raw block (at most 2 KiB raw: a few hundred
    bytes more). The blocks go under the whole
    frame's header (its window is at least theirs), so the piece has no sequences and
    the splice goes on; data whose matches do pay (repeats, runs of zeros) keeps them."""
    whole = _compress_whole(data)
    if whole is None or not whole.matches or len(data) < 2 * MIN_SPLIT:
        return whole
    if len(whole.frame) < MATCHES_PAY * _entropy_bytes(data):
        return whole
    parts: list[bytes | memoryview] = [memoryview(whole.frame)[: whole.header]]
    if not _free_blocks(data, True, parts, whole):
        return whole
    frame = b"".join(parts)
    walked = _walk(frame, whole.header)
    if walked is None or walked[1] or walked[2] != len(data):
        return whole  # cannot happen: every block above is literal-only
    return Piece(frame, whole.header, whole.window, walked[0], False)


#: The smallest part :func:`compress_piece` compresses again to lose a match.
MIN_SPLIT = 1 << 10
#: A frame with matches below this fraction of the data's order-0 entropy keeps them.
MATCHES_PAY = 0.98


def _entropy_bytes(data: memoryview) -> float:
    """The order-0 entropy of ``data``'s bytes, in bytes."""
    return entropy_bits(np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)) / 8


def _free_blocks(
    data: memoryview, final: bool, out: list[bytes | memoryview], piece: Piece | None = None
) -> bool:
    """Blocks without sequences that decode to ``data`` (the last one flagged when
    ``final``) appended to ``out``; ``False`` when zstd's frame cannot be walked.
    ``piece``: ``data`` compressed whole, when the caller has it."""
    piece = piece or _compress_whole(data)
    if piece is None:
        return False
    if not piece.matches:
        emit_piece(piece, final, out.append)
        return True
    if len(data) >= 2 * MIN_SPLIT:
        half = (len(data) + 1) // 2
        return _free_blocks(data[:half], False, out) and _free_blocks(data[half:], final, out)
    out.append(((len(data) << 3) | (_RAW << 1) | int(final)).to_bytes(3, "little"))
    out.append(data)
    return True


def _walk(frame: bytes, header: int) -> tuple[int, bool, int] | None:
    """A frame's blocks from ``header``: the offset of its last block, whether any holds
    sequences, and what the sequence-free ones decode to; ``None`` when malformed."""
    pos, last, out, matches = header, header, 0, False
    while True:
        walked = _block(frame, pos)
        if walked is None:
            return None
        size, regen, _, is_last = walked
        matches = matches or regen is None
        last, pos, out = pos, pos + 3 + size, out + (regen or 0)
        if is_last:
            return (last, matches, out) if pos == len(frame) else None


def _compress_whole(data: memoryview) -> Piece | None:
    """:func:`compress_piece` in one frame, matches or not."""
    compressor = getattr(_local, "compressor", None)
    if compressor is None:
        compressor = _local.compressor = zstandard.ZstdCompressor(compression_params=LITERAL_PARAMS)
    frame = compressor.compress(data)
    header, window = _frame_header(frame)
    walked = _walk(frame, header)
    if walked is None:
        return None
    last, matches, out = walked
    if not matches and out != len(data):
        return None
    return Piece(frame, header, window, last, matches)


def compress_spliced(data: bytes | memoryview, piece: int = 1 << 20) -> bytes | None:
    """``data`` compressed in pieces of ``piece`` bytes on every core, spliced into one
    ordinary frame (:func:`write_spliced`); ``None`` when the pieces cannot be spliced
    (two with matches: the caller compresses otherwise) or the frame would not be
    smaller than ``data``.

    For payloads of quantization codes and positions, which have next to no repeats: on
    the 2.7 MB body of a 90%-pruned 4-bit 100 MB tensor, 2,236,734 bytes in 2.6 ms of
    one core against zstd level 3's 2,255,236 bytes in 8.9 ms (level 3's matches cost
    more than they save there)."""
    if piece < 1:
        raise ValueError(f"piece must be >= 1, got {piece}")
    view = memoryview(data).cast("B")
    if not len(view):
        return None
    bounds = [(a, min(a + piece, len(view))) for a in range(0, len(view), piece)]
    pieces = parallel_map(lambda b: compress_piece(view[b[0] : b[1]]), bounds)
    if any(p is None for p in pieces):
        return None
    parts: list[bytes | memoryview] = []
    if not write_spliced(cast("list[Piece]", pieces), parts.append):
        return None
    packed = b"".join(parts)
    return packed if len(packed) < len(view) else None


def write_spliced(pieces: Sequence[Piece], write: Writer) -> bool:
    """Write the frame made of ``pieces``' blocks, in order, through ``write`` (a
    callable taking bytes-like parts): the header of the first piece, every piece's
    blocks with the last-block flag cleared on all but the last piece. ``False``
    (nothing written) when a piece's window is larger than the first's, or more than
    one piece holds matches."""
    emit = write
    if not pieces or any(p.window > pieces[0].window for p in pieces):
        return False
    if sum(p.matches for p in pieces) > 1:
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
    ``target`` bytes of output: ``None`` unless the frame is one that
    :func:`decode_piece` may decode (no checksum or dictionary, a window no larger than
    ``max(size, 2 MiB)``, a declared size of ``size`` if any, blocks that end where the
    body ends) and its blocks with sequences all fall in one segment (whose output is
    then what the others leave of ``size``; the literal-only blocks decode to exactly
    ``size`` bytes otherwise).

    Segments start only at sequence-free blocks that bring their own table; a segment
    is cut once it holds ``target`` bytes of output, or right after sequences."""
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
    cuts: list[tuple[int, int, int | None]] = []  # (start, stop, output or None)
    seg_start, seg_out, sequenced = header, 0, False
    pos = header
    for _ in range(_MAX_WALKED_BLOCKS + size // (64 << 10)):
        walked = _block(view, pos)
        if walked is None:
            return None
        length, regen, own_table, last = walked
        if own_table and regen is not None and pos > seg_start and (sequenced or seg_out >= target):
            cuts.append((seg_start, pos, None if sequenced else seg_out))
            seg_start, seg_out, sequenced = pos, 0, False
        pos += 3 + length
        if regen is None:
            sequenced = True
        else:
            seg_out += regen
        if last:
            if pos != len(view):
                return None
            cuts.append((seg_start, pos, None if sequenced else seg_out))
            return _placed(bytes(view[:header]), cuts, size)
    return None


def _placed(header: bytes, cuts: list[tuple[int, int, int | None]], size: int) -> Plan | None:
    """The segments of ``cuts`` placed in the output: at most one of unknown output
    (with sequences), which gets what the others leave of ``size``."""
    known = sum(n for _, _, n in cuts if n is not None)
    unknown = sum(n is None for _, _, n in cuts)
    if unknown > 1 or known > size or (unknown == 0 and known != size):
        return None
    segments = []
    out = 0
    for i, (start, stop, n) in enumerate(cuts):
        grown = size - known if n is None else n
        segments.append(Segment(start, stop, out, out + grown, i == len(cuts) - 1))
        out += grown
    return Plan(header, tuple(segments))


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


def _block(data: bytes | memoryview, pos: int) -> tuple[int, int | None, bool, bool] | None:
    """The block at ``pos``: (its content's length, what it decodes to or ``None`` when
    it holds sequences, whether it brings its own table, whether it is the last);
    ``None`` when it is truncated or malformed (left to zstd to report)."""
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
    if used >= size:
        return None
    if data[pos + 3 + used] != 0:
        return size, None, own_table, last  # sequences: decoded by zstd alone
    # nbSeq = 0: a single zero byte ends the block.
    return (size, regen, own_table, last) if used + 1 == size else None


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
