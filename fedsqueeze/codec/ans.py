"""Adaptive rANS coding of quantization codes (the ``entropy=ans`` stage, format v8).

zstandard finds repeats; quantization codes of low-rank factors have none, only a skewed
distribution over ``2^bits`` symbols (near-Gaussian around the middle code), which zstd
codes with a Huffman table plus a frame and block header per record. At the kilobyte
sizes of the ``frontier`` payloads that costs about 10% over the codes' order-0 entropy.

This stage codes ``count`` codes of ``bits`` bits with a byte-wise range asymmetric
numeral system (rANS, Duda 2013; state in ``[2^23, 2^31)``, probabilities in units of
``2^-15``) under an *adaptive* order-0 model: every symbol starts with a count of 1 and
each coded symbol adds 2 to its own (the Krichevsky–Trofimov estimator), and the table
the coder uses is rebuilt from the counts every :data:`BLOCK` symbols (on seed 0's 4-bit
low-rank downloads: 1 symbol 1,706 B, 4 symbols 1,709 B, 16 symbols 1,722 B, 64
symbols 1,759 B a payload's bodies, against 1,857 B with zstd 19). Nothing about the
model travels: the decoder rebuilds the same integer tables from what it has decoded, so
a record pays only for its codes (about the empirical entropy plus ``(K-1)/2·log2 n``
bits of learning) and the coder's 4-byte final state.

Everything is integer arithmetic (no floats), so encoder and decoder agree on every
machine. The decoder checks that it ends exactly in the encoder's initial state and has
consumed every byte, so a corrupt body raises :class:`~fedsqueeze.errors.FormatError`
(with probability about ``1 - 2^-23`` for random corruption), never a wrong tensor by
design; its work is linear in ``count``, which the record's header bounds.

**Context-adaptive variant** (format v9, :func:`encode_context_codes`): symbol ``i`` is
coded with the adaptive model of its context ``ctx[i]`` (one set of counts per context,
each rebuilt every :data:`BLOCK` of *its own* symbols), the contexts being known to both
sides. A progressive tensor's refinement plane is coded this way with the value's
coarser code bits, which the receiver already holds, as its context: a plane that is
near-random on its own is often near-determined given them (on the digits support-level
stream, fc1's second plane of its 1,746-value group costs 218 B at its order-0 entropy
and about 1 B given the sign). With one context it is :func:`encode_codes`, byte for
byte.
"""

from __future__ import annotations

from bisect import bisect_right

import numpy as np

from fedsqueeze.errors import FormatError

__all__ = [
    "BLOCK",
    "MAX_CODES",
    "MAX_CONTEXTS",
    "decode_codes",
    "decode_context_codes",
    "encode_codes",
    "encode_context_codes",
]

_SCALE_BITS = 15
_M = 1 << _SCALE_BITS
_MASK = _M - 1
_LOW = 1 << 23  # the state's lower bound; it lives in [_LOW, 256·_LOW)
#: Symbols coded with one table before it is rebuilt from the counts, for alphabets of
#: up to 16 symbols (4-bit codes); 8-bit codes rebuild their 256 entries every 64.
BLOCK = 4
#: Most codes one ANS-coded record may hold (the coder is plain Python: about a
#: microsecond a code; larger tensors keep zstandard).
MAX_CODES = 1 << 20
_SUPPORTED_BITS = (1, 2, 3, 4, 8)
#: Contexts a context-adaptive record may use (``0 <= ctx < MAX_CONTEXTS``): the coarser
#: bits of a code of at most 8 bits.
MAX_CONTEXTS = 1 << 8


