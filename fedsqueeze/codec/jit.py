"""Compiled chunk kernels (numba) for the codec's hot loops: dense quantization and its
decode, per-run ranges, and the byte planes of the lossless coder.

The dense pipelines (:mod:`~fedsqueeze.codec.dense_encode`,
:mod:`~fedsqueeze.codec.dense_decode`) cut a large tensor into chunks that fit in a
core's cache and hand them to worker threads. In NumPy a chunk of int8 codes costs five
passes over the chunk (multiply, round, add the zero point, clip, convert) and a 4-bit
chunk two more to pack; NF4 nine. Each pass is cheap, but together they were half of
int8's encode CPU and most of its decode's outside zstd (BENCHMARKS.md, "A 100 MB fp32
tensor"). NumPy cannot fuse them; a compiled loop does every step of a value while it
sits in a register.

These kernels compute exactly what the NumPy kernels compute: the same float32
operations in the same order (no fast-math, no float64 intermediates: every constant is
a float32), so the codes and the decoded values are bit-identical, whichever path ran
(``tests/codec/test_jit.py`` compares them on random tensors and every width; the byte
planes are shifts and masks of integers, exact by construction, and compared too). They run
with the GIL released (``nogil``) on the pipelines' own worker threads, one chunk per
call; numba's own parallelism is not used.

numba compiles a kernel the first time a process calls it (about a second each) and
keeps the machine code in ``__pycache__`` for the next process. Only arrays of at least
:data:`MIN_VALUES` values come here, so small models and the golden vectors never pay for
a compilation. Without numba (or with ``FEDSQUEEZE_JIT=0`` in the
environment) the NumPy kernels run instead, with the same results.

The functions here are plain Python until :func:`ready` compiles them: callers ask
:func:`use` first (a process that never handles a large tensor never imports numba).
"""

from __future__ import annotations

import os
import threading

import numpy as np
import numpy.typing as npt

__all__ = [
    "ENABLED",
    "MIN_VALUES",
    "band_pass",
    "bucket_gather",
    "bucket_histogram",
    "bucket_scatter",
    "byte_counts",
    "join_planes2",
    "join_planes4",
    "linear_decode",
    "linear_encode",
    "nf4_decode",
    "nf4_encode",
    "per_run",
    "ready",
    "rice_chunk",
    "run_range",
    "select_pass",
    "split_plane",
    "use",
    "warm",
]

#: Whether the compiled kernels may be used (``FEDSQUEEZE_JIT=0`` turns them off; the
#: benchmark and the tests switch this for their side-by-side runs). :func:`ready` also
#: needs numba to import.
ENABLED: bool = os.environ.get("FEDSQUEEZE_JIT", "1") != "0"
#: Fewest values for which the callers use the kernels (:func:`use`): below it NumPy's
#: fixed costs are small, and a process that only handles small models never imports
#: numba (a quarter of a second) nor compiles anything.
MIN_VALUES = 1 << 16

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
Words = npt.NDArray[np.unsignedinteger]
I64 = npt.NDArray[np.int64]
U16 = npt.NDArray[np.uint16]

_lock = threading.Lock()
_compiled: bool | None = None  # None: not tried yet


