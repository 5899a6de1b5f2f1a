"""Block-wise parameters chosen chunk by chunk (fedsqueeze.codec.fused_blocks, through
dense_encode.encode_dense_blocks): the parameters choose_qparams chooses, bit for bit
(signed zeros included), and the same body as the separate pass; hostile ranges
rejected as before; encode_state's bytes unchanged with the fused path on or off."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from fedsqueeze.codec import dense_encode
from fedsqueeze.codec.blockwise import scales_to_bytes, store_scales
from fedsqueeze.codec.fused_blocks import fusable
from fedsqueeze.codec.model import encode_state
from fedsqueeze.codec.quantization import Runs, choose_qparams
from fedsqueeze.codec.spec import Granularity, QuantScheme, QuantSpec, ScaleFormat
from fedsqueeze.codec.spec_text import parse_spec

SPECS = [
    (QuantScheme.AFFINE, 2),
    (QuantScheme.AFFINE, 4),
    (QuantScheme.AFFINE, 8),
    (QuantScheme.SYMMETRIC, 4),
    (QuantScheme.SYMMETRIC, 8),
    (QuantScheme.NF4, 4),
]
FORMATS = [ScaleFormat.FP16, ScaleFormat.BF16, ScaleFormat.FP32]


@contextlib.contextmanager
def small_chunks(chunk: int) -> Iterator[None]:
    saved = dense_encode._CHUNK, dense_encode.PIPELINE_ABOVE, torch.get_num_threads()
    dense_encode._CHUNK, dense_encode.PIPELINE_ABOVE = chunk, 64
    torch.set_num_threads(2)
    try:
        yield
    finally:
        dense_encode._CHUNK, dense_encode.PIPELINE_ABOVE, threads = saved
        torch.set_num_threads(threads)


def hostile(n: int, seed: int, fmt: ScaleFormat) -> torch.Tensor:
    """Blocks over many octaves, all-zero and signed-zero blocks, single values, exact
    ties, subnormals, and magnitudes up to what the format allows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    top = 10 if fmt is ScaleFormat.FP16 else 120
    octave = torch.randint(-140, top, (n // 32 + 1,), generator=g)
    x = x * torch.exp2(octave.repeat_interleave(32)[:n].to(torch.float32))
    if fmt is ScaleFormat.FP16:
        x = x.clamp(-60000.0, 60000.0)
    x[:40] = 0.0
    x[40:80] = -0.0
    x[80:120] = torch.where(torch.arange(40) % 2 == 0, 0.0, -0.0)
    x[120:160] = 1e-45  # the smallest subnormal
    x[160:200] = -3.0
    x[200:240] = torch.tensor([0.5, -0.5]).repeat(20)
    return x


def bits_of(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().numpy().view(np.uint32)


@pytest.mark.parametrize(("scheme", "bits"), SPECS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("n", "block"), [(4000, 64), (4001, 32), (10_000, 100), (9000, 4096)])
def test_same_params_and_body_as_the_separate_pass(
    scheme: QuantScheme, bits: int, fmt: ScaleFormat, n: int, block: int
) -> None:
    q = QuantSpec(bits, scheme, Granularity.PER_BLOCK, block_size=block, scale_format=fmt)
    runs = Runs(block)
    assert fusable(q, runs)
    for seed in range(2):
        x = hostile(n, seed, fmt)
        ref = choose_qparams(x, bits, scheme, Granularity.PER_BLOCK, runs, runs.count(n), fmt)
        with small_chunks(chunk=96):
            qp, body = dense_encode.encode_dense_blocks(x, q, runs, 3)
            want = dense_encode.encode_dense(x, ref, runs, 3)
        assert np.array_equal(bits_of(qp.scale), bits_of(ref.scale))
        assert np.array_equal(bits_of(qp.zero_point), bits_of(ref.zero_point))
        assert qp.scale_format is ref.scale_format and qp.double_quant is None
        assert torch.equal(body.packed, want.packed)
        assert bytes(body.body) == bytes(want.body) and body.raw_length == want.raw_length


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 2.0**127])
def test_non_finite_values_rejected_as_before(bad: float) -> None:
    q = QuantSpec(4, QuantScheme.SYMMETRIC, Granularity.PER_BLOCK, block_size=64,
                  scale_format=ScaleFormat.BF16)  # fmt: skip
    x = torch.randn(5000)
    x[3333] = bad
    runs = Runs(64)
    with pytest.raises(ValueError, match="finite") as before:
        choose_qparams(x, 4, q.scheme, q.granularity, runs, runs.count(5000), q.scales)
    with small_chunks(chunk=256), pytest.raises(ValueError, match="finite") as fused:
        dense_encode.encode_dense_blocks(x, q, runs, 3)
    assert str(fused.value) == str(before.value)


def test_fp16_scale_overflow_rejected_as_before() -> None:
    q = QuantSpec(8, QuantScheme.AFFINE, Granularity.PER_BLOCK, block_size=64)
    x = torch.randn(5000)
    x[100] = 1e9
    runs = Runs(64)
    with pytest.raises(ValueError, match="fp16") as before:
        choose_qparams(x, 8, q.scheme, q.granularity, runs, runs.count(5000), q.scales)
    with small_chunks(chunk=256), pytest.raises(ValueError, match="fp16") as fused:
        dense_encode.encode_dense_blocks(x, q, runs, 3)
    assert str(fused.value) == str(before.value)


def test_not_fusable() -> None:
    dq = QuantSpec(4, QuantScheme.NF4, Granularity.PER_BLOCK, block_size=64,
                   scale_format=ScaleFormat.DQ8)  # fmt: skip
    assert not fusable(dq, Runs(64))
    pow2 = QuantSpec(8, QuantScheme.POW2, Granularity.PER_BLOCK, block_size=64)
    assert not fusable(pow2, Runs(64))
    channel = QuantSpec(8, QuantScheme.AFFINE, Granularity.PER_CHANNEL)
    assert not fusable(channel, Runs(64))


@pytest.mark.parametrize(
    "text", ["quant=4:block64", "quant=8:block64", "quant=4:nf4:block64",
             "quant=4:symmetric:block32:bf16", "quant=2:block128:fp32", "quant=4:nf4:block64:dq"],
)  # fmt: skip
def test_encode_state_bytes_unchanged(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(3)
    state = {"w": torch.randn(300, 170, generator=g) * 0.02, "b": torch.randn(170, generator=g)}
    spec = parse_spec(text)
    with small_chunks(chunk=4096):
        monkeypatch.setattr(dense_encode, "FUSED_SCALES", True)
        fused = encode_state(state, spec).to_bytes()
        monkeypatch.setattr(dense_encode, "FUSED_SCALES", False)
        separate = encode_state(state, spec).to_bytes()
    assert fused == separate


def torch_scale_bytes(flat: torch.Tensor, fmt: ScaleFormat) -> bytes:
    """scales_to_bytes' previous torch form (the reference)."""
    if not bool((torch.isfinite(flat) & (flat > 0)).all()):
        raise ValueError("scale must be finite and positive")
    if fmt is ScaleFormat.FP32:
        return flat.numpy().astype("<f4").tobytes()
    dtype = torch.float16 if fmt is ScaleFormat.FP16 else torch.bfloat16
    stored = flat.to(dtype)
    if not torch.equal(stored.to(torch.float32), flat):
        raise ValueError(f"scales are not exactly representable in {fmt.name.lower()}")
    return stored.view(torch.int16).numpy().astype("<i2").tobytes()


@pytest.mark.parametrize("fmt", FORMATS)
def test_scale_bytes_as_the_torch_form(fmt: ScaleFormat) -> None:
    g = torch.Generator().manual_seed(1)
    raw = (
        torch.exp2(torch.randint(-140, 120, (5000,), generator=g).float())
        * torch.rand(5000, generator=g)
        + 2.0**-126
    )
    if fmt is ScaleFormat.FP16:
        raw = raw.clamp(max=60000.0)
    stored, _ = store_scales(raw, fmt)
    assert scales_to_bytes(stored, fmt, None) == torch_scale_bytes(stored, fmt)
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        hostile = stored.clone()
        hostile[17] = bad
        with pytest.raises(ValueError, match="finite and positive"):
            scales_to_bytes(hostile, fmt, None)
    if fmt is not ScaleFormat.FP32:
        inexact = stored.clone()
        inexact[3] = 1.0 + 2.0**-20  # between two fp16 and two bf16 values
        with pytest.raises(ValueError, match="not exactly representable") as got:
            scales_to_bytes(inexact, fmt, None)
        with pytest.raises(ValueError, match="not exactly representable") as want:
            torch_scale_bytes(inexact, fmt)
        assert str(got.value) == str(want.value)
    if fmt is ScaleFormat.FP16:
        over = stored.clone()
        over[5] = 70000.0  # beyond fp16: inf when converted
        with pytest.raises(ValueError, match="not exactly representable"):
            scales_to_bytes(over, fmt, None)
