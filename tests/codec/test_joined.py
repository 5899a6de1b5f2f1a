"""fedsqueeze.codec.joined: a large ``bytes`` built in huge pages is exactly what
``b"".join`` makes, whatever the pieces (bytes, bytearrays, memoryviews of other item
sizes, empty ones, pieces larger than a copy block), and owns its memory."""

from __future__ import annotations

import gc
import sys

import numpy as np
import pytest

from fedsqueeze.codec import joined


def _pieces(seed: int, total: int) -> list[bytes | bytearray | memoryview]:
    rng = np.random.default_rng(seed)
    out: list[bytes | bytearray | memoryview] = [b"", b"head"]
    left = total
    while left > 0:
        n = min(left, int(rng.integers(1, 9 << 20)))
        data = rng.integers(0, 256, n, dtype=np.uint8)
        kind = len(out) % 3
        if kind == 0:
            out.append(data.tobytes())
        elif kind == 1:
            out.append(bytearray(data.tobytes()))
        else:  # a view of 4-byte items: its length is not its bytes
            words = data[: n - n % 4].view(np.uint32)
            out.append(memoryview(words.data))
        left -= n
    return out


@pytest.mark.parametrize("total", [0, 1000, joined.HUGE_FROM - 1, joined.HUGE_FROM, 21 << 20])
def test_join_equals_bytes_join(total: int) -> None:
    pieces = _pieces(total, total)
    out = joined.join(pieces)
    assert type(out) is bytes
    assert out == b"".join(pieces)


def test_the_result_owns_its_memory() -> None:
    pieces = _pieces(1, 12 << 20)
    expected = b"".join(pieces)
    out = joined.join(pieces)
    del pieces
    gc.collect()
    assert out == expected
    assert sys.getrefcount(out) == 2  # the name and the call's argument: nothing leaked
    assert hash(out) == hash(expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_many_small_pieces_copied_in_runs(seed: int) -> None:
    """A model's stream: hundreds of record headers and bodies of a few KB to a few MB
    (copied in runs of about a block on every core), and one larger than a block."""
    rng = np.random.default_rng(seed)
    pieces: list[bytes | bytearray | memoryview] = []
    for i in range(400):
        pieces.append(rng.integers(0, 256, int(rng.integers(5, 40)), dtype=np.uint8).tobytes())
        size = int(rng.integers(1, 3 << 20)) if i % 50 == 0 else int(rng.integers(0, 60_000))
        pieces.append(bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes()))
    pieces.insert(123, rng.integers(0, 256, 9 << 20, dtype=np.uint8).tobytes())
    assert joined.join(pieces) == b"".join(pieces)