def per_run(value: object) -> F32:
    """A quantization parameter as the kernels take it: float32 ``[runs]`` (a tensor or
    array per run, as it is when already float32 on the CPU), or a one-element array for
    a per-tensor scalar."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(value, dtype=np.float32).reshape(-1)


def use(values: int) -> bool:
    """Whether a caller with ``values`` values should run the compiled kernels."""
    return values >= MIN_VALUES and ready()


def ready() -> bool:
    """Whether the compiled kernels are usable: :data:`ENABLED` and numba importable. The
    first call imports numba and hands the kernels to it (each compiles, or loads its
    cached machine code, on its first call); thread-safe."""
    global _compiled
    if not ENABLED:
        return False
    if _compiled is None:
        with _lock:
            if _compiled is None:
                _compiled = _compile()
    return _compiled


def warm() -> None:
    """Compile (or load from the cache) every kernel now, on tiny inputs, so that the
    compiler's memory is part of the process's baseline rather than of the first large
    tensor's working memory (the bounded-memory benchmarks and tests measure from a
    baseline). Nothing happens when :func:`ready` is false."""
    if not ready():
        return
    f = np.zeros(8, dtype=np.float32)
    u = np.zeros(8, dtype=np.uint8)
    one = np.ones(1, dtype=np.float32)
    lo, hi = np.float32(0.0), np.float32(255.0)
    for bits in (2, 4, 8):
        linear_encode(f, 0, 8, one, one, 8, lo, hi, bits, u, u)
        linear_decode(u, 0, 8, bits, one, one, 8, f)
    nf4_encode(f, 0, 8, one, 8, u, np.full(256, np.inf, dtype=np.float32), u, u)
    nf4_decode(u, 0, 8, f, one, 8, f)
    run_range(f, 0, 8, 4, f[:2].copy(), f[:2].copy())
    for uint in (np.uint16, np.uint32, np.uint64):
        words = np.zeros(8, dtype=uint)
        split_plane(words, words, False, 8, 0xFF, 0, 0, u)
        split_plane(words, words, True, 8, 0xFF, 0, 0, u)
    join_planes2(u, u, True, np.zeros(8, dtype=np.uint16))
    counts = np.zeros(256, dtype=np.int64)
    byte_counts(u, counts)
    ranks = np.zeros(256, dtype=np.uint16)
    bucket_histogram(u, ranks, u, np.zeros((1, 256), dtype=np.int64))
    bucket_gather(u, ranks, u, np.zeros(1, dtype=np.int64), u.copy())
    bucket_scatter(u, ranks, u, np.zeros(1, dtype=np.int64), u.copy())
    join_planes4(u, u, u, u, True, np.zeros(8, dtype=np.uint32))


def _compile() -> bool:
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency; NumPy runs instead
        return False
    space = globals()
    for name in _KERNELS:  # helpers first: their callers find them compiled
        fn = space[name]
        try:
            space[name] = numba.njit(fn, cache=True, nogil=True, boundscheck=False)
        except RuntimeError:  # no writable place for the machine code: compile each time
            space[name] = numba.njit(fn, cache=False, nogil=True, boundscheck=False)
    return True


# Every loop below runs over a slice from index 0: with a loop from ``start`` numba must
# allow for negative indices (it wraps them), and LLVM then leaves the loop unvectorized
# (measured: 4.5x slower on a chunk of int8 codes).


def _pack(codes: U8, size: int, bits: int, packed: U8, b0: int) -> None:
    """``codes[:size]`` (each below ``2**bits``) packed lowest bits first into
    ``packed[b0:]``; the last byte's unused high bits are zero."""
    per_byte = 8 // bits
    whole = size // per_byte
    out = packed[b0 : b0 + whole]
    if bits == 4:
        for b in range(whole):
            out[b] = codes[2 * b] | (codes[2 * b + 1] << 4)
    elif bits == 2:
        for b in range(whole):
            out[b] = (
                codes[4 * b]
                | (codes[4 * b + 1] << 2)
                | (codes[4 * b + 2] << 4)
                | (codes[4 * b + 3] << 6)
            )
    else:
        for b in range(whole):
            acc = 0
            for j in range(per_byte):
                acc |= int(codes[b * per_byte + j]) << (j * bits)
            out[b] = acc
    tail = size - whole * per_byte
    if tail:
        acc = 0
        for j in range(tail):
            acc |= int(codes[whole * per_byte + j]) << (j * bits)
        packed[b0 + whole] = acc


