"""The compiled chunk kernels (fedsqueeze.codec.jit) give the NumPy kernels' codes and
values bit for bit: every width and scheme, per tensor and in runs whose ends fall
inside bytes, chunks that end inside a byte, exact ties, values far outside the range,
subnormals and signed zeros; byte planes of 2-, 4- and 8-byte words, with and without
an XOR base; both passes of the magnitude selection; and the switch that turns them off
changes no byte."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from fedsqueeze.codec import (
    dense_decode,
    dense_encode,
    jit,
    jit_bytes,
    jit_select,
    rice_encode,
    threshold_select,
)
from fedsqueeze.codec import planes as planes_module
from fedsqueeze.codec.kernels import value_range
from fedsqueeze.codec.model import EncodedModel, decode_state, encode_state
from fedsqueeze.codec.planes import PlaneLayout, join_planes, split_planes
from fedsqueeze.codec.quantization import Runs, choose_qparams
from fedsqueeze.codec.spec import Granularity, QuantScheme, ScaleFormat
from fedsqueeze.codec.spec_text import parse_spec
from tests.codec.test_dense_encode import SCHEMES  # every scheme and width the pipelines take

pytestmark = pytest.mark.skipif(not jit.ready(), reason="numba is not importable here")


@pytest.fixture(autouse=True)
def _kernels_at_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels run on these small inputs (callers skip them below MIN_VALUES)."""
    monkeypatch.setattr(jit, "MIN_VALUES", 1)


#: (values, run length or None for per tensor): runs that end inside a byte, a short
#: last run, one run, runs longer than a chunk.
LAYOUTS = [(5_001, None), (4_099, 64), (3 * 611 * 2 + 5, 611), (777, 777), (6_000, 1_500)]


@contextlib.contextmanager
def jit_off() -> Iterator[None]:
    saved = jit.ENABLED
    jit.ENABLED = False
    try:
        yield
    finally:
        jit.ENABLED = saved


@contextlib.contextmanager
def small_chunks() -> Iterator[None]:
    """Chunks of about 96 values on two worker threads, so chunks and runs cut bytes."""
    saved = dense_encode._CHUNK, dense_decode._CHUNK, torch.get_num_threads()
    dense_encode._CHUNK = dense_decode._CHUNK = 96
    torch.set_num_threads(2)
    try:
        yield
    finally:
        dense_encode._CHUNK, dense_decode._CHUNK, threads = saved
        torch.set_num_threads(threads)


