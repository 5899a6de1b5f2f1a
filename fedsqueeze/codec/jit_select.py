"""Compiled kernels (numba) of the sparse specs: the two passes of the exact magnitude
selection (:mod:`fedsqueeze.codec.threshold_select`), the quantizer fused into the
second (:mod:`fedsqueeze.codec.select_quantize`) with stochastic rounding's keyed draws
(:mod:`fedsqueeze.codec.draws`), the Rice-coded positions
(:mod:`fedsqueeze.codec.rice_encode`) and the top-k residual's scatter.

Plain Python until :func:`fedsqueeze.codec.jit.ready` compiles them in this module (the
rules and the reasons are in :mod:`fedsqueeze.codec.jit`): callers ask
:func:`~fedsqueeze.codec.jit.use` first.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "KERNELS",
    "band_pass",
    "quantize_kept",
    "rice_chunk",
    "rice_decode",
    "rice_sums",
    "scatter_values",
    "select_pass",
    "sum_into",
    "sum_top",
    "unit_draw",
    "unit_draws",
    "warm",
]

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

# Every loop runs over a slice from index 0 (see fedsqueeze.codec.jit).

#: Whether :func:`_compress16` is the vector kernel of :mod:`fedsqueeze.codec.jit_vector`
#: (set by its ``install`` before anything is compiled; a constant to the compiler).
VECTOR = False


def band_pass(
    x: F32,
    bits: I32,
    start: int,
    stop: int,
    lo: np.float32,
    hi: np.float32,
    band: F32,
    tops: I32,
    slot: int,
) -> int:
    """The first pass of :func:`~fedsqueeze.codec.threshold_select.select_above` over
    ``x[start:stop]``: the magnitudes in ``[lo, hi]`` into ``band`` (in order; ``band``
    holds ``stop − start`` values) and the count of magnitudes ``>= lo``, returned as
    ``count * 2^32 + len(band used)`` (one integer: numba returns it without a tuple).
    Also ``tops[2·slot]`` and ``tops[2·slot + 1]``: the largest magnitude's bit pattern
    among the values with the sign bit clear, and among those with it set (0 where
    none), from ``bits`` (``x``'s memory as int32): magnitudes order like their bits,
    NaN above infinity above every finite value, so the encoder's finiteness and range
    check needs no pass of its own (integer maxima: a float one would not vectorize),
    and a quantizer fused into the second pass knows the kept values' range from them
    (:mod:`fedsqueeze.codec.select_quantize`).

    Without AVX-512, blocks of 32 values are counted first (a loop LLVM vectorizes) and
    only a block with a magnitude in the band is written out: the band holds about 1% of
    the values, so three blocks in four are skipped (measured on 25M normal values, a
    0.8% band: 18 ms against 60 for the write of every value). With it, one vector step
    per 16 values counts them, keeps the maxima lane by lane and stores the band's
    magnitudes side by side (:func:`_scan16`): 9.4-9.9 ms on 25M values, two threads,
    at the memory's pace (a count alone: 7.8-9.2), against 17.7 for a vectorized loop of
    count and maxima beside a compressed store of the band, and 18.4 for the blocks of
    32 with one maximum."""
    xs = x[start:stop]
    bs = bits[start:stop]
    n = xs.size
    count = 0
    used = 0
    top_pos = 0
    top_neg = 0
    # With the vector kernel (VECTOR): 16 values a step, counted, their maxima kept lane
    # by lane and the band's magnitudes stored side by side, all in one step (_scan16).
    body = n - n % 16 if VECTOR else 0
    if VECTOR:
        lanes = np.zeros(32, dtype=np.int32)
        for b0 in range(0, body, 16):
            packed = _scan16(xs, bs, b0, lo, hi, band, used, lanes)
            used = packed & 0xFFFFFFFF
            count += packed >> 32
        top_pos = lanes[:16].max()
        top_neg = lanes[16:].max()
    for b0 in range(body, n - (n - body) % 32, 32):
        block = xs[b0 : b0 + 32]
        words = bs[b0 : b0 + 32]
        above = 0
        inside = 0
        for k in range(32):
            m = abs(block[k])
            above += m >= lo
            inside += (m >= lo) & (m <= hi)
            w = words[k]
            neg = w >> 31  # 0, or -1 (every bit set) where the sign bit is
            top_pos = max(top_pos, w & ~neg)
            top_neg = max(top_neg, w & 0x7FFFFFFF & neg)
        count += above
        if inside:
            for k in range(32):  # each magnitude at the next slot, kept if in the band
                m = abs(block[k])  # (no branch on the data)
                band[used] = m
                used += (m >= lo) & (m <= hi)
    body = n - (n - body) % 32
    tail = xs[body:]
    tail_bits = bs[body:]
    for k in range(tail.size):
        m = abs(tail[k])
        count += m >= lo
        band[used] = m
        used += (m >= lo) & (m <= hi)
        w = tail_bits[k]
        neg = w >> 31
        top_pos = max(top_pos, w & ~neg)
        top_neg = max(top_neg, w & 0x7FFFFFFF & neg)
    tops[2 * slot] = top_pos
    tops[2 * slot + 1] = top_neg
    return count * (1 << 32) + used


def _scan16(
    xs: F32, bs: I32, k: int, lo: np.float32, hi: np.float32, band: F32, used: int, tops: I32
) -> int:
    """Of ``xs[k:k+16]`` (``bs``: their memory as int32): the magnitudes in ``[lo, hi]``
    into ``band[used:]``, in order, the sign-split maxima of their bit patterns into
    ``tops`` (lane ``j`` of the sixteen
    for the sign bit clear, ``16 + j`` for it set); returns ``used`` plus how many went
    to the band, plus 2^32 times how many magnitudes are ``>= lo``.
    :mod:`fedsqueeze.codec.jit_vector` replaces it with one vector step; without AVX-512
    :func:`band_pass` never calls this scalar form (compiled only so that the call
    types), as with :func:`_compress16`."""
    counted = 0
    for j in range(16):
        v = xs[k + j]
        m = abs(v)
        counted += m >= lo
        if m >= lo and m <= hi:
            band[used] = m
            used += 1
        w = bs[k + j]
        lane = j + 16 if w < 0 else j
        tops[lane] = max(tops[lane], w & 0x7FFFFFFF)
    return used + (counted << 32)


def _compress16(
    xs: F32, k: int, cut: np.float32, strict: bool, values: F32, indices: I64, o: int, base: int
) -> int:
    """Of ``xs[k:k+16]``, the values whose magnitude is above ``cut`` (``>= cut`` unless
    ``strict``) into ``values[o:]`` and their indices plus ``base`` into
    ``indices[o:]``, in order; returns ``o`` plus how many. The caller guarantees room
    for 16. :mod:`fedsqueeze.codec.jit_vector` replaces it with one vector step; where
    it cannot (no AVX-512), ``VECTOR`` stays false and :func:`select_pass` never calls
    this scalar form, which is compiled only so that the call in it types."""
    for j in range(16):
        v = xs[k + j]
        m = abs(v)
        if (m > cut) if strict else (m >= cut):
            indices[o] = base + k + j
            values[o] = v
            o += 1
    return o


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
    copy: F32,
) -> int:
    """The second pass: the indices and values of ``x[start:stop]`` whose magnitude is
    above ``cut`` (``>= cut`` unless ``strict``) into ``indices[o0:o1]`` and
    ``values[o0:o1]``, in order; returns how many there were (the caller checks it is
    ``o1 − o0``), never writing past ``o1``. Unless ``copy`` is empty, also
    ``copy[start:stop] = x[start:stop]``, in the same loop (top-k's residual starts as
    that copy: :mod:`fedsqueeze.codec.select_quantize`).

    Where at most one value in 8 is kept (the chunk's count is known from the first
    pass), a kept value is written under a branch, which the predictor gets right most
    of the time; denser chunks write each value at the next slot and keep the slot only
    if the value is kept (no branch on the data). Measured on 25M normal values: 36
    against 58 ms at 10% kept, 57 against 57 at 20%, 117 against 48 at 50%. On a CPU
    with AVX-512 both give way to :func:`_compress16`'s vector form (21 against 9 ms
    of wall time at 10% kept, two threads)."""
    xs = x[start:stop]
    copying = copy.size > 0
    dst = copy[start:stop] if copying else copy
    o = o0
    k = 0
    # With the vector kernel (VECTOR), sixteen values a step while a whole step's output
    # fits; the rest, or everything without it, one by one below.
    while VECTOR and k + 16 <= xs.size and o + 16 <= o1:
        o = _compress16(xs, k, cut, strict, values, indices, o, start)
        if copying:
            for j in range(16):
                dst[k + j] = xs[k + j]
        k += 16
    if copying:
        rest = dst[k:]
        for j in range(rest.size):
            rest[j] = xs[k + j]
    xs = xs[k:]
    start += k
    if (o1 - o) * 8 <= xs.size:
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


def rice_sums(idx: I64, start: int, stop: int, k0: int, sums: I64) -> bool:
    """The first pass of :func:`fedsqueeze.codec.rice_encode.rice_sums` over the gaps of
    ``idx[start:stop]``: ``sums[j] = sum(g >> (k0 + j))`` for every ``j`` of ``sums``
    (zeroed first); returns whether every gap is ``>= 0`` (``sums`` is then complete).
    One pass, where NumPy made two per ``k`` over a scratch copy of the gaps."""
    ids = idx[start:stop]
    sums[:] = 0
    prev = idx[start - 1] if start > 0 else -1
    low = 0
    # Five sums (the callers' widest window) in registers: sums[w] += … in the loop made
    # each gap wait for the stores of the one before.
    s0 = s1 = s2 = s3 = s4 = 0
    for j in range(ids.size):
        g = ids[j] - prev - 1
        prev = ids[j]
        low = min(low, g)
        q = g >> k0
        s0 += q
        s1 += q >> 1
        s2 += q >> 2
        s3 += q >> 3
        s4 += q >> 4
    head = (s0, s1, s2, s3, s4)
    for w in range(min(5, sums.size)):
        sums[w] = head[w]
    for w in range(5, sums.size):  # a wider window: one more pass for each further k
        total = 0
        prev = idx[start - 1] if start > 0 else -1
        for j in range(ids.size):
            total += (ids[j] - prev - 1) >> (k0 + w)
            prev = ids[j]
        sums[w] = total
    return low >= 0


def rice_decode(rem: U8, k: int, unary: U8, count: int, numel: int, out: I64) -> int:
    """The positions of a Rice payload (remainders ``rem``, ``k`` bits a gap, LSB first;
    then the ``unary`` stream) into ``out[:count]``, in one pass over the unary bytes.
    Returns 0, or why the payload is refused (the caller then takes the reference path,
    which raises with the reason): 1 for a terminator count other than ``count``, 2 for
    bytes after the last terminator's, 3 for a position at or past ``numel``."""
    mask = (1 << k) - 1
    acc = 0  # remainder bits not yet used, lowest first
    nbits = 0
    at = 0  # next byte of rem
    j = 0
    q = 0
    pos = -1
    last_zero = -1
    for i in range(unary.size):
        byte = np.int64(unary[i])
        if byte == 0xFF:  # eight more one-bits of the current quotient
            q += 8
            continue
        for bit in range(8):
            if (byte >> bit) & 1:
                q += 1
                continue
            if j == count:
                return 1
            while nbits < k:
                acc |= np.int64(rem[at]) << nbits
                at += 1
                nbits += 8
            gap = (q << k) | (acc & mask)
            acc >>= k
            nbits -= k
            pos += gap + 1
            if pos >= numel:
                return 3
            out[j] = pos
            j += 1
            q = 0
            last_zero = i * 8 + bit
    if j != count:
        return 1
    if last_zero < 8 * unary.size - 8:
        return 2
    return 0