def linear_encode(
    x: F32,
    start: int,
    stop: int,
    inv: F32,
    zp: F32,
    length: int,
    qmin: np.float32,
    qmax: np.float32,
    bits: int,
    packed: U8,
    scratch: U8,
) -> None:
    """The packed codes ``clamp(rint(x · inv) + zp, qmin, qmax)`` of ``x[start:stop]``
    into ``packed`` (from byte ``start · bits / 8``): ``inv[r]`` and ``zp[r]`` for the
    values of run ``r`` (runs of ``length`` values; one run of ``len(x)`` values per
    tensor). ``start`` is on a run and on a byte; ``scratch`` holds ``stop − start``
    codes when ``bits < 8``."""
    size = stop - start
    codes = packed[start:stop] if bits == 8 else scratch[:size]
    r = start // length
    i = start
    while i < stop:
        end = min(stop, (r + 1) * length)
        s = inv[r]
        z = zp[r]
        xs = x[i:end]
        cs = codes[i - start : end - start]
        for k in range(xs.size):
            v = np.rint(xs[k] * s) + z
            cs[k] = np.uint8(min(max(v, qmin), qmax))
        i = end
        r += 1
    if bits != 8:
        _pack(codes, size, bits, packed, start // (8 // bits))


def nf4_encode(
    x: F32,
    start: int,
    stop: int,
    scale: F32,
    length: int,
    below: U8,
    inside: F32,
    packed: U8,
    scratch: U8,
) -> None:
    """The packed NF4 codes (4 bits) of ``x[start:stop]`` into ``packed``: the nearest
    entry of ``x / scale[r]`` by the cell tables of
    :func:`~fedsqueeze.codec.kernels.nf4_tables` (``below[cell]``, plus one where the
    value lies above ``inside[cell]``), as :func:`~fedsqueeze.codec.kernels.nearest_nf4`."""
    one = np.float32(1.0)
    half_cells = np.float32(128.0)
    lo = np.float32(0.0)
    hi = np.float32(255.0)
    size = stop - start
    codes = scratch[:size]
    r = start // length
    i = start
    while i < stop:
        end = min(stop, (r + 1) * length)
        s = scale[r]
        xs = x[i:end]
        cs = codes[i - start : end - start]
        for k in range(xs.size):
            unit = xs[k] / s
            cell = int(min(max((unit + one) * half_cells, lo), hi))
            cs[k] = below[cell] + (unit > inside[cell])
        i = end
        r += 1
    _pack(codes, size, 4, packed, start // 2)


def _lane(qs: U8, pos: int, bits: int) -> int:
    """The code at lane ``pos`` of the packed codes ``qs`` (lowest bits first)."""
    per_byte = 8 // bits
    return (int(qs[pos // per_byte]) >> ((pos % per_byte) * bits)) & ((1 << bits) - 1)


def _decode_run(qs: U8, off: int, bits: int, table: F32, out: F32, o0: int, n: int) -> None:
    """``out[o0 + k] = table[q_k]`` for the ``n`` codes packed in ``qs`` from lane ``off``
    of byte 0: the partial bytes at either end lane by lane, the whole bytes between
    them with their lanes unrolled. Index loops, not slices: a run of a block-wise
    tensor is a few dozen values, and three slices per run cost more than its values."""
    per_byte = 8 // bits
    head = min(n, (per_byte - off) % per_byte)
    for k in range(head):
        out[o0 + k] = table[_lane(qs, off + k, bits)]
    first = (off + head) // per_byte
    whole = (n - head) // per_byte
    o = o0 + head
    if bits == 4:
        for b in range(first, first + whole):
            v = qs[b]
            out[o] = table[v & 15]
            out[o + 1] = table[v >> 4]
            o += 2
    elif bits == 2:
        for b in range(first, first + whole):
            v = qs[b]
            out[o] = table[v & 3]
            out[o + 1] = table[(v >> 2) & 3]
            out[o + 2] = table[(v >> 4) & 3]
            out[o + 3] = table[v >> 6]
            o += 4
    else:
        for k in range(whole * per_byte):
            out[o + k] = table[_lane(qs, first * per_byte + k, bits)]
    for k in range(head + whole * per_byte, n):
        out[o0 + k] = table[_lane(qs, off + k, bits)]


def linear_decode(
    src: U8,
    start: int,
    stop: int,
    bits: int,
    scale: F32,
    zp: F32,
    length: int,
    out: F32,
) -> None:
    """``out[start:stop]``: ``(float(q) − zp[r]) · scale[r]`` of the packed ``bits``-bit
    codes ``q`` in ``src``, runs of ``length`` values as :func:`linear_encode`.
    ``start`` is on a run and on a byte (the runs after it may start inside one).

    Below 8 bits each run's ``2^bits`` values are computed once into a table, by the
    same two float32 operations: a code's value is the same number either way."""
    per_byte = 8 // bits
    table = np.empty(1 << bits, dtype=np.float32)
    r = start // length
    i = start
    while i < stop:
        end = min(stop, (r + 1) * length)
        s = scale[r]
        z = zp[r]
        if bits == 8:
            os = out[i:end]
            qs = src[i:end]
            for k in range(os.size):
                os[k] = (np.float32(qs[k]) - z) * s
        else:
            for q in range(table.size):
                table[q] = (np.float32(q) - z) * s
            qs = src[i // per_byte :]
            if bits == 4:  # literal widths: numba compiles _decode_run for each
                _decode_run(qs, i % 2, 4, table, out, i, end - i)
            else:
                _decode_run(qs, i % 4, 2, table, out, i, end - i)
        i = end
        r += 1


def nf4_decode(
    src: U8,
    start: int,
    stop: int,
    codebook: F32,
    scale: F32,
    length: int,
    out: F32,
) -> None:
    """``out[start:stop]``: ``codebook[q] · scale[r]`` of the packed 4-bit codes ``q`` in
    ``src`` (runs as :func:`linear_decode`; each run's 16 values in a table)."""
    table = np.empty(16, dtype=np.float32)
    r = start // length
    i = start
    while i < stop:
        end = min(stop, (r + 1) * length)
        s = scale[r]
        for q in range(16):
            table[q] = codebook[q] * s
        _decode_run(src[i // 2 :], i & 1, 4, table, out, i, end - i)
        i = end
        r += 1


def run_range(x: F32, start: int, stop: int, length: int, lo: F32, hi: F32) -> None:
    """``lo[r]``, ``hi[r]``: the minimum and maximum of each run ``r`` of ``length``
    values in ``x[start:stop]`` (``start`` on a run; the last run may be short); NaN
    where the run holds one, as ``torch.amin`` / ``torch.amax`` give it."""
    r = start // length
    i = start
    while i < stop:
        end = min(stop, i + length)
        xs = x[i:end]
        a = xs[0]
        b = xs[0]
        nan = False
        for k in range(xs.size):
            v = xs[k]
            a = min(a, v)
            b = max(b, v)
            nan |= v != v
        if nan:
            a = b = np.float32(np.nan)
        lo[r] = a
        hi[r] = b
        i = end
        r += 1


def split_plane(
    words: Words, base: Words, xor: bool, s1: int, m1: int, s2: int, m2: int, out: U8
) -> None:
    """``out[i] = ((v >> s1) & m1) | ((v >> s2) & m2)`` of ``v = words[i]`` (XOR
    ``base[i]`` when ``xor``): one byte plane of the words
    (:mod:`fedsqueeze.codec.planes`; ``m2 = 0`` for a plain byte)."""
    if xor:
        for i in range(out.size):
            v = words[i] ^ base[i]
            out[i] = ((v >> s1) & m1) | ((v >> s2) & m2)
    else:
        for i in range(out.size):
            v = words[i]
            out[i] = ((v >> s1) & m1) | ((v >> s2) & m2)


def join_planes2(p0: U8, p1: U8, swapped: bool, out: Words) -> None:
    """16-bit words from their two planes (:func:`fedsqueeze.codec.planes.join_planes`):
    plane 0 the exponent byte (below the sign when ``swapped``), plane 1 the next."""
    if swapped:
        for i in range(out.size):
            a = np.uint16(p0[i])
            b = np.uint16(p1[i])
            out[i] = (a << 7) | ((b & 0x80) << 8) | (b & 0x7F)
    else:
        for i in range(out.size):
            out[i] = (np.uint16(p0[i]) << 8) | np.uint16(p1[i])


def join_planes4(p0: U8, p1: U8, p2: U8, p3: U8, swapped: bool, out: Words) -> None:
    """32-bit words from their four planes (as :func:`join_planes2`)."""
    if swapped:
        for i in range(out.size):
            a = np.uint32(p0[i])
            b = np.uint32(p1[i])
            out[i] = (
                (a << 23)
                | ((b & 0x80) << 24)
                | ((b & 0x7F) << 16)
                | (np.uint32(p2[i]) << 8)
                | np.uint32(p3[i])
            )
    else:
        for i in range(out.size):
            out[i] = (
                (np.uint32(p0[i]) << 24)
                | (np.uint32(p1[i]) << 16)
                | (np.uint32(p2[i]) << 8)
                | np.uint32(p3[i])
            )


def band_pass(x: F32, start: int, stop: int, lo: np.float32, hi: np.float32, band: F32) -> int:
    """The first pass of :func:`~fedsqueeze.codec.threshold_select.select_above` over
    ``x[start:stop]``: the magnitudes in ``[lo, hi]`` into ``band`` (in order; ``band``
    holds ``stop − start`` values) and the count of magnitudes ``>= lo``, returned as
    ``count * 2^32 + len(band used)`` (one integer: numba returns it without a tuple).

    Blocks of 32 values are counted first (a loop LLVM vectorizes) and only a block with
    a magnitude in the band is written out: the band holds about 1% of the values, so
    three blocks in four are skipped (measured on 25M normal values, a 0.8% band: 18 ms
    against 60 for the write of every value)."""
    xs = x[start:stop]
    n = xs.size
    body = n - n % 32
    count = 0
    used = 0
    for b0 in range(0, body, 32):
        block = xs[b0 : b0 + 32]
        above = 0
        inside = 0
        for k in range(32):
            m = abs(block[k])
            above += m >= lo
            inside += (m >= lo) & (m <= hi)
        count += above
        if inside:
            for k in range(32):  # each magnitude at the next slot, kept if in the band
                m = abs(block[k])  # (no branch on the data)
                band[used] = m
                used += (m >= lo) & (m <= hi)
    tail = xs[body:]
    for k in range(tail.size):
        m = abs(tail[k])
        count += m >= lo
        band[used] = m
        used += (m >= lo) & (m <= hi)
    return count * (1 << 32) + used


def select_pass(
    x: F32,
    start: int,
    stop: int,
    cut: np.float32,
    strict: bool,
    indices: I64,
    values: F32,
    o0: int,
    o1: int,
) -> int:
    """The second pass: the indices and values of ``x[start:stop]`` whose magnitude is
    above ``cut`` (``>= cut`` unless ``strict``) into ``indices[o0:o1]`` and
    ``values[o0:o1]``, in order; returns how many there were (the caller checks it is
    ``o1 − o0``), never writing past ``o1``.

    Where at most one value in 8 is kept (the chunk's count is known from the first
    pass), a kept value is written under a branch, which the predictor gets right most
    of the time; denser chunks write each value at the next slot and keep the slot only
    if the value is kept (no branch on the data). Measured on 25M normal values: 36
    against 58 ms at 10% kept, 57 against 57 at 20%, 117 against 48 at 50%."""
    xs = x[start:stop]
    o = o0
    if (o1 - o0) * 8 <= xs.size:
        for k in range(xs.size):
            v = xs[k]
            m = abs(v)
            if (m > cut) if strict else (m >= cut):
                if o < o1:
                    indices[o] = start + k
                    values[o] = v
                o += 1
        return o - o0
    for k in range(xs.size):
        v = xs[k]
        m = abs(v)
        keep = (m > cut) if strict else (m >= cut)
        if o < o1:
            indices[o] = start + k
            values[o] = v
        o += keep
    return o - o0


def rice_chunk(idx: I64, start: int, stop: int, k: int, rem: U8, phase: int, unary: U8) -> int:
    """The Rice code of the gaps of ``idx[start:stop]`` (``g_j = i_j − i_{j−1} − 1``,
    ``g_0 = i_0`` when ``start`` is 0), as :mod:`fedsqueeze.codec.rice_encode` writes
    it: the ``k`` low bits of each gap into ``rem`` (LSB first, from its byte 0: chunks
    hold a multiple of 8 gaps), and ``g >> k`` one-bits then a zero-bit per gap into
    ``unary`` from bit ``phase`` of its byte 0 (bits before ``phase`` and after the
    last are zero). Returns how many bytes of ``unary`` were written.

    Bits are flushed four bytes at a time, once 32 are pending (one predictable branch
    per gap or so, where a byte at a time took a branch per byte)."""
    ids = idx[start:stop]
    acc = 0  # bits not yet written, lowest first
    nbits = 0
    at = 0
    mask = (1 << k) - 1
    prev = idx[start - 1] if start > 0 else -1
    for j in range(ids.size):
        g = ids[j] - prev - 1
        prev = ids[j]
        acc |= (g & mask) << nbits
        nbits += k
        if nbits >= 32:
            rem[at] = acc & 0xFF
            rem[at + 1] = (acc >> 8) & 0xFF
            rem[at + 2] = (acc >> 16) & 0xFF
            rem[at + 3] = (acc >> 24) & 0xFF
            acc >>= 32
            nbits -= 32
            at += 4
    while nbits > 0:
        rem[at] = acc & 0xFF
        acc >>= 8
        nbits -= 8
        at += 1
    acc = 0
    nbits = phase
    at = 0
    prev = idx[start - 1] if start > 0 else -1
    for j in range(ids.size):
        g = ids[j] - prev - 1
        prev = ids[j]
        q = g >> k
        while q >= 24:  # long runs of one-bits, 24 at a time (nbits stays below 56)
            acc |= 0xFFFFFF << nbits
            nbits += 24
            q -= 24
            if nbits >= 32:
                unary[at] = acc & 0xFF
                unary[at + 1] = (acc >> 8) & 0xFF
                unary[at + 2] = (acc >> 16) & 0xFF
                unary[at + 3] = (acc >> 24) & 0xFF
                acc >>= 32
                nbits -= 32
                at += 4
        acc |= ((1 << q) - 1) << nbits
        nbits += q + 1  # the zero-bit: nothing to set
        if nbits >= 32:
            unary[at] = acc & 0xFF
            unary[at + 1] = (acc >> 8) & 0xFF
            unary[at + 2] = (acc >> 16) & 0xFF
            unary[at + 3] = (acc >> 24) & 0xFF
            acc >>= 32
            nbits -= 32
            at += 4
    while nbits > 0:
        unary[at] = acc & 0xFF
        acc >>= 8
        nbits -= 8
        at += 1
    return at


def byte_counts(data: U8, counts: I64) -> None:
    """``counts[v]``: how many bytes of ``data`` are ``v`` (``counts`` zeroed first).

    Four tables, one per byte of every four: an exponent plane repeats a few values, and
    with one table each increment waits for the previous one to the same count (measured
    on all-MiniLM-L6-v2's exponent planes: 1.9x slower)."""
    c0 = np.zeros(256, dtype=np.uint32)
    c1 = np.zeros(256, dtype=np.uint32)
    c2 = np.zeros(256, dtype=np.uint32)
    c3 = np.zeros(256, dtype=np.uint32)
    n = data.size
    body = n - n % 4
    for i in range(0, body, 4):
        c0[data[i]] += 1
        c1[data[i + 1]] += 1
        c2[data[i + 2]] += 1
        c3[data[i + 3]] += 1
    for i in range(body, n):
        c0[data[i]] += 1
    for v in range(256):
        counts[v] = np.int64(c0[v]) + np.int64(c1[v]) + np.int64(c2[v]) + np.int64(c3[v])


def bucket_histogram(exponents: U8, ranks: U16, plane: U8, hist: I64) -> None:
    """``hist[b, v]``: how many bytes ``v`` of ``plane`` fall in bucket ``b`` (the bucket
    of byte ``i`` is ``ranks[exponents[i]]``); ``hist`` is zeroed first."""
    hist[:] = 0
    for i in range(plane.size):
        hist[ranks[exponents[i]], plane[i]] += 1


def bucket_gather(exponents: U8, ranks: U16, plane: U8, starts: I64, out: U8) -> None:
    """``out``: the bytes of ``plane`` grouped by bucket (the bucket of byte ``i`` is
    ``ranks[exponents[i]]``; bucket ``b`` from ``starts[b]``), in index order within a
    bucket: a stable counting sort (:mod:`fedsqueeze.codec.grouping`'s exponent
    buckets). A copy of ``starts`` is the write cursor (a fresh array: LLVM then knows
    ``out`` writes cannot change it, 2.5x faster than updating ``starts`` in place)."""
    pos = starts.copy()
    for i in range(plane.size):
        b = ranks[exponents[i]]
        j = pos[b]
        out[j] = plane[i]
        pos[b] = j + 1


def bucket_scatter(exponents: U8, ranks: U16, grouped: U8, starts: I64, out: U8) -> None:
    """Inverse of :func:`bucket_gather`: ``out[i]`` is the next byte of bucket
    ``ranks[exponents[i]]`` in ``grouped`` (``starts`` copied, as there)."""
    pos = starts.copy()
    for i in range(out.size):
        b = ranks[exponents[i]]
        j = pos[b]
        out[i] = grouped[j]
        pos[b] = j + 1


def scatter_values(out: F32, idx: I64, start: int, stop: int, values: F32) -> None:
    """``out[idx[j]] = values[j]`` for ``j`` in ``[start, stop)`` (the top-k residual's
    kept positions; NumPy's fancy assignment costs several times more per value)."""
    ids = idx[start:stop]
    vs = values[start:stop]
    for j in range(ids.size):
        out[ids[j]] = vs[j]


#: The kernels, helpers before the kernels that call them.
_KERNELS = (
    "_pack",
    "_lane",
    "_decode_run",
    "linear_encode",
    "nf4_encode",
    "linear_decode",
    "nf4_decode",
    "run_range",
    "split_plane",
    "join_planes2",
    "join_planes4",
    "band_pass",
    "select_pass",
    "rice_chunk",
    "byte_counts",
    "bucket_histogram",
    "bucket_gather",
    "bucket_scatter",
    "scatter_values",
)
