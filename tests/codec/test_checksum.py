"""The trailer checksum on several threads (the same values as one zlib pass), and the
byte reader's inlined reads."""

from __future__ import annotations

import itertools
import random
import zlib

import numpy as np
import pytest

from fedsqueeze.codec import checksum, container
from fedsqueeze.codec.bytesio import ByteReader
from fedsqueeze.errors import FormatError, TruncatedError


def _data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def test_container_uses_the_shared_checksum() -> None:
    assert container.crc32 is checksum.crc32


@pytest.mark.parametrize("seed", range(5))
def test_combine_matches_zlib_on_random_splits(seed: int) -> None:
    rng = random.Random(seed)
    data = _data(5000, seed)
    for _ in range(50):
        a = rng.randrange(len(data) + 1)
        b = rng.randrange(a, len(data) + 1)
        left, right = data[:a], data[a:b]
        joined = checksum.crc32_combine(zlib.crc32(left), zlib.crc32(right), len(right))
        assert joined == zlib.crc32(left + right)


def test_combine_with_an_empty_piece_is_the_first_crc() -> None:
    assert checksum.crc32_combine(0xDEADBEEF, 0, 0) == 0xDEADBEEF
    with pytest.raises(ValueError, match="negative length"):
        checksum.crc32_combine(1, 2, -1)


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 16])
@pytest.mark.parametrize("value", [0, 1, 0x12345678, 0xFFFFFFFF])
def test_pieces_on_threads_give_zlibs_value(
    monkeypatch: pytest.MonkeyPatch, piece: int, value: int
) -> None:
    """Every piece size, including ones that leave a short last piece, and a CRC continued
    from an earlier part (what ``to_bytes`` does part by part)."""
    monkeypatch.setattr(checksum, "PIECE_BYTES", piece)
    monkeypatch.setattr(checksum, "workers", lambda: (None, 3))
    data = _data(200_003, piece)
    assert checksum.crc32(data, value) == zlib.crc32(data, value)
    assert checksum.crc32(memoryview(data)[5:-3], value) == zlib.crc32(data[5:-3], value)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("spans", [1, 2, 3, 5])
def test_crc_of_pieces_is_the_crc_of_their_join(
    monkeypatch: pytest.MonkeyPatch, seed: int, spans: int
) -> None:
    """Spans cut across the pieces' edges wherever they fall: empty pieces, pieces
    shorter than a span, longer than one, typed buffers, and an input too small to cut."""
    monkeypatch.setattr(checksum, "PIECE_BYTES", 997)
    monkeypatch.setattr(checksum, "workers", lambda: (None, spans))
    rng = random.Random(seed)
    data = _data(60_000, seed)
    cuts = sorted([*rng.sample(range(1, len(data)), 12), 0, 0, len(data), len(data)])
    pieces: list[bytes | memoryview] = [data[a:b] for a, b in itertools.pairwise(cuts)]
    pieces.append(np.arange(50, dtype=np.uint32).data)  # a typed buffer
    want = zlib.crc32(b"".join(bytes(memoryview(p).cast("B")) for p in pieces))
    assert checksum.crc32_of(pieces) == want
    assert checksum.crc32_of([data[:100], data[100:900]]) == zlib.crc32(data[:900])
    assert checksum.crc32_of([]) == 0


def test_default_pieces_on_a_large_buffer() -> None:
    data = _data(3 * checksum.PIECE_BYTES + 11, 9)
    assert checksum.crc32(data) == zlib.crc32(data)


def test_a_typed_buffer_is_read_as_its_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checksum, "PIECE_BYTES", 1000)
    words = np.arange(10_000, dtype=np.uint32)
    assert checksum.crc32(words.data) == zlib.crc32(words.tobytes())  # format "I"


def test_reader_bytes_and_varints_bounded() -> None:
    """The reader's inlined byte and varint reads keep their errors and positions."""
    reader = ByteReader(bytes([0x05, 0x96, 0x01, 0x80]))
    assert reader.u8() == 5
    assert reader.varint() == 150
    assert reader.pos == 3
    with pytest.raises(TruncatedError, match="count needs 1 bytes"):
        reader.varint("count")
    assert reader.pos == 4
    with pytest.raises(TruncatedError, match="flag needs 1 bytes, 0 left"):
        reader.u8("flag")
    with pytest.raises(FormatError, match="exceeds the limit 100"):
        ByteReader(bytes([0x96, 0x01])).varint("size", 100)
    with pytest.raises(FormatError, match="longer than 10 bytes"):
        ByteReader(bytes([0xFF] * 11)).varint()
