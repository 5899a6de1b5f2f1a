"""Dense quantized records decoded while their zstd body is still being decompressed.

A large dense record (int8, block-wise 4-bit, NF4, per-channel...) used to decode in
three passes one after the other: zstd into a fresh buffer (one thread: a frame
cannot be decoded in parallel), unpacking the codes into another, and dequantizing
into the output. Here zstd fills the code buffer a megabyte at a time on the calling
thread while the worker threads (:mod:`fedsqueeze.codec.chunks`) dequantize each
chunk as soon as its bytes have arrived, so zstd's time hides behind the
dequantization instead of adding to it.

A literal-only frame (what :mod:`fedsqueeze.codec.dense_encode` now writes for large
bodies; :mod:`fedsqueeze.codec.literal_frames`) is decoded in pieces on every core
instead, with one writer: the calling thread dequantizes the pieces in order, each
while it is in cache, and the other workers decode pieces (zstd's Huffman stage) for
it, then write from the last piece backwards once nothing is left to decode
(:func:`_in_pieces`: two threads first-touching one fresh output cost twice the CPU of
one).
Any other frame (level 3 from earlier versions, a frame with matches) is decoded as one
stream as above, with the same checks.

Codes narrower than a byte are never unpacked: a table of the ``8 / bits`` values of
each of the 256 byte values (``float(code)``, or the NF4 entry) is gathered straight
into the output, then the usual ``(q − zp) · scale`` or ``· scale`` is applied in place.
The arithmetic is that of :func:`~fedsqueeze.codec.quantization.dequantize` (the same
operations on the same values, so the results are bit-identical; the tests compare).
"""

from __future__ import annotations

import bisect
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from functools import partial
from typing import cast

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from fedsqueeze.codec import entropy, jit, literal_frames
from fedsqueeze.codec.blockwise import NF4_CODEBOOK, group_of
from fedsqueeze.codec.chunks import aligned_bounds, np_scratch, run_chunks, scratch, submit
from fedsqueeze.codec.kernels import Runs
from fedsqueeze.codec.quantization import QuantParams
from fedsqueeze.codec.spec import QuantScheme
from fedsqueeze.errors import FormatError

__all__ = ["PIECES", "PIPELINE_ABOVE", "decode_dense", "pipelines"]

#: Decompressed body size (bytes) from which a dense record is decoded in a pipeline;
#: below it, one zstd call and the chunked kernels cost less than the hand-offs.
PIPELINE_ABOVE = 4 << 20
#: Bytes zstd decodes between hand-offs.
_STEP = 1 << 20
#: Values per chunk of work: its output stays in a core's L2 cache (1 MiB here)
#: through the passes over it.
_CHUNK = 1 << 18
_WIDTHS = (2, 4, 8)
#: The chunk kernels in torch operations and the output in torch memory, as before the
#: NumPy kernels (for the benchmark's side-by-side runs only; same values).
TORCH_KERNELS = False
#: Whether literal-only frames are decoded in pieces on every core (off: one stream, as
#: in the previous version; for the benchmark's side-by-side rows only, same values).
PIECES = True
#: Whether every worker decodes pieces and writes their values, as before (off: one
#: writer, helpers decode; :func:`_in_pieces`; for the benchmark's side-by-side rows
#: only, same values).
ALL_WRITE = False
_tables: dict[tuple[int, bool], Tensor] = {}
#: float32 ``[16]``: the NF4 entries, as :func:`_table` gathers them.
_NF4_ENTRIES: npt.NDArray[np.float32] = NF4_CODEBOOK.to(torch.float32).numpy()


def pipelines(qp: QuantParams, channels: Tensor | Runs | None, length: int) -> bool:
    """Whether :func:`decode_dense` takes a record with these params: a large body
    (``length`` bytes before entropy coding), linear or NF4 codes of 2, 4 or 8 bits,
    per tensor or in runs."""
    return (
        length >= PIPELINE_ABOVE
        and qp.bits in _WIDTHS
        and qp.codebook is None
        and not isinstance(channels, Tensor)
    )


