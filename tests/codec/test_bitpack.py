"""Bit packing: exact round trips, the documented bit order, hostile input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.codec import bitpack
from fedsqueeze.codec.bitpack import SUPPORTED_BITS, pack_bits, packed_size, unpack_bits
from fedsqueeze.errors import FormatError


def reference_pack(codes: list[int], bits: int) -> bytes:
    """Bit-by-bit packer: code i at stream bits [i·bits, (i+1)·bits), LSB first."""
    out = bytearray(packed_size(len(codes), bits))
    for i, value in enumerate(codes):
        for b in range(bits):
            if value >> b & 1:
                pos = i * bits + b
                out[pos // 8] |= 1 << (pos % 8)
    return bytes(out)


@st.composite
def codes_and_bits(draw: st.DrawFn) -> tuple[list[int], int]:
    bits = draw(st.sampled_from(SUPPORTED_BITS))
    codes = draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=100))
    return codes, bits


@settings(max_examples=150, deadline=None)
@given(codes_and_bits())
def test_round_trip_and_bit_order(case: tuple[list[int], int]) -> None:
    codes, bits = case
    t = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_bits(t, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_size(len(codes), bits)
    assert bytes(packed.numpy().tobytes()) == reference_pack(codes, bits)
    assert torch.equal(unpack_bits(packed, bits, len(codes)), t)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_large_round_trip(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (100_003,), dtype=torch.uint8, generator=g)
    codes_before = codes.clone()
    packed = pack_bits(codes, bits)
    assert torch.equal(codes, codes_before)  # input untouched
    assert torch.equal(unpack_bits(packed.clone(), bits, codes.numel()), codes)


@pytest.mark.parametrize("bits", (1, 2, 4))
def test_torch_path_matches_default(bits: int) -> None:
    # The shift-and-OR path is what CUDA uses for 1 bit; the CPU uses numpy there.
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 1 << bits, (1001,), dtype=torch.uint8, generator=g)
    packed = bitpack._pack_divisor(codes, bits)
    assert torch.equal(packed, pack_bits(codes, bits))
    assert torch.equal(bitpack._unpack_divisor(packed, bits, 1001), codes)


def test_eight_bits_is_identity() -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    assert pack_bits(codes, 8) is codes
    assert torch.equal(unpack_bits(codes, 8, 256), codes)


def test_caller_mistakes_raise_value_error() -> None:
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([1], dtype=torch.int64), 2)
    with pytest.raises(ValueError):
        pack_bits(torch.zeros((2, 2), dtype=torch.uint8), 2)
    with pytest.raises(ValueError):
        pack_bits(torch.zeros(3, dtype=torch.uint8), 5)
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(3, dtype=torch.int32), 2, 12)


def test_malformed_streams_raise_format_error() -> None:
    packed = pack_bits(torch.tensor([1, 2, 3], dtype=torch.uint8), 2)  # 6 bits: 1 byte
    with pytest.raises(FormatError, match="need"):
        unpack_bits(packed[:0], 2, 3)  # short
    with pytest.raises(FormatError, match="need"):
        unpack_bits(torch.cat([packed, packed]), 2, 3)  # trailing byte
    with pytest.raises(FormatError, match="padding"):
        unpack_bits(packed | 0x80, 2, 3)  # a set padding bit
    with pytest.raises(FormatError):
        unpack_bits(packed, 5, 1)
    with pytest.raises(FormatError):
        unpack_bits(packed, 2, -1)


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=64),
    st.integers(-2, 9),
    st.integers(-5, 600),
)
def test_hostile_input_raises_only_format_error(data: bytes, bits: int, count: int) -> None:
    packed = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.zeros(0, dtype=torch.uint8)
    )
    try:
        codes = unpack_bits(packed, bits, count)
    except FormatError:
        return
    assert codes.numel() == count
    assert bool((codes.to(torch.int64) < (1 << bits)).all())
    assert torch.equal(pack_bits(codes.clone(), bits), packed)  # canonical: re-encodes equal


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_cuda_round_trip(bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (10_001,), dtype=torch.uint8, device="cuda")
    packed = pack_bits(codes, bits)
    assert packed.device.type == "cuda"
    assert torch.equal(packed.cpu(), pack_bits(codes.cpu(), bits))
    assert torch.equal(unpack_bits(packed, bits, codes.numel()), codes)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("n", [1 << 16, (1 << 16) + 3, 2_500_001])  # the compiled path
def test_many_codes_pack_as_the_torch_path_does(bits: int, n: int) -> None:
    """Many codes on the CPU go through the compiled kernel in chunks on the worker
    threads: the same bytes as the shifted views (and the reference on a slice)."""
    g = torch.Generator().manual_seed(n + bits)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.uint8)
    got = pack_bits(codes, bits)
    want = bitpack._pack_divisor(codes, bits)
    assert torch.equal(got, want)
    head = codes[:40].tolist()
    assert bytes(got[: packed_size(40, bits)].tolist()) == reference_pack(head, bits)
    assert torch.equal(unpack_bits(got, bits, n), codes)
