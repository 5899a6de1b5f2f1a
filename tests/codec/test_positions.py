"""Position coding: exact round trips, the smaller coding and the best Rice k, hostile input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.codec.positions import (
    MAX_RICE_K,
    PositionCoding,
    decode_positions,
    encode_positions,
    indices_to_mask,
    mask_to_indices,
)
from fedsqueeze.errors import FormatError


def rice_size(indices: list[int], k: int) -> int:
    """Bytes of both Rice streams, computed the slow way."""
    gaps = [i - p - 1 for i, p in zip(indices, [-1, *indices], strict=False)]
    remainder_bits = len(gaps) * k
    unary_bits = sum((g >> k) + 1 for g in gaps)
    return (remainder_bits + 7) // 8 + (unary_bits + 7) // 8


@st.composite
def index_sets(draw: st.DrawFn) -> tuple[list[int], int]:
    numel = draw(st.integers(0, 3000))
    if numel == 0:
        return [], 0
    density = draw(st.sampled_from([0.0, 0.001, 0.02, 0.1, 0.5, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(numel, generator=g) < density
    return mask_to_indices(mask).tolist(), numel


@settings(max_examples=150, deadline=None)
@given(index_sets())
def test_round_trip_and_smallest_coding(case: tuple[list[int], int]) -> None:
    indices, numel = case
    idx = torch.tensor(indices, dtype=torch.int64)
    enc = encode_positions(idx, numel)
    assert enc.count == len(indices)
    assert enc.payload.dtype == torch.uint8
    decoded = decode_positions(enc.coding, enc.count, enc.rice_k, enc.payload, numel)
    assert torch.equal(decoded, idx)
    bitmap = (numel + 7) // 8
    best_rice = min(rice_size(indices, k) for k in range(MAX_RICE_K + 1))
    assert enc.payload.numel() == min(bitmap, best_rice)
    if enc.coding is PositionCoding.RICE:
        assert rice_size(indices, enc.rice_k) == best_rice < bitmap
    else:
        assert bitmap <= best_rice and enc.rice_k == 0


def test_sparse_positions_cost_about_six_bits_each() -> None:
    g = torch.Generator().manual_seed(0)
    numel = 1_000_000
    idx = mask_to_indices(torch.rand(numel, generator=g) < 0.05)
    enc = encode_positions(idx, numel)
    assert enc.coding is PositionCoding.RICE
    bits_per_position = 8 * enc.payload.numel() / idx.numel()
    # Entropy of the geometric gaps at p = 0.05 is 5.69 bits; varints would need 8+.
    assert bits_per_position < 6.0
    assert torch.equal(decode_positions(enc.coding, enc.count, enc.rice_k, enc.payload, numel), idx)


def test_dense_positions_use_a_bitmap() -> None:
    idx = torch.arange(0, 1000, 2)
    enc = encode_positions(idx, 1000)
    assert enc.coding is PositionCoding.BITMAP
    assert enc.payload.numel() == 125


def test_mask_helpers_round_trip() -> None:
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(4, 5, 6, generator=g) < 0.3
    idx = mask_to_indices(mask)
    assert idx.dtype == torch.int64
    assert torch.equal(indices_to_mask(idx, mask.numel()).view(mask.shape), mask)
    with pytest.raises(ValueError):
        indices_to_mask(torch.tensor([5]), 5)
    with pytest.raises(ValueError):
        mask_to_indices(torch.ones(3))


def test_encode_rejects_bad_indices() -> None:
    for bad in ([3, 2], [1, 1], [-1, 2], [0, 10]):
        with pytest.raises(ValueError):
            encode_positions(torch.tensor(bad), 10)
    with pytest.raises(ValueError):
        encode_positions(torch.tensor([1, 2], dtype=torch.int32), 10)


def test_inputs_are_not_modified() -> None:
    idx = torch.tensor([1, 5, 9, 200])
    before = idx.clone()
    enc = encode_positions(idx, 1000)
    payload = enc.payload.clone()
    decode_positions(enc.coding, enc.count, enc.rice_k, enc.payload, 1000)
    assert torch.equal(idx, before) and torch.equal(enc.payload, payload)


def test_malformed_payloads_raise_format_error() -> None:
    idx = torch.tensor([3, 40, 41, 300, 998])
    enc = encode_positions(idx, 1000)
    assert enc.coding is PositionCoding.RICE
    p, k = enc.payload, enc.rice_k
    rice = PositionCoding.RICE
    with pytest.raises(FormatError, match="out of range"):
        decode_positions(rice, 1001, k, p, 1000)  # count > numel
    with pytest.raises(FormatError, match="Rice parameter"):
        decode_positions(rice, 5, MAX_RICE_K + 1, p, 1000)
    with pytest.raises(FormatError):
        decode_positions(rice, 5, k, p[:-1], 1000)  # short
    with pytest.raises(FormatError):
        decode_positions(rice, 5, k, torch.cat([p, p.new_full((1,), 0xFF)]), 1000)  # trailing
    with pytest.raises(FormatError, match="terminator"):
        decode_positions(rice, 4, k, p, 1000)  # one zero bit too many
    with pytest.raises(FormatError, match="out of range"):
        decode_positions(rice, 5, k, p, 998)  # last index past numel
    with pytest.raises(FormatError):
        decode_positions(rice, 0, 0, p, 1000)
    bitmap = encode_positions(torch.arange(0, 10, 2), 10)
    assert bitmap.coding is PositionCoding.BITMAP
    bm = PositionCoding.BITMAP
    with pytest.raises(FormatError, match="different number"):
        decode_positions(bm, 4, 0, bitmap.payload, 10)
    with pytest.raises(FormatError):
        decode_positions(bm, 5, 0, bitmap.payload, 8)  # wrong length
    with pytest.raises(FormatError, match="padding"):
        padded = torch.tensor([0x01, 0x10], dtype=torch.uint8)  # bit 12 of 9
        decode_positions(bm, 2, 0, padded, 9)
    with pytest.raises(FormatError):
        decode_positions(bm, 5, 3, bitmap.payload, 10)


def test_huge_claimed_count_does_not_allocate() -> None:
    # A tiny payload claiming 2^40 positions of a 2^41-element tensor fails up front.
    with pytest.raises(FormatError, match="too short"):
        decode_positions(
            PositionCoding.RICE, 1 << 40, 0, torch.zeros(4, dtype=torch.uint8), 1 << 41
        )


def _check_decoded(out: torch.Tensor, count: int, numel: int) -> None:
    assert out.dtype == torch.int64 and out.numel() == count
    if count:
        assert int(out[0]) >= 0 and int(out[-1]) < numel
        assert bool((torch.diff(out) > 0).all())


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=48),
    st.sampled_from(list(PositionCoding)),
    st.integers(-1, 400),
    st.integers(-1, 32),
    st.integers(0, 400),
)
def test_random_payloads_raise_only_format_error(
    data: bytes, coding: PositionCoding, count: int, k: int, numel: int
) -> None:
    payload = torch.tensor(list(data), dtype=torch.uint8)
    try:
        out = decode_positions(coding, count, k, payload, numel)
    except FormatError:
        return
    _check_decoded(out, count, numel)


@settings(max_examples=200, deadline=None)
@given(index_sets(), st.integers(0, 2**31), st.sampled_from(["flip", "cut", "extend", "count"]))
def test_mutated_payloads_raise_only_format_error(
    case: tuple[list[int], int], seed: int, how: str
) -> None:
    indices, numel = case
    enc = encode_positions(torch.tensor(indices, dtype=torch.int64), numel)
    payload = enc.payload.clone()
    count = enc.count
    g = torch.Generator().manual_seed(seed)
    if how == "flip" and payload.numel():
        at = int(torch.randint(payload.numel(), (1,), generator=g))
        payload[at] ^= 1 << int(torch.randint(8, (1,), generator=g))
    elif how == "cut":
        payload = payload[: int(torch.randint(payload.numel() + 1, (1,), generator=g))]
    elif how == "extend":
        payload = torch.cat([payload, torch.randint(256, (2,), generator=g).to(torch.uint8)])
    else:
        count += int(torch.randint(-2, 3, (1,), generator=g))
    try:
        out = decode_positions(enc.coding, count, enc.rice_k, payload, numel)
    except FormatError:
        return
    _check_decoded(out, count, numel)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("density", [0.01, 0.05, 0.6])
def test_cuda_round_trip(density: float) -> None:
    mask = torch.rand(200_001, device="cuda") < density
    idx = mask_to_indices(mask)
    enc = encode_positions(idx, mask.numel())
    assert enc.payload.device.type == "cuda"
    cpu = encode_positions(idx.cpu(), mask.numel())
    assert (enc.coding, enc.rice_k) == (cpu.coding, cpu.rice_k)
    assert torch.equal(enc.payload.cpu(), cpu.payload)
    out = decode_positions(enc.coding, enc.count, enc.rice_k, enc.payload, mask.numel())
    assert torch.equal(out, idx)