def _flush32(out: U8, at: int, acc: int, nbits: int) -> tuple[int, int, int]:
    """With 32 or more bits pending in ``acc`` (lowest first), the low 32 into
    ``out[at : at + 4]``, lowest byte first; returns the new ``(at, acc, nbits)``."""
    if nbits < 32:
        return at, acc, nbits
    out[at] = acc & 0xFF
    out[at + 1] = (acc >> 8) & 0xFF
    out[at + 2] = (acc >> 16) & 0xFF
    out[at + 3] = (acc >> 24) & 0xFF
    return at + 4, acc >> 32, nbits - 32


def _flush_rest(out: U8, at: int, acc: int, nbits: int) -> int:
    """The bits still pending, a byte at a time (the last one zero-padded); returns the
    index after the last byte written."""
    while nbits > 0:
        out[at] = acc & 0xFF
        acc >>= 8
        nbits -= 8
        at += 1
    return at


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
        at, acc, nbits = _flush32(rem, at, acc, nbits + k)
    _flush_rest(rem, at, acc, nbits)
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
            at, acc, nbits = _flush32(unary, at, acc, nbits + 24)
            q -= 24
        acc |= ((1 << q) - 1) << nbits
        at, acc, nbits = _flush32(unary, at, acc, nbits + q + 1)  # the zero-bit: unset
    return _flush_rest(unary, at, acc, nbits)


