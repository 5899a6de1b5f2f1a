"""Byte-grouped lossless coding of floats: exponent bytes apart from mantissa bytes.

The bytes of a float are far from alike: the exponent takes a few dozen values (about 2.7
bits of entropy in a trained model) while the low mantissa bytes are close to random.
Coded together, an entropy coder sees a mix and gains little (zstd: 1.09× on MiniLM in
fp32); split into *planes* (byte ``k`` of every value), the exponent plane shrinks to a
third and the mantissa planes are stored as they are. This is ZipNN's idea (Hershcovitch
et al., 2024); the format here is our own.

For the 8-bit-exponent formats (fp32, bf16) the sign bit and the exponent's lowest bit
trade places first, so one plane holds the whole exponent and the next one the sign and
7 mantissa bits; fp16 and fp64 planes are the plain bytes.

Body layout (integers are LEB128 varints)::

    body  = chunk log2 u8 · (coding u8 · length)^(chunks × width) · data*
    data  = the plane bytes of one chunk, raw or zstd-compressed (magicless frame),
            or (coding 2, version 10) in buckets:
    buckets = min log2 u8 · (coding u8 · length)^buckets · bucket data*

or, for a chunk's planes 0 and 1 together (coding 3 on both, version 12), the joint
plane and the rest of :mod:`fedsqueeze.codec.plane_joint`.

Chunks are ``2^log2`` consecutive values (the last one shorter), listed chunk by chunk,
each chunk's planes from the most significant byte (the exponent's) down. Chunks are
coded and decoded independently: a tensor of several chunks on all cores, a one-chunk
tensor on the calling thread (on shared cores a hand-off to a pool thread costs more
than the chunk). The table fixes every plane's decoded size from the element count
alone, so a hostile body can never make the decoder write more than ``numel × width``
bytes (each zstd frame is decoded with that bound).

**Buckets (format version 10).** The plane after the exponent of fp32 and bf16 values
(the sign and 7 highest mantissa bits) may be coded in buckets by the chunk's exponents
(:mod:`fedsqueeze.codec.plane_buckets`), on chunks of more than 64K values: 0.56% off
all-MiniLM-L6-v2, where that plane was stored raw.

**Joint planes (format version 12).** Planes 0 and 1 of fp32 and bf16 values may be
coded together instead: the exponent with its top 1-3 mantissa bits as one
Huffman-coded byte, the rest packed (:mod:`fedsqueeze.codec.plane_joint`), where that
saves 0.2% of the two planes; preferred to buckets (as small or smaller on trained
weights, and decoded in one pass where buckets need a sort). Never on XOR deltas.

The exponent plane is compressed with literal-only zstd parameters (the shortest match
search: in effect zstd's Huffman literals, one table per 128 KiB block): as small as pure
Huffman coding on these planes and twice as fast as level 1, whose matches cost more than
they save here. Mantissa planes get the same parameters (level 1 up to 64 KiB) and stay
raw unless that saves at least 1%; a raw plane is decoded without a copy, as a view into
the body. Planes are split out of the words and joined back block by block
(:mod:`fedsqueeze.codec.planes`), the decoded values land in NumPy memory; a chunk
coded jointly is coded from its words directly (two compiled passes, no planes split
first: :func:`fedsqueeze.codec.plane_joint.encode_words`).

**Finiteness on the way.** Asked to (``finite=True``, fp32 and bf16 values without a
base), the encoder raises :class:`NonFiniteFound` for a NaN or an Inf, read from the
largest exponent of each chunk, which the joint plan's statistics or the split
exponent plane give anyway; the model encoder then needs no pass of its own over
such tensors (:meth:`fedsqueeze.codec.tensor_encode.TensorEncoder.encode_checked`).

Encoding holds, beyond its input and the body it returns, a few chunks (one per core,
and one more) at a time: a delta's XOR is made block by block as its planes are split
(never the whole XOR), the chunks' planes are split into one staging map whose slots
are reused chunk after chunk, and each chunk's planes and frames are copied into the
body's own map, in order, while the other cores code the next chunks
(:func:`fedsqueeze.codec.workers.ordered_pipeline`). Large
buffers are maps of their own, not malloc's: freed, they go back to the system, where a
thread's malloc arena would keep them for later (several threads' arenas add up).
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from enum import IntEnum
from typing import TypeVar, cast

import numpy as np
import torch
import zstandard

from fedsqueeze.codec import jit, plane_buckets, plane_joint
from fedsqueeze.codec.bytesio import ByteReader, write_varint
from fedsqueeze.codec.literal_frames import LITERAL_PARAMS
from fedsqueeze.codec.planes import Plane, PlaneLayout, Words, join_planes, split_planes
from fedsqueeze.codec.workers import ordered_pipeline, parallel_map, workers
from fedsqueeze.errors import FormatError

#: Values per chunk written by default (2^20: a few MB per chunk, enough to spread a
#: large tensor over both cores while keeping zstd's tables adaptive).
DEFAULT_CHUNK_LOG2 = 20
MIN_CHUNK_LOG2 = 10
MAX_CHUNK_LOG2 = 26
#: Dtypes that can be grouped (their width is the number of planes).
GROUPED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SWAPPED = (torch.float32, torch.bfloat16)  # 8-bit exponents: swap sign and exponent LSB
_MIN_GAIN = 0.99  # a mantissa plane stays raw unless zstd saves at least 1%
#: Mantissa planes up to this many bytes get zstd level 1, larger ones the literal
#: parameters: on MiniLM's large planes those are as small (fp32: 255 bytes smaller in
#: 68 MB) and on XOR deltas' sparse planes 5% smaller and 2× faster; small planes keep
#: the bytes they always had (the golden vectors).
_LEVEL1_UP_TO = 1 << 16
#: Whether :func:`encode_grouped` may code planes in buckets by default (format version
#: 10). ``FEDSQUEEZE_BUCKETS=0`` keeps every body readable by builds before version 10
#: (a fleet whose edges are not all upgraded) and skips the buckets' decode cost.
BUCKETS = os.environ.get("FEDSQUEEZE_BUCKETS", "1") != "0"
#: Whether :func:`encode_grouped` may code planes 0 and 1 jointly by default (format
#: version 12; preferred to buckets where both apply: smaller on the models measured,
#: and decoded in one pass). ``FEDSQUEEZE_JOINT=0`` keeps bodies readable by builds
#: before version 12; ``FEDSQUEEZE_BUCKETS=0`` turns it off too (before version 10).
JOINT = BUCKETS and os.environ.get("FEDSQUEEZE_JOINT", "1") != "0"
_FORMAT = zstandard.FORMAT_ZSTD1_MAGICLESS
#: Bodies of at least this many bytes (at most: every plane raw) are built in a map of
#: their own (:func:`_mapped`), smaller ones in NumPy memory. A map's pages are fresh
#: (a fault each); malloc's reuse what the last tensors freed. Was 1 MiB: on
#: all-MiniLM-L6-v2 in bf16 (one-chunk tensors of 1-5 MB) 8 MiB took the lossless
#: encode from 256 to 207 ms of CPU (a side script); past a few MB the faults are a small
#: part of the coding, and a thread's malloc arena keeps no more than a few such bodies.
_MAPPED_FROM = 8 << 20
#: Private anonymous maps exist here (POSIX; elsewhere NumPy memory throughout).
_MAPS = hasattr(mmap, "MAP_PRIVATE")


_MANTISSA_PARAMS = zstandard.ZstdCompressionParameters.from_level(
    1, format=_FORMAT, write_content_size=False, write_checksum=False, write_dict_id=False
)

_local = threading.local()

#: A plane's coding: its bytes, or pieces whose bytes follow one another (buckets).
Coded = bytes | memoryview | list[bytes | memoryview]

T = TypeVar("T")
R = TypeVar("R")


class NonFiniteFound(Exception):
    """A NaN or Inf among the values :func:`encode_grouped` was asked to check
    (``finite=True``): the caller decides what to do with the tensor."""


class PlaneCoding(IntEnum):
    """How one plane of one chunk is stored."""

    RAW = 0
    ZSTD = 1
    #: In buckets by the chunk's exponent (format version 10; plane 1 of fp32 and bf16
    #: only): see the module's text.
    BUCKETS = 2
    #: Planes 0 and 1 coded jointly (format version 12; fp32 and bf16 only, both planes
    #: of a chunk or neither): :mod:`fedsqueeze.codec.plane_joint`.
    JOINT = 3


def _coders() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdCompressor]:
    # zstandard's (de)compressors are not thread-safe: one set per thread.
    coders = getattr(_local, "coders", None)
    if coders is None:
        coders = _local.coders = (
            zstandard.ZstdCompressor(compression_params=LITERAL_PARAMS),
            zstandard.ZstdCompressor(compression_params=_MANTISSA_PARAMS),
        )
    return coders


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor(format=_FORMAT)
    return d


def _layout(dtype: torch.dtype) -> PlaneLayout:
    return PlaneLayout(dtype.itemsize, dtype in _SWAPPED)


def _words(t: torch.Tensor) -> Words:
    """A contiguous CPU tensor's bits as a 1-D NumPy array of unsigned words (a view)."""
    signed = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return cast(Words, t.view(signed).numpy().view(_UINTS[t.element_size()]))