def _table(counts: list[int]) -> tuple[list[int], list[int]]:
    """Frequencies summing to ``2^15`` (every one >= 1) and their cumulative starts."""
    total = sum(counts)
    freqs = [max(1, c * _M // total) for c in counts]
    # Give the rounding's remainder to the most frequent symbol (it can spare it).
    top = freqs.index(max(freqs))
    freqs[top] += _M - sum(freqs)
    cum = [0] * len(freqs)
    acc = 0
    for s, f in enumerate(freqs):
        cum[s] = acc
        acc += f
    return freqs, cum


def _block(k: int) -> int:
    return BLOCK if k <= 16 else k // 4


def _check(count: int, bits: int) -> int:
    if bits not in _SUPPORTED_BITS:
        raise ValueError(f"ANS codes have 1, 2, 3, 4 or 8 bits, got {bits}")
    if not 0 < count <= MAX_CODES:
        raise ValueError(f"ANS codes one record of 1..{MAX_CODES} codes, got {count}")
    return 1 << bits


def encode_codes(codes: np.ndarray, bits: int) -> bytes:
    """The rANS bytes of ``codes`` (integers ``< 2**bits``) under the adaptive model.

    Parameters
    ----------
    codes
        1-D integer array, ``1 <= len(codes) <=`` :data:`MAX_CODES`.
    bits
        The codes' width: 1, 2, 3, 4 or 8.
    """
    flat = np.asarray(codes).reshape(-1)
    k = _check(len(flat), bits)
    if flat.min() < 0 or flat.max() >= k:
        raise ValueError(f"codes must be in 0..{k - 1}")
    symbols = flat.tolist()
    # The model each block was coded with (the decoder sees the same, in order).
    block = _block(k)
    # Each symbol's frequency and cumulative start under its block's table.
    freq_of: list[int] = []
    start_of: list[int] = []
    counts = [1] * k
    for start in range(0, len(symbols), block):
        freqs, cum = _table(counts)
        for s in symbols[start : start + block]:
            freq_of.append(freqs[s])
            start_of.append(cum[s])
            counts[s] += 2
    return _emit(freq_of, start_of)


def _emit(freq_of: list[int], start_of: list[int]) -> bytes:
    """The rANS bytes of symbols with these frequencies and cumulative starts (coded
    last to first, so the decoder reads them in order)."""
    out = bytearray()
    x = _LOW
    bound = (_LOW >> _SCALE_BITS) << 8
    for i in range(len(freq_of) - 1, -1, -1):
        f = freq_of[i]
        x_max = bound * f
        while x >= x_max:
            out.append(x & 0xFF)
            x >>= 8
        q, r = divmod(x, f)
        x = (q << _SCALE_BITS) + r + start_of[i]
    out += x.to_bytes(4, "little")
    out.reverse()  # the decoder reads the final state first, then what came out last
    return bytes(out)


def decode_codes(data: bytes | memoryview, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`encode_codes`: uint8 ``[count]`` (``bits`` <= 8).

    Raises
    ------
    FormatError
        If ``data`` is not exactly the coding of ``count`` codes (too short, bytes left
        over, or a final state other than the encoder's initial one).
    """
    k = _check(count, bits)
    raw = bytes(data)
    if len(raw) < 4:
        raise FormatError(f"ANS body of {len(raw)} bytes (at least 4)")
    x = int.from_bytes(raw[:4], "big")
    pos = 4
    n = len(raw)
    out = bytearray(count)
    block = _block(k)
    counts = [1] * k
    freqs: list[int] = []
    cum: list[int] = []
    for i in range(count):
        if i % block == 0:
            freqs, cum = _table(counts)
        slot = x & _MASK
        s = bisect_right(cum, slot) - 1
        out[i] = s
        counts[s] += 2
        x = freqs[s] * (x >> _SCALE_BITS) + slot - cum[s]
        while x < _LOW:
            if pos >= n:
                raise FormatError("ANS body ends before its codes do")
            x = (x << 8) | raw[pos]
            pos += 1
    if x != _LOW or pos != n:
        raise FormatError("corrupt ANS body (final state or length does not match)")
    return np.frombuffer(bytes(out), dtype=np.uint8)


def _check_contexts(contexts: np.ndarray, count: int) -> list[int]:
    flat = np.asarray(contexts).reshape(-1)
    if len(flat) != count:
        raise ValueError(f"{len(flat)} contexts for {count} codes")
    if flat.min() < 0 or flat.max() >= MAX_CONTEXTS:
        raise ValueError(f"contexts must be in 0..{MAX_CONTEXTS - 1}")
    out: list[int] = flat.tolist()
    return out


def encode_context_codes(codes: np.ndarray, contexts: np.ndarray, bits: int) -> bytes:
    """The rANS bytes of ``codes`` where code ``i`` is coded with the adaptive model of
    context ``contexts[i]``.

    Every context's model is the one :func:`encode_codes` uses (counts start at 1, each
    coded symbol adds 2, the table is rebuilt every :data:`BLOCK` symbols *of that
    context*), so with a single context the bytes are :func:`encode_codes`'s.

    Parameters
    ----------
    codes
        1-D integer array, ``1 <= len(codes) <=`` :data:`MAX_CODES`, values ``< 2**bits``.
    contexts
        1-D integer array as long as ``codes``, values in ``0 ..`` :data:`MAX_CONTEXTS`
        ``- 1``; the decoder must be given the same.
    bits
        The codes' width: 1, 2, 3, 4 or 8.
    """
    flat = np.asarray(codes).reshape(-1)
    k = _check(len(flat), bits)
    if flat.min() < 0 or flat.max() >= k:
        raise ValueError(f"codes must be in 0..{k - 1}")
    symbols = flat.tolist()
    ctx = _check_contexts(contexts, len(symbols))
    block = _block(k)
    # The table each symbol was coded with (the decoder rebuilds the same, in order).
    # Per context (lists indexed by it: the contexts are bytes): counts, symbols seen,
    # and the table in use; a context's counts are made when it first occurs.
    counts: list[list[int]] = [[] for _ in range(MAX_CONTEXTS)]
    seen = [0] * MAX_CONTEXTS
    current: list[tuple[list[int], list[int]]] = [([], [])] * MAX_CONTEXTS
    # Each symbol's frequency and cumulative start under the table it was coded with.
    freq_of: list[int] = []
    start_of: list[int] = []
    for s, c in zip(symbols, ctx, strict=True):
        n = seen[c]
        if n % block == 0:
            if not n:
                counts[c] = [1] * k
            current[c] = _table(counts[c])
        freqs, cum = current[c]
        freq_of.append(freqs[s])
        start_of.append(cum[s])
        counts[c][s] += 2
        seen[c] = n + 1
    return _emit(freq_of, start_of)


def decode_context_codes(data: bytes | memoryview, contexts: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`encode_context_codes`: uint8 ``[len(contexts)]``.

    Raises
    ------
    ValueError
        ``contexts`` empty, longer than :data:`MAX_CODES` or out of range (the caller
        derives them from what it holds, so that is its mistake, not the body's).
    FormatError
        If ``data`` is not exactly the coding of ``len(contexts)`` codes under these
        contexts (too short, bytes left over, or a final state other than the encoder's
        initial one).
    """
    count = len(contexts)
    k = _check(count, bits)
    ctx = _check_contexts(contexts, count)
    raw = bytes(data)
    if len(raw) < 4:
        raise FormatError(f"ANS body of {len(raw)} bytes (at least 4)")
    x = int.from_bytes(raw[:4], "big")
    pos = 4
    n = len(raw)
    out = bytearray(count)
    block = _block(k)
    counts: list[list[int]] = [[] for _ in range(MAX_CONTEXTS)]
    seen = [0] * MAX_CONTEXTS
    current: list[tuple[list[int], list[int]]] = [([], [])] * MAX_CONTEXTS
    for i, c in enumerate(ctx):
        m = seen[c]
        if m % block == 0:
            if not m:
                counts[c] = [1] * k
            current[c] = _table(counts[c])
        seen[c] = m + 1
        freqs, cum = current[c]
        slot = x & _MASK
        s = bisect_right(cum, slot) - 1
        out[i] = s
        counts[c][s] += 2
        x = freqs[s] * (x >> _SCALE_BITS) + slot - cum[s]
        while x < _LOW:
            if pos >= n:
                raise FormatError("ANS body ends before its codes do")
            x = (x << 8) | raw[pos]
            pos += 1
    if x != _LOW or pos != n:
        raise FormatError("corrupt ANS body (final state or length does not match)")
    return np.frombuffer(bytes(out), dtype=np.uint8)