def scatter_values(out: F32, idx: I64, start: int, stop: int, values: F32) -> None:
    """``out[idx[j]] = values[j]`` for ``j`` in ``[start, stop)`` (the top-k residual's
    kept positions; NumPy's fancy assignment costs several times more per value)."""
    ids = idx[start:stop]
    vs = values[start:stop]
    for j in range(ids.size):
        out[ids[j]] = vs[j]


def unit_draw(key: np.uint64, i: int) -> np.float32:
    """Stochastic rounding's draw at position ``i`` under ``key``: the function of
    :func:`fedsqueeze.codec.draws.uniform_np`, one value (the constants are
    :mod:`fedsqueeze.codec.draws`')."""
    z = np.uint64(i + 1) * np.uint64(0x9E3779B97F4A7C15) + key
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    unit: np.float32 = np.float32(z >> np.uint64(40)) * np.float32(2.0**-24)
    return unit


def quantize_kept(
    values: F32,
    indices: I64,
    o0: int,
    o1: int,
    inv: np.float32,
    zp: np.float32,
    qmin: np.float32,
    qmax: np.float32,
    scale: np.float32,
    stochastic: bool,
    key: np.uint64,
    codes: U8,
    residual: F32,
) -> None:
    """The codes of the kept ``values[o0:o1]`` into ``codes[o0:o1]``, per tensor:
    ``clamp(rint(v · inv) + zp, qmin, qmax)``, or when ``stochastic``
    ``clamp(floor(v · inv + u) + zp, …)`` with ``u`` the draw at the value's ordinal
    under ``key`` (:func:`unit_draw`); the same float32 operations in the same order as
    :func:`fedsqueeze.codec.quantization.quantize`. Where ``residual`` is not empty,
    ``residual[indices[j]] = v − (q − zp) · scale``: what the receiver misses of each
    kept value (the dequantization of :func:`fedsqueeze.codec.jit.linear_decode`)."""
    vs = values[o0:o1]
    ids = indices[o0:o1]
    cs = codes[o0:o1]
    # The codes in loops of their own (LLVM vectorizes them), the residual's scattered
    # writes after.
    if stochastic:
        for j in range(vs.size):
            b = np.floor(vs[j] * inv + unit_draw(key, o0 + j)) + zp
            cs[j] = np.uint8(min(max(b, qmin), qmax))
    else:
        for j in range(vs.size):
            b = np.rint(vs[j] * inv) + zp
            cs[j] = np.uint8(min(max(b, qmin), qmax))
    if residual.size > 0:
        for j in range(vs.size):
            residual[ids[j]] = vs[j] - (np.float32(cs[j]) - zp) * scale


