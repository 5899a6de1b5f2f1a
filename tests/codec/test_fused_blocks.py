"""Block-wise parameters chosen chunk by chunk (fedsqueeze.codec.fused_blocks, and the
compiled fedsqueeze.codec.jit.block_params, through dense_encode.encode_dense_blocks):
the parameters choose_qparams chooses, bit for bit (signed zeros included), and the same
body as the separate pass; hostile ranges rejected as before; encode_state's bytes
unchanged with the fused path on or off; the compiled path's own check of the values
refuses or carries a bad tensor as the encoder's separate check did, and replaces it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from fedsqueeze.codec import NonFinite, dense_encode, jit, kernels, tensor_encode
from fedsqueeze.codec.blockwise import DQ_GROUP, DQ_TABLE, scales_to_bytes, store_scales
from fedsqueeze.codec.fused_blocks import _stored, block_params, fusable
from fedsqueeze.codec.model import EncodedModel, decode_state, encode_state
from fedsqueeze.codec.quantization import Runs, choose_qparams
from fedsqueeze.codec.spec import Granularity, QuantScheme, QuantSpec, ScaleFormat
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.errors import NonFiniteError

SPECS = [
    (QuantScheme.AFFINE, 2),
    (QuantScheme.AFFINE, 4),
    (QuantScheme.AFFINE, 8),
    (QuantScheme.SYMMETRIC, 4),
    (QuantScheme.SYMMETRIC, 8),
    (QuantScheme.NF4, 4),
]
FORMATS = [ScaleFormat.FP16, ScaleFormat.BF16, ScaleFormat.FP32]
#: jit.block_params' double-quantization parts where the format has none.
NO_DQ = (DQ_TABLE, np.empty(0, np.uint8), np.empty(0, np.int16))
#: The NumPy kernels, and the compiled ones (at every size; skipped without numba).
PATHS = [
    False,
    pytest.param(True, marks=pytest.mark.skipif(not jit.ready(), reason="numba is not here")),
]


@pytest.fixture
def compiled(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """The path a test runs: the compiled kernels at every size, or none at all."""
    on = bool(request.param)
    monkeypatch.setattr(jit, "MIN_VALUES", 1)
    monkeypatch.setattr(jit, "ENABLED", on)
    return on


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


@pytest.mark.parametrize("compiled", PATHS, indirect=True)
@pytest.mark.parametrize(("scheme", "bits"), SPECS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("n", "block"), [(4000, 64), (4001, 32), (10_000, 100), (9000, 4096)])
def test_same_params_and_body_as_the_separate_pass(
    scheme: QuantScheme, bits: int, fmt: ScaleFormat, n: int, block: int, compiled: bool
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


@pytest.mark.parametrize("compiled", PATHS, indirect=True)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 2.0**127])
def test_non_finite_values_rejected_as_before(bad: float, compiled: bool) -> None:
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


@pytest.mark.parametrize("compiled", PATHS, indirect=True)
def test_fp16_scale_overflow_rejected_as_before(compiled: bool) -> None:
    q = QuantSpec(8, QuantScheme.AFFINE, Granularity.PER_BLOCK, block_size=64)
    x = torch.randn(5000)
    x[100] = 1e9
    runs = Runs(64)
    with pytest.raises(ValueError, match="fp16") as before:
        choose_qparams(x, 8, q.scheme, q.granularity, runs, runs.count(5000), q.scales)
    with small_chunks(chunk=256), pytest.raises(ValueError, match="fp16") as fused:
        dense_encode.encode_dense_blocks(x, q, runs, 3)
    assert str(fused.value) == str(before.value)
    assert isinstance(fused.value, dense_encode.OutOfRange) == compiled


def test_not_fusable() -> None:
    dq = QuantSpec(4, QuantScheme.NF4, Granularity.PER_BLOCK, block_size=64,
                   scale_format=ScaleFormat.DQ8)  # fmt: skip
    assert not fusable(dq, Runs(64))
    pow2 = QuantSpec(8, QuantScheme.POW2, Granularity.PER_BLOCK, block_size=64)
    assert not fusable(pow2, Runs(64))
    channel = QuantSpec(8, QuantScheme.AFFINE, Granularity.PER_CHANNEL)
    assert fusable(channel, Runs(64))  # rows as blocks, fp32 scales
    assert not fusable(channel, torch.zeros(64, dtype=torch.int64))  # channel indices
    per_tensor = QuantSpec(8, QuantScheme.AFFINE, Granularity.PER_TENSOR)
    assert not fusable(per_tensor, Runs(64))


@pytest.mark.parametrize(
    "text", ["quant=4:block64", "quant=8:block64", "quant=4:nf4:block64",
             "quant=4:symmetric:block32:bf16", "quant=2:block128:fp32", "quant=4:nf4:block64:dq",
             "quant=8:block384:dq", "quant=8:channel", "quant=4:symmetric:channel",
             "quant=4:nf4:channel"],
)  # fmt: skip
@pytest.mark.parametrize("compiled", PATHS, indirect=True)
@pytest.mark.parametrize("entropy", ["", ",entropy=0"])
def test_encode_state_bytes_unchanged(
    text: str, entropy: str, compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = torch.Generator().manual_seed(3)
    state = {"w": torch.randn(300, 170, generator=g) * 0.02, "b": torch.randn(170, generator=g)}
    spec = parse_spec(text + entropy)
    with small_chunks(chunk=4096):
        monkeypatch.setattr(dense_encode, "FUSED_SCALES", True)
        fused = encode_state(state, spec).to_bytes()
        monkeypatch.setattr(dense_encode, "FUSED_SCALES", False)
        monkeypatch.setattr(jit, "ENABLED", False)  # the compiled path fuses whenever it runs
        separate = encode_state(state, spec).to_bytes()
    assert fused == separate


@pytest.mark.skipif(not jit.ready(), reason="numba is not importable here")
def test_compiled_scales_are_the_numpy_rounding() -> None:
    """Each format's stored scale (the smallest value of the format >= the raw scale)
    for raw scales over every octave and at fp16's subnormal, normal and largest edges."""
    g = np.random.default_rng(0)
    bits = g.integers(np.float32(2.0**-130).view(np.int32), np.float32(2.0**126).view(np.int32),
                      200_000).astype(np.int32)  # fmt: skip
    edges = [0.0, -0.0, -1.0, 2.0**-126, 2.0**-25, 2.0**-24, 3 * 2.0**-25, 2.0**-14,
             2.0**-14 - 2.0**-30, 1.0, 1.0 + 2.0**-20, 65504.0, 65503.9]  # fmt: skip
    raw = np.concatenate([bits.view(np.float32), np.array(edges, np.float32)])
    for fmt in FORMATS:
        r = raw[raw <= 65504.0] if fmt is ScaleFormat.FP16 else raw
        want = np.empty(r.size, np.float32)
        _stored(r, fmt, want)
        for sign in (1.0, -1.0):  # NF4 blocks of one value: the raw scale is its magnitude
            got, unused = np.empty(r.size, np.float32), np.empty(r.size, np.float32)
            status = jit.block_params(
                np.float32(sign) * r, 0, r.size, 1, 4, 2, dense_encode._FORMAT_CODES[fmt],
                np.float32(2.0**126), got, unused, unused, NO_DQ,
            )  # fmt: skip
            assert status == 0
            assert np.array_equal(got.view(np.int32), want.view(np.int32)), (fmt, sign)


