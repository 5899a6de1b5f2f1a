"""Literal-only zstd frames (fedsqueeze.codec.literal_frames) and the dense paths on them:
a splice of pieces is one ordinary frame for every decoder, its planned segments decode
on their own to the same bytes, frames with matches are never cut, hostile frames give
a FormatError or exactly what the one-stream decoder gives, and the encoder's choice of
coder (raw, literal pieces, one stream) follows the sample.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import zstandard

from fedsqueeze.codec import chunks, dense_decode, dense_encode, entropy, literal_frames
from fedsqueeze.codec.dense_encode import Coder, choose_coder
from fedsqueeze.codec.quantization import Runs, choose_qparams, dequantize, quantize
from fedsqueeze.codec.spec import Granularity, QuantScheme, Rounding
from fedsqueeze.errors import FormatError

_MAGIC = b"\x28\xb5\x2f\xfd"


def normal_codes(n: int, seed: int, spread: float = 30.0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * spread + 128
    return bytes(x.round().clamp(0, 255).to(torch.uint8).numpy())


def spliced(data: bytes, chunk: int) -> bytes:
    view = memoryview(data)
    pieces = [
        literal_frames.compress_piece(view[i : i + chunk]) for i in range(0, len(data), chunk)
    ]
    assert all(p is not None for p in pieces)
    parts: list[bytes | memoryview] = []
    assert literal_frames.write_spliced([p for p in pieces if p is not None], parts.append)
    return b"".join(bytes(p) for p in parts)


def in_pieces(body: bytes, size: int, target: int) -> bytes:
    plan = literal_frames.plan(body, size, target)
    assert plan is not None
    out = bytearray(size)
    view = memoryview(out)
    for seg in plan.segments:
        literal_frames.decode_piece(body, plan.header, seg, view[seg.out_start : seg.out_stop])
    return bytes(out)


UNIFORM = bytes(np.random.default_rng(3).integers(0, 256, 150_000, dtype=np.uint8))
MIXES = {
    "normal": normal_codes(300_001, 1),
    "uniform": UNIFORM,  # raw blocks
    "mixed": normal_codes(100_000, 4) + UNIFORM + normal_codes(90_000, 5, spread=8.0),
}


@pytest.mark.parametrize("name", sorted(MIXES))
@pytest.mark.parametrize("chunk", [1_000, 65_536, 262_144, 1 << 22])
def test_splice_is_one_frame_for_every_decoder(name: str, chunk: int) -> None:
    data = MIXES[name]
    body = spliced(data, chunk)
    size = len(data)
    assert entropy.decompress(body, size) == data
    out = bytearray(size)
    list(entropy.decompress_into(body, memoryview(out), 10_000))
    assert bytes(out) == data
    framed = _MAGIC + body
    assert zstandard.ZstdDecompressor().decompressobj().decompress(framed) == data
    for target in (1, 100_000, 1 << 30):
        assert in_pieces(body, size, target) == data


def test_plan_cuts_only_where_a_block_brings_its_table() -> None:
    data = MIXES["normal"]
    body = spliced(data, 65_536)
    plan = literal_frames.plan(body, len(data), 1)
    assert plan is not None
    assert len(plan.segments) >= -(-len(data) // 65_536)  # at least every piece
    assert plan.segments[0].out_start == 0 and plan.segments[-1].out_stop == len(data)
    assert plan.segments[-1].final and not any(s.final for s in plan.segments[:-1])
    for a, b in zip(plan.segments, plan.segments[1:], strict=False):
        assert a.stop == b.start and a.out_stop == b.out_start
    whole = literal_frames.plan(body, len(data), 1 << 30)
    assert whole is not None and len(whole.segments) == 1


def test_frames_with_matches_are_cut_only_around_them() -> None:
    repeats = bytes(range(256)) * 2_000  # level 3 and the literal parameters find matches
    body = entropy.compress(repeats, 3)
    assert body is not None
    whole = literal_frames.plan(body, len(repeats), 1)
    assert whole is None or len(whole.segments) == 1
    piece = literal_frames.compress_piece(memoryview(repeats))
    assert piece is not None and piece.matches
    assert not _piece(MIXES["normal"]).matches
    with_sum = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(MIXES["normal"])
    assert literal_frames.plan(with_sum[4:], len(MIXES["normal"]), 1) is None


def _piece(data: bytes) -> literal_frames.Piece:
    piece = literal_frames.compress_piece(memoryview(data))
    assert piece is not None
    return piece


def _join(pieces: list[literal_frames.Piece]) -> bytes:
    parts: list[bytes | memoryview] = [pieces[0].frame[: pieces[0].header]]
    for i, piece in enumerate(pieces):
        literal_frames.emit_piece(piece, i == len(pieces) - 1, parts.append)
    return b"".join(bytes(p) for p in parts)


def test_one_piece_with_matches_rides_in_the_splice() -> None:
    """The frame's initial repeat offsets hold until the first sequence: one piece with
    matches decodes right in a splice, alone in its segment; two are refused."""
    a, b = MIXES["normal"][:100_000], MIXES["normal"][100_000:220_000]
    repeats = bytes(range(200)) * 400
    parts = [_piece(a), _piece(repeats), _piece(b)]
    frames: list[bytes | memoryview] = []
    assert literal_frames.write_spliced(parts, frames.append)
    body = b"".join(bytes(p) for p in frames)
    data = a + repeats + b
    assert entropy.decompress(body, len(data)) == data
    plan = literal_frames.plan(body, len(data), 1)
    assert plan is not None and len(plan.segments) > 1
    assert in_pieces(body, len(data), 1) == data
    # The matches' piece starts with a block of sequences: its segment starts earlier.
    assert any(s.out_stop == len(a) + len(repeats) for s in plan.segments)
    two = [_piece(a), _piece(repeats), _piece(b), _piece(repeats[7:] + b"xy")]
    assert not literal_frames.write_spliced(two, frames.append)
    assert literal_frames.plan(_join(two), 2 * len(repeats) + len(a) + len(b) - 5, 1) is None


def _int4_codes(n: int) -> bytes:
    """Packed 4-bit codes of ``n`` standard normal values (NumPy's generator: the same
    bytes on every platform), as a per-tensor 4-bit spec makes them."""
    x = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    lo, hi = float(x.min()), float(x.max())
    codes = np.clip(np.rint((x - lo) / (hi - lo) * 15), 0, 15).astype(np.uint8)
    return bytes(codes[0::2] | (codes[1::2] << 4))


def test_pieces_with_incidental_matches_are_made_again_without_them() -> None:
    """On real 4-bit codes zstd's fastest search lands on a short repeat in a few
    pieces. Each such piece is made again without sequences (halves compressed anew,
    a raw block where a small part still matches), under its own header and window,
    about as small, and decodes to its data by every path; the whole body splices
    (five matched pieces here: it went to one zstd stream on one core before)."""
    data = _int4_codes(50_000_000)
    size = 1 << 17
    view = memoryview(data)
    matched = 0
    for start in range(0, len(data), size):
        chunk = view[start : start + size]
        whole = literal_frames._compress_whole(chunk)
        assert whole is not None
        if not whole.matches:
            continue
        matched += 1
        piece = _piece(bytes(chunk))
        assert not piece.matches
        assert piece.frame[: piece.header] == whole.frame[: whole.header]
        assert piece.window == whole.window
        assert len(piece.frame) < 1.01 * len(whole.frame) + 1_000
        assert entropy.decompress(piece.frame, len(chunk)) == bytes(chunk)
        assert in_pieces(piece.frame, len(chunk), 1) == bytes(chunk)
    assert matched >= 2
    body = literal_frames.compress_spliced(data, piece=size)
    assert body is not None
    assert entropy.decompress(body, len(data)) == data
    assert in_pieces(body, len(data), size) == data


def test_matches_that_pay_are_kept() -> None:
    repeats = bytes(range(256)) * 400  # real repeats: the matches are the compression
    piece = _piece(repeats)
    assert piece.matches and len(piece.frame) < len(repeats) // 50
    assert entropy.decompress(piece.frame, len(repeats)) == repeats


def test_a_small_part_that_keeps_matching_is_stored_raw(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the entropy guard off, a piece of repeats is made without sequences all the
    way down: halves to the smallest part, then raw blocks; it still decodes."""
    monkeypatch.setattr(literal_frames, "MATCHES_PAY", 0.0)
    repeats = bytes(range(256)) * 10  # 2,560 bytes: halves of 1,280 still repeat
    calls: list[int] = []
    whole = literal_frames._compress_whole

    def counted(data: memoryview) -> literal_frames.Piece | None:
        calls.append(len(data))
        return whole(data)

    monkeypatch.setattr(literal_frames, "_compress_whole", counted)
    piece = _piece(repeats)
    assert not piece.matches
    assert sorted(calls) == [1_280, 1_280, 2_560]  # no part below MIN_SPLIT compressed
    assert len(piece.frame) > len(repeats)  # raw: the price of no sequences
    assert entropy.decompress(piece.frame, len(repeats)) == repeats
    assert in_pieces(piece.frame, len(repeats), 1) == repeats


