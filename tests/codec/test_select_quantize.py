"""The quantizer and top-k's residual in the magnitude selection's second pass
(fedsqueeze.codec.select_quantize): the same bytes and residual as the separate passes,
taken where the kept range is known from the first pass and left alone elsewhere; and
stochastic rounding's keyed draws (fedsqueeze.codec.draws), the same from NumPy, the
compiled kernel and torch."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.codec import draws, jit, jit_select, pruning, select_quantize, threshold_select
from fedsqueeze.codec.model import encode_state
from fedsqueeze.codec.pruning import count_to_prune, prepare_selection
from fedsqueeze.codec.quantization import choose_qparams, linear_bounds, quantize
from fedsqueeze.codec.spec import Granularity, QuantScheme, QuantSpec, Rounding
from fedsqueeze.codec.spec_text import parse_spec

LARGE = pruning._SAMPLE_ABOVE + 4097  # the two-pass selection's size
MANY = 3 * threshold_select.CHUNK + 4097  # the two-pass selection over several chunks
NAME = "layer.weight"  # a name every spec here targets

SPECS = [
    "topk10-int4",  # stochastic, affine
    "topk=0.1,quant=4",
    "topk=0.05,quant=8:symmetric:stochastic",
    "topk=0.2,quant=3:pow2",
    "prune=l1:0.9,quant=4",  # no error feedback
]


class Spy:
    """Counts the fused pass's outcomes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.taken = self.declined = 0
        real = select_quantize.select_quantized

        def spy(*args: Any, **kwargs: Any) -> select_quantize.Selected | None:
            got = real(*args, **kwargs)
            if got is None:
                self.declined += 1
            else:
                self.taken += 1
            return got

        monkeypatch.setattr(select_quantize, "select_quantized", spy)


@contextlib.contextmanager
def fused(on: bool) -> Iterator[None]:
    saved = select_quantize.ENABLED
    select_quantize.ENABLED = on
    try:
        yield
    finally:
        select_quantize.ENABLED = saved


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def both_ways(
    t: torch.Tensor, text: str, base: torch.Tensor | None, residual: torch.Tensor | None
) -> tuple[Any, Any]:
    spec = parse_spec(text)
    kwargs: dict[str, Any] = {"seed": 5}
    if base is not None:
        kwargs["base"] = {NAME: base}
    if residual is not None:
        kwargs["residual"] = {NAME: residual}
    with fused(True):
        a = encode_state({NAME: t}, spec, **kwargs)
    with fused(False):
        b = encode_state({NAME: t}, spec, **kwargs)
    return a, b


def same_outputs(a: Any, b: Any) -> None:
    assert a.to_bytes() == b.to_bytes()
    if b.residual is None:
        assert a.residual is None
        return
    assert a.residual is not None and a.residual.keys() == b.residual.keys()
    for name in b.residual:
        assert torch.equal(bits(a.residual[name]), bits(b.residual[name]))


