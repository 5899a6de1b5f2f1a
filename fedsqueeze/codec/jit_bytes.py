"""Compiled kernels (numba) of the lossless coder's byte planes: splitting words into
planes and joining them back, and the exponent buckets of format version 10
(:mod:`fedsqueeze.codec.grouping`, :mod:`fedsqueeze.codec.plane_buckets`).

Plain Python until :func:`fedsqueeze.codec.jit.ready` compiles them in this module (the
rules and the reasons are in :mod:`fedsqueeze.codec.jit`): callers ask
:func:`~fedsqueeze.codec.jit.use` first.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "KERNELS",
    "bucket_gather",
    "bucket_histogram",
    "bucket_scatter",
    "byte_counts",
    "join_planes2",
    "join_planes4",
    "joint_bits",
    "joint_split",
    "joint_stats",
    "joint_words",
    "split_plane",
    "split_words2",
    "split_words4",
    "top_bits",
    "warm",
]

U8 = npt.NDArray[np.uint8]
U16 = npt.NDArray[np.uint16]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
Words = npt.NDArray[np.unsignedinteger]

# Every loop runs over a slice from index 0 (see fedsqueeze.codec.jit).


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


# The whole-word splits below run one helper per layout, called with literal flags so
# that numba compiles each with every shift a constant: the loop then vectorizes. With
# the shifts as arguments (:func:`split_plane`, a pass per plane) a bf16 chunk of 1M
# values took 0.61 ms for its two planes through :func:`~fedsqueeze.codec.planes.split_planes`;
# this takes 0.12 ms for both (a side script timing that call, best of 30).


def _split2_k(words: Words, base: Words, p0: U8, p1: U8, XOR: int, SWAPPED: int) -> None:
    for i in range(p0.size):
        v = words[i] ^ base[i] if XOR else words[i]
        if SWAPPED:
            p0[i] = (v >> 7) & 0xFF
            p1[i] = (v & 0x7F) | ((v >> 8) & 0x80)
        else:
            p0[i] = (v >> 8) & 0xFF
            p1[i] = v & 0xFF


def _split4_k(
    words: Words, base: Words, p0: U8, p1: U8, p2: U8, p3: U8, XOR: int, SWAPPED: int
) -> None:
    for i in range(p0.size):
        v = words[i] ^ base[i] if XOR else words[i]
        if SWAPPED:
            p0[i] = (v >> 23) & 0xFF
            p1[i] = ((v >> 16) & 0x7F) | ((v >> 24) & 0x80)
        else:
            p0[i] = (v >> 24) & 0xFF
            p1[i] = (v >> 16) & 0xFF
        p2[i] = (v >> 8) & 0xFF
        p3[i] = v & 0xFF


def split_words2(words: Words, base: Words, xor: bool, swapped: bool, p0: U8, p1: U8) -> None:
    """Both planes of 16-bit ``words`` (XOR ``base`` when ``xor``) in one pass: what
    :func:`split_plane` writes for planes 0 and 1 of the layout (``swapped``: the sign
    and the exponent's lowest bit trade places)."""
    if xor:
        if swapped:
            _split2_k(words, base, p0, p1, 1, 1)
        else:
            _split2_k(words, base, p0, p1, 1, 0)
    elif swapped:
        _split2_k(words, base, p0, p1, 0, 1)
    else:
        _split2_k(words, base, p0, p1, 0, 0)


def split_words4(
    words: Words, base: Words, xor: bool, swapped: bool, p0: U8, p1: U8, p2: U8, p3: U8
) -> None:
    """The four planes of 32-bit ``words`` in one pass (see :func:`split_words2`)."""
    if xor:
        if swapped:
            _split4_k(words, base, p0, p1, p2, p3, 1, 1)
        else:
            _split4_k(words, base, p0, p1, p2, p3, 1, 0)
    elif swapped:
        _split4_k(words, base, p0, p1, p2, p3, 0, 1)
    else:
        _split4_k(words, base, p0, p1, p2, p3, 0, 0)


def top_bits(words: Words, mask: Words) -> int:
    """The largest ``words[i] & mask[0]`` (0 for no words): one pass that vectorizes
    (:func:`fedsqueeze.codec.finite.all_finite` on a chunk: with the sign masked off, a
    float is finite when its bits are below the exponent's all-ones pattern)."""
    m = mask[0]
    top = m ^ m
    for i in range(words.size):
        top = max(top, words[i] & m)
    return top  # type: ignore[no-any-return]


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


def byte_counts(data: U8, counts: I64) -> None:
    """``counts[q, v]``: how many bytes of quarter ``q`` of ``data`` are ``v`` (the
    quarters of :func:`quarters`; ``counts`` is ``[4, 256]``, overwritten).

    The four quarters are counted side by side, a table each: an exponent plane repeats
    a few values, and with one table each increment waits for the previous one to the
    same count (measured on all-MiniLM-L6-v2's exponent planes: 1.9x slower). The
    bucket kernels need the quarters' counts anyway (their four cursors)."""
    c0 = np.zeros(256, dtype=np.uint32)
    c1 = np.zeros(256, dtype=np.uint32)
    c2 = np.zeros(256, dtype=np.uint32)
    c3 = np.zeros(256, dtype=np.uint32)
    n = data.size
    q = n // 4
    for i in range(q):
        c0[data[i]] += 1
        c1[data[q + i]] += 1
        c2[data[2 * q + i]] += 1
        c3[data[3 * q + i]] += 1
    for i in range(4 * q, n):
        c3[data[i]] += 1
    for v in range(256):
        counts[0, v] = c0[v]
        counts[1, v] = c1[v]
        counts[2, v] = c2[v]
        counts[3, v] = c3[v]


def bucket_histogram(exponents: U8, ranks: U16, plane: U8, step: int, hist: I64) -> None:
    """``hist[b, v]``: how many of every ``step``-th byte of ``plane`` are ``v`` and fall
    in bucket ``b`` (the bucket of byte ``i`` is ``ranks[exponents[i]]``); ``hist`` is
    zeroed first. The step is taken here: the sample is never copied out."""
    hist[:] = 0
    for i in range(0, plane.size, step):
        hist[ranks[exponents[i]], plane[i]] += 1


def _bucket_move(exponents: U8, ranks: U16, src: U8, cursors: I64, out: U8, gather: bool) -> None:
    """:func:`bucket_gather` (``gather``) or :func:`bucket_scatter`: the same cursors,
    the byte moved one way or the other."""
    k0 = cursors[0].copy()
    k1 = cursors[1].copy()
    k2 = cursors[2].copy()
    k3 = cursors[3].copy()
    n = exponents.size
    q = n // 4
    for i in range(q):
        b0 = ranks[exponents[i]]
        b1 = ranks[exponents[q + i]]
        b2 = ranks[exponents[2 * q + i]]
        b3 = ranks[exponents[3 * q + i]]
        j0 = k0[b0]
        j1 = k1[b1]
        j2 = k2[b2]
        j3 = k3[b3]
        if gather:
            out[j0] = src[i]
            out[j1] = src[q + i]
            out[j2] = src[2 * q + i]
            out[j3] = src[3 * q + i]
        else:
            out[i] = src[j0]
            out[q + i] = src[j1]
            out[2 * q + i] = src[j2]
            out[3 * q + i] = src[j3]
        k0[b0] = j0 + 1
        k1[b1] = j1 + 1
        k2[b2] = j2 + 1
        k3[b3] = j3 + 1
    for i in range(4 * q, n):
        b = ranks[exponents[i]]
        j = k3[b]
        if gather:
            out[j] = src[i]
        else:
            out[i] = src[j]
        k3[b] = j + 1


def bucket_gather(exponents: U8, ranks: U16, plane: U8, cursors: I64, out: U8) -> None:
    """``out``: the bytes of ``plane`` grouped by bucket (the bucket of byte ``i`` is
    ``ranks[exponents[i]]``), in index order within a bucket: a stable counting sort
    (:mod:`fedsqueeze.codec.plane_buckets`). ``cursors[q, b]`` is where quarter ``q``'s
    first byte of bucket ``b`` goes (the quarters of :func:`byte_counts`).

    The quarters run side by side, a write cursor each (fresh copies: LLVM then knows
    ``out`` writes cannot change them, 2.5x faster than updating the argument in
    place): each cursor's increment waits on its previous one, four chains at once
    instead of one (measured on 1M exponent-like values: 3.5 -> 2.8 ms)."""
    _bucket_move(exponents, ranks, plane, cursors, out, True)


def bucket_scatter(exponents: U8, ranks: U16, grouped: U8, cursors: I64, out: U8) -> None:
    """Inverse of :func:`bucket_gather`: ``out[i]`` is the next byte of bucket
    ``ranks[exponents[i]]`` in ``grouped`` (the quarters side by side, as there;
    2.0 -> 1.6 ms on 1M values)."""
    _bucket_move(exponents, ranks, grouped, cursors, out, False)


# The joint kernels (fedsqueeze.codec.plane_joint) run one helper per k, called with a
# literal k so that numba compiles it with k a constant: every shift is then by a
# constant and every loop vectorizes (measured on 1M values: 0.1 ms, against 0.4-0.6 ms
# with k a variable). Runtime parameters come in a one-element array of the lanes'
# width (``prm``), for the same reason: an int64 argument widens every lane to 64 bits.
#
# The encode kernels read the words themselves, not planes split out of them first: a
# chunk's words are read twice (the statistics, then the split), where splitting planes
# 0 and 1 first wrote them out and read them back. One helper per word width too
# (``WIDE``: fp32's 32-bit words, else bf16's 16-bit ones).


def _joint_stats_k(words: Words, step: int, span: I64, hist: I64, counts: I64, WIDE: bool) -> None:
    # The span: the exponent field in place, masked, in lanes of the words' width (cast
    # back at every step: numba widens integer arithmetic to 64 bits, and a max over
    # those did not vectorize: 166 against 28 us on a 590K-value bf16 matrix). Zero's
    # field less one unit wraps to the top, above every nonzero one.
    if WIDE:
        hi32 = np.uint32(0)
        lo32 = np.uint32(0xFFFFFFFF)
        for i in range(words.size):
            x = np.uint32(words[i] & np.uint32(0x7F800000))
            hi32 = max(hi32, x)
            lo32 = min(lo32, np.uint32(x - np.uint32(0x800000)))
        span[0] = (hi32 >> 23) & 0xFF
        span[1] = (lo32 >> 23) & 0xFF
    else:
        hi16 = np.uint16(0)
        lo16 = np.uint16(0xFFFF)
        for i in range(words.size):
            x = np.uint16(words[i] & np.uint16(0x7F80))
            hi16 = max(hi16, x)
            lo16 = min(lo16, np.uint16(x - np.uint16(0x80)))
        span[0] = (hi16 >> 7) & 0xFF
        span[1] = (lo16 >> 7) & 0xFF
    hist[:] = 0
    counts[:] = 0
    T = 16 if WIDE else 0
    for i in range(0, words.size, step):
        v = words[i] >> T  # the top 16 bits
        p = (v & 0x7F) | ((v >> 8) & 0x80)
        hist[(v >> 7) & 0xFF, (v >> 4) & 7] += 1
        counts[p] += 1


def _joint_stats16(words: Words, step: int, span: I64, hist: I64, counts: I64) -> None:
    _joint_stats_k(words, step, span, hist, counts, False)


def _joint_stats32(words: Words, step: int, span: I64, hist: I64, counts: I64) -> None:
    _joint_stats_k(words, step, span, hist, counts, True)


def joint_stats(words: Words, step: int, span: I64, hist: I64, counts: I64) -> None:
    """What the joint coder plans a chunk of fp32 (32-bit) or bf16 (16-bit) ``words``
    from, in one pass over them: ``span[0]``, the largest exponent byte (255: a NaN or
    Inf among them), ``span[1]``, the smallest less one modulo 256 (a zero exponent
    counts as 255: one plus it is the smallest nonzero exponent, or 0 when every
    exponent is zero); and of every ``step``-th word, ``hist[e, t]`` (exponent byte
    ``e``, top three mantissa bits ``t``) and ``counts[v]`` (``v``: the byte after the
    exponent, the sign above the 7 highest mantissa bits), both zeroed first."""
    if words.itemsize == 4:
        _joint_stats32(words, step, span, hist, counts)
    else:
        _joint_stats16(words, step, span, hist, counts)


def joint_bits(hist: I64, counts: I64, lo: int, hi: int, k_max: int, bits: F64) -> None:
    """The ideal code lengths, in bits, of what :func:`joint_stats` counted: ``bits[0]``
    the exponents alone, ``bits[k]`` (``1 <= k <= k_max``) the exponent with its ``k``
    top mantissa bits, ``bits[4]`` the byte after the exponent; rows ``0`` and ``lo ..
    hi`` of ``hist`` hold every value. A code of counts ``c`` summing to ``N`` takes
    ``N·log2 N − Σ c·log2 c`` bits."""
    total = 0
    for v in range(256):
        total += counts[v]
    base = total * np.log2(max(total, 1))
    for k in range(k_max + 1):
        bits[k] = base
    bits[4] = base
    for v in range(256):
        c = counts[v]
        if c > 1:
            bits[4] -= c * np.log2(c)
    for r in range(hi - lo + 2):
        row = 0 if r == 0 else lo + r - 1
        whole = 0
        for t in range(8):
            whole += hist[row, t]
        if whole > 1:
            bits[0] -= whole * np.log2(whole)
        for k in range(1, k_max + 1):
            width = 8 >> k
            for g in range(1 << k):
                c = 0
                for t in range(g * width, (g + 1) * width):
                    c += hist[row, t]
                if c > 1:
                    bits[k] -= c * np.log2(c)


def _joint_split_k(
    words: Words, prm: U16, joint: U8, rest: U8, p2: U8, p3: U8, K: int, WIDE: bool
) -> None:
    T = 16 if WIDE else 0  # the top 16 bits: sign, exponent, 7 mantissa bits
    n = words.size
    m = n // 8
    W = 8 - K
    LOW = 7 - K
    KEEP = (1 << LOW) - 1
    lo_1 = prm[0]
    for i in range(n):
        v = words[i]
        top = v >> T
        e = (top >> 7) & 0xFF
        slot = ((e - lo_1) & 0xFF) * ((e + 0xFF) >> 8)  # 0 for a zero exponent
        joint[i] = (slot << K) | ((top & 0x7F) >> LOW)
        if WIDE:
            p2[i] = (v >> 8) & 0xFF
            p3[i] = v & 0xFF
    # The rest's fields: the sign above the 7 − k low mantissa bits of the top 16.
    for g in range(W):
        own = words[g * m : (g + 1) * m]
        host = rest[g * m : (g + 1) * m]
        for i in range(m):
            t = own[i] >> T
            r = (((t >> 15) & 1) << LOW) | (t & KEEP)
            for s in range(K):
                q = words[(W + s) * m + i] >> T
                f = (((q >> 15) & 1) << LOW) | (q & KEEP)
                r |= ((f >> g) & 1) << (W + s)
            host[i] = r
    tail = words[8 * m :]
    last = rest[W * m :]
    for t in range(tail.size):
        q = tail[t] >> T
        last[t] = (((q >> 15) & 1) << LOW) | (q & KEEP)


def _joint_split16(words: Words, prm: U16, k: int, joint: U8, rest: U8) -> None:
    if k == 1:
        _joint_split_k(words, prm, joint, rest, joint[:0], joint[:0], 1, False)
    elif k == 2:
        _joint_split_k(words, prm, joint, rest, joint[:0], joint[:0], 2, False)
    else:
        _joint_split_k(words, prm, joint, rest, joint[:0], joint[:0], 3, False)


def _joint_split32(words: Words, prm: U16, k: int, joint: U8, rest: U8, p2: U8, p3: U8) -> None:
    if k == 1:
        _joint_split_k(words, prm, joint, rest, p2, p3, 1, True)
    elif k == 2:
        _joint_split_k(words, prm, joint, rest, p2, p3, 2, True)
    else:
        _joint_split_k(words, prm, joint, rest, p2, p3, 3, True)


def joint_split(words: Words, prm: U16, k: int, joint: U8, rest: U8, p2: U8, p3: U8) -> None:
    """A chunk of fp32 (32-bit) or bf16 (16-bit) ``words`` as the joint plane, the rest
    and (fp32) planes 2 and 3 in ``p2`` and ``p3`` (unused for bf16), straight from the
    words (:mod:`fedsqueeze.codec.plane_joint`, which checked that the exponents fit;
    ``prm[0]`` is the lowest nonzero exponent minus one): ``joint[i] = slot << k | top``
    and the rest's ``8 − k``-bit fields, segment ``j < 8 − k`` in the low bits of its own
    bytes and bit ``j`` of segment ``8 − k + s``'s fields in bit ``8 − k + s`` of
    segment ``j``'s bytes; the last ``n mod 8`` fields a byte each."""
    if words.itemsize == 4:
        _joint_split32(words, prm, k, joint, rest, p2, p3)
    else:
        _joint_split16(words, prm, k, joint, rest)


def _joint_word(c8: int, r: int, b2: int, b3: int, lo_1: int, K: int, WIDE: bool) -> int:
    """One word from its joint byte ``c8``, its field ``r`` and (fp32) its two low bytes."""
    W = 8 - K
    LOW = 7 - K
    c = np.uint16(c8)
    slot = c >> K
    e = (slot + lo_1) * ((slot + ((1 << W) - 1)) >> W)  # 0 for slot 0
    mantissa = ((c & ((1 << K) - 1)) << LOW) | (r & ((1 << LOW) - 1))
    high = (e << 7) | ((r >> LOW) << 15) | mantissa  # the word's top 16 bits
    if WIDE:
        return (np.uint32(high) << 16) | (np.uint32(b2) << 8) | np.uint32(b3)  # type: ignore[no-any-return]
    return high  # type: ignore[no-any-return]


def _joint_spill(
    joint: U8, hosts: U8, p2: U8, p3: U8, lo_1: int, out: Words, K: int, WIDE: bool, S: int
) -> None:
    W = 8 - K
    m = hosts.shape[1]
    a = (W + S) * m
    cs = joint[a : a + m]
    ws = out[a : a + m]
    b2 = p2[a : a + m] if WIDE else p2[:0]
    b3 = p3[a : a + m] if WIDE else p3[:0]
    for i in range(m):
        r = np.uint16(0)
        for j in range(W):
            r |= ((np.uint16(hosts[j, i]) >> (W + S)) & 1) << j
        x2 = b2[i] if WIDE else 0
        x3 = b3[i] if WIDE else 0
        ws[i] = _joint_word(cs[i], r, x2, x3, lo_1, K, WIDE)


def _joint_words_k(
    joint: U8, rest: U8, p2: U8, p3: U8, prm: U16, out: Words, K: int, WIDE: bool
) -> None:
    n = out.size
    m = n // 8
    W = 8 - K
    lo_1 = prm[0]
    hosts = rest[: W * m].reshape((W, m))
    for g in range(W):
        a = g * m
        cs = joint[a : a + m]
        ws = out[a : a + m]
        b2 = p2[a : a + m] if WIDE else p2[:0]
        b3 = p3[a : a + m] if WIDE else p3[:0]
        own = hosts[g]
        for i in range(m):
            r = np.uint16(own[i]) & ((1 << W) - 1)
            x2 = b2[i] if WIDE else 0
            x3 = b3[i] if WIDE else 0
            ws[i] = _joint_word(cs[i], r, x2, x3, lo_1, K, WIDE)
    # Segment W + S: bit j of each field in bit W + S of host segment j (S a constant).
    if K > 0:
        _joint_spill(joint, hosts, p2, p3, lo_1, out, K, WIDE, 0)
    if K > 1:
        _joint_spill(joint, hosts, p2, p3, lo_1, out, K, WIDE, 1)
    if K > 2:
        _joint_spill(joint, hosts, p2, p3, lo_1, out, K, WIDE, 2)
    a = 8 * m
    cs = joint[a:]
    ws = out[a:]
    last = rest[W * m :]
    b2 = p2[a:] if WIDE else p2[:0]
    b3 = p3[a:] if WIDE else p3[:0]
    for t in range(n - a):
        x2 = b2[t] if WIDE else 0
        x3 = b3[t] if WIDE else 0
        ws[t] = _joint_word(cs[t], np.uint16(last[t]), x2, x3, lo_1, K, WIDE)


def _joint_words16(joint: U8, rest: U8, prm: U16, k: int, out: Words) -> None:
    if k == 1:
        _joint_words_k(joint, rest, joint[:0], joint[:0], prm, out, 1, False)
    elif k == 2:
        _joint_words_k(joint, rest, joint[:0], joint[:0], prm, out, 2, False)
    else:
        _joint_words_k(joint, rest, joint[:0], joint[:0], prm, out, 3, False)


def _joint_words32(joint: U8, rest: U8, p2: U8, p3: U8, prm: U16, k: int, out: Words) -> None:
    if k == 1:
        _joint_words_k(joint, rest, p2, p3, prm, out, 1, True)
    elif k == 2:
        _joint_words_k(joint, rest, p2, p3, prm, out, 2, True)
    else:
        _joint_words_k(joint, rest, p2, p3, prm, out, 3, True)


def _frozen(a: U8) -> U8:
    """A read-only view of ``a`` (itself when it is read-only already)."""
    if not a.flags.writeable:
        return a
    view: U8 = a.view()
    view.flags.writeable = False
    return view


def joint_words(joint: U8, rest: U8, p2: U8, p3: U8, prm: U16, k: int, out: Words) -> None:
    """Words from the joint plane and the rest (:func:`joint_split`): 32-bit words
    (fp32: the two lower planes ``p2`` and ``p3`` below) or 16-bit ones (bf16: ``p2`` and
    ``p3`` unused). Any joint byte gives an exponent byte (the caller has checked
    ``prm[0]``, the lowest nonzero exponent minus one).

    Plain Python over two compiled kernels, one per word width, whose inputs are always
    read-only (numba types a read-only array apart from a writable one): each kernel
    is compiled for one set of types, with its three ``k`` inlined, in 14-15 s. A
    single kernel for both widths, called with writable and read-only planes, took
    four sets of types with six ``k``-and-width variants each: 91 s of the 130 s that
    a cold cache took to compile every kernel, paid by each fresh process that warmed
    the kernels before another had cached them (the memory tests' children in CI)."""
    joint, rest = _frozen(joint), _frozen(rest)
    if out.itemsize == 4:
        _joint_words32(joint, rest, _frozen(p2), _frozen(p3), prm, k, out)
    else:
        _joint_words16(joint, rest, prm, k, out)


def warm() -> None:
    """Each kernel called once on tiny inputs of the types its callers pass (compiled by
    then: :func:`fedsqueeze.codec.jit.warm` calls this)."""
    u = np.zeros(8, dtype=np.uint8)
    for uint in (np.uint16, np.uint32, np.uint64):
        words = np.zeros(8, dtype=uint)
        top_bits(words, words[:1].copy())
        split_plane(words, words, False, 8, 0xFF, 0, 0, u)
        split_plane(words, words, True, 8, 0xFF, 0, 0, u)
    for xor in (False, True):
        for swapped in (False, True):
            w16, w32 = np.zeros(8, dtype=np.uint16), np.zeros(8, dtype=np.uint32)
            split_words2(w16, w16, xor, swapped, u, u.copy())
            split_words4(w32, w32, xor, swapped, u, u.copy(), u.copy(), u.copy())
    join_planes2(u, u, True, np.zeros(8, dtype=np.uint16))
    join_planes4(u, u, u, u, True, np.zeros(8, dtype=np.uint32))
    byte_counts(u, np.zeros((4, 256), dtype=np.int64))
    ranks = np.zeros(256, dtype=np.uint16)
    bucket_histogram(u, ranks, u, 1, np.zeros((1, 256), dtype=np.int64))
    cursors = np.array([[0], [2], [4], [6]], dtype=np.int64)
    bucket_gather(u, ranks, u, cursors, u.copy())
    bucket_scatter(u, ranks, u, cursors, u.copy())
    hist, counts = np.zeros((256, 8), dtype=np.int64), np.zeros(256, dtype=np.int64)
    prm = np.zeros(1, dtype=np.uint16)
    rest = np.zeros(7, dtype=np.uint8)
    for uint in (np.uint16, np.uint32):
        words = np.zeros(8, dtype=uint)
        joint_stats(words, 1, np.zeros(2, dtype=np.int64), hist, counts)
        joint_split(words, prm, 1, u.copy(), rest, u.copy(), u.copy())
    joint_bits(hist, counts, 1, 1, 3, np.zeros(5, dtype=np.float64))
    joint_words(u, rest, u, u, prm, 1, np.zeros(8, dtype=np.uint16))  # (freezes its inputs)
    joint_words(u, rest, u, u, prm, 1, np.zeros(8, dtype=np.uint32))
    # Decoding passes read-only planes (views of the received bytes, or of what zstd
    # returned): numba compiles those as other types, so they are warmed too (else the
    # first large decode compiles them, inside a bounded-memory measurement).
    ro = np.frombuffer(bytes(8), dtype=np.uint8)
    join_planes2(ro, ro, True, np.zeros(8, dtype=np.uint16))
    join_planes2(ro, u, True, np.zeros(8, dtype=np.uint16))
    join_planes4(ro, ro, ro, ro, True, np.zeros(8, dtype=np.uint32))
    join_planes4(ro, u, ro, ro, True, np.zeros(8, dtype=np.uint32))
    byte_counts(ro, np.zeros((4, 256), dtype=np.int64))
    bucket_scatter(ro, ranks, u, cursors, u.copy())


#: The kernels, helpers before the kernels that call them.
KERNELS = (
    "split_plane",
    "_split2_k",
    "_split4_k",
    "split_words2",
    "split_words4",
    "top_bits",
    "join_planes2",
    "join_planes4",
    "byte_counts",
    "bucket_histogram",
    "_bucket_move",
    "bucket_gather",
    "bucket_scatter",
    "_joint_stats_k",
    "_joint_stats16",
    "_joint_stats32",
    "joint_bits",
    "_joint_split_k",
    "_joint_split16",
    "_joint_split32",
    "_joint_word",
    "_joint_spill",
    "_joint_words_k",
    "_joint_words16",
    "_joint_words32",
)