@pytest.mark.skipif(not jit.ready(), reason="numba is not importable here")
@pytest.mark.parametrize(("scheme", "bits"), SPECS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_compiled_params_are_the_numpy_params(
    scheme: QuantScheme, bits: int, fmt: ScaleFormat
) -> None:
    """jit.block_params against fused_blocks.block_params on hostile blocks of several
    lengths (a short last block included), the reciprocals as the pipeline makes them."""
    for length in (1, 3, 64, 100):
        for seed in range(3):
            x = hostile(4_001, seed + length, fmt).numpy()
            count = -(-x.size // length)
            want_s, want_z = np.empty(count, np.float32), np.empty(count, np.float32)
            block_params(x, length, bits, scheme, fmt, want_s, want_z)
            got_s, got_z, inv = (np.empty(count, np.float32) for _ in range(3))
            status = jit.block_params(
                x, 0, x.size, length, bits, dense_encode._SCHEME_CODES[scheme],
                dense_encode._FORMAT_CODES[fmt], np.float32(2.0**126), got_s, got_z, inv, NO_DQ,
            )  # fmt: skip
            assert status == 0
            assert np.array_equal(got_s.view(np.int32), want_s.view(np.int32))
            assert np.array_equal(got_z.view(np.int32), want_z.view(np.int32))
            if scheme is not QuantScheme.NF4:
                assert np.array_equal(inv, np.float32(1.0) / want_s)


@pytest.mark.skipif(not jit.ready(), reason="numba is not importable here")
@pytest.mark.parametrize(("scheme", "bits"), SPECS)
@pytest.mark.parametrize("length", [1, 3, 64, 100])
def test_compiled_double_quantized_scales_are_choose_qparams(
    scheme: QuantScheme, bits: int, length: int
) -> None:
    """DQ8 in the compiled pass: each block's code, each group's exponent, the stored
    scales and zero points as choose_qparams (blockwise.store_scales) makes them, on
    blocks over every octave (groups whose largest scale is huge or tiny, short last
    groups), the pass cut in steps of whole groups."""
    for seed in range(3):
        x = hostile(40_001, seed + length, ScaleFormat.DQ8)
        if seed == 2:
            x[: 256 * length] *= 2.0**-100  # a group of tiny scales (its exponent clips)
            x[-length:] = x[-length:].clamp(-1.0, 1.0) * 2.0**100  # a huge last block
        runs = Runs(length)
        count = runs.count(x.numel())
        ref = choose_qparams(x, bits, scheme, Granularity.PER_BLOCK, runs, count, ScaleFormat.DQ8)
        assert ref.double_quant is not None
        xs = x.numpy()
        got_s, got_z, inv = (np.empty(count, np.float32) for _ in range(3))
        codes = np.empty(count, np.uint8)
        exps = np.empty(-(-count // DQ_GROUP), np.int16)
        step = DQ_GROUP * length * 3  # three groups a call, as the pass steps
        for start in range(0, xs.size, step):
            status = jit.block_params(
                xs, start, min(xs.size, start + step), length, bits,
                dense_encode._SCHEME_CODES[scheme], 3, np.float32(2.0**126),
                got_s, got_z, inv, (DQ_TABLE, codes, exps),
            )  # fmt: skip
            assert status == 0
        assert np.array_equal(codes, ref.double_quant.codes.numpy())
        assert np.array_equal(exps, ref.double_quant.exponents.numpy())
        assert np.array_equal(got_s.view(np.int32), bits_of(ref.scale))
        assert np.array_equal(got_z.view(np.int32), bits_of(ref.zero_point))
    inside = jit.block_params(
        xs, length, xs.size, length, bits, 0, 3, np.float32(2.0**126),
        got_s, got_z, inv, (DQ_TABLE, codes, exps),
    )  # fmt: skip
    assert inside == 3  # a start inside a group is refused


def _big_blocks(monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """Tensors the compiled block-wise pipeline takes (small thresholds)."""
    monkeypatch.setattr(jit, "MIN_VALUES", 1)
    monkeypatch.setattr(dense_encode, "PIPELINE_ABOVE", 64)
    monkeypatch.setattr(dense_encode, "_CHUNK", 512)
    g = torch.Generator().manual_seed(5)
    return {f"l{i}.weight": torch.randn(40, 97, generator=g) for i in range(4)}


@pytest.mark.skipif(not jit.ready(), reason="numba is not importable here")
@pytest.mark.parametrize(
    "text", ["quant=4:block64", "quant=8:symmetric:block32:bf16", "quant=8:channel"]
)
@pytest.mark.parametrize("bad", [float("nan"), -float("inf"), 3e38])
def test_a_bad_block_is_refused_or_carried_as_by_the_separate_check(
    text: str, bad: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled pass checks the blocks itself: the refusal names the first bad
    tensor with the separate check's words, CARRY sends it bit-exactly, and the rest are
    the bytes of the path with the check first."""
    state = _big_blocks(monkeypatch)
    state["l1.weight"][7, 3] = bad
    state["l3.weight"][0, 0] = bad
    spec = parse_spec(text)
    encoder = tensor_encode.TensorEncoder(spec, None, None, None)
    own = encoder.problem("l1.weight", state["l1.weight"])
    assert own is not None
    with pytest.raises(NonFiniteError) as exc:
        encode_state(state, spec)
    assert exc.value.tensor == "l1.weight"
    assert str(exc.value) == str(NonFiniteError("l1.weight", own))
    carried = encode_state(state, spec, nonfinite=NonFinite.CARRY).to_bytes()
    decoded = decode_state(EncodedModel.from_bytes(carried))
    for name in ("l1.weight", "l3.weight"):
        assert torch.equal(decoded[name].view(torch.int32), state[name].view(torch.int32))
    monkeypatch.setattr(jit, "ENABLED", False)  # the check first, then the separate pass
    assert encode_state(state, spec, nonfinite=NonFinite.CARRY).to_bytes() == carried


@pytest.mark.skipif(not jit.ready(), reason="numba is not importable here")
def test_fp16_scales_refuse_values_beyond_65504_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    state = _big_blocks(monkeypatch)
    state["l2.weight"][1, 1] = 70_000.0  # finite, but beyond what fp16 block scales allow
    spec = parse_spec("quant=4:block64")
    with pytest.raises(NonFiniteError, match="65504") as exc:
        encode_state(state, spec)
    monkeypatch.setattr(jit, "ENABLED", False)
    with pytest.raises(NonFiniteError) as before:
        encode_state(state, spec)
    assert str(exc.value) == str(before.value)
    channel = parse_spec("quant=8:channel")  # fp32 row scales: 70,000 is fine there
    want = encode_state(state, channel).to_bytes()
    monkeypatch.setattr(jit, "ENABLED", True)
    assert encode_state(state, channel).to_bytes() == want


@pytest.mark.skipif(not jit.ready(), reason="numba is not importable here")
@pytest.mark.parametrize("text", ["quant=4:nf4:block64", "quant=4:channel"])
def test_the_separate_check_is_not_made(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A good tensor on the compiled path is read once: the encoder's own range pass
    (kernels.value_range) is never called, and the bytes are those of the path with it."""
    state = _big_blocks(monkeypatch)
    spec = parse_spec(text)
    calls: list[int] = []
    real = kernels.value_range

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tensor_encode, "value_range", counted)
    blob = encode_state(state, spec).to_bytes()
    assert calls == []
    monkeypatch.setattr(jit, "ENABLED", False)
    assert encode_state(state, spec).to_bytes() == blob
    assert len(calls) == len(state)  # the check first, once per tensor


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
