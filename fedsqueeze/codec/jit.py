"""Compiled chunk kernels (numba) for the codec's hot loops: dense quantization and its
decode and per-run ranges here; the byte planes of the lossless coder
(:mod:`fedsqueeze.codec.jit_bytes`) and the sparse specs' selection and positions
(:mod:`fedsqueeze.codec.jit_select`) in their own modules, compiled by :func:`ready`
here and called in their modules.

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

import math
import os
import threading

import numpy as np
import numpy.typing as npt

from fedsqueeze.codec import jit_bytes, jit_select

__all__ = [
    "ENABLED",
    "MIN_VALUES",
    "block_encode",
    "block_params",
    "fp16_bits",
    "linear_decode",
    "linear_encode",
    "nf4_decode",
    "nf4_encode",
    "pack",
    "per_run",
    "ready",
    "run_range",
    "span_range",
    "use",
    "warm",
    "zero_point_bytes",
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
I32 = npt.NDArray[np.int32]
#: Double-quantized scales' parts: the 1/16-octave table (float32 ``[256]``), the codes
#: (uint8, per block) and the exponents (int16, per group).
DQ = tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8], npt.NDArray[np.int16]]
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
        pack(u, 8, bits, u.copy(), 0)
    nf4_encode(f, 0, 8, one, 8, np.zeros(15, dtype=np.float32), u, u)
    nf4_decode(u, 0, 8, f, one, 8, f)
    run_range(f, 0, 8, 4, f[:2].copy(), f[:2].copy())
    span_range(f, 0, 8, f[:2].copy(), 0)
    fp16_bits(one, np.zeros(1, dtype=np.int16))
    zero_point_bytes(one, np.float32(255.0), u)
    for scheme in (0, 1, 2):
        for fmt in (0, 1, 2, 3):
            p = [f[:2].copy() for _ in range(3)]
            dq = (np.ones(256, np.float32), np.zeros(2, np.uint8), np.zeros(1, np.int16))
            block_params(f, 0, 8, 4, 4, scheme, fmt, np.float32(1.0), p[0], p[1], p[2], dq)
            mids = np.zeros(15, dtype=np.float32)
            block_encode(f, 0, 8, 4, 4, scheme, fmt, np.float32(1.0), p[0], p[1], p[2], dq,
                         mids, u.copy(), u.copy())  # fmt: skip
    jit_bytes.warm()
    jit_select.warm()


def _compile() -> bool:
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency; NumPy runs instead
        return False
    spaces = ((globals(), _KERNELS), (vars(jit_bytes), jit_bytes.KERNELS))
    for space, names in (*spaces, (vars(jit_select), jit_select.KERNELS)):
        for name in names:  # helpers first: their callers find them compiled
            fn = space[name]
            try:
                space[name] = numba.njit(fn, cache=True, nogil=True, boundscheck=False)
            except RuntimeError:  # no writable place for the machine code: compile each time
                space[name] = numba.njit(fn, cache=False, nogil=True, boundscheck=False)
    # Kernels compile on their first call, so the vector helper can still take the
    # compiled scalar one's place.
    from fedsqueeze.codec import jit_vector

    jit_vector.install(vars(jit_select))
    return True


# Every loop below runs over a slice from index 0: with a loop from ``start`` numba must
# allow for negative indices (it wraps them), and LLVM then leaves the loop unvectorized
# (measured: 4.5x slower on a chunk of int8 codes).


def pack(codes: U8, size: int, bits: int, packed: U8, b0: int) -> None:
    """:func:`_pack`, called from Python (:func:`fedsqueeze.codec.bitpack.pack_bits`)."""
    _pack(codes, size, bits, packed, b0)


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
    mids: F32,
    packed: U8,
    scratch: U8,
) -> None:
    """The packed NF4 codes (4 bits) of ``x[start:stop]`` into ``packed``: the nearest
    entry of ``x / scale[r]``, i.e. how many of the codebook's 15 float32 midpoints
    ``mids`` (:func:`~fedsqueeze.codec.kernels.nf4_midpoints`) lie strictly below it, as
    ``bucketize`` and :func:`~fedsqueeze.codec.kernels.nearest_nf4`'s cell tables count
    them (ties to the lower entry). Fifteen comparisons a value, which vectorize: 0.73
    against 1.74 ns a value through the 256-cell tables' lookups."""
    m0, m1, m2, m3, m4 = mids[0], mids[1], mids[2], mids[3], mids[4]
    m5, m6, m7, m8, m9 = mids[5], mids[6], mids[7], mids[8], mids[9]
    m10, m11, m12, m13, m14 = mids[10], mids[11], mids[12], mids[13], mids[14]
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
            u = xs[k] / s
            cs[k] = np.uint8(
                (u > m0) + (u > m1) + (u > m2) + (u > m3) + (u > m4)
                + (u > m5) + (u > m6) + (u > m7) + (u > m8) + (u > m9)
                + (u > m10) + (u > m11) + (u > m12) + (u > m13) + (u > m14)
            )  # fmt: skip
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


