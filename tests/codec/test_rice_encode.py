"""The chunked Rice encoder (fedsqueeze.codec.rice_encode): the reference path's
payload byte for byte, whatever the density, chunking and threads; hostile indices
rejected as before."""

from __future__ import annotations

import pytest
import torch

from fedsqueeze.codec import positions, rice_encode
from fedsqueeze.codec.positions import PositionCoding, decode_positions, encode_positions


def reference(indices: torch.Tensor, numel: int) -> positions.EncodedPositions:
    """encode_positions with the chunked path switched off."""
    saved = positions._CHUNKED_ABOVE
    positions._CHUNKED_ABOVE = 1 << 62
    try:
        return encode_positions(indices, numel)
    finally:
        positions._CHUNKED_ABOVE = saved


def chunked(indices: torch.Tensor, numel: int) -> positions.EncodedPositions:
    saved = positions._CHUNKED_ABOVE
    positions._CHUNKED_ABOVE = 1
    try:
        return encode_positions(indices, numel)
    finally:
        positions._CHUNKED_ABOVE = saved


def random_indices(numel: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nonzero(torch.rand(numel, generator=g) < density).view(-1)


@pytest.mark.parametrize("chunk", [8, 64, 1 << 16])
@pytest.mark.parametrize(
    ("numel", "density"),
    [(1, 1.0), (50, 0.3), (5000, 0.1), (300_000, 0.1), (300_000, 0.02), (200_000, 0.4),
     (3_000_000, 0.0005), (300_000, 0.9)],
)  # fmt: skip
def test_same_payload_as_reference(
    numel: int, density: float, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rice_encode, "CHUNK", chunk)
    for seed in range(3):
        idx = random_indices(numel, density, seed)
        if idx.numel() == 0:
            continue
        want, got = reference(idx, numel), chunked(idx, numel)
        assert (got.coding, got.count, got.rice_k) == (want.coding, want.count, want.rice_k)
        assert torch.equal(got.payload, want.payload)
        back = decode_positions(got.coding, got.count, got.rice_k, got.payload, numel)
        assert torch.equal(back, idx)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5, 8, 9, 13, 20])
def test_every_k_same_as_reference(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced parameters, including ones outside the first pass's window and above 8."""
    monkeypatch.setattr(rice_encode, "CHUNK", 4096)
    g = torch.Generator().manual_seed(k)
    gaps = torch.randint(0, 1 << (k + 1), (20_000,), generator=g)
    gaps[::997] = (1 << (k + 3)) + 5  # a few long gaps
    idx = torch.cumsum(gaps + 1, 0) - 1
    numel = int(idx[-1]) + 1
    payload = rice_encode.encode_rice(
        idx.numpy(), k, rice_encode.rice_sums(idx.numpy(), range(k, k + 1))[0][:, 0]
    )
    want = positions._encode_rice(gaps, k)
    assert torch.equal(torch.from_numpy(payload), want)
    back = decode_positions(PositionCoding.RICE, idx.numel(), k, torch.from_numpy(payload), numel)
    assert torch.equal(back, idx)


def test_walk_leaves_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gaps whose mean misleads the start (most 0, a few huge): the walk goes beyond the
    summed window and the extra pass gives the same k and payload."""
    monkeypatch.setattr(rice_encode, "CHUNK", 1024)
    gaps = torch.zeros(100_000, dtype=torch.int64)
    gaps[::5000] = 1 << 24
    idx = torch.cumsum(gaps + 1, 0) - 1
    numel = int(idx[-1]) + 1
    want, got = reference(idx, numel), chunked(idx, numel)
    assert (got.coding, got.rice_k) == (want.coding, want.rice_k)
    assert torch.equal(got.payload, want.payload)


@pytest.mark.parametrize(
    "bad",
    [
        [5, 4, 9],  # decreasing
        [1, 1, 2],  # repeated
        [-1, 3, 4],  # negative
        [0, 3, 100],  # beyond numel
    ],
)
def test_hostile_indices_rejected(bad: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rice_encode, "CHUNK", 8)
    idx = torch.tensor(bad + list(range(200, 260)), dtype=torch.int64)
    if bad == [0, 3, 100]:
        idx = torch.tensor([0, 3, 100], dtype=torch.int64)
    with pytest.raises(ValueError, match="strictly increasing"):
        chunked(idx, 100)
    with pytest.raises(ValueError, match="strictly increasing"):
        reference(idx, 100)


def test_bitmap_when_smaller_same_as_reference() -> None:
    """Dense kept sets take the bitmap (NumPy's packbits in the chunked path)."""
    for density in (0.4, 0.9, 1.0):
        idx = random_indices(100_003, density, 5)
        want, got = reference(idx, 100_003), chunked(idx, 100_003)
        assert got.coding is PositionCoding.BITMAP is want.coding
        assert got.count == want.count and torch.equal(got.payload, want.payload)