def test_plan_refuses_frames_that_do_not_fill_the_size() -> None:
    data = MIXES["normal"]
    body = spliced(data, 65_536)
    assert literal_frames.plan(body, len(data) + 1, 1) is None  # blocks end short
    assert literal_frames.plan(body, len(data) - 1, 1) is None  # blocks run past
    assert literal_frames.plan(body + b"\x00", len(data), 1) is None  # bytes after
    assert literal_frames.plan(body[:-1], len(data), 1) is None  # truncated


def test_a_piece_that_decodes_to_the_wrong_length_is_refused() -> None:
    """A block header whose size is changed, so the planned output is not what the
    block decodes to: FormatError, never a wrong buffer."""
    data = MIXES["normal"]
    body = bytearray(spliced(data, 65_536))
    plan = literal_frames.plan(bytes(body), len(data), 1)
    assert plan is not None
    seg = plan.segments[1]
    out = bytearray(seg.out_stop - seg.out_start + 1)
    with pytest.raises(FormatError):  # one byte more than the blocks decode to
        bogus = literal_frames.Segment(seg.start, seg.stop, seg.out_start, seg.out_stop + 1, False)
        literal_frames.decode_piece(bytes(body), plan.header, bogus, memoryview(out))
    with pytest.raises(ValueError):
        literal_frames.decode_piece(bytes(body), plan.header, seg, memoryview(out))