def sum_top(t: F32, b: F32, r: F32, start: int, stop: int) -> int:
    """The largest magnitude's float32 bit pattern (NaN above infinity above the rest,
    as :func:`band_pass`'s) of ``(t − b) + r`` over ``[start, stop)``, in float32 (``b``
    or ``r`` empty: left out); the sum is never stored but in a block of 256 values.
    A value of ``t`` that is not finite leaves a sum that is not finite either."""
    ts = t[start:stop]
    bs = b[start:stop] if b.size else b
    rs = r[start:stop] if r.size else r
    block = np.empty(256, dtype=np.float32)
    words = block.view(np.int32)
    top = 0
    n = ts.size
    for b0 in range(0, n, 256):
        m = min(256, n - b0)
        for j in range(m):
            x = ts[b0 + j]
            if bs.size:
                x = x - bs[b0 + j]
            if rs.size:
                x = x + rs[b0 + j]
            block[j] = x
        for j in range(m):
            top = max(top, words[j] & 0x7FFFFFFF)
    return top


def sum_into(t: F32, b: F32, r: F32, start: int, stop: int, out: F32, at: int) -> None:
    """``out[at : at + stop − start] = (t − b) + r`` over ``[start, stop)``, in float32
    (``b`` or ``r`` empty: left out), the order of
    :meth:`fedsqueeze.codec.tensor_encode.TensorEncoder.lossy_input`'s operations."""
    ts = t[start:stop]
    os = out[at : at + stop - start]
    if b.size and r.size:
        bs = b[start:stop]
        rs = r[start:stop]
        for j in range(ts.size):
            os[j] = (ts[j] - bs[j]) + rs[j]
    elif b.size:
        bs = b[start:stop]
        for j in range(ts.size):
            os[j] = ts[j] - bs[j]
    else:
        rs = r[start:stop]
        for j in range(ts.size):
            os[j] = ts[j] + rs[j]


