"""k-means weight sharing: valid codebooks, nearest assignment, better than uniform."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.codec.kmeans import MAX_FIT_VALUES, assign, kmeans_codebook
from fedsqueeze.codec.quantization import choose_qparams, dequantize, quantize
from fedsqueeze.codec.spec import Granularity, QuantScheme, Rounding


def is_fp16_exact(t: torch.Tensor) -> bool:
    return torch.equal(t.to(torch.float16).to(torch.float32), t)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 8),
    st.integers(0, 3000),
    st.integers(0, 2**31),
    st.sampled_from([1e-3, 1.0, 300.0]),
)
def test_codebook_is_sorted_fp16_exact_and_assignment_is_nearest(
    bits: int, n: int, seed: int, spread: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=g) * spread
    before = values.clone()
    cb = kmeans_codebook(values, bits)
    assert cb.dtype == torch.float32 and cb.shape == (1 << bits,)
    assert bool(torch.isfinite(cb).all())
    assert bool((cb[1:] >= cb[:-1]).all())
    assert is_fp16_exact(cb)
    codes = assign(values, cb)
    assert codes.dtype == torch.uint8 and codes.shape == (n,)
    nearest = (values[:, None] - cb[None, :]).abs().min(1).values
    assert torch.allclose((values - cb[codes.long()]).abs(), nearest, rtol=0, atol=1e-6 * spread)
    assert torch.equal(values, before)


def test_fit_is_deterministic_and_handles_empty_clusters() -> None:
    values = torch.tensor([1.0, 1.0, 3.0, 3.0, 3.0])  # 2 distinct values, 8 clusters
    cb = kmeans_codebook(values, 3)
    assert torch.equal(cb, kmeans_codebook(values, 3))
    assert cb[0] == 1.0 and cb[-1] == 3.0
    assert torch.equal(cb[assign(values, cb).long()], values)
    assert torch.equal(kmeans_codebook(torch.empty(0), 2), torch.zeros(4))
    assert torch.equal(kmeans_codebook(torch.full((9,), 0.25), 2), torch.full((4,), 0.25))


def test_huge_values_are_clamped_to_fp16_range() -> None:
    cb = kmeans_codebook(torch.tensor([-1e6, 0.0, 1e6]), 2)
    assert bool(torch.isfinite(cb).all()) and float(cb.abs().max()) == 65504.0


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_error_no_worse_than_uniform_on_gaussian(bits: int) -> None:
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(bits))
    cb = kmeans_codebook(x, bits)
    kmeans_mse = float(((cb[assign(x, cb).long()] - x) ** 2).mean())
    qp = choose_qparams(x, bits, QuantScheme.AFFINE, Granularity.PER_TENSOR)
    uniform_mse = float(((dequantize(quantize(x, qp, Rounding.NEAREST), qp) - x) ** 2).mean())
    assert kmeans_mse <= uniform_mse


def test_large_inputs_fit_on_a_deterministic_sample() -> None:
    x = torch.randn(MAX_FIT_VALUES + 1000, generator=torch.Generator().manual_seed(0))
    cb = kmeans_codebook(x, 3)
    assert torch.equal(cb, kmeans_codebook(x, 3))
    other = kmeans_codebook(x, 3, generator=torch.Generator().manual_seed(1))
    assert float((cb - other).abs().max()) < 0.05  # a different sample, nearly the same fit
    assert assign(x, cb).shape == x.shape


def test_caller_mistakes_raise_value_error() -> None:
    with pytest.raises(ValueError):
        kmeans_codebook(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError):
        kmeans_codebook(torch.tensor([1.0, float("inf")]), 2)
    with pytest.raises(ValueError):
        kmeans_codebook(torch.ones(3), 9)
    with pytest.raises(ValueError):
        kmeans_codebook(torch.ones(2, 2), 2)
    with pytest.raises(ValueError):
        assign(torch.ones(3), torch.zeros(257))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fit_and_assign() -> None:
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(2))
    cb = kmeans_codebook(x.cuda(), 3)
    assert cb.device.type == "cuda" and is_fp16_exact(cb.cpu())
    assert torch.allclose(cb.cpu(), kmeans_codebook(x, 3), atol=1e-2)
    assert torch.equal(assign(x.cuda(), cb).cpu(), assign(x, cb.cpu()))


def test_two_bit_kmeans_beats_affine_on_top_k_updates() -> None:
    """Why the adaptive ladders use ``quant=2:kmeans`` (BENCHMARKS.md, simulations).

    Top-k keeps the largest entries of both signs: a two-humped set that four evenly
    spaced affine levels fit badly and four k-means centroids fit well. Measured when
    written: error 0.72 (affine) against 0.56 (k-means) of the update's norm, where
    top-k alone drops 0.55 (8-bit values), for 1% more bytes.
    """
    from fedsqueeze.codec import EncodedModel, decode_state, encode_state
    from fedsqueeze.codec.spec_text import parse_spec
    from fedsqueeze.tasks import get_task

    torch.manual_seed(0)
    base = dict(get_task("digits-cnn").build_model(0).state_dict())
    update = {
        k: v + 0.01 * torch.randn_like(v) * (1 + 3 * torch.rand_like(v) ** 4)
        for k, v in base.items()
    }
    norm = sum(float(((update[k] - base[k]) ** 2).sum()) for k in base)

    def run(quant: str) -> tuple[int, float]:
        spec = parse_spec(f"topk=0.05,quant={quant},targets=*,min-ndim=1")
        data = encode_state(update, spec, base, seed=0).to_bytes()
        out = decode_state(EncodedModel.from_bytes(data), base)
        return len(data), sum(float(((out[k] - update[k]) ** 2).sum()) for k in base) / norm

    affine_bytes, affine_err = run("2")
    kmeans_bytes, kmeans_err = run("2:kmeans")
    _, floor = run("8")
    assert kmeans_err < affine_err - 0.1, (kmeans_err, affine_err)
    assert kmeans_err < floor * 1.05, (kmeans_err, floor)
    assert kmeans_bytes < affine_bytes * 1.03, (kmeans_bytes, affine_bytes)