def decode_dense(
    body: bytes | memoryview,
    raw_length: int | None,
    count: int,
    qp: QuantParams,
    runs: Runs | None,
) -> Tensor:
    """float32 ``[count]``: the values of a dense record's ``body`` (zstd, ``raw_length``
    bytes of packed codes once decompressed; or the packed codes themselves when
    ``raw_length`` is ``None``), as
    ``dequantize(unpack_bits(decompress(body), qp.bits, count), qp, runs)`` gives them.

    Raises
    ------
    FormatError
        A corrupt or wrongly sized zstd frame, or non-zero padding bits after the last
        code; as the sequential path raises them.
    """
    bits = qp.bits
    per_byte = 8 // bits
    if qp.scale.dim() == 0:
        runs = None  # one parameter set (one block, one channel): per tensor, as dequantize
    length = len(body) if raw_length is None else raw_length
    if length != -(-count * bits // 8):
        raise FormatError(f"{count} codes of {bits} bits need {-(-count * bits // 8)} bytes")
    if TORCH_KERNELS:
        out = torch.empty(count, dtype=torch.float32)
    else:
        # NumPy memory: huge pages for a large output, whose first touch is then several
        # times cheaper than torch's 4 KiB pages (it is most of a decode's writing).
        out = torch.from_numpy(np.empty(count, dtype=np.float32))
    if count == 0:
        return out
    table = _table(bits, qp.scheme is QuantScheme.NF4)
    scale = qp.scale if runs is not None else float(qp.scale)
    zp = None if qp.scheme is QuantScheme.NF4 else _zero_point(qp, runs)
    # Chunks cut as the encoder cuts them (a piece each), on groups of scales too.
    run = 1 if runs is None else runs.length * group_of(qp.scale_format)
    bounds = aligned_bounds(count, per_byte, run, _CHUNK)
    futures: list[Future[None]] = []
    pending = 0  # bounds[pending:] still wait for their bytes
    kernel = _dequantize if TORCH_KERNELS else _dequantize_numpy
    if not TORCH_KERNELS and jit.use(count):  # parameters and views made once per tensor
        kernel = partial(
            _dequantize_jit,
            length=count if runs is None else runs.length,
            scales=jit.per_run(scale),
            zps=None if zp is None else jit.per_run(zp),
            o=out.numpy(),
        )

    def chunk(start: int, stop: int) -> None:
        kernel(raw, start, stop, per_byte, table, scale, zp, runs, out)

    if raw_length is None:
        raw = _read_only_uint8(body)
        _padding(raw, count, bits)
        run_chunks(chunk, bounds)
        return out
    if TORCH_KERNELS:
        raw = torch.empty(raw_length, dtype=torch.uint8)
    else:
        raw = torch.from_numpy(np.empty(raw_length, dtype=np.uint8))
        pieces = literal_frames.plan(body, raw_length, -(-_CHUNK * bits // 8)) if PIECES else None
        if pieces is not None and len(pieces.segments) > 1:
            try:
                _in_pieces(body, pieces, raw, bounds, per_byte, chunk)
            except FormatError:
                pass  # a corrupt piece: one stream below gives that path's verdict
            else:
                _padding(raw, count, bits)
                return out
    try:
        for filled in entropy.decompress_into(body, raw.numpy().data, _STEP):
            while pending < len(bounds) and -(-bounds[pending][1] // per_byte) <= filled:
                start, stop = bounds[pending]
                futures.append(submit(partial(chunk, start, stop)))
                pending += 1
    finally:
        errors = [f.exception() for f in futures]  # waits for every chunk
    for error in errors:
        if error is not None:
            raise error
    _padding(raw, count, bits)
    return out


def _in_pieces(
    body: bytes | memoryview,
    pieces: literal_frames.Plan,
    raw: Tensor,
    bounds: list[tuple[int, int]],
    per_byte: int,
    chunk: Callable[[int, int], None],
) -> None:
    """A literal-only frame decoded in pieces, by one writer and helpers.

    The *writer* (the calling thread) takes the segments in order and dequantizes the
    chunks whose bytes each holds, while they are in cache. The *helpers* (the other
    workers) decode segments (zstd's Huffman stage) into ``raw``, each taking the first
    one nobody has taken. The writer decodes a segment itself when nobody has taken it
    yet, and one further on while a helper holds the one it needs. A helper that finds
    nothing left to decode writes too, from the last segment backwards, until it meets
    the writer. So the work balances on its own: while there is Huffman work, one
    thread writes fresh output pages; when there is little (4-bit codes), every thread
    writes most of the time.

    That is the point: on these 2-core VMs two threads writing a fresh 100 MB output
    took 35-44 ms of CPU where one took 17 (the first touch of each page is most of the
    cost, and two threads faulting pages at once slow each other), so the other core is
    better spent on Huffman (BENCHMARKS.md, "One writer"). With :data:`ALL_WRITE` the
    previous schedule runs instead (:func:`_in_pieces_shared`: the benchmark's rows).

    Chunks across two segments (none when the encoder's chunks and the decoder's agree)
    are dequantized once every segment is in.
    """
    if ALL_WRITE:
        _in_pieces_shared(body, pieces, raw, bounds, per_byte, chunk)
        return
    segments = pieces.segments
    mine, across = _by_segment(segments, bounds, per_byte)
    view = raw.numpy().data
    claims = _Claims(len(segments))
    errors: list[BaseException | None] = [None] * len(segments)

    def decode(k: int) -> None:
        seg = segments[k]
        into = view[seg.out_start : seg.out_stop]
        try:
            literal_frames.decode_piece(body, pieces.header, seg, into)
        except BaseException as exc:  # whoever writes segment k raises it
            errors[k] = exc
        finally:
            claims.finish(k)

    def write(k: int) -> None:
        if claims.take(k):
            decode(k)
        while not claims.done(k):  # someone decodes it: decode one further on meanwhile
            ahead = claims.next()
            if ahead is None:
                claims.wait(k)
                break
            decode(ahead)
        error = errors[k] or claims.cancelled
        if error is not None:
            raise error
        for start, stop in mine[k]:
            chunk(start, stop)

    def helper() -> None:
        try:
            while (k := claims.next()) is not None:
                decode(k)
            while (k := claims.back()) is not None:
                write(k)
        except BaseException:
            claims.cancel()  # nobody starts a segment more, and nobody waits
            raise

    helpers = [submit(helper) for _ in range(torch.get_num_threads() - 1)]
    stopped: _Cancelled | None = None
    try:
        while (k := claims.front()) is not None:
            write(k)
    except _Cancelled as exc:  # a helper failed: its error is raised below
        stopped = exc
    except BaseException:
        claims.cancel()
        raise
    finally:
        # A helper the pool has not started yet (its threads busy elsewhere) is not
        # waited for: its work is done by now, or nobody's after a failure.
        for task in helpers:
            task.cancel()
        failures = [f.exception() for f in helpers if not f.cancelled()]
    for failure in failures:
        if failure is not None and not isinstance(failure, _Cancelled):
            raise failure
    if stopped is not None:
        raise stopped
    run_chunks(chunk, across)


def _in_pieces_shared(
    body: bytes | memoryview,
    pieces: literal_frames.Plan,
    raw: Tensor,
    bounds: list[tuple[int, int]],
    per_byte: int,
    chunk: Callable[[int, int], None],
) -> None:
    """:func:`_in_pieces` as before (:data:`ALL_WRITE`): each worker decodes a segment
    into ``raw`` and dequantizes the chunks whose bytes it holds, every worker alike."""
    segments = pieces.segments
    mine, across = _by_segment(segments, bounds, per_byte)
    view = raw.numpy().data

    def segment(k: int, _: int) -> None:
        seg = segments[k]
        literal_frames.decode_piece(body, pieces.header, seg, view[seg.out_start : seg.out_stop])
        for start, stop in mine[k]:
            chunk(start, stop)

    run_chunks(segment, [(k, k + 1) for k in range(len(segments))])
    run_chunks(chunk, across)


def _by_segment(
    segments: Sequence[literal_frames.Segment], bounds: list[tuple[int, int]], per_byte: int
) -> tuple[list[list[tuple[int, int]]], list[tuple[int, int]]]:
    """The chunks of ``bounds`` within each segment's bytes, and those across two."""
    starts = [seg.out_start for seg in segments]
    mine: list[list[tuple[int, int]]] = [[] for _ in segments]
    across: list[tuple[int, int]] = []
    for start, stop in bounds:
        first, last = start // per_byte, -(-stop // per_byte)
        k = bisect.bisect_right(starts, first) - 1
        (mine[k] if last <= segments[k].out_stop else across).append((start, stop))
    return mine, across


class _Claims:
    """Who decodes and who writes which of ``count`` segments, each once.

    Writing: the writer from the front (:meth:`front`), helpers from the back
    (:meth:`back`) once nothing is left to decode. Decoding: the first segment nobody
    has taken (:meth:`next`), or the one the writer needs (:meth:`take`); a writer
    waits for one another thread holds (:meth:`wait`).
    """

    def __init__(self, count: int) -> None:
        self._lock = threading.Lock()
        self._taken = [False] * count
        self._done = [threading.Event() for _ in range(count)]
        self._first = 0  # no segment before it is free to decode
        self._front, self._back = 0, count  # [front, back): not yet written
        self._cancelled: _Cancelled | None = None

    def next(self) -> int | None:
        with self._lock:
            k = self._first
            while k < len(self._taken) and self._taken[k]:
                k += 1
            self._first = k
            if k == len(self._taken):
                return None
            self._taken[k] = True
            return k

    def take(self, k: int) -> bool:
        with self._lock:
            if self._taken[k]:
                return False
            self._taken[k] = True
            return True

    def front(self) -> int | None:
        """The next segment the writer writes, if any is left."""
        with self._lock:
            if self._cancelled is not None or self._front >= self._back:
                return None
            self._front += 1
            return self._front - 1

    def back(self) -> int | None:
        """The last segment left to write, if any."""
        with self._lock:
            if self._cancelled is not None or self._front >= self._back:
                return None
            self._back -= 1
            return self._back

    def finish(self, k: int) -> None:
        self._done[k].set()

    def done(self, k: int) -> bool:
        return self._done[k].is_set()

    def wait(self, k: int) -> None:
        self._done[k].wait()

    @property
    def cancelled(self) -> _Cancelled | None:
        """Set once a thread of the decode failed: what the others raise to stop."""
        return self._cancelled

    def cancel(self) -> None:
        """After a failure: nothing is taken or written any more, and a thread waiting
        for a segment nobody decodes wakes (and stops: :attr:`cancelled`)."""
        with self._lock:
            self._cancelled = _Cancelled("another thread of the decode failed")
            for k, taken in enumerate(self._taken):
                if not taken:
                    self._taken[k] = True
                    self._done[k].set()


class _Cancelled(Exception):
    """A thread stopped because another thread of the decode failed (that one's error
    is the one raised)."""


def _padding(raw: Tensor, count: int, bits: int) -> None:
    used = (count * bits) % 8
    if used and int(raw[-1]) >> used:
        raise FormatError("non-zero padding bits after the last code")


def _read_only_uint8(data: bytes | memoryview) -> Tensor:
    """A uint8 tensor over ``data`` without copying it (only read here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8)


def _zero_point(qp: QuantParams, runs: Runs | None) -> Tensor | float:
    return qp.zero_point if runs is not None else float(qp.zero_point)


def _table(bits: int, nf4: bool) -> Tensor:
    """float32 ``[256, 8 / bits]``: the code values (or NF4 entries) of each byte, lowest
    bits first, as :func:`~fedsqueeze.codec.bitpack.unpack_bits` orders them."""
    key = (bits, nf4)
    cached = _tables.get(key)
    if cached is None:
        per_byte = 8 // bits
        byte = torch.arange(256, dtype=torch.int64).unsqueeze(1)
        shifts = torch.arange(per_byte, dtype=torch.int64) * bits
        codes = (byte >> shifts) & ((1 << bits) - 1)
        values = NF4_CODEBOOK.to(torch.float32)[codes] if nf4 else codes.to(torch.float32)
        cached = _tables[key] = values.contiguous()
    return cached


def _dequantize(
    raw: Tensor,
    start: int,
    stop: int,
    per_byte: int,
    table: Tensor,
    scale: Tensor | float,
    zp: Tensor | float | None,
    runs: Runs | None,
    out: Tensor,
) -> None:
    """Values ``[start, stop)`` into ``out``; ``start`` is on a byte (and a run)."""
    o = out[start:stop]
    size = stop - start
    first, last = start // per_byte, -(-stop // per_byte)
    if zp is None:  # NF4: the entries of both codes of a byte in one gather
        idx = scratch("dense-idx", last - first, torch.int32)
        idx.copy_(raw[first:last])
        if size % per_byte == 0:
            torch.index_select(table, 0, idx, out=o.view(-1, per_byte))
        else:  # the last chunk ends inside a byte
            wide = scratch("dense-wide", (last - first) * per_byte, torch.float32)
            torch.index_select(table, 0, idx, out=wide.view(-1, per_byte))
            o.copy_(wide[:size])
    elif per_byte == 1:
        o.copy_(raw[start:stop])  # float(q)
    else:
        # float(q) of each code lane straight into its strided place: cheaper than a
        # gather (measured: 13 ms against 31 ms per 25M 4-bit codes on one thread).
        whole = size // per_byte
        bits = 8 // per_byte
        lanes = o[: whole * per_byte].view(-1, per_byte)
        lane = scratch("dense-lane", whole, torch.uint8)
        src = raw[first : first + whole]
        for j in range(per_byte):
            torch.bitwise_right_shift(src, j * bits, out=lane)
            lane.bitwise_and_((1 << bits) - 1)
            lanes[:, j].copy_(lane)
        if whole * per_byte < size:  # the last chunk ends inside a byte
            byte = int(raw[last - 1])
            tail = [float((byte >> (j * bits)) & ((1 << bits) - 1)) for j in range(size % per_byte)]
            o[whole * per_byte :] = torch.tensor(tail, dtype=torch.float32)
    if runs is None:
        if zp is not None:
            o.sub_(zp)
        o.mul_(scale)
        return
    whole = size // runs.length  # full runs; the rest is the short last run (if any)
    r0 = start // runs.length
    scale_t = cast(Tensor, scale)
    zp_t = None if zp is None else cast(Tensor, zp)
    if whole:
        rows = o[: whole * runs.length].view(whole, runs.length)
        if zp_t is not None:
            rows.sub_(zp_t[r0 : r0 + whole].unsqueeze(1))
        rows.mul_(scale_t[r0 : r0 + whole].unsqueeze(1))
    if whole * runs.length < size:
        short = o[whole * runs.length :]
        if zp_t is not None:
            short.sub_(zp_t[r0 + whole : r0 + whole + 1])
        short.mul_(scale_t[r0 + whole : r0 + whole + 1])


def _dequantize_jit(
    raw: Tensor,
    start: int,
    stop: int,
    per_byte: int,
    table: Tensor,
    scale: Tensor | float,
    zp: Tensor | float | None,
    runs: Runs | None,
    out: Tensor,
    *,
    length: int,
    scales: npt.NDArray[np.float32],
    zps: npt.NDArray[np.float32] | None,
    o: npt.NDArray[np.float32],
) -> None:
    """:func:`_dequantize_numpy` by the compiled kernels (:mod:`fedsqueeze.codec.jit`):
    the same values in one pass. The keywords are the tensor's parameters as the kernels
    take them (:func:`~fedsqueeze.codec.jit.per_run`) and ``out``'s array, made once."""
    src: npt.NDArray[np.uint8] = raw.numpy()
    if zps is None:  # NF4: the table's entries of the 16 codes
        jit.nf4_decode(src, start, stop, _NF4_ENTRIES, scales, length, o)
    else:
        jit.linear_decode(src, start, stop, 8 // per_byte, scales, zps, length, o)


def _dequantize_numpy(
    raw: Tensor,
    start: int,
    stop: int,
    per_byte: int,
    table: Tensor,
    scale: Tensor | float,
    zp: Tensor | float | None,
    runs: Runs | None,
    out: Tensor,
) -> None:
    """:func:`_dequantize` in NumPy operations: single-threaded inside the worker (a
    torch operation there may fork an OpenMP team of its own) and about a microsecond a
    call; the same float32 operations in the same order, so the same values."""
    o: npt.NDArray[np.float32] = out.numpy()[start:stop]
    src: npt.NDArray[np.uint8] = raw.numpy()
    size = stop - start
    first, last = start // per_byte, -(-stop // per_byte)
    zp_s = None if zp is None or runs is not None else np.float32(cast(float, zp))
    if zp is None:  # NF4: the entries of both codes of a byte in one gather
        # intp indices: take() would convert narrower ones into a temporary first.
        idx = np_scratch("dense-idx", last - first, np.intp, _CHUNK)
        np.copyto(idx, src[first:last])
        table_np = table.numpy()
        if size % per_byte == 0:
            np.take(table_np, idx, axis=0, out=o.reshape(-1, per_byte), mode="clip")
        else:  # the last chunk ends inside a byte
            wide = np_scratch("dense-wide", (last - first) * per_byte, np.float32, _CHUNK)
            np.take(table_np, idx, axis=0, out=wide.reshape(-1, per_byte), mode="clip")
            o[:] = wide[:size]
    elif per_byte == 1:
        if zp_s is not None:  # float(q) − zp in one pass (float(q) is exact)
            np.subtract(src[start:stop], zp_s, out=o)
            zp_s = None
        else:
            np.copyto(o, src[start:stop])
    else:
        whole = size // per_byte
        bits = 8 // per_byte
        lanes = o[: whole * per_byte].reshape(-1, per_byte)
        lane = np_scratch("dense-lane", whole, np.uint8, _CHUNK)
        codes = src[first : first + whole]
        for j in range(per_byte):
            np.right_shift(codes, j * bits, out=lane)
            np.bitwise_and(lane, (1 << bits) - 1, out=lane)
            np.copyto(lanes[:, j], lane)
        if whole * per_byte < size:  # the last chunk ends inside a byte
            byte = int(src[last - 1])
            for j in range(size % per_byte):
                o[whole * per_byte + j] = (byte >> (j * bits)) & ((1 << bits) - 1)
    if runs is None:
        if zp_s is not None:
            np.subtract(o, zp_s, out=o)
        np.multiply(o, np.float32(cast(float, scale)), out=o)
        return
    whole = size // runs.length  # full runs; the rest is the short last run (if any)
    r0 = start // runs.length
    scale_np = cast(Tensor, scale).numpy()
    zp_np = None if zp is None else cast(Tensor, zp).numpy()
    if whole:
        rows = o[: whole * runs.length].reshape(whole, runs.length)
        if zp_np is not None:
            np.subtract(rows, zp_np[r0 : r0 + whole, None], out=rows)
        np.multiply(rows, scale_np[r0 : r0 + whole, None], out=rows)
    if whole * runs.length < size:
        short = o[whole * runs.length :]
        if zp_np is not None:
            np.subtract(short, zp_np[r0 + whole], out=short)
        np.multiply(short, scale_np[r0 + whole], out=short)
