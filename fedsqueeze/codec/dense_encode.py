"""Dense quantized records encoded in a pipeline: each worker thread quantizes a chunk
and entropy-codes it while its codes are still in cache, on every core.

A large dense record (int8, per-channel, block-wise, NF4; 2, 4 or 8 bits, nearest
rounding) used to be encoded in passes one after the other: quantize the whole tensor
into a fresh code buffer, pack it, then hand all of it to zstd. Then (session 22) one
zstd stream at the record's level ran on the calling thread while the workers made the
codes: zstd was still ~30 ms of int8's ~45 ms encode of a 100 MB tensor, on one core.

Now a size sample from the middle of the codes picks the coder (:func:`choose_coder`):

* **literal-only pieces** (the usual case): every chunk of :data:`_CHUNK` values is
  compressed by zstd's literal-only parameters on the worker that made it, and the
  pieces are spliced into one ordinary frame (:mod:`fedsqueeze.codec.literal_frames`:
  older decoders read it as one stream; the new one decodes its pieces on all cores).
  On quantization codes those parameters are as small as zstd's level 3 (int8 codes
  of a 100 MB normal tensor: 4 bytes smaller; block-wise 4-bit: 0.03% larger, from a
  Huffman table per 128 KiB piece instead of per block) and 1.5× cheaper, and they
  run on both cores instead of one;
* **raw**, when literal coding saves less than :data:`MIN_GAIN` (3%) of the sample:
  no entropy stage at all. Not 1%: NF4 codes of a 100 MB normal tensor shrink by 2.3%
  (13,281,300 → 12,971,683 bytes) and their decode then cost 2.1x the CPU time (113
  against 53 ms, side by side): the decode target NF4 met raw would be lost for 2.3%.
  On MiniLM this keeps NF4's large tensor raw, as before;
* **one stream** at the record's level, as before, when the sample's literal-only frame
  holds a match, or that level makes the sample more than :data:`LITERAL_SLACK`
  smaller (codes with repeats: a delta's zeros, low-entropy 4-bit codes); and when
  more than one piece turned out to hold matches (a splice carries one such piece:
  :mod:`~fedsqueeze.codec.literal_frames`; the codes are made by then, only zstd runs
  again, on one core). On the real MiniLM weights the one large tensor (the word
  embeddings, 11.7M values) has one such piece of 45 in int8 (the rows of unused
  tokens): it stays in the splice, the only piece decoded with its matches.

The single stream uses zstd's single-threaded compressor: zstd's multi-threaded mode
(``threads=-1``) cost 1.8x its CPU time on these codes (43 against 24 ms for int8's 25
MB) and competed with the quantization for the same two cores. Its frame differs from
one call's by a few bytes (a stream keeps its window in a ring buffer) and decodes to
the same codes, whatever the chunking or the threads' timing. A frame that is not
smaller than the codes is dropped, as in :func:`~fedsqueeze.codec.entropy.compress`.
Bodies under :data:`PIPELINE_ABOVE` (the golden vectors among them) never come here and
keep their one-call frames.

The kernels are NumPy (single-threaded, GIL released, about a microsecond a call): a
torch operation called from a worker thread may fork its own OpenMP team, and its fixed
cost made chunks that fit in a core's cache slower than large ones. They compute
exactly what :func:`~fedsqueeze.codec.quantization.quantize` and
:func:`~fedsqueeze.codec.bitpack.pack_bits` compute (the same float32 operations in the
same order; the tests compare the codes bit for bit), then pack the chunk's codes while
they are still in cache. The code buffer is NumPy memory: NumPy asks the kernel for huge
pages for large buffers, which makes its first touch several times cheaper than
torch's 4 KiB pages here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import zstandard
from torch import Tensor

from fedsqueeze.codec import entropy, jit
from fedsqueeze.codec.blockwise import (
    DQ_GROUP,
    DQ_TABLE,
    FP16_SCALE_ERROR,
    NF4_CODEBOOK,
    DoubleQuant,
    group_of,
)
from fedsqueeze.codec.chunks import aligned_bounds, np_scratch, run_chunks, submit
from fedsqueeze.codec.fused_blocks import block_params, fusable, stored_format
from fedsqueeze.codec.kernels import Runs, nf4_midpoints, nf4_tables
from fedsqueeze.codec.literal_frames import Piece, compress_piece, emit_piece
from fedsqueeze.codec.quantization import MAX_MAGNITUDE, RANGE_ERROR, QuantParams
from fedsqueeze.codec.spec import QuantScheme, QuantSpec, Rounding, ScaleFormat

__all__ = [
    "ENABLED",
    "FUSED_SCALES",
    "LITERAL",
    "LITERAL_SLACK",
    "MIN_GAIN",
    "PIPELINE_ABOVE",
    "Coder",
    "DenseBody",
    "OutOfRange",
    "choose_coder",
    "encode_dense",
    "encode_dense_blocks",
    "fuses_blocks",
    "pipelines",
    "quantize_packed",
]

#: Packed body size (bytes) from which a dense record is encoded in a pipeline (below
#: it, one zstd call costs less than the hand-offs, and small records, the golden
#: vectors among them, keep their one-call frames).
PIPELINE_ABOVE = 4 << 20
#: Values per chunk of work: its float32 temporaries (1 MiB) stay in a core's L2 cache.
_CHUNK = 1 << 18
_WIDTHS = (2, 4, 8)
#: Pieces in flight per worker thread (compressed pieces wait at most this many chunks
#: for the calling thread: bounded memory on a tensor of any size).
_AHEAD = 4
#: A body is stored raw unless literal-only zstd makes its sample this much smaller.
MIN_GAIN = 0.03
#: Literal-only pieces are kept unless the record's level makes the sample this much
#: smaller again.
LITERAL_SLACK = 0.005
#: Whether :class:`~fedsqueeze.codec.tensor_encode.TensorEncoder` uses the pipeline (off:
#: the stages one after the other and zstd's threads, as before; for the benchmark's
#: side-by-side runs).
ENABLED = True
#: Whether block-wise parameters are chosen chunk by chunk inside the pass by the
#: NumPy kernels too (:func:`encode_dense_blocks`; the same bytes). The compiled kernel
#: (:func:`fedsqueeze.codec.jit.block_params`) always is, where numba runs: one compiled
#: loop per chunk, and one read of the tensor fewer. The NumPy version is off by
#: default: measured side by side on these 2-core machines it saved no CPU time on one
#: thread (the pass it removes reads memory once more, but each chunk then runs ~30
#: small NumPy operations) and cost ~10% with two worker threads (their Python steps
#: contend for the GIL); BENCHMARKS.md has the figures.
FUSED_SCALES = False
#: Whether large bodies may be coded as literal-only pieces (off: one stream at the
#: record's level, as in the previous version; for the benchmark's side-by-side rows).
LITERAL = True

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
#: :func:`fedsqueeze.codec.jit.block_params`' codes for the schemes and scale formats.
_SCHEME_CODES = {QuantScheme.AFFINE: 0, QuantScheme.SYMMETRIC: 1, QuantScheme.NF4: 2}
_FORMAT_CODES = {ScaleFormat.FP32: 0, ScaleFormat.FP16: 1, ScaleFormat.BF16: 2, ScaleFormat.DQ8: 3}


@dataclass(frozen=True)
class DenseBody:
    """A dense record's body, ready for :class:`~fedsqueeze.codec.container.TensorRecord`.

    Attributes
    ----------
    body
        The magicless zstd frame of the packed codes, or the packed codes themselves
        (views of NumPy buffers that nothing else holds).
    raw_length
        The packed codes' length when ``body`` is a frame, else ``None``.
    packed
        uint8 ``[ceil(n · bits / 8)]``: the packed codes (for a decoded copy, or the
        rANS coder).
    """

    body: memoryview
    raw_length: int | None
    packed: Tensor


def pipelines(values: Tensor, qp: QuantParams, rounding: Rounding, channels: object) -> bool:
    """Whether the pipeline's kernels take these values (:func:`encode_dense` with zstd
    on, :func:`quantize_packed` without): float32 on the CPU, nearest rounding, linear or
    NF4 codes of 2, 4 or 8 bits, per tensor or in runs, whose packed codes fill at least
    :data:`PIPELINE_ABOVE` bytes."""
    per_set = qp.scale.dim() == 1
    return (
        values.device.type == "cpu"
        and values.dtype == torch.float32
        and values.dim() == 1
        and rounding is Rounding.NEAREST
        and qp.bits in _WIDTHS
        and qp.codebook is None
        and (not per_set or isinstance(channels, Runs))
        and -(-values.numel() * qp.bits // 8) >= PIPELINE_ABOVE
    )


def fuses_blocks(values: Tensor, q: QuantSpec, channels: object, level: int) -> bool:
    """Whether :func:`encode_dense_blocks` takes these values: :func:`pipelines`'
    conditions, and a block-wise or per-channel spec whose parameters are chosen chunk by chunk
    (:func:`~fedsqueeze.codec.fused_blocks.fusable`) by the compiled kernel, or by the
    NumPy one with :data:`FUSED_SCALES` and zstd on."""
    compiled = jit.use(values.numel())
    return (
        (compiled or (FUSED_SCALES and level > 0))
        and fusable(q, channels, compiled)
        and values.device.type == "cpu"
        and values.dtype == torch.float32
        and values.dim() == 1
        and -(-values.numel() * q.bits // 8) >= PIPELINE_ABOVE
    )


def encode_dense(values: Tensor, qp: QuantParams, runs: Runs | None, level: int) -> DenseBody:
    """Quantize ``values`` (float32 ``[n]``) with ``qp``, pack the codes and zstd them at
    ``level``, overlapped (see the module docstring): the codes of
    ``pack_bits(quantize(values, qp, NEAREST, runs), bits)``, streamed through zstd's
    single-threaded compressor (or raw, by :func:`~fedsqueeze.codec.entropy.compress`'s
    rules)."""
    packed = np.empty(-(-values.numel() * qp.bits // 8), dtype=np.uint8)
    kernel = _kernel(values, qp, runs, packed)
    return _encode(kernel, packed, values.numel(), qp.bits, runs, level, group_of(qp.scale_format))


class OutOfRange(ValueError):
    """A block of the values :func:`encode_dense_blocks` was given holds a NaN, an Inf
    or a value beyond its ``limit``: nothing was encoded (the caller finds out which, and
    says so)."""


def encode_dense_blocks(
    values: Tensor, q: QuantSpec, runs: Runs, level: int, limit: float = MAX_MAGNITUDE
) -> tuple[QuantParams, DenseBody]:
    """:func:`encode_dense` of block-wise or per-channel spec ``q`` (blocks or rows in
    ``runs``; :func:`fused_blocks.fusable <fedsqueeze.codec.fused_blocks.fusable>`) with
    its parameters chosen chunk by chunk
    inside the pass (:func:`fedsqueeze.codec.jit.block_params`, or
    :mod:`fedsqueeze.codec.fused_blocks` without numba): the parameters
    :func:`~fedsqueeze.codec.quantization.choose_qparams` chooses, and the same body
    (stored raw when ``level <= 0``, as ``entropy=0`` stores it).

    The compiled kernel checks every block on the way: a NaN, an Inf or a value beyond
    ``±limit`` (at most :data:`~fedsqueeze.codec.quantization.MAX_MAGNITUDE`) raises
    :class:`OutOfRange`, so a caller need not read the values once more to check them
    first.

    Raises
    ------
    OutOfRange
        A value that is not finite or is beyond ``±limit``.
    ValueError
        The same, from the NumPy kernels (an fp16 scale beyond 65504 too).
    """
    count = values.numel()
    fmt = stored_format(q)
    x: F32 = values.detach().contiguous().numpy()
    scale = np.empty(runs.count(count), dtype=np.float32)
    zp = np.empty_like(scale)
    packed = np.empty(-(-count * q.bits // 8), dtype=np.uint8)
    dq: DoubleQuant | None = None
    if jit.use(count):
        make, dq = _compiled_blocks(x, packed, q, runs, scale, zp, limit)
    else:
        make = _numpy_blocks(x, packed, q, runs, scale, zp)
    body = _encode(make, packed, count, q.bits, runs, level, group_of(fmt))
    qp = QuantParams(
        q.bits, q.scheme, torch.from_numpy(scale), torch.from_numpy(zp), scale_format=fmt,
        double_quant=dq,
    )  # fmt: skip
    return qp, body


def _numpy_blocks(
    x: F32, packed: U8, q: QuantSpec, runs: Runs, scale: F32, zp: F32
) -> Callable[[int, int], None]:
    """``chunk(start, stop)`` of :func:`encode_dense_blocks` by the NumPy kernels
    (:func:`fedsqueeze.codec.fused_blocks.block_params`, then :func:`_chunk`)."""
    length, bits, fmt = runs.length, q.bits, stored_format(q)
    nf4 = q.scheme is QuantScheme.NF4
    params: dict[str, Any]
    if nf4:
        below, inside = nf4_tables(NF4_CODEBOOK)
        params = {"below": below.numpy(), "inside": inside.numpy(), "scale": scale}
    else:
        params = {
            "inv": np.empty_like(scale),
            "zp": zp,
            "qmin": np.float32(0.0 if q.scheme is QuantScheme.AFFINE else 1.0),
            "qmax": np.float32((1 << bits) - 1),
        }
    kernel = partial(_chunk, x, packed, bits, runs, _nf4_codes if nf4 else _linear_codes, params)

    def chunk(start: int, stop: int) -> None:
        r0, r1 = start // length, -(-stop // length)
        block_params(x[start:stop], length, bits, q.scheme, fmt, scale[r0:r1], zp[r0:r1])
        if not nf4:  # as _kernel: the reciprocal in float32
            np.divide(np.float32(1.0), scale[r0:r1], out=params["inv"][r0:r1])
        kernel(start, stop)

    return chunk


def _compiled_blocks(
    x: F32, packed: U8, q: QuantSpec, runs: Runs, scale: F32, zp: F32, limit: float
) -> tuple[Callable[[int, int], None], DoubleQuant | None]:
    """``chunk(start, stop)`` of :func:`encode_dense_blocks` by the compiled kernel
    (:func:`fedsqueeze.codec.jit.block_encode`): in steps that stay in cache, the
    blocks' parameters (checking the values as it goes), then their codes; and, with
    double-quantized scales, the codes and exponents it fills."""
    nf4 = q.scheme is QuantScheme.NF4
    fmt = stored_format(q)
    scheme, fmt_code = _SCHEME_CODES[q.scheme], _FORMAT_CODES[fmt]
    bound = np.float32(min(limit, MAX_MAGNITUDE))
    inv = scale if nf4 else np.empty_like(scale)  # NF4 has no reciprocals (not written)
    mids = nf4_midpoints(NF4_CODEBOOK) if nf4 else np.zeros(15, dtype=np.float32)
    dq_codes = np.empty(scale.size if fmt is ScaleFormat.DQ8 else 0, dtype=np.uint8)
    exps = np.empty(-(-dq_codes.size // DQ_GROUP), dtype=np.int16)
    parts = (DQ_TABLE, dq_codes, exps)

    def chunk(start: int, stop: int) -> None:
        scratch = _scratch_u8("codes", stop - start) if q.bits < 8 or nf4 else packed[:0]
        status = jit.block_encode(
            x, start, stop, runs.length, q.bits, scheme, fmt_code, bound, scale, zp, inv,
            parts, mids, packed, scratch,
        )  # fmt: skip
        if status == 1:  # choose_qparams' words where the bound is its own
            raise OutOfRange(
                RANGE_ERROR
                if bound == np.float32(MAX_MAGNITUDE)
                else f"values must be finite, with |x| <= {float(bound):g}"
            )
        if status == 2:
            raise OutOfRange(FP16_SCALE_ERROR)
        if status:  # cannot happen: chunks start on a group (_bounds)
            raise RuntimeError("a chunk of double-quantized blocks starts inside a group")

    dq = None
    if fmt is ScaleFormat.DQ8:
        dq = DoubleQuant(torch.from_numpy(dq_codes), torch.from_numpy(exps))
    return chunk, dq


def _encode(
    kernel: Callable[[int, int], None],
    packed: U8,
    count: int,
    bits: int,
    runs: Runs | None,
    level: int,
    group: int = 1,
) -> DenseBody:
    """The body of ``encode_dense``: ``kernel(start, stop)`` makes the packed codes of
    values ``[start, stop)`` into ``packed``; chunks start on ``group`` runs."""
    bounds = _bounds(count, 8 // bits, runs, group)
    per_byte = 8 // bits
    byte_bounds = [(start // per_byte, -(-stop // per_byte)) for start, stop in bounds]
    done = [False] * len(bounds)
    nbytes = packed.size

    def make(i: int) -> None:
        kernel(*bounds[i])

    if nbytes < entropy.MIN_COMPRESSED or level <= 0:  # entropy.compress leaves these raw
        run_chunks(lambda start, stop: make(start), [(i, i + 1) for i in range(len(bounds))])
        return _raw(packed)

    # The size sample comes first, from the chunks that hold it; it picks the coder.
    lo = max(0, nbytes // 2 - entropy.SAMPLE_BYTES // 2)
    hi = min(nbytes, lo + entropy.SAMPLE_BYTES)
    first = [i for i, (b0, b1) in enumerate(byte_bounds) if b1 > lo and b0 < hi]
    run_chunks(lambda start, stop: make(start), [(i, i + 1) for i in first])
    for i in first:
        done[i] = True
    coder = (
        choose_coder(packed.data[lo:hi], level) if LITERAL else _one_stream(packed, lo, hi, level)
    )
    if coder is Coder.RAW:
        run_chunks(
            lambda start, stop: make(start),
            [(i, i + 1) for i in range(len(bounds)) if not done[i]],
        )
        return _raw(packed)
    if coder is Coder.LITERAL:
        spliced = _spliced(packed, byte_bounds, done, make)
        if spliced is not None:
            return spliced
        # Pieces held matches (rare on quantization codes): one stream after all.
        done = [True] * len(bounds)
    return _streamed(packed, byte_bounds, done, make, level)


class Coder(enum.Enum):
    """How a dense body is entropy-coded (:func:`choose_coder`)."""

    #: Stored raw: literal coding shrinks the sample by less than :data:`MIN_GAIN`.
    RAW = "raw"
    #: Literal-only pieces on every core, spliced into one frame
    #: (:mod:`fedsqueeze.codec.literal_frames`).
    LITERAL = "literal"
    #: One zstd stream at the record's level (matches pay off).
    STREAM = "stream"


def choose_coder(sample: memoryview, level: int) -> Coder:
    """The coder for a body whose middle is ``sample``: literal-only zstd unless it
    saves less than :data:`MIN_GAIN` of the sample (raw), or it finds a match in the
    sample (the pieces would hold matches: one stream), or the record's level makes
    the sample more than :data:`LITERAL_SLACK` smaller (one stream at that level:
    codes with repeats, such as a delta's zeros). Two compressions of at most 256 KiB,
    about half a millisecond."""
    size = len(sample)
    piece = compress_piece(sample)
    if piece is None or piece.matches:
        return Coder.STREAM
    literal = len(piece.frame)
    if literal >= (1.0 - MIN_GAIN) * size:
        return Coder.RAW
    at_level = len(zstandard.ZstdCompressor(level=level, write_content_size=False).compress(sample))
    return Coder.LITERAL if literal <= (1.0 + LITERAL_SLACK) * (at_level - 4) else Coder.STREAM


def _one_stream(packed: U8, lo: int, hi: int, level: int) -> Coder:
    """The coder before literal pieces (:data:`LITERAL` off): one stream unless zstd at
    ``level`` saves less than 3% of the sample."""
    sample = packed.data[lo:hi]
    size = len(zstandard.ZstdCompressor(level=level).compress(sample))
    return Coder.STREAM if size < 0.97 * len(sample) else Coder.RAW


def _spliced(
    packed: U8, byte_bounds: list[tuple[int, int]], done: list[bool], make: Callable[[int], None]
) -> DenseBody | None:
    """Each chunk made (unless ``done``) and compressed as a literal-only piece on a
    worker, the pieces spliced in order into one frame; ``None`` when more than one
    piece held a match (every chunk is made by then)."""
    nbytes = packed.size
    view = packed.data
    count = len(byte_bounds)
    spliced = True  # read by the workers' piece() (a closure cell): off stops compressing

    def piece(i: int) -> Piece | None:
        if not done[i]:
            make(i)
        if not spliced:
            return None  # the splice is off: only the codes are needed now
        b0, b1 = byte_bounds[i]
        return compress_piece(view[b0:b1])

    # A window of pieces in flight, so the compressed pieces waiting for the calling
    # thread stay a few chunks' worth, whatever the tensor's size.
    ahead = _AHEAD * max(1, torch.get_num_threads())
    futures: dict[int, Future[Piece | None]] = {}
    submitted = 0
    frame = _Frame(nbytes, skip=0)
    window = 0
    matched = 0
    try:
        for i in range(count):
            while submitted < min(count, i + ahead):
                futures[submitted] = submit(partial(piece, submitted))
                submitted += 1
            got = futures.pop(i).result()
            if not spliced:
                continue
            matched += got is not None and got.matches
            if got is None or (i and got.window > window) or matched > 1:
                spliced = False
                continue
            if i == 0:
                window = got.window
                frame.add(memoryview(got.frame)[: got.header])
            emit_piece(got, i == count - 1, frame.add)
    finally:
        for future in futures.values():  # on an error, wait for the chunks still running
            future.exception()
    if not spliced:
        return None
    body = frame.body()
    if body is None:
        return _raw(packed)
    return DenseBody(body, nbytes, torch.from_numpy(packed))


def _streamed(
    packed: U8,
    byte_bounds: list[tuple[int, int]],
    done: list[bool],
    make: Callable[[int], None],
    level: int,
) -> DenseBody:
    """The chunks made on the workers (unless ``done``) while one zstd stream at
    ``level`` compresses them in order on the calling thread."""
    nbytes = packed.size
    futures: list[Future[None] | None] = [
        None if done[i] else submit(partial(make, i)) for i in range(len(byte_bounds))
    ]
    compressor = zstandard.ZstdCompressor(
        level=level,
        write_checksum=False,
        write_content_size=False,
        write_dict_id=False,
        threads=0,  # one core: the quantization has the other (see the module docstring)
    )
    stream = compressor.compressobj(size=nbytes)  # as one call knows it: same parameters
    frame = _Frame(nbytes)
    view = packed.data
    try:
        for i, future in enumerate(futures):
            if future is not None:
                future.result()
            b0, b1 = byte_bounds[i]
            frame.add(stream.compress(view[b0:b1]))
        frame.add(stream.flush())
    finally:
        for future in futures:  # on an error, wait for the chunks still running
            if future is not None:
                future.exception()
    body = frame.body()
    if body is None:
        return _raw(packed)
    return DenseBody(body, nbytes, torch.from_numpy(packed))


class _Frame:
    """The compressor's output, less the 4-byte magic number (the magicless format's),
    copied piece by piece into one NumPy buffer as it comes (a join of the pieces at the
    end wrote 21 MB of fresh 4 KiB pages: 10 ms of int8's encode); holds at most
    ``limit − 1`` bytes, the most a kept frame may have."""

    def __init__(self, limit: int, skip: int = 4) -> None:
        self._buf = np.empty(max(0, limit - 1), dtype=np.uint8)
        self._skip = skip
        self._size = 0
        self._over = False

    def add(self, part: bytes | memoryview) -> None:
        view = memoryview(part)
        if self._skip:
            cut = min(self._skip, len(view))
            view, self._skip = view[cut:], self._skip - cut
        end = self._size + len(view)
        if end > self._buf.size:
            self._over = True
        elif not self._over:
            self._buf[self._size : end] = np.frombuffer(view, dtype=np.uint8)
        self._size = end

    def body(self) -> memoryview | None:
        """The frame's bytes (a view of the buffer), ``None`` when longer than allowed."""
        return None if self._over else self._buf[: self._size].data


def quantize_packed(values: Tensor, qp: QuantParams, runs: Runs | None) -> Tensor:
    """uint8 ``[ceil(n · bits / 8)]``: ``pack_bits(quantize(values, qp, NEAREST, runs),
    bits)`` by the pipeline's kernels, on the worker threads (no zstd), for values
    :func:`pipelines` takes (of any size)."""
    count = values.numel()
    bits = qp.bits
    packed = np.empty(-(-count * bits // 8), dtype=np.uint8)
    kernel = _kernel(values, qp, runs, packed)
    run_chunks(kernel, _bounds(count, 8 // bits, runs))
    return torch.from_numpy(packed)


def _raw(packed: U8) -> DenseBody:
    return DenseBody(packed.data, None, torch.from_numpy(packed))


# ---------------------------------------------------------------------- chunks
def _bounds(count: int, per_byte: int, runs: Runs | None, group: int = 1) -> list[tuple[int, int]]:
    """Chunks of about :data:`_CHUNK` values on bytes and on ``group`` runs
    (:func:`~fedsqueeze.codec.chunks.aligned_bounds`, as the decoder cuts them)."""
    return aligned_bounds(count, per_byte, 1 if runs is None else runs.length * group, _CHUNK)


def _kernel(
    values: Tensor, qp: QuantParams, runs: Runs | None, packed: U8
) -> Callable[[int, int], None]:
    """``fn(start, stop)``: the packed codes of values ``[start, stop)`` into ``packed``."""
    x: F32 = values.detach().contiguous().numpy()
    bits = qp.bits
    per_set = qp.scale.dim() == 1
    if not per_set:
        runs = None
    nf4 = qp.scheme is QuantScheme.NF4
    params: dict[str, Any]
    compiled = jit.use(x.size)
    if nf4:
        if compiled:  # the compiled kernel counts the midpoints below each value
            params = {"mids": nf4_midpoints(NF4_CODEBOOK)}
        else:
            below, inside = nf4_tables(NF4_CODEBOOK)
            params = {"below": below.numpy(), "inside": inside.numpy()}
        scale = qp.scale.detach().cpu()
        params["scale"] = scale.numpy() if per_set else np.float32(float(scale))
    else:
        # As quantize_linear: the reciprocal in float32, then used as a float32 factor.
        inv = (1.0 / qp.scale.detach().cpu()).to(torch.float32)
        zp = qp.zero_point.detach().cpu().to(torch.float32)
        params = {
            "inv": inv.numpy() if per_set else np.float32(float(inv)),
            "zp": zp.numpy() if per_set else np.float32(float(zp)),
            "qmin": np.float32(0.0 if qp.scheme is QuantScheme.AFFINE else 1.0),
            "qmax": np.float32((1 << bits) - 1),
        }
    if compiled:  # the parameters as the kernels take them, once per tensor
        names = ("scale",) if nf4 else ("inv", "zp")
        arrays = params | {name: jit.per_run(params[name]) for name in names}
        return partial(_jit_chunk, x, packed, bits, runs, nf4, arrays)
    codes_fn = _nf4_codes if nf4 else _linear_codes
    return partial(_chunk, x, packed, bits, runs, codes_fn, params)


def _jit_chunk(
    x: F32,
    packed: U8,
    bits: int,
    runs: Runs | None,
    nf4: bool,
    params: dict[str, Any],
    start: int,
    stop: int,
) -> None:
    """:func:`_chunk` by the compiled kernels (:mod:`fedsqueeze.codec.jit`): the same
    codes in one pass."""
    length = max(1, x.size) if runs is None else runs.length
    scratch = _scratch_u8("codes", stop - start) if bits < 8 or nf4 else packed[:0]
    if nf4:
        jit.nf4_encode(
            x, start, stop, params["scale"], length, params["mids"], packed, scratch
        )  # fmt: skip
    else:
        jit.linear_encode(
            x, start, stop, params["inv"], params["zp"], length,
            params["qmin"], params["qmax"], bits, packed, scratch,
        )  # fmt: skip


def _chunk(
    x: F32,
    packed: U8,
    bits: int,
    runs: Runs | None,
    codes_fn: Callable[..., None],
    params: dict[str, Any],
    start: int,
    stop: int,
) -> None:
    size = stop - start
    per_byte = 8 // bits
    b0 = start // per_byte
    whole = size // per_byte
    if per_byte == 1:
        codes = packed[b0 : b0 + size]
    else:
        codes = _scratch_u8("codes", -(-size // per_byte) * per_byte)
    xs = x[start:stop]
    length = size if runs is None else runs.length
    full = size // length  # rows of whole runs; the rest is one short run
    r0 = start // length if runs is not None else 0
    if full:
        codes_fn(xs[: full * length], codes[: full * length], length, r0, full, params)
    if full * length < size:
        codes_fn(xs[full * length :], codes[full * length : size], size - full * length,
                 r0 + full, 1, params)  # fmt: skip
    if per_byte == 1:
        return
    tail = size - whole * per_byte
    if tail:
        codes[size : size + per_byte - tail] = 0  # the last byte's unused high bits
    lanes = codes[: -(-size // per_byte) * per_byte].reshape(-1, per_byte)
    out = packed[b0 : b0 + lanes.shape[0]]
    np.copyto(out, lanes[:, 0])
    shifted = _scratch_u8("shifted", lanes.shape[0])
    for j in range(1, per_byte):
        np.left_shift(lanes[:, j], j * bits, out=shifted)
        np.bitwise_or(out, shifted, out=out)


def _linear_codes(
    xs: F32, codes: U8, length: int, r0: int, rows: int, params: dict[str, Any]
) -> None:
    """``clamp(round(x · inv) + zp, qmin, qmax)`` of ``rows`` runs of ``length`` values
    (one run, for per-tensor params), as :func:`~fedsqueeze.codec.kernels.quantize_linear`."""
    b = _scratch_f32("b", xs.size)
    inv, zp = params["inv"], params["zp"]
    if isinstance(inv, np.ndarray):
        b2 = b.reshape(rows, length)
        np.multiply(xs.reshape(rows, length), inv[r0 : r0 + rows, None], out=b2)
        np.rint(b, out=b)
        np.add(b2, zp[r0 : r0 + rows, None], out=b2)
    else:
        np.multiply(xs, inv, out=b)
        np.rint(b, out=b)
        np.add(b, zp, out=b)
    np.clip(b, params["qmin"], params["qmax"], out=b)
    np.copyto(codes, b, casting="unsafe")


def _nf4_codes(xs: F32, codes: U8, length: int, r0: int, rows: int, params: dict[str, Any]) -> None:
    """The nearest NF4 entry of ``x / scale``, as :func:`~fedsqueeze.codec.kernels.nearest_nf4`."""
    n = xs.size
    unit = _scratch_f32("b", n)
    grid = _scratch_f32("c", n)
    scale = params["scale"]
    if isinstance(scale, np.ndarray):
        np.divide(xs.reshape(rows, length), scale[r0 : r0 + rows, None],
                  out=unit.reshape(rows, length))  # fmt: skip
    else:
        np.divide(xs, scale, out=unit)
    np.add(unit, np.float32(1.0), out=grid)
    np.multiply(grid, np.float32(128.0), out=grid)
    np.clip(grid, np.float32(0.0), np.float32(255.0), out=grid)
    # intp indices: take() would convert narrower ones into a temporary first.
    cells = _scratch_intp("cells", n)
    np.copyto(cells, grid, casting="unsafe")  # truncation: the floor of a value >= 0
    # mode="clip" (cells are in [0, 255]): with "raise", take() buffers its output.
    np.take(params["below"], cells, out=codes, mode="clip")
    np.take(params["inside"], cells, out=grid, mode="clip")
    above = _scratch_bool("above", n)
    np.greater(unit, grid, out=above)
    np.add(codes, above, out=codes, casting="unsafe")


# ---------------------------------------------------------------------- scratch
# Per-thread buffers (fedsqueeze.codec.chunks.np_scratch), typed for the kernels above.
def _scratch_f32(slot: str, numel: int) -> F32:
    return np_scratch(slot, numel, np.float32, _CHUNK)


def _scratch_u8(slot: str, numel: int) -> U8:
    return np_scratch(slot, numel, np.uint8, _CHUNK)


def _scratch_intp(slot: str, numel: int) -> npt.NDArray[np.intp]:
    return np_scratch(slot, numel, np.intp, _CHUNK)


def _scratch_bool(slot: str, numel: int) -> npt.NDArray[np.bool_]:
    return np_scratch(slot, numel, np.bool_, _CHUNK)
