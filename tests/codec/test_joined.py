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