def unit_draws(key: np.uint64, start: int, out: F32) -> None:
    """``out[j]``: the draw at position ``start + j`` (for the tests, beside NumPy's)."""
    for j in range(out.size):
        out[j] = unit_draw(key, start + j)


def warm() -> None:
    """Each kernel called once on tiny inputs of the types its callers pass (compiled by
    then: :func:`fedsqueeze.codec.jit.warm` calls this)."""
    f = np.zeros(8, dtype=np.float32)
    u = np.zeros(8, dtype=np.uint8)
    idx = np.arange(8, dtype=np.int64)
    lo, hi = np.float32(0.0), np.float32(255.0)
    band_pass(f, f.view(np.int32), 0, 8, lo, hi, f.copy(), np.zeros(2, dtype=np.int32), 0)
    for copy in (f.copy(), f[:0]):
        select_pass(f, 0, 8, lo, True, idx.copy(), f.copy(), 0, 8, copy)
    rice_chunk(idx, 0, 8, 1, u.copy(), 0, np.zeros(64, dtype=np.uint8))
    rice_sums(idx, 0, 8, 0, np.zeros(3, dtype=np.int64))
    rice_decode(u, 1, u, 0, 8, idx.copy())
    scatter_values(f.copy(), idx, 0, 8, f)
    one = np.float32(1.0)
    for stochastic in (True, False):
        for residual in (f.copy(), f[:0]):
            quantize_kept(
                f, idx, 0, 8, one, lo, lo, hi, one, stochastic, np.uint64(1), u.copy(), residual
            )
    for b, r in ((f, f), (f, f[:0]), (f[:0], f)):
        sum_top(f, b, r, 0, 8)
        sum_into(f, b, r, 0, 8, f.copy(), 0)
    draws = np.zeros(8, dtype=np.float32)
    unit_draws(np.uint64(1), 0, draws)


#: The kernels, helpers before the kernels that call them.
KERNELS = (
    "_scan16",
    "band_pass",
    "_compress16",
    "select_pass",
    "rice_sums",
    "rice_decode",
    "_flush32",
    "_flush_rest",
    "rice_chunk",
    "scatter_values",
    "sum_into",
    "sum_top",
    "unit_draw",
    "unit_draws",
    "quantize_kept",
)