def hard_values(n: int, seed: int) -> torch.Tensor:
    """Normal values with outliers, ties, zeros of both signs and subnormals."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 3
    x[::13] = 0.0
    x[1::17] = -0.0
    x[2::19] = 1e-40  # subnormal
    x[3::23] = x[4] * 1000.0  # far outside most runs' ranges
    x[5::29] = 0.5  # ties once scaled by a power of two
    return x


def params(
    x: torch.Tensor, scheme: QuantScheme, bits: int, run: int | None
) -> tuple[object, Runs | None]:
    if run is None:
        return choose_qparams(x, bits, scheme, Granularity.PER_TENSOR), None
    runs = Runs(run)
    count = runs.count(x.numel())
    return choose_qparams(
        x, bits, scheme, Granularity.PER_BLOCK, runs, count, ScaleFormat.FP16
    ), runs


@pytest.mark.parametrize(("scheme", "bits"), SCHEMES)
@pytest.mark.parametrize(("n", "run"), LAYOUTS)
def test_codes_and_values_match_the_numpy_kernels(
    scheme: QuantScheme, bits: int, n: int, run: int | None
) -> None:
    x = hard_values(n, seed=n + bits)
    qp, runs = params(x, scheme, bits, run)
    with small_chunks():
        fast = dense_encode.quantize_packed(x, qp, runs)  # type: ignore[arg-type]
        with jit_off():
            slow = dense_encode.quantize_packed(x, qp, runs)  # type: ignore[arg-type]
        assert torch.equal(fast, slow)
        body = memoryview(fast.numpy().tobytes())
        got = dense_decode.decode_dense(body, None, n, qp, runs)  # type: ignore[arg-type]
        with jit_off():
            want = dense_decode.decode_dense(body, None, n, qp, runs)  # type: ignore[arg-type]
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("scale", [1.0, 0.1, 1.0 / 3.0])
def test_rounding_ties_go_to_even(scale: float) -> None:
    """Values that land exactly between two codes round as ``np.rint`` does."""
    x = torch.arange(-300, 301, dtype=torch.float32) * np.float32(0.5) * np.float32(scale)
    qp = choose_qparams(x, 8, QuantScheme.AFFINE, Granularity.PER_TENSOR)
    fast = dense_encode.quantize_packed(x, qp, None)
    with jit_off():
        slow = dense_encode.quantize_packed(x, qp, None)
    assert torch.equal(fast, slow)


def test_turning_the_kernels_off_changes_no_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole model through the real pipelines (small thresholds): same bytes, same values."""
    monkeypatch.setattr(dense_encode, "PIPELINE_ABOVE", 64)
    monkeypatch.setattr(dense_decode, "PIPELINE_ABOVE", 64)
    g = torch.Generator().manual_seed(3)
    sparse = torch.randn(64 * 70, generator=g)
    sparse[: 64 * 20] = 0.0  # whole blocks of zeros of both signs, and pruned-like runs
    sparse[64 * 5 : 64 * 9 : 2] = -0.0
    sparse[64 * 30 : 64 * 50 : 3] = 0.0
    state = {
        "a.weight": torch.randn(96, 203, generator=g),
        "b.weight": torch.randn(4_097, generator=g),
        "c.weight": sparse,
    }
    with small_chunks():
        for text in (
            "int8",
            "quant=8:channel",
            "quant=4:block64",
            "quant=4:nf4:block64",
            "quant=2:block32",
            "quant=4:nf4:block64:dq",
            "quant=8:block48:dq",
        ):
            spec = parse_spec(text)
            blob = encode_state(state, spec).to_bytes()
            got = decode_state(EncodedModel.from_bytes(blob))
            with jit_off():
                assert encode_state(state, spec).to_bytes() == blob, text
                want = decode_state(EncodedModel.from_bytes(blob))
            for name in state:
                assert torch.equal(got[name].view(torch.int32), want[name].view(torch.int32)), text