def _linear_run(qs: U8, off: int, bits: int, z: F32, s: F32, out: F32, o0: int, n: int) -> None:
    """``out[o0 + k] = (float(q_k) − z) · s`` for the ``n`` codes (2 or 4 bits) packed in
    ``qs`` from lane ``off`` of byte 0: :func:`_decode_run` with the table's two float32
    operations done in place, so the whole bytes' loop vectorizes (0.12 against 0.60 ns
    a value through a 16-entry table, blocks of 64; the same numbers)."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    head = min(n, (per_byte - off) % per_byte)
    for k in range(head):
        out[o0 + k] = (np.float32(_lane(qs, off + k, bits)) - z) * s
    first = (off + head) // per_byte
    whole = (n - head) // per_byte
    o = o0 + head
    vs = qs[first : first + whole]
    os = out[o : o + whole * per_byte]
    if bits == 4:
        for b in range(vs.size):
            v = vs[b]
            os[2 * b] = (np.float32(v & 15) - z) * s
            os[2 * b + 1] = (np.float32(v >> 4) - z) * s
    else:
        for b in range(vs.size):
            v = vs[b]
            os[4 * b] = (np.float32(v & mask) - z) * s
            os[4 * b + 1] = (np.float32((v >> 2) & mask) - z) * s
            os[4 * b + 2] = (np.float32((v >> 4) & mask) - z) * s
            os[4 * b + 3] = (np.float32(v >> 6) - z) * s
    for k in range(head + whole * per_byte, n):
        out[o0 + k] = (np.float32(_lane(qs, off + k, bits)) - z) * s


def _nibble_runs(
    src: U8, start: int, stop: int, scale: F32, zp: F32, length: int, out: F32
) -> None:
    """:func:`linear_decode` of 4-bit codes in runs of an even ``length`` (``start`` on a
    run, so every run starts on a byte; the last may end inside one): the loop on its
    own, which LLVM vectorizes at 0.12 ns a value on blocks of 64 (0.29 inside the
    general loop, 0.60 through a table)."""
    r = start // length
    i = start
    while i < stop:
        end = min(stop, i + length)
        s = scale[r]
        z = zp[r]
        qs = src[i // 2 : end // 2]
        os = out[i:end]
        for b in range(qs.size):
            v = qs[b]
            os[2 * b] = (np.float32(v & 15) - z) * s
            os[2 * b + 1] = (np.float32(v >> 4) - z) * s
        if (end - i) % 2:  # the tensor's last value, alone in its byte's low lane
            out[end - 1] = (np.float32(src[(end - 1) // 2] & 15) - z) * s
        i = end
        r += 1


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
    ``start`` is on a run and on a byte (the runs after it may start inside one)."""
    per_byte = 8 // bits
    if bits == 4 and length % 2 == 0:  # every run on a byte: no lanes to split
        _nibble_runs(src, start, stop, scale, zp, length, out)
        return
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
            qs = src[i // per_byte :]
            if bits == 4:  # literal widths: numba compiles _linear_run for each
                _linear_run(qs, i % 2, 4, z, s, out, i, end - i)
            else:
                _linear_run(qs, i % 4, 2, z, s, out, i, end - i)
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
    ``src`` (runs as :func:`linear_decode`). Runs of an even length (every one on a
    byte) multiply each value in place, 0.28 against 0.59 ns a value on blocks of 64;
    the others put each run's 16 values in a table. The same products either way."""
    if length % 2 == 0:
        r = start // length
        i = start
        while i < stop:
            end = min(stop, i + length)
            s = scale[r]
            qs = src[i // 2 : end // 2]
            os = out[i:end]
            for b in range(qs.size):
                v = qs[b]
                os[2 * b] = codebook[v & 15] * s
                os[2 * b + 1] = codebook[v >> 4] * s
            if (end - i) % 2:  # the tensor's last value, alone in its byte's low lane
                out[end - 1] = codebook[src[(end - 1) // 2] & 15] * s
            i = end
            r += 1
        return
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


def _ordered(v: int) -> int:
    """The int32 bits of a float32 mapped so that integer order is float order
    (negatives reflected below the positives; ``-0 < +0``; a NaN with its sign bit set
    below every number, one without above). The map is its own inverse."""
    return np.int32(v ^ ((v >> 31) & 0x7FFFFFFF))  # type: ignore[no-any-return]


def _span(w: I32) -> tuple[int, int]:
    """The :func:`_ordered` minimum and maximum of the float32 bits ``w`` (non-empty).
    Integer reductions: LLVM vectorizes them, where a float ``min`` (which must keep
    NaN's order) stays scalar: 0.11 against 0.50 ns a value on blocks of 64."""
    a = np.int32(2147483647)
    b = np.int32(-2147483648)
    for k in range(w.size):
        m = _ordered(w[k])
        a = min(a, m)
        b = max(b, m)
    return a, b


def run_range(x: F32, start: int, stop: int, length: int, lo: F32, hi: F32) -> None:
    """``lo[r]``, ``hi[r]``: the minimum and maximum of each run ``r`` of ``length``
    values in ``x[start:stop]`` (``start`` on a run; the last run may be short); NaN in
    both where the run holds one, as ``torch.amin`` / ``torch.amax`` give it (a zero's
    sign may differ from theirs: no stored byte depends on it)."""
    w = x.view(np.int32)
    lo_w = lo.view(np.int32)
    hi_w = hi.view(np.int32)
    nan = np.float32(np.nan)
    r = start // length
    i = start
    while i < stop:
        end = min(stop, i + length)
        a, b = _span(w[i:end])
        lo_w[r] = _ordered(a)
        hi_w[r] = _ordered(b)
        if lo[r] != lo[r] or hi[r] != hi[r]:
            lo[r] = nan
            hi[r] = nan
        i = end
        r += 1


def _pow2(e: int) -> np.float32:
    """``2^e`` as a float32, exactly (``-149 <= e <= 127``: a power of two float64
    holds, which float32 holds too)."""
    return np.float32(math.ldexp(1.0, e))  # type: ignore[no-any-return]


def _double_quantize(los: F32, r0: int, dq: DQ) -> None:
    """Double-quantized scales (``blockwise._double_quantize_part``, value for value) of
    the raw scales ``los`` (blocks ``r0..``, ``r0`` on a group), replaced by the stored
    ones: per group of 256 blocks the smallest exponent ``e`` with ``top <= 2^e ·
    table[255]`` (clipped to [−126, 111]), then each block's smallest code with
    ``table[code] >= raw · 2^−e``. ``dq``: the table (float32 ``[256]``), and the codes
    (uint8, per block) and exponents (int16, per group) it fills."""
    table, codes, exps = dq
    count = los.size
    top_code = table[255]
    for g in range(-(-count // 256)):
        a = g * 256
        b = min(count, a + 256)
        top = los[a]
        for j in range(a, b):
            top = max(top, los[j])
        e = math.frexp(top)[1] - 17  # top = m · 2^e2, m in [0.5, 1); less 17
        for _ in range(3):
            if top_code * _pow2(e) < top:
                e += 1
        e = min(max(e, -126), 111)
        unit = _pow2(-e)
        step = _pow2(e)
        for j in range(a, b):
            v = los[j] * unit
            c = 0  # how many entries lie below v (searchsorted, side "left"), at most 255:
            for half in (128, 64, 32, 16, 8, 4, 2, 1):  # halvings without branches
                c += half * (table[c + half - 1] < v)
            codes[r0 + j] = c
            los[j] = table[c] * step
        exps[r0 // 256 + g] = e


def block_params(
    x: F32,
    start: int,
    stop: int,
    length: int,
    bits: int,
    scheme: int,
    fmt: int,
    limit: np.float32,
    scale: F32,
    zp: F32,
    inv: F32,
    dq: DQ,
) -> int:
    """The parameters of the blocks (runs of ``length`` values, the last may be short)
    of ``x[start:stop]`` (``start`` on a block) into ``scale[r]``, ``zp[r]`` and, for the
    linear schemes, ``inv[r] = 1 / scale[r]``: :func:`fedsqueeze.codec.fused_blocks.block_params`'
    float32 arithmetic, value for value (scheme 0 affine, 1 symmetric, 2 NF4; ``fmt`` 0
    fp32, 1 fp16, 2 bf16 scales, 3 double-quantized: ``dq`` then holds the 1/16-octave
    table, and takes each block's code and each group's exponent as
    :func:`fedsqueeze.codec.blockwise.store_scales` chooses them; ``start`` must then be
    on a group of :data:`~fedsqueeze.codec.blockwise.DQ_GROUP` blocks). Returns 0, or 1
    where a block holds a NaN, an Inf or a value beyond ``±limit`` (nothing is then
    trusted), 2 for an fp16 scale beyond 65504, 3 for a start inside a DQ group.

    Each block's minimum and maximum first (:func:`_span`), then the parameters of all
    the blocks in loops over the blocks without branches, which vectorize: 0.39 → 0.05 ns
    a value on blocks of 64 (a block's scalar arithmetic, rounding to the scale's format
    included, cost ~25 ns)."""
    r0 = start // length
    count = -(-(stop - start) // length)
    w = x.view(np.int32)
    s_i = scale[r0 : r0 + count].view(np.int32)
    z_i = zp[r0 : r0 + count].view(np.int32)
    i = start
    for j in range(count):  # the ends, as int32 bits, into the outputs for now
        end = min(stop, i + length)
        a, b = _span(w[i:end])
        s_i[j] = _ordered(a)
        z_i[j] = _ordered(b)
        i = end
    los = scale[r0 : r0 + count]
    his = zp[r0 : r0 + count]
    good = 0
    for j in range(count):  # NaN fails both comparisons
        good += (los[j] >= -limit) & (his[j] <= limit)
    if good != count:
        return 1
    zero = np.float32(0.0)
    one = np.float32(1.0)
    qmax = np.float32((1 << bits) - 1)
    mid = np.float32(1 << (bits - 1))
    lows = inv[r0 : r0 + count] if scheme == 0 else scale[:0]
    for j in range(count):  # the raw scale, then zero → 1 and at least 2^-126
        lo = los[j]
        hi = his[j]
        if scheme == 0:
            lo = zero if lo > zero else lo
            hi = zero if hi < zero else hi
            lows[j] = lo  # kept for the zero point (inv is written after it)
            raw = hi / qmax - lo / qmax  # divided first: hi − lo may overflow
        elif scheme == 1:
            raw = (-lo if -lo >= hi else hi) / (mid - one)
        else:
            raw = -lo if -lo >= hi else hi
        raw = raw if raw > zero else one
        los[j] = max(raw, np.float32(2.0**-126))
    if fmt == 1:
        over = 0
        for j in range(count):
            over += los[j] > np.float32(65504.0)
        if over:
            return 2
        tiny = np.float32(2.0**-24)
        ups = his  # the zero points are written last: room for the rounded-up bits
        up_i = z_i
        for j in range(count):  # normal fp16: the low 13 mantissa bits rounded up
            up_i[j] = (s_i[j] + 0x1FFF) & ~0x1FFF
        for j in range(count):
            r = los[j]
            sub = np.ceil(r * np.float32(2.0**24)) * tiny  # fp16's subnormals, exactly
            near = sub if r < np.float32(2.0**-14) else ups[j]
            los[j] = tiny if r <= tiny else near
    elif fmt == 2:
        for j in range(count):  # bf16: the low 16 bits rounded up
            s_i[j] = (s_i[j] + 0xFFFF) & ~0xFFFF
    elif fmt == 3:
        if r0 % 256:
            return 3
        _double_quantize(los, r0, dq)
    if scheme == 0:
        for j in range(count):
            s = los[j]
            z = np.rint(-lows[j] / s)
            z = zero if z < zero else z
            z = qmax if z > qmax else z
            his[j] = z + zero  # −0 → +0
            inv[r0 + j] = one / s
    elif scheme == 1:
        for j in range(count):
            his[j] = mid
            inv[r0 + j] = one / los[j]
    else:
        for j in range(count):
            his[j] = zero
    return 0


def block_encode(
    x: F32,
    start: int,
    stop: int,
    length: int,
    bits: int,
    scheme: int,
    fmt: int,
    limit: np.float32,
    scale: F32,
    zp: F32,
    inv: F32,
    dq: DQ,
    mids: F32,
    packed: U8,
    scratch: U8,
) -> int:
    """:func:`block_params` and then the codes (:func:`linear_encode`, or
    :func:`nf4_encode` with midpoints ``mids`` for scheme 2) of ``x[start:stop]``, in
    steps of whole blocks and bytes of about 16K values, so each step's values are
    still in cache when they are quantized (one read of the tensor from memory).
    Returns :func:`block_params`' status; on a non-zero one nothing is trusted."""
    per_byte = 8 // bits
    unit = length * per_byte  # a step starts on a block and on a byte
    if fmt == 3:
        unit = length * 256  # ... and on a group of double-quantized scales (even)
    step = max(1, 16384 // unit) * unit
    qmin = np.float32(0.0 if scheme == 0 else 1.0)
    qmax = np.float32((1 << bits) - 1)
    i = start
    while i < stop:
        end = min(stop, i + step)
        status = block_params(x, i, end, length, bits, scheme, fmt, limit, scale, zp, inv, dq)
        if status:
            return status
        if scheme == 2:
            nf4_encode(x, i, end, scale, length, mids, packed, scratch)
        else:
            linear_encode(x, i, end, inv, zp, length, qmin, qmax, bits, packed, scratch)
        i = end
    return 0


def fp16_bits(values: F32, out: npt.NDArray[np.int16]) -> int:
    """``out[k]``: the fp16 bits of ``values[k]`` (float32), each exactly an fp16 value,
    in one pass: 0, or 1 where one is not finite and positive, else 2 where one is not
    exactly an fp16 value (the checks of
    :func:`~fedsqueeze.codec.blockwise.scales_to_bytes`, in its order). Normal fp16
    values are float32s with their low 13 mantissa bits zero and exponents 2^−14..2^15;
    subnormal ones are whole multiples of 2^−24."""
    w = values.view(np.int32)
    bad = 0
    inexact = 0
    for k in range(w.size):  # both forms computed, one kept: no branch, so it vectorizes
        b = w[k]
        bad += (b <= 0) | (b >= 0x7F800000)  # ±0, negatives, Inf and NaN
        e = (b >> 23) & 0xFF
        m = b & 0x7FFFFF
        normal = e >= 113  # 2^-14 and above: an fp16 normal when below 2^16, on its grid
        cut = min(max(126 - e, 0), 31)  # fp16 subnormals: (1.m)·2^(e−127) = k·2^−24
        whole = (m | 0x800000) >> cut
        off_grid = (e > 142) | ((m & 0x1FFF) != 0)
        off_sub = (e < 103) | ((whole << cut) != (m | 0x800000))
        inexact += (normal & off_grid) | ((normal ^ True) & off_sub)  # (no branch)
        out[k] = (((e - 112) << 10) | (m >> 13)) if normal else whole
    if bad:
        return 1
    return 2 if inexact else 0


def zero_point_bytes(zp: F32, top: np.float32, out: U8) -> bool:
    """``out[k] = zp[k]`` as uint8 where every zero point is a whole number in
    ``[0, top]`` (the check of :func:`~fedsqueeze.codec.quantization.qparams_to_bytes`,
    in one pass); ``False`` otherwise."""
    ok = 0
    for k in range(zp.size):
        z = zp[k]
        ok += (z == np.rint(z)) & (z >= np.float32(0.0)) & (z <= top)
        out[k] = np.uint8(min(max(z, np.float32(0.0)), np.float32(255.0)))
    return ok == zp.size


def span_range(x: F32, start: int, stop: int, out: F32, slot: int) -> None:
    """``out[slot]``, ``out[slot + 1]``: the minimum and maximum of ``x[start:stop]``
    (non-empty), :func:`run_range`'s for one run."""
    n = stop - start
    run_range(x[start:stop], 0, n, n, out[slot : slot + 1], out[slot + 1 : slot + 2])


#: The kernels of this module, helpers before the kernels that call them.
_KERNELS = (
    "_pack",
    "pack",
    "_lane",
    "_decode_run",
    "_linear_run",
    "_nibble_runs",
    "linear_encode",
    "nf4_encode",
    "linear_decode",
    "nf4_decode",
    "_ordered",
    "_span",
    "run_range",
    "span_range",
    "_pow2",
    "_double_quantize",
    "block_params",
    "block_encode",
    "fp16_bits",
    "zero_point_bytes",
)