_UINTS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _code_planes(
    words: Words,
    ks: Sequence[int],
    layout: PlaneLayout,
    base: Words | None = None,
    into: Plane | None = None,
    buckets: bool = False,
    joint_planes: bool = False,
    finite: bool = False,
) -> list[tuple[PlaneCoding, Coded]]:
    """Planes ``ks`` of ``words`` (of ``words ^ base`` with a base), each compressed
    when that pays (else stored raw: a view of the plane, split into ``into`` when given,
    ``len(ks) × len(words)`` bytes, else into fresh arrays); with ``joint_planes``,
    planes 0 and 1 of an 8-bit-exponent layout coded jointly where that pays
    (:mod:`fedsqueeze.codec.plane_joint`, from the words with the compiled kernels),
    else with ``buckets`` plane 1 in buckets by plane 0 where that is smaller. With
    ``finite`` (an 8-bit-exponent layout, no base), raises :class:`NonFiniteFound` for
    a NaN or Inf among the values, found in a pass the coding makes anyway."""
    n = words.shape[0]
    planes = {
        k: np.empty(n, dtype=np.uint8) if into is None else into[i * n : (i + 1) * n]
        for i, k in enumerate(ks)
    }
    literal, level1 = _coders()
    joint_here = (
        joint_planes and layout.swapped and 0 in planes and 1 in planes and n > _LEVEL1_UP_TO
    )
    from_words = joint_here and base is None and layout.width in (2, 4) and jit.use(n)
    if from_words:
        joint, top = plane_joint.plan_words(words)
        if finite and top == 0xFF:
            raise NonFiniteFound
        if joint is not None:
            lower = {k: planes[k] for k in ks if k >= 2}
            p2, p3 = (lower[2], lower[3]) if layout.width == 4 else (planes[0][:0], planes[0][:0])
            head, rest = plane_joint.encode_words(words, joint, literal.compress, p2, p3)
            coded: list[tuple[PlaneCoding, Coded]] = [
                (PlaneCoding.JOINT, head),
                (PlaneCoding.JOINT, rest),
            ]
            return coded + [_coded_plane(k, plane, literal, level1) for k, plane in lower.items()]
        finite = False  # checked
    split_planes(words, planes, layout, base)
    if finite and int(planes[0].max()) == 0xFF:
        raise NonFiniteFound
    out: list[tuple[PlaneCoding, Coded]] = []
    joint = None
    if joint_here and not from_words:
        joint = plane_joint.plan(planes[0], planes[1])
    if joint is not None:
        head, rest = plane_joint.encode(planes[0], planes[1], joint, literal.compress)
        out += [(PlaneCoding.JOINT, head), (PlaneCoding.JOINT, rest)]
    for k, plane in planes.items():
        if joint is not None and k < 2:
            continue
        if buckets and k == 1 and layout.swapped and 0 in planes and n > _LEVEL1_UP_TO:
            plan = plane_buckets.plan(planes[0], plane)
            if plan is not None:
                pieces = plane_buckets.encode(planes[0], plane, literal.compress, _MIN_GAIN, plan)
                if sum(len(p) for p in pieces) < n:  # (the plan asked for its 0.2% already)
                    out.append((PlaneCoding.BUCKETS, pieces))
                    continue
        out.append(_coded_plane(k, plane, literal, level1))
    return out


