"""The fast kernels against the reference paths they replace: bit-identical results.

Runs of parameter sets (dense channels, blocks) against the same sets given as a
per-value index (the reference loops), per-tensor kernels against a one-channel index,
the NF4 table against ``bucketize``, sampled top-k indices against the mask path and
the exact ``topk`` reference. Chunks are made small and two worker threads are used, so
the multi-chunk, short-last-run and pool paths all run on small inputs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.codec import bitpack, chunks, kernels, pruning
from fedsqueeze.codec.blockwise import NF4_CODEBOOK
from fedsqueeze.codec.chunks import chunk_bounds, run_chunks
from fedsqueeze.codec.kernels import Runs, nearest_nf4
from fedsqueeze.codec.kmeans import assign
from fedsqueeze.codec.pruning import count_to_prune, magnitude_indices, magnitude_mask
from fedsqueeze.codec.quantization import QuantParams, choose_qparams, dequantize, quantize
from fedsqueeze.codec.spec import Granularity, QuantScheme, Rounding, ScaleFormat

SCHEMES = [
    (QuantScheme.AFFINE, 2),
    (QuantScheme.AFFINE, 3),
    (QuantScheme.AFFINE, 4),
    (QuantScheme.AFFINE, 8),
    (QuantScheme.SYMMETRIC, 4),
    (QuantScheme.SYMMETRIC, 8),
    (QuantScheme.NF4, 4),
]


@contextlib.contextmanager
def small_chunks(size: int = 97, threads: int = 2) -> Iterator[None]:
    """Chunks of ``size`` values on ``threads`` workers (restored afterwards)."""
    saved = kernels._CHUNK, pruning._CHUNK, bitpack._CHUNK, torch.get_num_threads()
    kernels._CHUNK = pruning._CHUNK = bitpack._CHUNK = size
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        kernels._CHUNK, pruning._CHUNK, bitpack._CHUNK, threads_before = saved
        torch.set_num_threads(threads_before)


def values(n: int, seed: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    # Runs with very different ranges, and a few exact zeros and ties.
    x *= (1.0 + (torch.arange(n) // length % 7).to(torch.float32)) ** 2
    x[:: max(1, n // 5)] = 0.0
    return x


def same_params(a: QuantParams, b: QuantParams) -> bool:
    return torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(SCHEMES),
    st.sampled_from([Granularity.PER_CHANNEL, Granularity.PER_BLOCK]),
    st.integers(1, 900),
    st.integers(1, 130),
    st.sampled_from(list(ScaleFormat)),
    st.integers(0, 2**31),
)
def test_runs_equal_the_per_value_index(
    scheme_bits: tuple[QuantScheme, int],
    gran: Granularity,
    n: int,
    length: int,
    scales: ScaleFormat,
    seed: int,
) -> None:
    scheme, bits = scheme_bits
    x = values(n, seed, length)
    runs = Runs(length)
    sets = runs.count(n)
    fmt = scales if gran is Granularity.PER_BLOCK else ScaleFormat.FP32
    with small_chunks():
        qp_fast = choose_qparams(x, bits, scheme, gran, runs, sets, fmt)
        codes_fast = quantize(x, qp_fast, Rounding.NEAREST, runs)
        decoded_fast = dequantize(codes_fast, qp_fast, runs)
    index = runs.index(n)
    qp_ref = choose_qparams(x, bits, scheme, gran, index, sets, fmt)
    codes_ref = quantize(x, qp_ref, Rounding.NEAREST, index)
    assert same_params(qp_fast, qp_ref)
    assert torch.equal(codes_fast, codes_ref)
    assert torch.equal(decoded_fast, dequantize(codes_ref, qp_ref, index))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(SCHEMES), st.integers(1, 900), st.integers(0, 2**31))
def test_per_tensor_kernels_equal_the_reference_loop(
    scheme_bits: tuple[QuantScheme, int], n: int, seed: int
) -> None:
    scheme, bits = scheme_bits
    x = values(n, seed, 50)
    with small_chunks():
        qp = choose_qparams(x, bits, scheme, Granularity.PER_TENSOR)
        codes = quantize(x, qp, Rounding.NEAREST)
        decoded = dequantize(codes, qp)
    # The same params as one channel, given as a per-value index: the reference loops.
    one = QuantParams(bits, scheme, qp.scale.reshape(1), qp.zero_point.reshape(1))
    index = torch.zeros(n, dtype=torch.int64)
    assert torch.equal(codes, quantize(x, one, Rounding.NEAREST, index))
    assert torch.equal(decoded, dequantize(codes, one, index))


def test_nf4_table_equals_bucketize_at_edges_and_midpoints() -> None:
    cb = NF4_CODEBOOK
    mids = (cb[:-1] + cb[1:]) / 2
    edges = torch.arange(257, dtype=torch.float32) / 128 - 1  # the grid's cell edges
    special = torch.cat([mids, edges, torch.tensor([-1.0, 0.0, 1.0, -0.0])])
    inf = torch.full_like(special, float("inf"))
    around = torch.cat(
        [special, torch.nextafter(special, inf), torch.nextafter(special, -inf)]
    ).clamp(-1.0, 1.0)
    g = torch.Generator().manual_seed(0)
    unit = torch.cat([around, torch.rand(200_000, generator=g) * 2 - 1])
    ones = torch.ones(())
    with small_chunks(size=1000):
        got = nearest_nf4(unit, ones, cb, None)
    assert torch.equal(got, assign(unit, cb))


def test_nf4_table_beyond_the_unit_range_goes_to_the_ends() -> None:
    unit = torch.tensor([-3.0, -1.0000001, 1.0000001, 7.0])
    assert nearest_nf4(unit, torch.ones(()), NF4_CODEBOOK, None).tolist() == [0, 0, 15, 15]


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 3000),
    st.sampled_from([0.0, 0.001, 0.1, 0.5, 0.9, 0.999, 1.0]),
    st.sampled_from(["normal", "ties", "zeros"]),
    st.integers(0, 2**31),
)
def test_sampled_indices_equal_the_mask_and_keep_the_exact_count(
    n: int, sparsity: float, kind: str, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    if kind == "ties":  # few distinct magnitudes: ties straddle every cut
        x = torch.randint(-3, 4, (n,), generator=g).to(torch.float32)
    elif kind == "zeros":
        x[: n // 2] = 0.0
    saved = pruning._SAMPLE_ABOVE, pruning._SAMPLE_SIZE
    pruning._SAMPLE_ABOVE, pruning._SAMPLE_SIZE = 100, 64  # the sampled path from 101
    try:
        with small_chunks(size=89):
            got = magnitude_indices(x, sparsity)
            selected, values = pruning.magnitude_selection(x, sparsity)
        reference = torch.nonzero(magnitude_mask(x, sparsity)).view(-1)
    finally:
        pruning._SAMPLE_ABOVE, pruning._SAMPLE_SIZE = saved
    assert torch.equal(got, reference)  # the same values, ties broken alike
    assert torch.equal(selected, reference)
    if n > 100 and 0 < count_to_prune(n, sparsity) < n:  # the sampled path gathers values
        assert values is not None and torch.equal(values, x[reference])
    keep = n - count_to_prune(n, sparsity)
    assert got.numel() == keep
    # Against the exact selection: the kept magnitudes are the `keep` largest.
    exact = torch.sort(x.abs(), descending=True).values[:keep]
    assert torch.equal(torch.sort(x.abs()[got], descending=True).values, exact)


def test_sampled_indices_fall_back_when_the_band_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(pruning, "_SAMPLE_ABOVE", 100)
    monkeypatch.setattr(pruning, "_band_ranks", lambda n, prune: (1, 1))  # a band of one value
    got = magnitude_indices(x, 0.7)
    assert torch.equal(got, torch.nonzero(pruning._drop_smallest_exact(x.abs(), 3500)).view(-1))


def test_run_chunks_covers_every_chunk_once_and_reraises() -> None:
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def record(start: int, stop: int) -> None:
        with lock:
            seen.append((start, stop))

    bounds = chunk_bounds(1000, 64)
    with small_chunks():
        run_chunks(record, bounds)
    assert sorted(seen) == bounds

    def fail(start: int, stop: int) -> None:
        if start == 128:
            raise ValueError("chunk 128")

    with small_chunks(), pytest.raises(ValueError, match="chunk 128"):
        run_chunks(fail, bounds)


def test_nested_run_chunks_runs_inline() -> None:
    out = torch.zeros(100, dtype=torch.int64)

    def outer(start: int, stop: int) -> None:
        def inner(a: int, b: int) -> None:
            out[a:b] += 1

        run_chunks(inner, [(start + a, start + b) for a, b in chunk_bounds(stop - start, 3)])

    with small_chunks():
        run_chunks(outer, chunk_bounds(100, 10))
    assert torch.equal(out, torch.ones(100, dtype=torch.int64))


def test_runs_validate_their_length_and_count() -> None:
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError):
            Runs(bad)  # type: ignore[arg-type]
    x = torch.randn(10)
    with pytest.raises(ValueError, match="fill 4 sets"):
        choose_qparams(x, 8, QuantScheme.AFFINE, Granularity.PER_BLOCK, Runs(3), 3)
    assert chunks.chunk_bounds(0) == []


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([2, 4]), st.integers(0, 2000), st.integers(0, 2**31))
def test_chunked_packing_equals_the_bit_layout(bits: int, n: int, seed: int) -> None:
    codes = torch.randint(1 << bits, (n,), generator=torch.Generator().manual_seed(seed))
    codes = codes.to(torch.uint8)
    with small_chunks(size=37):
        packed = bitpack.pack_bits(codes, bits)
        unpacked = bitpack.unpack_bits(packed, bits, n)
    # Code i at stream bits [i·bits, (i+1)·bits), LSB first.
    expected = bytearray(bitpack.packed_size(n, bits))
    for i, c in enumerate(codes.tolist()):
        expected[i * bits // 8] |= c << (i * bits % 8)
    assert bytes(packed.numpy()) == bytes(expected)
    assert torch.equal(unpacked, codes)


def _bits_to_bytes(bits: list[int]) -> bytes:
    out = bytearray((len(bits) + 7) // 8)
    for i, b in enumerate(bits):
        out[i // 8] |= b << (i % 8)
    return bytes(out)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5000), st.floats(0.001, 0.9), st.integers(0, 2**31))
def test_rice_payload_equals_its_bit_layout(numel: int, density: float, seed: int) -> None:
    from fedsqueeze.codec.positions import PositionCoding, decode_positions, encode_positions

    g = torch.Generator().manual_seed(seed)
    indices = torch.nonzero(torch.rand(numel, generator=g) < density).view(-1)
    enc = encode_positions(indices, numel)
    assert torch.equal(
        decode_positions(enc.coding, enc.count, enc.rice_k, enc.payload, numel), indices
    )
    if enc.coding is not PositionCoding.RICE:
        return
    k = enc.rice_k
    kept = indices.tolist()
    gaps = [i - p - 1 for i, p in zip(kept, [-1, *kept][:-1], strict=True)]
    remainder_bits = [(gap >> j) & 1 for gap in gaps for j in range(k)]
    unary_bits = [b for gap in gaps for b in [1] * (gap >> k) + [0]]
    unary_bits += [1] * (-len(unary_bits) % 8)
    expected = _bits_to_bytes(remainder_bits) + _bits_to_bytes(unary_bits)
    assert bytes(enc.payload.numpy()) == expected


@pytest.mark.parametrize("threads", [1, 2])
def test_submit_returns_the_result_or_reraises(threads: int) -> None:
    def fail() -> int:
        raise ValueError("no positions")

    with small_chunks(threads=threads):
        assert chunks.submit(lambda: 6 * 7).result() == 42
        pending = chunks.submit(fail)
        with pytest.raises(ValueError, match="no positions"):
            pending.result()


# Python 3.12+ warns that forking a multi-threaded process may deadlock: the point here.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_forked_child_runs_chunks_on_pools_of_its_own() -> None:
    import multiprocessing

    with small_chunks():
        run_chunks(lambda a, b: None, chunk_bounds(100, 10))  # the parent's pool exists
        context = multiprocessing.get_context("fork")
        with context.Pool(1) as pool:
            total = pool.apply_async(_sum_in_chunks, (1000,)).get(timeout=60)
    assert total == sum(range(1000))


def _sum_in_chunks(n: int) -> int:
    torch.set_num_threads(2)
    parts = torch.zeros(n, dtype=torch.int64)

    def fill(start: int, stop: int) -> None:
        parts[start:stop] = torch.arange(start, stop)

    run_chunks(fill, chunk_bounds(n, 64))
    return int(parts.sum())
