"""Positions decoded chunk by chunk agree with the whole decode, hostile payloads too."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from fedsqueeze.codec.position_chunks import iter_positions
from fedsqueeze.codec.positions import PositionCoding, decode_positions, encode_positions
from fedsqueeze.errors import FormatError


def _chunked(
    coding: PositionCoding, count: int, k: int, payload: torch.Tensor, numel: int, chunk: int
) -> torch.Tensor:
    pieces = list(iter_positions(coding, count, k, payload, numel, chunk))
    assert all(p.numel() == chunk for p in pieces[:-1])
    assert not pieces or 0 < pieces[-1].numel() <= chunk
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    numel=st.integers(0, 3000),
    density=st.sampled_from([0.0, 0.001, 0.02, 0.1, 0.5, 0.97, 1.0]),
    chunk=st.sampled_from([8, 16, 64, 1024]),
)
def test_chunks_join_to_the_whole_decode(seed: int, numel: int, density: float, chunk: int) -> None:
    g = torch.Generator().manual_seed(seed)
    indices = torch.nonzero(torch.rand(numel, generator=g) < density).view(-1)
    enc = encode_positions(indices, numel)
    got = _chunked(enc.coding, enc.count, enc.rice_k, enc.payload, numel, chunk)
    assert torch.equal(got, indices)
    # Rice too where the encoder would pick the bitmap, with any parameter
    if enc.coding is PositionCoding.BITMAP and indices.numel():
        from fedsqueeze.codec.positions import _encode_rice

        gaps = torch.diff(indices, prepend=indices.new_full((1,), -1)) - 1
        for k in (0, 3, 5, 7):
            payload = _encode_rice(gaps, k)
            assert torch.equal(
                _chunked(PositionCoding.RICE, indices.numel(), k, payload, numel, chunk), indices
            )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    numel=st.integers(1, 600),
    density=st.sampled_from([0.02, 0.1, 0.5]),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=3),
    count_shift=st.sampled_from([0, 0, -1, 1]),
    cut=st.sampled_from([0, 0, 1, 3]),
)
def test_hostile_payloads_fail_exactly_as_the_whole_decode(
    seed: int,
    numel: int,
    density: float,
    flips: list[tuple[int, int]],
    count_shift: int,
    cut: int,
) -> None:
    g = torch.Generator().manual_seed(seed)
    indices = torch.nonzero(torch.rand(numel, generator=g) < density).view(-1)
    enc = encode_positions(indices, numel)
    payload = enc.payload.clone()
    if payload.numel():
        for pos, value in flips:
            payload[pos % payload.numel()] = value
        payload = payload[: payload.numel() - min(cut, payload.numel())]
    count = enc.count + count_shift
    try:
        whole: torch.Tensor | None = decode_positions(enc.coding, count, enc.rice_k, payload, numel)
    except FormatError:
        whole = None
    if whole is None:
        with pytest.raises(FormatError):
            _chunked(enc.coding, count, enc.rice_k, payload, numel, 16)
    else:
        assert torch.equal(_chunked(enc.coding, count, enc.rice_k, payload, numel, 16), whole)


def test_bad_arguments() -> None:
    payload = torch.zeros(2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="multiple of 8"):
        iter_positions(PositionCoding.BITMAP, 0, 0, payload, 16, 12)
    with pytest.raises(FormatError, match="Rice parameter"):
        iter_positions(PositionCoding.RICE, 1, 31, payload, 16, 8)
    with pytest.raises(FormatError, match="out of range"):
        iter_positions(PositionCoding.BITMAP, 17, 0, payload, 16, 8)