@pytest.mark.parametrize("length", [1, 7, 64, 1_000])
def test_run_ranges_match_torch_and_carry_nan(length: int) -> None:
    x = hard_values(5_003, seed=length)
    x[100] = float("nan")
    x[2_000] = float("inf")
    runs = Runs(length)
    with small_chunks():
        lo, hi = value_range(x, runs)
        with jit_off():
            want_lo, want_hi = value_range(x, runs)
    # Equal as numbers (a zero's sign may differ: it changes no stored byte, see the
    # whole-model test above), NaN in the same runs.
    assert torch.equal(lo.isnan(), want_lo.isnan()) and bool(lo[100 // length].isnan())
    assert torch.equal(lo.nan_to_num(), want_lo.nan_to_num())
    assert torch.equal(hi.nan_to_num(), want_hi.nan_to_num())


@pytest.mark.parametrize(
    ("width", "swapped"), [(2, True), (2, False), (4, True), (4, False), (8, False)]
)
@pytest.mark.parametrize("xor", [False, True])
def test_planes_match_the_numpy_kernels(width: int, swapped: bool, xor: bool) -> None:
    layout = PlaneLayout(width, swapped)
    rng = np.random.default_rng(width * 2 + xor)
    n = 70_001  # not a whole number of blocks with the small block below
    words = rng.integers(0, np.iinfo(layout.uint).max, n, dtype=layout.uint, endpoint=True)
    base = rng.integers(0, np.iinfo(layout.uint).max, n, dtype=layout.uint, endpoint=True)
    got = {k: np.empty(n, np.uint8) for k in range(width)}
    want = {k: np.empty(n, np.uint8) for k in range(width)}
    saved = planes_module.BLOCK
    planes_module.BLOCK = 4_096
    try:
        split_planes(words, got, layout, base if xor else None)
        with jit_off():
            split_planes(words, want, layout, base if xor else None)
        for k in range(width):
            assert np.array_equal(got[k], want[k]), k
        # A subset of the planes takes the plane-by-plane kernel, every plane the
        # whole-word one (16- and 32-bit words): both give NumPy's bytes.
        some = {width - 1: np.empty(n, np.uint8)}
        split_planes(words, some, layout, base if xor else None)
        assert np.array_equal(some[width - 1], want[width - 1])
        joined = np.empty(n, layout.uint)
        join_planes([got[k] for k in range(width)], layout, joined)
        expect = np.empty(n, layout.uint)
        with jit_off():
            join_planes([want[k] for k in range(width)], layout, expect)
    finally:
        planes_module.BLOCK = saved
    assert np.array_equal(joined, expect)
    assert np.array_equal(joined, words ^ base if xor else words)


def test_small_inputs_stay_with_numpy() -> None:
    """Below MIN_VALUES the callers keep to NumPy (a small model never compiles)."""
    saved = jit.MIN_VALUES
    jit.MIN_VALUES = 1 << 16
    try:
        assert not jit.use(1_000) and jit.use(1 << 16)
    finally:
        jit.MIN_VALUES = saved


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("share", [0.5, 0.9, 0.99])
def test_magnitude_selection_matches_the_numpy_passes(seed: int, share: float) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(300_001, generator=g) * 2).numpy()
    x[::97] = 0.0
    prune = int(share * x.size)
    cut = float(np.sort(np.abs(x))[prune])
    monkey = threshold_select.CHUNK
    threshold_select.CHUNK = 4_096  # many chunks, two workers
    try:
        with small_chunks():
            for lo, hi in ((cut * 0.98, cut * 1.02), (cut, cut * 1.5), (-np.inf, np.inf)):
                got = threshold_select.select_above(x, prune, lo, hi)
                with jit_off():
                    want = threshold_select.select_above(x, prune, lo, hi)
                if want is None:
                    assert got is None
                    continue
                assert got is not None
                assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
                assert got[0].size == x.size - prune
    finally:
        threshold_select.CHUNK = monkey


@pytest.mark.parametrize("where", [None, 5, 100_000, 300_000])  # a block, the tail
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), -3e38])
def test_the_band_pass_finds_the_largest_magnitude_as_numpy_does(
    where: int | None, bad: float
) -> None:
    x = hard_values(300_001, 4).numpy()
    if where is not None:
        x[where] = bad
    saved = threshold_select.CHUNK
    threshold_select.CHUNK = 4_096
    try:
        with small_chunks():
            got = threshold_select.first_pass(x, 0.5, 1.5)
            with jit_off():
                want = threshold_select.first_pass(x, 0.5, 1.5)
    finally:
        threshold_select.CHUNK = saved
    assert got.top == want.top == int((x.view(np.int32) & 0x7FFFFFFF).max())
    words = x.view(np.int32) & 0x7FFFFFFF
    negative = np.signbit(x)
    assert got.top_pos == want.top_pos == int(words[~negative].max(initial=0))
    assert got.top_neg == want.top_neg == int(words[negative].max(initial=0))
    top = float(np.abs(x).max())
    assert got.within(np.inf) == (where is None or abs(bad) < np.inf)
    assert got.within(top) == (where is None or bad == -3e38)
    assert np.array_equal(got.at_least, want.at_least)
    assert all(np.array_equal(a, b) for a, b in zip(got.band, want.band, strict=True))