@pytest.mark.parametrize("text", SPECS)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_the_fused_pass_gives_the_separate_passes_bytes_and_residual(
    text: str, with_base: bool, with_residual: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    g = torch.Generator().manual_seed(len(text))
    t = torch.randn(1024, MANY // 1024 + 1, generator=g)
    base = torch.randn(t.shape, generator=g) * 0.5 if with_base else None
    residual = torch.randn(t.shape, generator=g) * 0.1 if with_residual else None
    held = [x.clone() for x in (t, base, residual) if x is not None]
    a, b = both_ways(t, text, base, residual)
    same_outputs(a, b)
    assert spy.taken == 1  # the fused pass made the first: not a fallback twice
    for old, now in zip(held, [x for x in (t, base, residual) if x is not None], strict=True):
        assert torch.equal(bits(old), bits(now))  # nothing the caller holds changed
    if "topk" in text:  # error feedback: the residual is the input less the decoded
        assert a.residual is not None and a.residual[NAME].shape == t.shape


def test_ties_split_inside_a_chunk_keep_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """Magnitudes on a grid of quarters: the cut's ties span chunks, one of which drops
    some and keeps the rest; the extremes (±40) lie far above the band."""
    spy = Spy(monkeypatch)
    g = torch.Generator().manual_seed(7)
    t = torch.randint(-12, 13, (MANY,), generator=g).to(torch.float32) / 4
    t[100], t[MANY - 100] = 40.0, -40.0
    a, b = both_ways(t.reshape(1, -1), "topk=0.3,quant=4", None, None)
    same_outputs(a, b)
    assert spy.taken == 1


@pytest.mark.parametrize(
    "kind", ["all positive", "one negative near zero", "mostly zeros", "a NaN"]
)
def test_it_declines_where_the_kept_range_is_unknown(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One side's extreme not surely kept, a cut that may be zero (zeros would be kept),
    a value that is not finite: the separate passes run (the same bytes), or the
    encoder refuses as before."""
    spy = Spy(monkeypatch)
    g = torch.Generator().manual_seed(3)
    t = torch.randn(LARGE, generator=g)
    if kind == "all positive":
        t = t.abs() + 0.1
    elif kind == "one negative near zero":
        t = t.abs()
        t[17] = -1e-3
    elif kind == "mostly zeros":
        t[: LARGE * 19 // 20] = 0.0
    else:
        t[17] = float("nan")
    if kind == "a NaN":
        with pytest.raises(ValueError, match=r"NaN|finite"):
            encode_state({NAME: t.reshape(1, -1)}, parse_spec("topk10-int4"), seed=1)
        return
    a, b = both_ways(t.reshape(1, -1), "topk10-int4", None, None)
    same_outputs(a, b)
    assert spy.taken == 0 and spy.declined == 1


def test_a_missed_band_leaves_the_generator_and_the_tensor_alone() -> None:
    """The first pass's band misses the cut (the selection gives up, as it does about
    once in a billion): nothing drawn, nothing written, ``None``."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(LARGE, generator=g)
    prune = count_to_prune(LARGE, 0.9)
    first = threshold_select.first_pass(x.numpy(), 3.0, 3.1)  # the cut is near 1.64
    assert threshold_select.finish(x.numpy(), prune, first) is None
    ends = first.extremes()
    assert ends is not None and -ends[0] > 3.1 and ends[1] > 3.1
    gen = torch.Generator().manual_seed(4)
    state = gen.get_state()
    mine = x.clone()
    quant = QuantSpec(4, rounding=Rounding.STOCHASTIC)
    got = select_quantize.select_quantized(mine, prune, first, quant, gen, True, in_place=True)
    assert got is None
    assert torch.equal(gen.get_state(), state)
    assert torch.equal(bits(mine), bits(x))


def test_refused_quantizers_and_inputs() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(LARGE, generator=g)
    first = prepare_selection(x, 0.9)
    assert first is not None
    prune = count_to_prune(LARGE, 0.9)
    for quant in (
        QuantSpec(4, QuantScheme.NF4, Granularity.PER_BLOCK, block_size=64),
        QuantSpec(3, QuantScheme.KMEANS),
        QuantSpec(8, granularity=Granularity.PER_CHANNEL),
    ):
        assert not select_quantize.applies(quant)
        assert select_quantize.select_quantized(x, prune, first, quant, None, True) is None
    q = QuantSpec(4)
    assert select_quantize.select_quantized(x[:-1], prune, first, q, None, True) is None
    assert select_quantize.select_quantized(x.double(), prune, first, q, None, True) is None
    assert select_quantize.select_quantized(x, 0, first, q, None, True) is None


def test_the_result_is_what_it_says() -> None:
    """Kept positions are the magnitude selection's, codes the quantizer's (nearest
    rounding), and the residual the input less the decoded values."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(LARGE, generator=g)
    first = prepare_selection(x, 0.9)
    assert first is not None
    prune = count_to_prune(LARGE, 0.9)
    got = select_quantize.select_quantized(x, prune, first, QuantSpec(4), None, True)
    assert got is not None and got.residual is not None
    want = pruning.magnitude_indices(x, 0.9)
    assert torch.equal(got.indices, want)
    kept = x[want]
    qp = choose_qparams(kept, 4, QuantScheme.AFFINE, Granularity.PER_TENSOR)
    assert torch.equal(got.qp.scale, qp.scale) and torch.equal(got.qp.zero_point, qp.zero_point)
    assert torch.equal(got.codes, quantize(kept, qp, Rounding.NEAREST))
    _, zp, _, _, scale = linear_bounds(qp)
    decoded = (got.codes.to(torch.float32) - float(zp)) * float(scale)
    expected = x.clone()
    expected[want] = kept - decoded
    assert torch.equal(bits(got.residual), bits(expected))


@contextlib.contextmanager
def small_everything() -> Iterator[None]:
    """The sampled selection and the compiled kernels from 101 values, in chunks of 97
    on two threads (a sample large enough for a band with two ends)."""
    saved = pruning._SAMPLE_ABOVE, pruning._SAMPLE_SIZE, threshold_select.CHUNK
    min_values = jit.MIN_VALUES
    threads = torch.get_num_threads()
    pruning._SAMPLE_ABOVE, pruning._SAMPLE_SIZE, threshold_select.CHUNK = 100, 4096, 97
    jit.MIN_VALUES = 1
    torch.set_num_threads(2)
    try:
        yield
    finally:
        pruning._SAMPLE_ABOVE, pruning._SAMPLE_SIZE, threshold_select.CHUNK = saved
        jit.MIN_VALUES = min_values
        torch.set_num_threads(threads)


TEMPLATES = [
    "topk={keep},quant=4:stochastic",
    "topk={keep},quant=4",
    "topk={keep},quant=8:symmetric:stochastic",
    "topk={keep},quant=3:pow2",
    "prune=l1:{drop},quant=4",
]


@settings(max_examples=40, deadline=None)
@given(
    st.integers(101, 3000),
    st.sampled_from([0.05, 0.2, 0.5]),
    st.sampled_from(["normal", "ties", "skewed"]),
    st.sampled_from(TEMPLATES),
    st.booleans(),
    st.integers(0, 2**31),
)
def test_any_tensor_gives_the_separate_passes_bytes(
    n: int, keep: float, kind: str, template: str, with_base: bool, seed: int
) -> None:
    """Small tensors through the sampled selection and the compiled kernels, in small
    chunks on two threads: ties at the cut, skewed ranges (one side's extreme not
    kept), deltas."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g)
    if kind == "ties":
        t = torch.randint(-3, 4, (n,), generator=g).to(torch.float32)
        t[0], t[1] = 9.0, -9.0
    elif kind == "skewed":
        t = t.abs() * 3 - 0.2
    base = torch.randn(1, n, generator=g) * 0.3 if with_base else None
    text = template.format(keep=keep, drop=round(1 - keep, 2))
    with small_everything():
        a, b = both_ways(t.reshape(1, -1), text, base, None)
    same_outputs(a, b)


def test_small_chunks_take_the_fused_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """The property test above runs the fused pass, not only its fallbacks."""
    spy = Spy(monkeypatch)
    t = torch.randn(1, 3000, generator=torch.Generator().manual_seed(1))
    with small_everything():
        a, b = both_ways(t, "topk=0.2,quant=4:stochastic", None, None)
    same_outputs(a, b)
    assert spy.taken == 1


def test_the_first_pass_knows_each_sides_extreme() -> None:
    x = np.array([0.5, -3.0, 2.0, -0.0, 1.0], dtype=np.float32)
    first = threshold_select.first_pass(x, 0.5, 1.5)
    assert first.extremes() == (-3.0, 2.0)
    assert threshold_select.first_pass(np.abs(x), 0.5, 1.5).extremes() == (-0.0, 3.0)
    assert threshold_select.first_pass(-np.abs(x), 0.5, 1.5).extremes() == (-3.0, 0.0)
    y = x.copy()
    y[2] = np.inf
    assert threshold_select.first_pass(y, 0.5, 1.5).extremes() is None


# ---------------------------------------------------------------------- the draws
def test_the_draws_agree_across_numpy_the_kernel_and_torch() -> None:
    jit.ready()
    for key in (0, 1, 2**62 + 12345, 2**63 - 2):
        for start in (0, 7, 10**9):
            want = draws.uniform_np(key, start, 1000)
            on_torch = draws.uniform_torch(key, start, 1000, torch.device("cpu"))
            assert np.array_equal(on_torch.numpy(), want)
            got = np.zeros(1000, dtype=np.float32)
            jit_select.unit_draws(np.uint64(key), start, got)
            assert np.array_equal(got, want)
            assert torch.equal(draws.uniform(key, start, 1000, torch.device("cpu")), on_torch)
    # a later window is the same numbers as a slice of a longer one
    assert np.array_equal(draws.uniform_np(5, 300, 50), draws.uniform_np(5, 0, 400)[300:350])


def test_the_draws_look_uniform_and_keys_differ() -> None:
    u = draws.uniform_np(123, 0, 1_000_000)
    assert u.dtype == np.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.003  # 5 standard errors (0.289 / 1000)
    counts = np.bincount((u * 16).astype(np.int64), minlength=16)
    assert np.all(np.abs(counts - 62_500) < 5 * 242)  # each bin within 5 sigma
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.005  # neighbours uncorrelated
    assert not np.array_equal(draws.uniform_np(124, 0, 100), u[:100])


def test_a_key_is_one_draw_of_the_generator() -> None:
    g1, g2 = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    assert draws.key(g1) == draws.key(g2)
    assert draws.key(g1) != draws.key(torch.Generator().manual_seed(9))
    assert 0 <= draws.key(None) < 2**63


@pytest.mark.parametrize("n", [1000, 3 * (1 << 20) + 5])  # NumPy draws; compiled, on threads
def test_stochastic_quantize_rounds_with_the_keyed_draws(n: int) -> None:
    """quantize's stochastic codes are floor(x / scale + u) + zp with u the draws at the
    values' positions under one key from the generator, whichever path made them."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    qp = choose_qparams(x, 4, QuantScheme.AFFINE, Granularity.PER_TENSOR)
    codes = quantize(x, qp, Rounding.STOCHASTIC, generator=torch.Generator().manual_seed(3))
    key = draws.key(torch.Generator().manual_seed(3))
    inv, zp, qmin, qmax, _ = linear_bounds(qp)
    u = draws.uniform_np(key, 0, n)
    want = np.clip(np.floor(x.numpy() * inv + u) + zp, qmin, qmax).astype(np.uint8)
    assert np.array_equal(codes.numpy(), want)


# ------------------------------------------------------------ the check of a sum
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # compiled; torch's
@pytest.mark.parametrize("terms", ["base", "residual", "both"])
@pytest.mark.parametrize("where", [None, 0, 70_000, MANY - 1])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3e38])
def test_the_sums_check_is_the_check_of_the_sum(
    dtype: torch.dtype, terms: str, where: int | None, bad: float
) -> None:
    """``t − base + residual`` checked chunk by chunk without being made whole: the
    answer of the check of the sum itself, with a bad value in the tensor, the base
    or the residual (3e38 − (−3e38) overflows to infinity in float32)."""
    from fedsqueeze.codec import tensor_encode

    g = torch.Generator().manual_seed(MANY)
    t = torch.randn(MANY, generator=g).to(dtype)
    base = torch.randn(MANY, generator=g).to(dtype) if terms != "residual" else None
    residual = torch.randn(MANY, generator=g) * 0.1 if terms != "base" else None
    for victim in [x for x in (t, base, residual) if x is not None]:
        x = victim.clone()
        if where is not None:
            x[where] = bad if victim is not base else -bad
        parts = [x if v is victim else v for v in (t, base, residual)]
        tt, bb, rr = parts
        assert tt is not None
        total = tt.to(torch.float32)
        if bb is not None:
            total = total - bb.to(torch.float32)
        if rr is not None:
            total = total + rr.to(torch.float32)
        for limit in (2.0**126, 1.0):
            want = tensor_encode._within(total, limit) and tensor_encode._within(tt, math.inf)
            assert tensor_encode._sum_within(tt, bb, rr, limit) == want


def test_a_carried_residual_is_added_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Top-k with a residual carried in: the check reads the sum chunk by chunk, and
    the encoder makes the sum once (it was made for the check and again for the
    encode); the bytes and the residual are what the separate passes give."""
    from fedsqueeze.codec import tensor_encode

    made = []
    real = tensor_encode.TensorEncoder.lossy_input

    def counted(self: Any, name: str, t: torch.Tensor) -> torch.Tensor:
        made.append(name)
        return real(self, name, t)

    monkeypatch.setattr(tensor_encode.TensorEncoder, "lossy_input", counted)
    g = torch.Generator().manual_seed(1)
    t = torch.randn(1, MANY, generator=g)
    r = torch.randn(1, MANY, generator=g) * 0.1
    encode_state({NAME: t}, parse_spec("topk10-int4"), residual={NAME: r}, seed=2)
    assert made == [NAME]
    made.clear()
    a, b = both_ways(t, "topk10-int4", None, r)
    same_outputs(a, b)


@pytest.mark.parametrize("terms", ["base", "residual", "both"])
def test_the_first_pass_of_a_sum_is_the_first_pass_of_the_sum(terms: str) -> None:
    """The check's first pass over ``t − base + residual``, made chunk by chunk: the
    same band, counts, band values and maxima as the first pass over the sum made
    whole; and nothing where it does not apply."""
    g = torch.Generator().manual_seed(5)
    t = torch.randn(MANY, generator=g)
    base = torch.randn(MANY, generator=g) * 0.5 if terms != "residual" else None
    residual = torch.randn(MANY, generator=g) * 0.1 if terms != "base" else None
    total = t.clone()
    if base is not None:
        total = total - base
    if residual is not None:
        total = total + residual
    got = pruning.prepare_selection_of_sum(t, base, residual, 0.9)
    want = prepare_selection(total, 0.9)
    assert got is not None and want is not None
    assert (got.n, got.lo, got.hi, got.top_pos, got.top_neg) == (
        want.n, want.lo, want.hi, want.top_pos, want.top_neg,
    )  # fmt: skip
    assert np.array_equal(got.at_least, want.at_least)
    assert all(np.array_equal(a, b) for a, b in zip(got.band, want.band, strict=True))
    small = torch.randn(1000, generator=g)
    assert pruning.prepare_selection_of_sum(small, small, None, 0.9) is None
    assert pruning.prepare_selection_of_sum(t.double(), base, residual, 0.9) is None