def test_block_sizes_beyond_the_limit_are_not_planned() -> None:
    data = MIXES["uniform"][:1_000]
    raw_block = bytes(((len(data) << 3) | 1).to_bytes(3, "little")) + data
    header = spliced(MIXES["normal"], 65_536)[:2]
    assert literal_frames.plan(header + raw_block, len(data), 1) is not None
    huge = (((200 << 10) << 3) | 1).to_bytes(3, "little")  # 200 KiB > zstd's 128 KiB
    assert literal_frames.plan(header + huge + bytes(200 << 10), 200 << 10, 1) is None


@contextlib.contextmanager
def two_threads(count: int = 2) -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _dense(n: int, bits: int, seed: int, length: int | None = None) -> tuple[torch.Tensor, object]:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    if length is None:
        qp = choose_qparams(x, bits, QuantScheme.AFFINE, Granularity.PER_TENSOR)
    else:
        runs = Runs(length)
        qp = choose_qparams(x, bits, QuantScheme.AFFINE, Granularity.PER_BLOCK, runs, runs.count(n))
    return x, qp


@pytest.mark.parametrize(("bits", "length"), [(8, None), (4, 64), (8, 100), (4, 100)])
def test_dense_round_trip_through_pieces(
    bits: int, length: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encoded in literal pieces, decoded in pieces on two threads: the values of the
    sequential path, bit for bit; with the decoder's chunks not the encoder's too."""
    n = 200_003
    x, qp = _dense(n, bits, bits, length)
    runs = None if length is None else Runs(length)
    monkeypatch.setattr(dense_encode, "_CHUNK", 16_384)
    with two_threads():
        coded = dense_encode.encode_dense(x, qp, runs, 3)  # type: ignore[arg-type]
    assert coded.raw_length is not None
    plan = literal_frames.plan(coded.body, coded.raw_length, 1)
    assert plan is not None and len(plan.segments) > 1
    codes = quantize(x, qp, Rounding.NEAREST, runs)  # type: ignore[arg-type]
    expected = dequantize(codes, qp, runs)  # type: ignore[arg-type]
    for chunk in (16_384, 10_000, 1 << 18):
        monkeypatch.setattr(dense_decode, "_CHUNK", chunk)
        with two_threads():
            got = dense_decode.decode_dense(coded.body, coded.raw_length, n, qp, runs)  # type: ignore[arg-type]
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    # One writer and helpers on 1, 3 and 5 threads; every worker writing, as before.
    monkeypatch.setattr(dense_decode, "_CHUNK", 16_384)
    for threads, all_write in ((1, False), (3, False), (5, False), (2, True), (5, True)):
        monkeypatch.setattr(dense_decode, "ALL_WRITE", all_write)
        with two_threads(threads):
            got = dense_decode.decode_dense(coded.body, coded.raw_length, n, qp, runs)  # type: ignore[arg-type]
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


def _pieced_int8(monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, int, literal_frames.Plan]:
    """An int8 body of 200,003 codes in literal pieces of 16,384 (13 segments)."""
    x, qp = _dense(200_003, 8, 3)
    monkeypatch.setattr(dense_encode, "_CHUNK", 16_384)
    with two_threads():
        coded = dense_encode.encode_dense(x, qp, None, 3)  # type: ignore[arg-type]
    assert coded.raw_length is not None
    plan = literal_frames.plan(coded.body, coded.raw_length, 1)
    assert plan is not None and len(plan.segments) == 13
    return bytes(coded.body), coded.raw_length, plan


_WRITERS = [(1, False), (2, False), (3, False), (5, False), (2, True), (5, True)]


@pytest.mark.parametrize(("threads", "all_write"), _WRITERS)
def test_each_piece_is_decoded_once_and_each_chunk_written_once(
    threads: int, all_write: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever order the threads run in (random delays in each decode), each segment
    is decoded by one thread and each chunk written by one; with one writer (the
    default) the calling thread writes the first chunk and helpers only the last ones."""
    body, size, plan = _pieced_int8(monkeypatch)
    rng = np.random.default_rng(threads)
    delays = rng.random(len(plan.segments)) * 0.003
    decoded: dict[int, int] = {}
    real = literal_frames.decode_piece

    def slow(body: bytes, header: bytes, seg: literal_frames.Segment, out: memoryview) -> None:
        k = plan.segments.index(seg)
        decoded[k] = decoded.get(k, 0) + 1
        time.sleep(float(delays[k]))
        real(body, header, seg, out)

    monkeypatch.setattr(literal_frames, "decode_piece", slow)
    monkeypatch.setattr(dense_decode, "ALL_WRITE", all_write)
    written: dict[tuple[int, int], list[int]] = {}

    def chunk(start: int, stop: int) -> None:
        written.setdefault((start, stop), []).append(threading.get_ident())

    bounds = [(s.out_start, s.out_stop) for s in plan.segments]  # the encoder's chunks
    raw = torch.empty(size, dtype=torch.uint8)
    with two_threads(threads):
        dense_decode._in_pieces(body, plan, raw, bounds, 1, chunk)
    assert decoded == dict.fromkeys(range(len(plan.segments)), 1)
    assert sorted(written) == bounds and all(len(w) == 1 for w in written.values())
    assert bytes(raw.numpy()) == entropy.decompress(body, size)
    if not all_write:
        assert written[bounds[0]] == [threading.get_ident()]


@pytest.mark.timeout(60)
def test_a_busy_pool_does_not_hold_the_decode_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every worker thread busy elsewhere: the calling thread decodes and writes every
    segment itself (a helper task the pool never started is not waited for; the
    previous schedule, ``ALL_WRITE``, waits: it is the benchmark's only)."""
    body, size, plan = _pieced_int8(monkeypatch)
    release = threading.Event()
    with two_threads(2):
        pool = chunks._pool(2)
        blockers = [pool.submit(release.wait, 30) for _ in range(2)]
        try:
            raw = torch.empty(size, dtype=torch.uint8)
            bounds = [(s.out_start, s.out_stop) for s in plan.segments]
            dense_decode._in_pieces(body, plan, raw, bounds, 1, lambda start, stop: None)
            assert not any(b.done() for b in blockers)  # it finished while they held the pool
        finally:
            release.set()
    assert bytes(raw.numpy()) == entropy.decompress(body, size)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("threads", "all_write"), [(1, False), (2, False), (4, False), (4, True)])
@pytest.mark.parametrize("bad", [0, 6, 12])
def test_a_failing_piece_stops_every_thread_with_its_error(
    threads: int, all_write: bool, bad: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One segment's decode raises: the decode raises that FormatError (not another
    thread's stop), promptly, whichever thread held it; nothing hangs."""
    body, size, plan = _pieced_int8(monkeypatch)
    real = literal_frames.decode_piece

    def failing(body: bytes, header: bytes, seg: literal_frames.Segment, out: memoryview) -> None:
        if plan.segments.index(seg) == bad:
            raise FormatError(f"segment {bad} is corrupt")
        time.sleep(0.001)
        real(body, header, seg, out)

    monkeypatch.setattr(literal_frames, "decode_piece", failing)
    monkeypatch.setattr(dense_decode, "ALL_WRITE", all_write)
    bounds = [(s.out_start, s.out_stop) for s in plan.segments]
    raw = torch.empty(size, dtype=torch.uint8)
    with two_threads(threads), pytest.raises(FormatError, match=f"segment {bad} is corrupt"):
        dense_decode._in_pieces(body, plan, raw, bounds, 1, lambda start, stop: None)


def test_hostile_bytes_in_pieces_decode_as_one_stream_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every byte of a spliced body flipped (and some cut): the pieces decode either
    raises FormatError or gives exactly the one-stream decode's values."""
    n = 24_000
    x, qp = _dense(n, 8, 7)
    monkeypatch.setattr(dense_encode, "_CHUNK", 2_048)
    monkeypatch.setattr(dense_decode, "_CHUNK", 2_048)
    with two_threads():
        coded = dense_encode.encode_dense(x, qp, None, 3)  # type: ignore[arg-type]
    body = bytes(coded.body)
    size = coded.raw_length
    assert size is not None and literal_frames.plan(body, size, 1) is not None
    rng = np.random.default_rng(0)
    spots = sorted(set(rng.integers(0, len(body), 300).tolist()) | {0, 1, 2, 3, 4, len(body) - 1})
    for i in spots:
        flipped = bytearray(body)
        flipped[i] ^= 0x5A
        _same_verdict(bytes(flipped), size, n, qp)
    for cut in (1, 3, len(body) // 2):
        _same_verdict(body[:-cut], size, n, qp)


def _same_verdict(body: bytes, size: int, n: int, qp: object) -> None:
    try:
        raw = entropy.decompress(body, size)
    except FormatError:
        with pytest.raises(FormatError), two_threads():
            dense_decode.decode_dense(body, size, n, qp, None)  # type: ignore[arg-type]
        return
    codes = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    expected = dequantize(codes, qp)  # type: ignore[arg-type]
    with two_threads():
        got = dense_decode.decode_dense(body, size, n, qp, None)  # type: ignore[arg-type]
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


def test_choose_coder() -> None:
    normal = memoryview(normal_codes(1 << 18, 9))
    assert choose_coder(normal, 3) is Coder.LITERAL
    uniform = memoryview(UNIFORM)
    assert choose_coder(uniform, 3) is Coder.RAW
    repeats = memoryview(bytes(range(200)) * 1_000)  # matches: one stream
    assert choose_coder(repeats, 3) is Coder.STREAM


def test_raw_stream_and_fallback_bodies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uniform codes are stored raw; codes with repeats get one stream; a piece that
    turns out to hold a match (outside the sample) sends the record to one stream."""
    n = 100_000
    monkeypatch.setattr(dense_encode, "_CHUNK", 8_192)
    u = torch.rand(n, generator=torch.Generator().manual_seed(1))
    qp_u = choose_qparams(u, 8, QuantScheme.AFFINE, Granularity.PER_TENSOR)
    with two_threads():
        assert dense_encode.encode_dense(u, qp_u, None, 3).raw_length is None
    pattern = torch.arange(n, dtype=torch.float32) % 97
    qp_p = choose_qparams(pattern, 8, QuantScheme.AFFINE, Granularity.PER_TENSOR)
    with two_threads():
        coded = dense_encode.encode_dense(pattern, qp_p, None, 3)
    assert coded.raw_length == n
    stream = literal_frames.plan(coded.body, n, 1)  # one stream, with matches
    assert stream is None or len(stream.segments) == 1
    assert entropy.decompress(coded.body, n) == bytes(coded.packed.numpy())

    x, qp = _dense(n, 8, 5)
    real = literal_frames.compress_piece
    calls: list[int] = []

    lock = threading.Lock()

    def two_match(data: memoryview) -> literal_frames.Piece | None:
        with lock:  # this call's number, taken before another worker's call can add one
            calls.append(1)
            number = len(calls)
        piece = real(data)
        assert piece is not None
        return dataclasses.replace(piece, matches=number in (4, 6))

    monkeypatch.setattr(dense_encode, "compress_piece", two_match)
    with two_threads():
        coded = dense_encode.encode_dense(x, qp, None, 3)  # type: ignore[arg-type]
    assert len(calls) > 6
    assert coded.raw_length == n
    stream = literal_frames.plan(coded.body, n, 1)  # one stream at level 3
    assert stream is None or len(stream.segments) == 1
    expected = bytes(quantize(x, qp, Rounding.NEAREST).numpy())  # type: ignore[arg-type]
    assert entropy.decompress(coded.body, n) == expected


def test_a_chunk_with_repeats_stays_in_the_splice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Normal values with one chunk of repeating ones (as MiniLM's unused-token rows):
    still literal pieces, decoded in pieces to the sequential path's values."""
    n = 600_000  # the size sample (the middle 256 KiB) holds no repeats
    x = torch.randn(n, generator=torch.Generator().manual_seed(8))
    x[40_000:48_192] = (torch.arange(8_192) % 50).to(torch.float32) / 20 - 1
    qp = choose_qparams(x, 8, QuantScheme.AFFINE, Granularity.PER_TENSOR)
    monkeypatch.setattr(dense_encode, "_CHUNK", 8_192)
    monkeypatch.setattr(dense_decode, "_CHUNK", 8_192)
    with two_threads():
        coded = dense_encode.encode_dense(x, qp, None, 3)
        plan = literal_frames.plan(coded.body, n, 8_192)
        assert plan is not None and len(plan.segments) > 1
        got = dense_decode.decode_dense(coded.body, n, n, qp, None)
    chunk5 = literal_frames.compress_piece(memoryview(bytes(coded.packed.numpy()[40_960:49_152])))
    assert chunk5 is not None and chunk5.matches  # the piece with matches is in the splice
    expected = dequantize(quantize(x, qp, Rounding.NEAREST), qp)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


def _packed(scheme: QuantScheme, seed: int) -> memoryview:
    x = torch.randn(1 << 19, generator=torch.Generator().manual_seed(seed))
    runs = Runs(64)
    qp = choose_qparams(x, 4, scheme, Granularity.PER_BLOCK, runs, runs.count(x.numel()))
    return memoryview(bytes(dense_encode.quantize_packed(x, qp, runs).numpy()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_is_skipped_below_the_gain_that_pays(seed: int) -> None:
    """NF4 codes of normal values shrink by ~2%: below MIN_GAIN (3%), stored raw (their
    decode would cost twice the CPU); block-wise affine 4-bit codes shrink by ~5%:
    literal pieces."""
    nf4 = _packed(QuantScheme.NF4, seed)
    affine = _packed(QuantScheme.AFFINE, seed)
    for codes, coder in ((nf4, Coder.RAW), (affine, Coder.LITERAL)):
        piece = literal_frames.compress_piece(codes)
        assert piece is not None
        gain = 1 - len(piece.frame) / len(codes)
        assert 0.01 < gain < 0.1
        assert (gain < dense_encode.MIN_GAIN) == (coder is Coder.RAW)
        assert choose_coder(codes, 3) is coder


@pytest.mark.parametrize("piece", [1 << 16, 100_003, 1 << 20])
def test_compress_spliced_is_one_frame_that_decodes_to_the_payload(piece: int) -> None:
    noise = np.random.default_rng(7).integers(0, 256, 9_999, dtype=np.uint8)
    data = normal_codes(700_001, 7) + bytes(noise)
    packed = literal_frames.compress_spliced(data, piece)
    assert packed is not None and len(packed) < len(data)
    assert entropy.decompress(packed, len(data)) == data
    plain = zstandard.ZstdDecompressor().decompress(_MAGIC + packed, max_output_size=len(data))
    assert plain == data


def test_compress_spliced_refuses_what_it_cannot_shrink() -> None:
    noise = bytes(np.random.default_rng(3).integers(0, 256, 300_000, dtype=np.uint8))
    assert literal_frames.compress_spliced(noise, 1 << 16) is None
    assert literal_frames.compress_spliced(b"", 1 << 16) is None
    with pytest.raises(ValueError, match="piece"):
        literal_frames.compress_spliced(b"abc", 0)


def test_compress_spliced_gives_up_on_two_pieces_with_matches() -> None:
    repeated = bytes(range(256)) * 4096  # matches in every piece
    assert literal_frames.compress_spliced(repeated, 1 << 18) is None


def test_large_sparse_records_take_literal_pieces_and_round_trip() -> None:
    from fedsqueeze.codec.model import EncodedModel, decode_state, encode_state
    from fedsqueeze.codec.spec_text import parse_spec

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3_000, 1_000, generator=g)
    state = {"fc.weight": x}
    for text, level in (("prune=l1:0.5,quant=4", 3), ("prune=l1:0.5,quant=4,entropy=9", 9)):
        encoded = encode_state(state, parse_spec(text))
        (record,) = encoded.records
        assert record.raw_length is not None and record.raw_length >= 1 << 20
        reference = entropy.compress(
            _raw_body(record.body, record.raw_length), level
        )  # the spec's level, one stream
        if level <= 3:
            assert len(record.body) < len(reference or b"")  # literal pieces: smaller
        else:
            assert record.body == reference
        decoded = decode_state(EncodedModel.from_bytes(encoded.to_bytes()))["fc.weight"]
        kept = decoded != 0
        assert int(kept.sum()) == x.numel() // 2
        assert torch.allclose(decoded[kept], x[kept], atol=float(x.abs().max()) / 7)


def _raw_body(body: bytes | memoryview, size: int) -> bytes:
    return entropy.decompress(body, size)


def test_regular_positions_keep_one_stream_at_the_level() -> None:
    """Whole channels kept: the positions repeat, and the level's matches win there."""
    from fedsqueeze.codec.model import EncodedModel, decode_state, encode_state
    from fedsqueeze.codec.spec_text import parse_spec

    g = torch.Generator().manual_seed(6)
    x = torch.randn(4_000, 1_000, generator=g)
    encoded = encode_state({"fc.weight": x}, parse_spec("prune=channel:0.5,quant=8"))
    (record,) = encoded.records
    assert record.raw_length is not None and record.raw_length >= 1 << 20
    raw = _raw_body(record.body, record.raw_length)
    assert record.body == entropy.compress(raw, 3)
    decoded = decode_state(EncodedModel.from_bytes(encoded.to_bytes()))["fc.weight"]
    assert int((decoded.abs().sum(dim=1) > 0).sum()) == 2_000