@pytest.mark.parametrize("share", [0.2, 0.5, 0.9])
def test_ties_at_the_cut_compiled_and_numpy_keep_the_rule(share: float) -> None:
    """Magnitudes from 0 to 3 in steps of 1/4 (float16-like weights): the cut's tied
    values span many chunks; compiled and NumPy passes drop the lowest indices first."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randint(-12, 13, (300_001,), generator=g).to(torch.float32) / 4).numpy()
    prune = int(share * x.size)
    order = np.argsort(np.abs(x), kind="stable")
    want = np.sort(order[prune:])
    saved = threshold_select.CHUNK
    threshold_select.CHUNK = 4_096
    try:
        with small_chunks():
            for lo, hi in ((0.0, 3.0), (-np.inf, np.inf)):
                got = threshold_select.select_above(x, prune, lo, hi)
                with jit_off():
                    plain = threshold_select.select_above(x, prune, lo, hi)
                assert got is not None and plain is not None
                assert np.array_equal(got[0], want) and np.array_equal(plain[0], want)
                assert np.array_equal(got[1], x[want]) and np.array_equal(plain[1], x[want])
    finally:
        threshold_select.CHUNK = saved


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("cut", [0.5, 2.0])  # 62% and 4.6% kept: both scalar loops
@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("room", [1.0, 0.5])
def test_select_pass_matches_numpy(
    compiled: bool, cut: float, strict: bool, room: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled pass (with the vector step where the CPU has one) and the scalar
    loops alone (the plain Python function, ``VECTOR`` off): the same indices and values
    as NumPy, NaN never kept, nothing written past the output's end; with a copy, the
    copy too (and nothing of it outside the chunk)."""
    jit.ready()
    kernel = jit_select.select_pass
    if not compiled:
        kernel = getattr(kernel, "py_func", kernel)
        monkeypatch.setattr(jit_select, "VECTOR", False)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(10_007).astype(np.float32)
    x[::13] = np.float32(cut)  # ties on the cut
    x[5], x[6], x[7] = np.nan, -0.0, -np.inf
    cut32 = np.float32(cut)
    keep = np.flatnonzero(np.abs(x) > cut32 if strict else np.abs(x) >= cut32)
    for start, stop in ((0, x.size), (3, 4_099), (17, 40)):
        want = keep[(keep >= start) & (keep < stop)]
        o1 = 7 + int(want.size * room)
        indices = np.full(o1 + 5, -1, dtype=np.int64)
        values = np.full(o1 + 5, 9.0, dtype=np.float32)
        copy = np.full(x.size, 7.0, dtype=np.float32)
        got = kernel(x, start, stop, cut32, strict, indices, values, 7, o1, copy)
        assert got == want.size
        assert np.array_equal(copy[start:stop], x[start:stop], equal_nan=True)
        assert (copy[:start] == 7.0).all() and (copy[stop:] == 7.0).all()
        again = np.full(o1 + 5, -1, dtype=np.int64)
        got = kernel(x, start, stop, cut32, strict, again, values, 7, o1, copy[:0])
        assert np.array_equal(again, indices)
        fit = o1 - 7
        assert np.array_equal(indices[7:o1], want[:fit])
        assert np.array_equal(values[7:o1], x[want[:fit]])
        assert (indices[:7] == -1).all() and (indices[o1:] == -1).all()


@pytest.mark.parametrize("k", [0, 1, 5, 13, 24, 40])
def test_rice_payload_matches_the_numpy_path(k: int) -> None:
    rng = np.random.default_rng(k)
    gaps = rng.geometric(1.0 / (1 + (1 << k)), 20_003) - 1
    gaps[::501] += 5_000 << k  # unary runs far longer than 32 bits
    idx = np.cumsum(gaps + 1) - 1
    saved = rice_encode.CHUNK
    rice_encode.CHUNK = 1_024  # many chunks sharing bytes at their edges, two workers
    try:
        with small_chunks():
            sums, ok = rice_encode.rice_sums(idx, range(k, k + 1))
            assert ok
            got = rice_encode.encode_rice(idx, k, sums[:, 0])
            with jit_off():
                want = rice_encode.encode_rice(idx, k, sums[:, 0])
    finally:
        rice_encode.CHUNK = saved
    assert np.array_equal(got, want)


