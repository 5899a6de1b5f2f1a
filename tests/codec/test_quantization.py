"""Quantization: error bounds, unbiased stochastic rounding, params and their bytes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.codec.quantization import (
    QuantParams,
    choose_qparams,
    dequantize,
    qparams_from_bytes,
    qparams_to_bytes,
    quantize,
)
from fedsqueeze.codec.spec import Granularity, QuantScheme, Rounding
from fedsqueeze.errors import FormatError

# Block-wise granularity has its own tests (test_blockwise.py).
CHANNEL_GRANULARITIES = [Granularity.PER_TENSOR, Granularity.PER_CHANNEL]
LINEAR = [QuantScheme.AFFINE, QuantScheme.SYMMETRIC, QuantScheme.POW2]
BITS = [2, 3, 4, 8]
PARAM_BYTES = {QuantScheme.AFFINE: 5, QuantScheme.SYMMETRIC: 4, QuantScheme.POW2: 1}


def sample(
    n: int, seed: int, spread: float = 1.0, channels: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=g) * spread
    ch = torch.randint(channels, (n,), generator=g)
    # Give channels very different ranges, as real weights have.
    values = values * (1.0 + ch.to(torch.float32)) ** 2
    return values, ch


def per_value(t: torch.Tensor, ch: torch.Tensor) -> torch.Tensor:
    return t[ch] if t.dim() else t.expand(ch.shape)


@settings(max_examples=120, deadline=None)
@given(
    st.sampled_from(LINEAR),
    st.sampled_from(CHANNEL_GRANULARITIES),
    st.sampled_from(BITS),
    st.integers(0, 2000),
    st.integers(0, 2**31),
    st.sampled_from([1e-30, 1e-3, 1.0, 1e4]),
)
def test_nearest_error_at_most_half_a_step(
    scheme: QuantScheme, gran: Granularity, bits: int, n: int, seed: int, spread: float
) -> None:
    per_channel = gran is Granularity.PER_CHANNEL
    c = 5 if per_channel else 1
    x, ch = sample(n, seed, spread, c)
    before = x.clone()
    qp = choose_qparams(x, bits, scheme, gran, ch if per_channel else None, c)
    assert qp.scale.shape == ((c,) if per_channel else ())
    assert bool((torch.isfinite(qp.scale) & (qp.scale > 0)).all())
    codes = quantize(x, qp, Rounding.NEAREST, ch if per_channel else None)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    lowest = 0 if scheme is QuantScheme.AFFINE else 1
    if n:
        assert int(codes.min()) >= lowest and int(codes.max()) <= (1 << bits) - 1
    y = dequantize(codes, qp, ch if per_channel else None)
    assert y.dtype == torch.float32
    step = per_value(qp.scale, ch)
    # Half a step, plus float32 rounding of the values involved.
    bound = step / 2 * (1 + 1e-6) + 1e-6 * x.abs()
    assert bool(((y - x).abs() <= bound).all())
    assert torch.equal(x, before)
    if scheme is QuantScheme.AFFINE:  # zero is exactly representable
        zero = per_value(qp.zero_point, ch)
        assert bool((zero == zero.round()).all())


@pytest.mark.parametrize("scheme", LINEAR)
@pytest.mark.parametrize("bits", [2, 4])
def test_stochastic_rounding_is_unbiased(scheme: QuantScheme, bits: int) -> None:
    data = torch.tensor([-1.0, 0.3, 1.0])
    qp = choose_qparams(data, bits, scheme, Granularity.PER_TENSOR)
    # Unbiased inside the representable range (the affine zero point's rounding can
    # leave up to half a step of [min, max] outside it, where codes clamp).
    lowest = 0 if scheme is QuantScheme.AFFINE else 1
    lo = float(qp.scale * (lowest - qp.zero_point))
    hi = float(qp.scale * ((1 << bits) - 1 - qp.zero_point))
    x = torch.linspace(max(lo, -1.0), min(hi, 1.0), 41)
    draws = 4000
    gen = torch.Generator().manual_seed(bits)
    codes = quantize(x.repeat(draws), qp, Rounding.STOCHASTIC, generator=gen)
    mean = dequantize(codes, qp).view(draws, -1).mean(0)
    # Each draw is within one step of x, so the mean's standard error is < step/(2·√draws).
    tolerance = 5 * float(qp.scale) / (2 * math.sqrt(draws))
    assert float((mean - x).abs().max()) < tolerance
    # A seeded generator makes the draws reproducible.
    again = quantize(
        x.repeat(draws), qp, Rounding.STOCHASTIC, generator=torch.Generator().manual_seed(bits)
    )
    assert torch.equal(codes, again)


def test_stochastic_rounding_per_channel_and_kmeans_is_unbiased() -> None:
    data, data_ch = sample(60, 3, 0.5, 3)
    qp = choose_qparams(data, 3, QuantScheme.AFFINE, Granularity.PER_CHANNEL, data_ch, 3)
    # Keep the values inside their channel's representable range (see the test above).
    scale, zp = qp.scale[data_ch], qp.zero_point[data_ch]
    inside = (data >= scale * -zp) & (data <= scale * (7 - zp))
    x, ch = data[inside], data_ch[inside]
    assert x.numel() >= 50
    draws = 3000
    gen = torch.Generator().manual_seed(0)
    codes = quantize(x.repeat(draws), qp, Rounding.STOCHASTIC, ch.repeat(draws), gen)
    mean = dequantize(codes, qp, ch.repeat(draws)).view(draws, -1).mean(0)
    assert bool(((mean - x).abs() < 5 * qp.scale[ch] / (2 * math.sqrt(draws))).all())

    values = torch.randn(2000, generator=torch.Generator().manual_seed(1))
    km = choose_qparams(values, 3, QuantScheme.KMEANS, Granularity.PER_TENSOR)
    assert km.codebook is not None
    inside = torch.linspace(float(km.codebook[0]), float(km.codebook[-1]), 25)
    codes = quantize(inside.repeat(draws), km, Rounding.STOCHASTIC, generator=gen)
    mean = dequantize(codes, km).view(draws, -1).mean(0)
    assert float((mean - inside).abs().max()) < 5 * float(km.scale) / (2 * math.sqrt(draws))


@pytest.mark.parametrize("bits", BITS)
def test_pow2_scale_is_a_power_of_two_not_below_symmetric(bits: int) -> None:
    x, ch = sample(500, bits, 0.37, 4)
    for gran in CHANNEL_GRANULARITIES:
        args = (ch, 4) if gran is Granularity.PER_CHANNEL else (None, 1)
        pow2 = choose_qparams(x, bits, QuantScheme.POW2, gran, *args)
        sym = choose_qparams(x, bits, QuantScheme.SYMMETRIC, gran, *args)
        assert pow2.shift is not None and pow2.shift.dtype == torch.int32
        mantissa, _ = torch.frexp(pow2.scale)
        assert bool((mantissa == 0.5).all())
        assert torch.equal(pow2.scale, torch.ldexp(torch.ones(()), -pow2.shift.to(torch.float32)))
        assert bool((pow2.scale >= sym.scale).all()) and bool((pow2.scale < 2 * sym.scale).all())


@pytest.mark.parametrize("scheme", [*LINEAR, QuantScheme.KMEANS])
@pytest.mark.parametrize(
    "values",
    [[], [0.0], [0.0] * 7, [3.5], [-2.0], [1e-40, -1e-40], [2.0**126, -(2.0**126)], [1.0] * 5],
)
def test_degenerate_inputs_give_valid_params(scheme: QuantScheme, values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    qp = choose_qparams(x, 4, scheme, Granularity.PER_TENSOR)
    assert bool(torch.isfinite(qp.scale)) and float(qp.scale) > 0
    y = dequantize(quantize(x, qp, Rounding.NEAREST), qp)
    assert bool(torch.isfinite(y).all())
    if scheme is not QuantScheme.KMEANS:
        assert bool(((y - x).abs() <= qp.scale / 2 * (1 + 1e-6) + 1e-6 * x.abs()).all())
    _, end = qparams_from_bytes(qparams_to_bytes(qp), 0, 4, scheme, 1)
    assert end == len(qparams_to_bytes(qp))


def test_empty_channels_get_unit_scale_and_middle_zero_point() -> None:
    x = torch.tensor([1.0, -2.0, 0.5])
    ch = torch.tensor([0, 0, 2])
    qp = choose_qparams(x, 8, QuantScheme.AFFINE, Granularity.PER_CHANNEL, ch, 4)
    assert qp.scale[1] == 1.0 and qp.scale[3] == 1.0
    assert qp.zero_point[1] == 128.0 and qp.zero_point[3] == 128.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 2.0**126 * 1.01])
def test_non_finite_values_raise_value_error(bad: float) -> None:
    x = torch.tensor([1.0, bad, 2.0])
    for scheme in [*LINEAR, QuantScheme.KMEANS]:
        with pytest.raises(ValueError, match="finite"):
            choose_qparams(x, 4, scheme, Granularity.PER_TENSOR)
    with pytest.raises(ValueError, match="finite"):
        choose_qparams(
            x, 4, QuantScheme.AFFINE, Granularity.PER_CHANNEL, torch.tensor([0, 1, 1]), 2
        )


def test_caller_mistakes_raise_value_error() -> None:
    x = torch.randn(10)
    per_tensor = Granularity.PER_TENSOR
    with pytest.raises(ValueError):
        choose_qparams(x, 1, QuantScheme.AFFINE, per_tensor)
    with pytest.raises(ValueError):
        choose_qparams(x.view(2, 5), 4, QuantScheme.AFFINE, per_tensor)
    with pytest.raises(ValueError):
        choose_qparams(x, 4, QuantScheme.AFFINE, Granularity.PER_CHANNEL)  # no channels
    with pytest.raises(ValueError):
        choose_qparams(x, 4, QuantScheme.AFFINE, Granularity.PER_CHANNEL, torch.full((10,), 3), 3)
    with pytest.raises(ValueError):
        choose_qparams(
            x, 4, QuantScheme.KMEANS, Granularity.PER_CHANNEL, torch.zeros(10, dtype=torch.int64), 1
        )
    qp = choose_qparams(
        x, 4, QuantScheme.AFFINE, Granularity.PER_CHANNEL, torch.zeros(10, dtype=torch.int64), 2
    )
    with pytest.raises(ValueError):
        quantize(x, qp, Rounding.NEAREST)  # per-channel params need channels
    with pytest.raises(ValueError):
        dequantize(torch.zeros(10, dtype=torch.int32), qp)
    with pytest.raises(ValueError):
        QuantParams(4, QuantScheme.POW2, torch.ones(()), torch.ones(()))  # no shift
    one = torch.ones(())
    for bad in (
        QuantParams(4, QuantScheme.AFFINE, one, torch.tensor(16.0)),
        QuantParams(4, QuantScheme.AFFINE, one, torch.tensor(2.5)),
        QuantParams(4, QuantScheme.SYMMETRIC, torch.tensor(0.0), one),
        QuantParams(2, QuantScheme.KMEANS, one, one, codebook=torch.tensor([0.0, 0.1, 1.0, 2.0])),
    ):
        with pytest.raises(ValueError):
            qparams_to_bytes(bad)


@pytest.mark.parametrize("scheme", [*LINEAR, QuantScheme.KMEANS])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gran", CHANNEL_GRANULARITIES)
def test_params_bytes_round_trip(scheme: QuantScheme, bits: int, gran: Granularity) -> None:
    if scheme is QuantScheme.KMEANS and gran is Granularity.PER_CHANNEL:
        return
    c = 6 if gran is Granularity.PER_CHANNEL else 1
    x, ch = sample(300, bits, 0.2, c)
    qp = choose_qparams(x, bits, scheme, gran, ch if c > 1 else None, c)
    blob = qparams_to_bytes(qp)
    expected = 2 << bits if scheme is QuantScheme.KMEANS else PARAM_BYTES[scheme] * c
    assert len(blob) == expected
    prefix = b"\x99" * 3
    qp2, end = qparams_from_bytes(memoryview(prefix + blob + b"tail"), 3, bits, scheme, c)
    assert end == 3 + len(blob)
    assert (qp2.bits, qp2.scheme) == (bits, scheme)
    assert torch.equal(qp2.scale, qp.scale)
    assert torch.equal(qp2.zero_point, qp.zero_point)
    for a, b in ((qp.shift, qp2.shift), (qp.codebook, qp2.codebook)):
        assert (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
    codes = quantize(x, qp, Rounding.NEAREST, ch if c > 1 else None)
    assert torch.equal(dequantize(codes, qp2, ch), dequantize(codes, qp, ch))


def test_malformed_params_raise_format_error() -> None:
    affine = QuantScheme.AFFINE
    good = qparams_to_bytes(choose_qparams(torch.randn(50), 4, affine, Granularity.PER_TENSOR))
    with pytest.raises(FormatError, match="truncated"):
        qparams_from_bytes(good[:-1], 0, 4, affine, 1)
    with pytest.raises(FormatError, match="truncated"):
        qparams_from_bytes(good, 1, 4, affine, 1)
    for scale in (float("nan"), float("inf"), 0.0, -1.0):
        blob = torch.tensor([scale]).numpy().astype("<f4").tobytes() + b"\x03"
        with pytest.raises(FormatError, match="scale"):
            qparams_from_bytes(blob, 0, 4, affine, 1)
    with pytest.raises(FormatError, match="zero point"):
        qparams_from_bytes(good[:4] + b"\x10", 0, 4, affine, 1)
    with pytest.raises(FormatError, match="shift"):
        qparams_from_bytes(bytes([127]), 0, 4, QuantScheme.POW2, 1)
    # Every code must dequantize to a finite float32, even ones an encoder never emits.
    with pytest.raises(FormatError, match="float32 range"):
        qparams_from_bytes(bytes([256 - 126]), 0, 8, QuantScheme.POW2, 1)  # 128 · 2^126
    huge = torch.tensor([1e38]).numpy().astype("<f4").tobytes()
    with pytest.raises(FormatError, match="float32 range"):
        qparams_from_bytes(huge, 0, 3, QuantScheme.SYMMETRIC, 1)
    with pytest.raises(FormatError, match="float32 range"):
        qparams_from_bytes(huge + b"\x00", 0, 3, QuantScheme.AFFINE, 1)
    unsorted = torch.tensor([1.0, 0.0, 2.0, 3.0]).numpy().astype("<f2").tobytes()
    with pytest.raises(FormatError, match="codebook"):
        qparams_from_bytes(unsorted, 0, 2, QuantScheme.KMEANS, 1)
    with pytest.raises(FormatError):
        qparams_from_bytes(good, 0, 9, affine, 1)
    with pytest.raises(FormatError):
        qparams_from_bytes(good, 0, 4, affine, 0)
    with pytest.raises(FormatError):
        qparams_from_bytes(good * 8, 0, 2, QuantScheme.KMEANS, 2)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=80),
    st.integers(0, 4),
    st.integers(0, 10),
    st.sampled_from([*LINEAR, QuantScheme.KMEANS]),
    st.integers(-1, 20),
)
def test_random_param_bytes_raise_only_format_error(
    data: bytes, offset: int, bits: int, scheme: QuantScheme, num_params: int
) -> None:
    try:
        qp, end = qparams_from_bytes(data, offset, bits, scheme, num_params)
    except FormatError:
        return
    assert offset < end <= len(data)
    assert bool((torch.isfinite(qp.scale) & (qp.scale > 0)).all())
    codes = torch.arange(1 << bits, dtype=torch.uint8)
    channels = torch.zeros(codes.numel(), dtype=torch.int64)
    assert bool(torch.isfinite(dequantize(codes, qp, channels)).all())


def test_kmeans_dequantize_rejects_out_of_range_codes() -> None:
    qp = choose_qparams(torch.randn(100), 2, QuantScheme.KMEANS, Granularity.PER_TENSOR)
    with pytest.raises(FormatError):
        dequantize(torch.tensor([0, 4], dtype=torch.uint8), qp)


def test_large_tensor_is_processed_in_chunks() -> None:
    x = torch.randn(2_500_003, generator=torch.Generator().manual_seed(0))
    qp = choose_qparams(x, 8, QuantScheme.AFFINE, Granularity.PER_TENSOR)
    y = dequantize(quantize(x, qp, Rounding.NEAREST), qp)
    assert float((y - x).abs().max()) <= float(qp.scale) / 2 * (1 + 1e-6) + 1e-6 * float(
        x.abs().max()
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", [*LINEAR, QuantScheme.KMEANS])
def test_cuda_round_trip(scheme: QuantScheme) -> None:
    x, _ = sample(100_000, 5, 0.1, 1)
    xc = x.cuda()
    qp = choose_qparams(xc, 4, scheme, Granularity.PER_TENSOR)
    assert qp.scale.device.type == "cuda"
    codes = quantize(xc, qp, Rounding.NEAREST)
    assert codes.device.type == "cuda"
    qp2, _ = qparams_from_bytes(qparams_to_bytes(qp), 0, 4, scheme, 1)
    y = dequantize(codes, qp2)  # CPU params, CUDA codes
    assert y.device.type == "cuda"
    if scheme is not QuantScheme.KMEANS:
        assert float((y - xc).abs().max()) <= float(qp.scale) / 2 * (1 + 1e-6) + 1e-5
    gen = torch.Generator(device="cuda").manual_seed(0)
    stochastic = quantize(xc, qp, Rounding.STOCHASTIC, generator=gen)
    assert stochastic.device.type == "cuda"


def test_codes_beyond_float32_are_refused_pair_by_pair() -> None:
    """Parameters read from a stream: refused exactly when some code of some block
    dequantizes beyond float32's range (its scale times its zero point's farther
    reach), whether the quick bound (largest scale times farthest reach) settles it or
    each pair must be looked at."""
    import numpy as np

    from fedsqueeze.codec.quantization import _check_codes_finite

    top = float(np.finfo(np.float32).max)
    ok_scale = np.array([1.0, 2.0, 3.0], np.float32)
    _check_codes_finite(ok_scale, np.array([0.0, 128.0, 255.0], np.float32), 8)  # the bound
    # Largest scale and farthest reach in different blocks: the bound fails, no pair does.
    big = np.float32(top / 128)
    _check_codes_finite(np.array([big, 1.0], np.float32), np.array([128.0, 0.0], np.float32), 8)
    with pytest.raises(FormatError, match="beyond the float32 range"):  # one pair does
        _check_codes_finite(np.array([big, 1.0], np.float32), np.array([0.0, 0.0], np.float32), 8)
    with pytest.raises(FormatError, match="beyond the float32 range"):  # a NaN scale: exact path
        _check_codes_finite(
            np.array([np.nan, big], np.float32), np.array([0.0, 0.0], np.float32), 8
        )
    _check_codes_finite(np.array([big], np.float32), 128.0, 8)  # a scalar zero point
