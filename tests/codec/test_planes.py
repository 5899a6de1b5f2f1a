"""Byte planes split out of float words and joined back; bits helpers for lossless deltas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.codec import entropy
from fedsqueeze.codec.bits import all_zero_bits, as_bits, xor_bits, xor_into
from fedsqueeze.codec.planes import BLOCK, PlaneLayout, join_planes, split_planes

_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_LAYOUTS = [PlaneLayout(w, s) for w in (2, 4, 8) for s in (False, True) if not (w == 8 and s)]


def _words(width: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, n * width, dtype=np.uint8).view(_UINT[width])


@settings(max_examples=60, deadline=None)
@given(layout=st.sampled_from(_LAYOUTS), n=st.integers(0, 3000), seed=st.integers(0, 2**16))
def test_planes_join_back_to_the_same_words(layout: PlaneLayout, n: int, seed: int) -> None:
    words = _words(layout.width, n, seed)
    planes = {k: np.empty(n, dtype=np.uint8) for k in range(layout.width)}
    split_planes(words, planes, layout)
    out = np.empty(n, dtype=layout.uint)
    join_planes([planes[k] for k in range(layout.width)], layout, out)
    assert np.array_equal(out, words)


@pytest.mark.parametrize("layout", _LAYOUTS)
def test_planes_across_block_boundaries(layout: PlaneLayout) -> None:
    n = 2 * BLOCK + 3
    words = _words(layout.width, n, 7)
    planes = {k: np.empty(n, dtype=np.uint8) for k in reversed(range(layout.width))}
    split_planes(words, planes, layout)
    out = np.empty(n, dtype=layout.uint)
    join_planes([planes[k] for k in range(layout.width)], layout, out)
    assert np.array_equal(out, words)


def test_plane_contents() -> None:
    # fp32, swapped: plane 0 is the whole exponent, plane 1 the sign and 7 mantissa bits.
    x = torch.tensor([-1.5, 2.0**-126, float("nan"), -0.0, 3.0])
    words = x.view(torch.int32).numpy().view(np.uint32)
    planes = {k: np.empty(5, dtype=np.uint8) for k in range(4)}
    split_planes(words, planes, PlaneLayout(4, True))
    assert planes[0].tolist() == [((w >> 23) & 0xFF) for w in words.tolist()]
    assert planes[1].tolist() == [((w >> 24) & 0x80) | ((w >> 16) & 0x7F) for w in words.tolist()]
    assert planes[3].tolist() == [w & 0xFF for w in words.tolist()]
    # fp16, unswapped: the plain bytes, most significant first.
    h = torch.tensor([1.0, -2.5], dtype=torch.float16).view(torch.int16).numpy().view(np.uint16)
    hp = {k: np.empty(2, dtype=np.uint8) for k in range(2)}
    split_planes(h, hp, PlaneLayout(2, False))
    assert hp[0].tolist() == [w >> 8 for w in h.tolist()]


def test_layout_refuses_other_widths() -> None:
    with pytest.raises(ValueError):
        PlaneLayout(3, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_xor_bits_matches_torch_and_undoes_itself(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, generator=g).to(dtype)
    b = torch.where(torch.rand(1000, generator=g) < 0.9, a, torch.randn(1000).to(dtype))
    b[3] = -0.0
    b[5] = float("nan")
    x = xor_bits(a, b)
    assert torch.equal(x, as_bits(a) ^ as_bits(b))
    back = x.view(dtype).clone()
    xor_into(back, b)
    assert torch.equal(as_bits(back), as_bits(a))


def test_all_zero_bits() -> None:
    zeros = torch.zeros(10_000, dtype=torch.int32)
    assert all_zero_bits(zeros)
    late = zeros.clone()
    late[-1] = 1  # past the early probe
    assert not all_zero_bits(late)
    assert not all_zero_bits(as_bits(torch.tensor([0.0, -0.0])))  # -0.0 has a bit set
    assert all_zero_bits(torch.zeros(0, dtype=torch.int16))
    with pytest.raises(TypeError):
        all_zero_bits(torch.zeros(3))


def test_xor_into_refuses_mismatched_inputs() -> None:
    with pytest.raises(TypeError):
        xor_into(torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError):
        xor_into(torch.zeros(3), torch.zeros(3, dtype=torch.float16))
    with pytest.raises(ValueError):
        xor_into(torch.zeros(4, 2).t(), torch.zeros(2, 4))


def test_entropy_estimate_is_exact_when_small_and_close_when_sampled() -> None:
    small = (torch.arange(4000, dtype=torch.float32) / 7).numpy().tobytes()
    packed = entropy.compress(small, 3)
    assert packed is not None and entropy.estimate(small, 3) == len(packed)
    g = torch.Generator().manual_seed(0)
    weights = (torch.randn(1 << 18, generator=g) * 0.05).numpy().tobytes()
    whole = entropy.compress(weights, 3)
    size = len(whole) if whole is not None else len(weights)
    assert abs(entropy.estimate(weights, 3) - size) < 0.05 * size
    assert entropy.estimate(weights, 0) == len(weights)  # entropy coding off


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_nonfinite_values_past_the_first_block_are_found(dtype: torch.dtype) -> None:
    from fedsqueeze.codec.finite import count_nonfinite

    x = torch.zeros(300_001, dtype=dtype)
    assert count_nonfinite(x) is None
    x[-1] = float("-inf")
    assert count_nonfinite(x) == "1 Inf value"