def test_residual_scatter_matches_numpy() -> None:
    rng = np.random.default_rng(11)
    out = rng.standard_normal(50_003).astype(np.float32)
    want = out.copy()
    idx = np.sort(rng.choice(out.size, 5_001, replace=False)).astype(np.int64)
    values = rng.standard_normal(idx.size).astype(np.float32)
    want[idx] = values
    for start, stop in ((0, 2_000), (2_000, 2_001), (2_001, idx.size)):
        jit_select.scatter_values(out, idx, start, stop, values)
    assert np.array_equal(out, want)


def test_topk_residual_is_the_same_with_and_without_the_kernels() -> None:
    g = torch.Generator().manual_seed(12)
    state = {"w.weight": torch.randn(300, 700, generator=g)}
    spec = parse_spec("topk=0.1,quant=4")
    got = encode_state(state, spec, seed=0)
    with jit_off():
        want = encode_state(state, spec, seed=0)
    assert got.to_bytes() == want.to_bytes()
    assert got.residual is not None and want.residual is not None
    assert torch.equal(got.residual["w.weight"], want.residual["w.weight"])


@pytest.mark.parametrize(
    "window", [range(0, 5), range(3, 8), range(2, 3), range(9, 9), range(1, 8)]
)
def test_rice_sums_match_the_numpy_path(window: range) -> None:
    rng = np.random.default_rng(len(window) + window.start)
    gaps = rng.geometric(1.0 / 9, 30_011) - 1
    gaps[::777] += 4_000
    idx = np.cumsum(gaps + 1) - 1
    saved = rice_encode.CHUNK
    rice_encode.CHUNK = 1_024
    try:
        with small_chunks():
            got, ok = rice_encode.rice_sums(idx, window)
            with jit_off():
                want, ok_want = rice_encode.rice_sums(idx, window)
            bad = idx.copy()
            bad[5_000] = bad[4_999]  # a repeated index: not strictly increasing
            assert rice_encode.rice_sums(bad, window)[1] is False
            with jit_off():
                assert rice_encode.rice_sums(bad, window)[1] is False
    finally:
        rice_encode.CHUNK = saved
    assert ok and ok_want
    assert np.array_equal(got, want)


def _decoded_or_error(coding: object, count: int, k: int, payload: torch.Tensor, n: int) -> object:
    from fedsqueeze.codec.positions import decode_positions
    from fedsqueeze.errors import FormatError

    try:
        return decode_positions(coding, count, k, payload, n).tolist()  # type: ignore[arg-type]
    except FormatError as exc:
        return f"FormatError: {exc}"