def _coded_plane(
    k: int,
    plane: Plane,
    literal: zstandard.ZstdCompressor,
    level1: zstandard.ZstdCompressor,
) -> tuple[PlaneCoding, Coded]:
    """Plane ``k`` compressed where that pays (the exponent plane: any saving; the
    others: :data:`_MIN_GAIN`), else raw (a view of it)."""
    data = plane.data
    small = len(data) <= _LEVEL1_UP_TO
    packed = (level1 if k and small else literal).compress(data)
    if len(packed) < (len(data) if k == 0 else _MIN_GAIN * len(data)):
        return PlaneCoding.ZSTD, packed
    return PlaneCoding.RAW, data


def encode_grouped(
    bits: torch.Tensor,
    dtype: torch.dtype,
    chunk_log2: int = DEFAULT_CHUNK_LOG2,
    base: torch.Tensor | None = None,
    buckets: bool | None = None,
    joint: bool | None = None,
    finite: bool = False,
) -> memoryview:
    """The grouped body of a tensor's bits (or of its bits XOR ``base``'s): a read-only
    view of bytes in huge-page memory (NumPy's, or a private map for a body of 1 MiB or
    more), which fresh ``bytes`` of this size are not (their first-touch page faults
    cost more than the coding on some machines).

    Memory beyond the input and the body is a few chunks (one per core and one more:
    their planes, in one staging map, and compressed frames). Chunks are coded on every
    core and their planes written in order, after room for the table, into one buffer
    of the largest size a body can take (every plane raw): its pages past the body are
    never touched, so never resident, and are handed back once the body is done. The
    table, whose length is known only then, goes just before the first plane. The
    bytes are those of coding every chunk at once.

    Parameters
    ----------
    bits
        The values: a tensor of ``dtype`` or an integer view of the same width (XOR
        deltas; the sign/exponent swap is a bit permutation, so it commutes with XOR).
        Any shape, any device.
    dtype
        The float dtype the bits belong to, in :data:`GROUPED_DTYPES`.
    chunk_log2
        log2 of the values per chunk.
    base
        With a base (as many values, of ``dtype`` or an integer view of its width),
        the body codes ``bits ^ base``, XORed block by block as the planes are split:
        the whole XOR is never held.
    buckets
        Whether planes may be coded in buckets (format version 10: see
        :func:`holds_buckets`; default :data:`BUCKETS`); off, the body is one a
        version-4 decoder reads.
    joint
        Whether planes 0 and 1 may be coded jointly (format version 12: see
        :func:`holds_joint`; default :data:`JOINT` and :data:`BUCKETS`, without a
        ``base``).
    finite
        Whether to check that every value is finite on the way (fp32 and bf16 values,
        no ``base``): the largest exponent comes out of a pass the coding makes
        anyway (the joint coder's statistics, or the split exponent plane), where a
        check of its own reads the whole tensor once more.

    Raises
    ------
    NonFiniteFound
        With ``finite``: a NaN or an Inf among the values.
    """
    if not MIN_CHUNK_LOG2 <= chunk_log2 <= MAX_CHUNK_LOG2:
        raise ValueError(f"chunk_log2 must be in {MIN_CHUNK_LOG2}..{MAX_CHUNK_LOG2}")
    if dtype not in GROUPED_DTYPES or bits.element_size() != dtype.itemsize:
        raise ValueError(f"cannot group {bits.dtype} values as {dtype}")
    if base is not None and (base.element_size() != dtype.itemsize or base.numel() != bits.numel()):
        raise ValueError(f"cannot XOR {bits.numel()} values with {base.numel()} {base.dtype}")
    if finite and (dtype not in _SWAPPED or base is not None):
        raise ValueError("finiteness is checked on the way only for fp32 and bf16 values, no base")
    if buckets is None:
        buckets = BUCKETS
    if joint is None:
        # Joint planes are for values' own exponents and mantissas, not an XOR delta's
        # (mostly zero bytes, which zstd codes better apart); a caller passing bits
        # already XORed says so itself.
        joint = JOINT and BUCKETS and base is None
    layout = _layout(dtype)
    words = _host_words(bits)
    base_words = None if base is None else _host_words(base)
    numel = words.shape[0]
    size = 1 << chunk_log2
    every = tuple(range(layout.width))
    starts = range(0, numel, size)
    # Every plane takes at most its raw size (a frame is kept only when smaller).
    room = 1 + len(starts) * layout.width * (1 + _varint_size(min(size, numel)))
    bound = room + numel * layout.width
    mapped = _mapped(bound) if bound >= _MAPPED_FROM and _MAPS else None
    out = np.empty(bound, dtype=np.uint8) if mapped is None else np.frombuffer(mapped, np.uint8)
    table = bytearray([chunk_log2])
    at = room
    # Chunks are coded on every core and copied into the body in order on this thread
    # while the other cores code the next ones: at most a core's worth plus one ahead
    # of the copy. Their planes are split into one map, a chunk's room each, reused
    # slot after slot: only the compressed frames are allocated per chunk.
    ahead = workers()[1] + 1 if len(starts) > 1 else 1
    staging = None
    if len(starts) > 1:
        staged = min(ahead, len(starts)) * size * layout.width
        staging = np.frombuffer(_mapped(staged), np.uint8) if _MAPS else np.empty(staged, np.uint8)

    def code(i: int) -> list[tuple[PlaneCoding, Coded]]:
        start, end = starts[i], starts[i] + size
        part = None if base_words is None else base_words[start:end]
        span = size * layout.width
        into = None if staging is None else staging[(i % ahead) * span :][:span]
        return _code_planes(words[start:end], every, layout, part, into, buckets, joint, finite)

    def emit(_: int, chunk: list[tuple[PlaneCoding, Coded]], out: Plane = out) -> None:
        nonlocal at
        for coding, data in chunk:
            pieces = data if isinstance(data, list) else [data]
            table.append(int(coding))
            write_varint(table, sum(len(p) for p in pieces))
            for piece in pieces:
                out[at : at + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
                at += len(piece)

    ordered_pipeline(code, len(starts), emit, ahead)
    del emit  # (its default holds the body's array)
    head = room - len(table)
    out[head:room] = np.frombuffer(table, dtype=np.uint8)
    if mapped is None:
        # realloc to the body's end: shrinks in place, handing the untouched pages back.
        out.resize(at, refcheck=False)
        return out[head:].data.toreadonly()
    del out  # no view of the map left: it can shrink
    mapped.resize(at)  # mremap: the pages past the body are unmapped
    return memoryview(mapped)[head:].toreadonly()


def _mapped(size: int) -> mmap.mmap:
    """``size`` bytes of anonymous memory mapped on their own (huge pages asked for):
    unmapped when the body goes, wherever it was made, not kept by the thread's malloc
    arena for later (which a body of a few MB would be: glibc serves those from the
    arena once large tensors have been freed, and arenas of several threads add up)."""
    # Private: a shared anonymous map would be shmem, outside the process's anonymous
    # memory (and huge pages).
    mapped = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapped.madvise(mmap.MADV_HUGEPAGE)
    return mapped


def _host_words(t: torch.Tensor) -> Words:
    """``t``'s bits as 1-D words on the CPU (a view of a contiguous CPU tensor)."""
    return _words(t.detach().to("cpu").contiguous().reshape(-1))


def _varint_size(value: int) -> int:
    """Bytes of ``value`` as a LEB128 varint."""
    return max(1, -(-value.bit_length() // 7))


def decode_grouped(
    body: bytes | memoryview,
    dtype: torch.dtype,
    numel: int,
    buckets: bool = False,
    joint: bool = False,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of :func:`encode_grouped`: ``numel`` values of ``dtype`` (1-D, on the CPU).
    ``buckets``: whether planes in buckets may appear (a format version 10 container);
    ``joint``: whether planes coded jointly may (version 12). With ``base`` (``numel``
    values of ``dtype``'s width, any shape and device), the values decoded are XORed with
    its bits: a lossless delta's, each chunk in the task that decodes it, while its words
    are in that core's cache (a pass of its own over the whole tensor, on one thread,
    took 11.8 of the 145 ms of MiniLM's fp32 delta decode).

    Raises
    ------
    FormatError
        A table that does not match ``numel`` and ``dtype``, a length beyond the body,
        a plane that does not decode to exactly its size, buckets or joint planes where
        they may not be, or trailing bytes.
    """
    if dtype not in GROUPED_DTYPES:
        raise FormatError(f"byte-grouped values of a {dtype} tensor")
    layout = _layout(dtype)
    width = layout.width
    reader = ByteReader(body)
    chunk_log2 = reader.u8("chunk size")
    if not MIN_CHUNK_LOG2 <= chunk_log2 <= MAX_CHUNK_LOG2:
        raise FormatError(f"chunk of 2^{chunk_log2} values")
    size = 1 << chunk_log2
    chunks = -(-numel // size)
    lengths = [
        _table_entry(reader.u8("plane coding"), reader.varint("plane length", len(body)))
        for _ in range(chunks * width)
    ]
    _check_codings(lengths, layout, buckets, joint)
    entries: list[tuple[PlaneCoding, memoryview, int]] = []
    for i, (coding, length) in enumerate(lengths):
        count = min(size, numel - (i // width) * size)
        if coding is PlaneCoding.RAW and length != count:
            raise FormatError(f"raw plane of {length} bytes for {count} values")
        entries.append((coding, reader.take(length, "plane data"), count))
    if reader.remaining:
        raise FormatError(f"{reader.remaining} bytes after the last plane")
    if base is not None and (base.numel() != numel or base.element_size() != width):
        raise ValueError(f"cannot XOR {numel} {dtype} values with {base.numel()} {base.dtype}")
    base_words = None if base is None else _host_words(base)
    out = _empty(numel, dtype)
    words = _words(out)

    def decode_chunk(c: int) -> None:
        chunk = words[c * size :][:size]
        _decode_chunk(entries[c * width : (c + 1) * width], layout, chunk)
        if base_words is not None:
            np.bitwise_xor(chunk, base_words[c * size :][:size], out=chunk)

    _run(decode_chunk, range(chunks))
    return out


def _decode_chunk(
    entries: Sequence[tuple[PlaneCoding, memoryview, int]], layout: PlaneLayout, out: Words
) -> None:
    """A chunk's words from its planes' entries."""
    if entries[0][0] is PlaneCoding.JOINT:
        (_, head, count), (_, rest, _) = entries[0], entries[1]
        joint, coded, packed = plane_joint.decode(head, rest, count, _bucket_part)
        lower = [_plane(coding, data, n) for coding, data, n in entries[2:]]
        plane_joint.into_words(joint, coded, packed, lower, out)
        return
    join_planes(_chunk_planes(entries), layout, out)


def _chunk_planes(entries: Sequence[tuple[PlaneCoding, memoryview, int]]) -> list[Plane]:
    """A chunk's planes, in order (a plane in buckets after the exponent plane it needs)."""
    planes: list[Plane] = []
    for coding, data, count in entries:
        if coding is PlaneCoding.BUCKETS:
            planes.append(plane_buckets.decode(data, count, planes[0], _bucket_part))
        else:
            planes.append(_plane(coding, data, count))
    return planes


def _bucket_part(coding: int, data: memoryview, size: int) -> Plane:
    return _plane(PlaneCoding(coding), data, size)


def _check_codings(
    table: Sequence[tuple[PlaneCoding, int]], layout: PlaneLayout, buckets: bool, joint: bool
) -> None:
    """Buckets only where they can be: plane 1 of an 8-bit-exponent layout, in a container
    of format version 10 or later; joint planes as a chunk's planes 0 and 1 of such a
    layout, both or neither, in a container of version 12 or later."""
    width = layout.width
    for i, (coding, _) in enumerate(table):
        k = i % width
        if coding is PlaneCoding.BUCKETS and not (buckets and layout.swapped and k == 1):
            where = "before format version 10" if not buckets else f"as plane {k}"
            raise FormatError(f"a plane in buckets {where}")
        if coding is PlaneCoding.JOINT:
            if not joint:
                raise FormatError("joint planes before format version 12")
            if not layout.swapped or k > 1:
                raise FormatError(f"a joint plane as plane {k} of {width}-byte values")
        if k == 1 and (coding is PlaneCoding.JOINT) != (table[i - 1][0] is PlaneCoding.JOINT):
            raise FormatError("a joint plane without its pair")


def holds_buckets(body: bytes | memoryview, dtype: torch.dtype, numel: int) -> bool:
    """Whether a grouped body written by :func:`encode_grouped` holds a plane in buckets
    (it then needs format version 10)."""
    return PlaneCoding.BUCKETS in _codings(body, dtype, numel)


def holds_joint(body: bytes | memoryview, dtype: torch.dtype, numel: int) -> bool:
    """Whether a grouped body written by :func:`encode_grouped` holds planes coded
    jointly (it then needs format version 12)."""
    return PlaneCoding.JOINT in _codings(body, dtype, numel)


def _codings(body: bytes | memoryview, dtype: torch.dtype, numel: int) -> set[int]:
    reader = ByteReader(body)
    chunk_log2 = reader.u8("chunk size")
    chunks = -(-numel // (1 << chunk_log2))
    found = set()
    for _ in range(chunks * dtype.itemsize):
        found.add(reader.u8("plane coding"))
        reader.varint("plane length", len(body))
    return found


def _empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor whose memory NumPy allocated: NumPy asks the kernel
    for huge pages on large buffers, and first-touch page faults on fresh memory cost
    more than the whole decode on some machines (6× a warm fill on these)."""
    words = np.empty(numel, dtype=_UINTS[dtype.itemsize])
    signed = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    return torch.from_numpy(words).view(signed).view(dtype)


def _run(fn: Callable[[T], R], chunks: Sequence[T]) -> list[R]:
    """``fn`` over a tensor's chunks: on all cores when there are several, else on the
    calling thread (handing one chunk to a pool thread and waiting costs more than it
    can save, often milliseconds on a loaded machine)."""
    return parallel_map(fn, chunks) if len(chunks) > 1 else [fn(c) for c in chunks]


def _table_entry(code: int, length: int) -> tuple[PlaneCoding, int]:
    try:
        return PlaneCoding(code), length
    except ValueError as exc:
        raise FormatError(f"unknown plane coding {code}") from exc


def stream_grouped(
    read: Callable[[int], bytes],
    length: int,
    dtype: torch.dtype,
    numel: int,
    buckets: bool = False,
    joint: bool = False,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Decode a grouped body of ``length`` bytes chunk by chunk, reading it with ``read``
    (which returns exactly the bytes asked for): yields ``(start, values)``, never
    holding more than one chunk. Same checks as :func:`decode_grouped`."""
    if dtype not in GROUPED_DTYPES:
        raise FormatError(f"byte-grouped values of a {dtype} tensor")
    layout = _layout(dtype)
    width = layout.width
    used = 0

    def take(count: int) -> bytes:
        nonlocal used
        if count > length - used:
            raise FormatError(f"grouped body: {count} bytes wanted, {length - used} left")
        used += count
        return read(count)

    def varint() -> int:
        value = 0
        for i in range(10):
            byte = take(1)[0]
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                return value
        raise FormatError("grouped body: varint longer than 10 bytes")

    chunk_log2 = take(1)[0]
    if not MIN_CHUNK_LOG2 <= chunk_log2 <= MAX_CHUNK_LOG2:
        raise FormatError(f"chunk of 2^{chunk_log2} values")
    size = 1 << chunk_log2
    chunks = -(-numel // size)
    table: list[tuple[PlaneCoding, int]] = []
    for i in range(chunks * width):
        coding, plane_length = _table_entry(take(1)[0], varint())
        count = min(size, numel - (i // width) * size)
        if coding is PlaneCoding.RAW and plane_length != count:
            raise FormatError(f"raw plane of {plane_length} bytes for {count} values")
        table.append((coding, plane_length))
    _check_codings(table, layout, buckets, joint)
    for c in range(chunks):
        count = min(size, numel - c * size)
        entries = [
            (coding, memoryview(take(n)), count) for coding, n in table[c * width : (c + 1) * width]
        ]
        values = _empty(count, dtype)
        _decode_chunk(entries, layout, _words(values))
        yield c * size, values
    if used != length:
        raise FormatError(f"{length - used} bytes after the last plane")


def _plane(coding: PlaneCoding, data: memoryview, count: int) -> Plane:
    """One plane of ``count`` bytes; a zstd frame may not decode to more (bombs)."""
    if coding is PlaneCoding.RAW:
        return np.frombuffer(data, dtype=np.uint8)
    try:
        # A frame stating its content size gets a buffer of that size whatever
        # max_output_size says: refuse a wrong one first.
        declared = zstandard.get_frame_parameters(data, format=_FORMAT).content_size
        if declared not in (zstandard.CONTENTSIZE_UNKNOWN, count):
            raise FormatError(f"zstd plane declares {declared} bytes, expected {count}")
        raw = _decompressor().decompress(data, max_output_size=count, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise FormatError(f"corrupt zstd plane: {exc}") from exc
    if len(raw) != count:
        raise FormatError(f"zstd plane decoded to {len(raw)} bytes, expected {count}")
    return np.frombuffer(raw, dtype=np.uint8)


__all__ = [
    "DEFAULT_CHUNK_LOG2",
    "GROUPED_DTYPES",
    "PlaneCoding",
    "decode_grouped",
    "encode_grouped",
    "holds_buckets",
    "holds_joint",
    "stream_grouped",
]