@pytest.mark.parametrize("density", [0.2, 0.05, 0.003])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rice_decoding_matches_the_reference_on_good_and_bad_payloads(
    density: float, seed: int
) -> None:
    from fedsqueeze.codec.positions import PositionCoding, encode_positions

    rng = np.random.default_rng(seed)
    n = 40_000
    idx = np.flatnonzero(rng.random(n) < density)
    if seed == 2:  # the last element kept
        idx = np.append(idx[idx < n - 1], n - 1)
    enc = encode_positions(torch.from_numpy(idx.astype(np.int64)), n)
    if enc.coding is not PositionCoding.RICE:
        pytest.skip("a bitmap at this density")
    cases = [(enc.count, enc.payload, n), (enc.count, enc.payload, int(idx[-1]))]
    cases += [(enc.count + d, enc.payload, n) for d in (-1, 1)]
    cases += [
        (enc.count, torch.cat([enc.payload, enc.payload.new_full((1,), v)]), n) for v in (0, 0xFF)
    ]
    rem_size = -(-enc.count * enc.rice_k // 8)
    if enc.count * enc.rice_k % 8:  # a set padding bit after the last remainder
        p = enc.payload.clone()
        p[rem_size - 1] |= 0x80
        cases.append((enc.count, p, n))
    for _ in range(20):
        p = enc.payload.clone()
        at = int(rng.integers(p.numel()))
        p[at] ^= 1 << int(rng.integers(8))
        cases.append((enc.count, p, n))
    for count, payload, numel in cases:
        got = _decoded_or_error(enc.coding, count, enc.rice_k, payload, numel)
        with jit_off():
            want = _decoded_or_error(enc.coding, count, enc.rice_k, payload, numel)
        assert got == want
    assert _decoded_or_error(enc.coding, enc.count, enc.rice_k, enc.payload, n) == idx.tolist()


@pytest.mark.parametrize("lo, hi", [(0.5, 1.5), (2.0, 2.1), (-np.inf, np.inf)])
def test_band_pass_vector_and_scalar_loops_agree(
    lo: float, hi: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled band pass (its vector step where the CPU has one) and the scalar
    blocks of 32 alone (the plain Python function, ``VECTOR`` off): the same count,
    band and largest magnitudes of each sign, on every start and tail length."""
    jit.ready()
    x = hard_values(5_003, 6).numpy()
    x[100] = np.nan
    bits = x.view(np.int32)
    lo32, hi32 = np.float32(lo), np.float32(hi)
    plain = getattr(jit_select.band_pass, "py_func", jit_select.band_pass)
    for start, stop in ((0, 5_003), (3, 4_099), (17, 40), (1, 16)):
        results = []
        for kernel, vector in ((jit_select.band_pass, jit_select.VECTOR), (plain, False)):
            monkeypatch.setattr(jit_select, "VECTOR", vector)
            band = np.zeros(stop - start, dtype=np.float32)
            tops = np.zeros(4, dtype=np.int32)
            packed = kernel(x, bits, start, stop, lo32, hi32, band, tops, 1)
            results.append((packed, band[: packed & 0xFFFFFFFF].copy(), tops[2:].copy()))
        (p1, b1, t1), (p2, b2, t2) = results
        assert p1 == p2 and np.array_equal(b1, b2) and np.array_equal(t1, t2)
        mags = np.abs(x[start:stop])
        assert p1 >> 32 == int(np.count_nonzero(mags >= lo32))
        inside = mags[(mags >= lo32) & (mags <= hi32)]
        assert np.array_equal(b1, inside)


@pytest.mark.parametrize("zeros", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("top", [140, 255])
def test_joint_stats_span_matches_numpy(zeros: float, dtype: torch.dtype, top: int) -> None:
    """The joint plan's span of a chunk's exponents, read from the words: the largest
    (255 where a NaN or Inf is among them), and the smallest nonzero (through the wrap
    of a zero to 255), as NumPy computes them from the exponent plane; signs and
    mantissas do not leak into it."""
    if not jit.ready():
        pytest.skip("numba is not importable")
    rng = np.random.default_rng(int(zeros * 10) + top)
    n = 100_003
    exponents = rng.integers(90, 140, n).astype(np.uint8)
    exponents[rng.random(n) < zeros] = 0
    exponents[rng.integers(0, n)] = top if zeros < 1 else 0
    width = dtype.itemsize * 8
    uint = np.uint16 if width == 16 else np.uint32
    noise = rng.integers(0, 1 << (width - 9), n).astype(uint)  # the mantissa bits
    sign = (rng.random(n) < 0.5).astype(uint) << (width - 1)
    words = ((exponents.astype(uint) << (width - 9)) | noise | sign).astype(uint)
    span = np.full(2, -1, dtype=np.int64)
    hist, counts = np.empty((256, 8), np.int64), np.empty(256, np.int64)
    jit_bytes.joint_stats(words, 7, span, hist, counts)
    assert int(span[0]) == int(exponents.max())
    assert int(span[1]) == int(np.subtract(exponents, 1, dtype=np.uint8).min())


def test_nf4_codes_count_the_midpoints_as_the_cell_tables_do() -> None:
    """The compiled NF4 kernel counts the codebook's float32 midpoints below each value;
    the cell tables (kernels.nearest_nf4) give the same code for values on, next to and
    between every midpoint, at and beyond ±1, zeros of both signs and subnormals."""
    from fedsqueeze.codec.blockwise import NF4_CODEBOOK
    from fedsqueeze.codec.kernels import nearest_nf4, nf4_midpoints

    mids = nf4_midpoints(NF4_CODEBOOK)
    near = [np.int32(m.view(np.int32) + d).view(np.float32) for m in mids for d in range(-4, 5)]
    special = [-1.0, 1.0, -1.5, 1.5, -3e38, 3e38, 0.0, -0.0, 1e-40, -1e-40]
    g = np.random.default_rng(7)
    u = np.concatenate([np.array(near + special, np.float32), g.uniform(-1.2, 1.2, 9_001)])
    u = u.astype(np.float32)
    n = u.size
    packed = np.zeros(-(-n // 2), np.uint8)
    one = np.ones(1, np.float32)
    jit.nf4_encode(u, 0, n, one, n, mids, packed, np.empty(n, np.uint8))
    want = nearest_nf4(torch.from_numpy(u), torch.tensor(1.0), NF4_CODEBOOK, None).numpy()
    got = np.empty(2 * packed.size, np.uint8)
    got[0::2], got[1::2] = packed & 15, packed >> 4
    assert np.array_equal(got[:n], want)


def test_fp16_scale_bytes_and_checks_match_numpy() -> None:
    """Every positive finite fp16 value serializes to its own bits in one compiled pass,
    and the refusals (not finite and positive; not exactly an fp16 value) come as the
    NumPy path gives them, in its order."""
    from fedsqueeze.codec.blockwise import scales_to_bytes
    from fedsqueeze.codec.spec import ScaleFormat as Fmt

    every = np.arange(1, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    got = scales_to_bytes(torch.from_numpy(every), Fmt.FP16, None)
    with jit_off():
        assert got == scales_to_bytes(torch.from_numpy(every), Fmt.FP16, None)
    assert got == np.arange(1, 0x7C00, dtype="<u2").tobytes()
    for bad in (0.0, -0.0, -1.0, float("inf"), float("nan"), 1.0 + 2.0**-20, 65505.0,
                2.0**-25, 3 * 2.0**-26, 1e-40, 70000.0):  # fmt: skip
        hostile = every.copy()
        hostile[123] = bad
        if bad > 0 and np.isfinite(bad):
            hostile[77] = -1.0 if bad == 70000.0 else hostile[77]  # both kinds: finite first
        with pytest.raises(ValueError) as fast:
            scales_to_bytes(torch.from_numpy(hostile), Fmt.FP16, None)
        with jit_off(), pytest.raises(ValueError) as slow:
            scales_to_bytes(torch.from_numpy(hostile), Fmt.FP16, None)
        assert str(fast.value) == str(slow.value), bad


def test_zero_point_bytes_and_checks_match_numpy() -> None:
    from fedsqueeze.codec.quantization import QuantParams, qparams_to_bytes

    g = torch.Generator().manual_seed(4)
    scale = torch.rand(5_000, generator=g) + 0.5
    for bits in (2, 4, 8):
        zp = torch.randint(0, 1 << bits, (5_000,), generator=g).to(torch.float32)
        qp = QuantParams(bits, QuantScheme.AFFINE, scale, zp)
        got = qparams_to_bytes(qp)
        with jit_off():
            assert got == qparams_to_bytes(qp)
        for bad in (0.5, -1.0, float(1 << bits), float("nan")):
            hostile = zp.clone()
            hostile[4_321] = bad
            qp = QuantParams(bits, QuantScheme.AFFINE, scale, hostile)
            with pytest.raises(ValueError, match="zero point") as fast:
                qparams_to_bytes(qp)
            with jit_off(), pytest.raises(ValueError, match="zero point") as slow:
                qparams_to_bytes(qp)
            assert str(fast.value) == str(slow.value)
