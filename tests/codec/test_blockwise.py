"""Block-wise and NF4 quantization: error bounds, a naive NF4 reference, stored scales,
spec text/bytes/proto, and hostile block headers."""

from __future__ import annotations

import struct
from dataclasses import replace
from statistics import NormalDist

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from fedsqueeze.codec import (
    CodecSpec,
    EncodedModel,
    Granularity,
    QuantScheme,
    QuantSpec,
    Rounding,
    ScaleFormat,
    blockwise,
    decode_state,
    encode_state,
)
from fedsqueeze.codec.blockwise import (
    NF4_CODEBOOK,
    block_index,
    num_blocks,
    scales_from_bytes,
    scales_to_bytes,
    store_scales,
)
from fedsqueeze.codec.container import BLOCKWISE_VERSION, FORMAT_VERSION, PROGRESSIVE_VERSION
from fedsqueeze.codec.quantization import (
    choose_qparams,
    dequantize,
    qparams_from_bytes,
    qparams_to_bytes,
    quantize,
)
from fedsqueeze.codec.spec_text import format_spec, parse_spec
from fedsqueeze.errors import CodecError, ConfigError, FormatError
from fedsqueeze.wire.spec_convert import codec_spec_from_proto, codec_spec_to_proto

BLOCK = Granularity.PER_BLOCK


def _outliers(n: int, seed: int, spread: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * spread
    if n:
        x[torch.randint(0, n, (max(1, n // 500),), generator=g)] *= 300.0  # a few outliers
    return x


def _round_trip(
    x: torch.Tensor, bits: int, scheme: QuantScheme, size: int, fmt: ScaleFormat
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ch = block_index(x.numel(), size)
    c = max(1, num_blocks(x.numel(), size))
    qp = choose_qparams(x, bits, scheme, BLOCK, ch, c, fmt)
    codes = quantize(x, qp, Rounding.NEAREST, ch)
    blob = qparams_to_bytes(qp)
    qp2, end = qparams_from_bytes(blob, 0, bits, scheme, c, fmt)
    assert end == len(blob)
    y = dequantize(codes, qp2, ch)
    assert torch.equal(y, dequantize(codes, qp, ch))
    scale = qp2.scale.reshape(-1)[ch] if qp2.scale.dim() else qp2.scale.expand(x.shape)
    return y, scale, ch


@settings(max_examples=80, deadline=None)
@given(
    scheme=st.sampled_from([QuantScheme.AFFINE, QuantScheme.SYMMETRIC]),
    bits=st.sampled_from([2, 3, 4, 8]),
    n=st.integers(1, 3000),
    size=st.sampled_from([32, 48, 64, 256, 4096]),
    fmt=st.sampled_from(list(ScaleFormat)),
    seed=st.integers(0, 2**31),
    spread=st.sampled_from([1e-30, 1e-3, 1.0, 100.0]),
)
def test_nearest_error_at_most_half_a_stored_block_scale(
    scheme: QuantScheme, bits: int, n: int, size: int, fmt: ScaleFormat, seed: int, spread: float
) -> None:
    x = _outliers(n, seed, spread)
    try:
        y, scale, _ = _round_trip(x, bits, scheme, size, fmt)
    except ValueError as exc:
        # A block whose scale fp16 cannot hold is refused with a clear error (the codec
        # then carries the tensor or refuses it): only for values past fp16's largest.
        assert fmt is ScaleFormat.FP16 and "beyond fp16's range" in str(exc)
        assert float(x.abs().max()) > 65504.0
        return
    assert bool(((y - x).abs() <= scale / 2 * (1 + 1e-5) + 1e-37).all())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 2000), seed=st.integers(0, 2**31), fmt=st.sampled_from(list(ScaleFormat)))
def test_block_scales_are_stored_rounded_up(n: int, seed: int, fmt: ScaleFormat) -> None:
    raw = _outliers(n, seed, 1.0).abs() + 1e-20
    stored, dq = store_scales(raw, fmt)
    assert bool((stored >= raw).all())
    again, _ = scales_from_bytes(scales_to_bytes(stored, fmt, dq), 0, fmt, n)
    assert torch.equal(again, stored)
    if fmt is ScaleFormat.DQ8:  # 1/16 octave, unless 2^16 below the group's largest
        starts = torch.arange(0, n, 256)
        group_max = torch.stack([raw[i : i + 256].max() for i in starts.tolist()])
        group_max = group_max.repeat_interleave(256)[:n]
        near = raw > group_max * 2.0**-15
        assert bool((stored[near] <= raw[near] * 2 ** (1 / 16) * (1 + 1e-6)).all())


def test_eight_bit_blocks_survive_outliers_where_per_tensor_does_not() -> None:
    x = _outliers(64 * 200, 0, 0.02)
    per_tensor = choose_qparams(x, 8, QuantScheme.AFFINE, Granularity.PER_TENSOR)
    y_tensor = dequantize(quantize(x, per_tensor, Rounding.NEAREST), per_tensor)
    y_block, _, _ = _round_trip(x, 8, QuantScheme.AFFINE, 64, ScaleFormat.FP16)
    rel_tensor = float((y_tensor - x).norm() / x.norm())
    rel_block = float((y_block - x).norm() / x.norm())
    assert rel_block < 0.01 < rel_tensor


def test_nf4_codebook_is_qloras_normal_quantiles() -> None:
    # QLoRA's construction: 8 positive and 7 negative quantiles of N(0, 1) at offset
    # 0.9677 (halves of 1/32 + 1/30), an exact zero, normalized to [-1, 1].
    offset = 0.5 * (1 / 32 + 1 / 30)
    ppf = NormalDist().inv_cdf

    def linspace(a: float, b: float, k: int) -> list[float]:
        return [a + (b - a) * i / (k - 1) for i in range(k)]

    pos = [ppf(p) for p in linspace(1 - offset, 0.5, 9)[:-1]]
    neg = [-ppf(p) for p in linspace(1 - offset, 0.5, 8)[:-1]]
    values = sorted([*pos, 0.0, *neg])
    expected = torch.tensor(values, dtype=torch.float64) / max(values)
    assert torch.allclose(NF4_CODEBOOK.double(), expected, atol=1e-6)


def _naive_nf4(x: torch.Tensor, size: int) -> torch.Tensor:
    """A plain loop: absmax per block, nearest entry (ties to the lower one), rescale."""
    table = NF4_CODEBOOK.tolist()
    out = []
    for start in range(0, x.numel(), size):
        block = x[start : start + size].tolist()
        absmax = max(abs(v) for v in block) or 1.0
        for v in block:
            unit = v / absmax
            best = min(range(16), key=lambda i: (abs(table[i] - unit), i))
            out.append(table[best] * absmax)
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("n", [1, 63, 64, 500])
def test_nf4_matches_a_naive_reference(n: int) -> None:
    x = _outliers(n, n, 1.0)
    y, _, _ = _round_trip(x, 4, QuantScheme.NF4, 64, ScaleFormat.FP32)
    assert torch.allclose(y, _naive_nf4(x, 64), rtol=1e-6, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 2000), seed=st.integers(0, 2**31), fmt=st.sampled_from(list(ScaleFormat)))
def test_nf4_error_at_most_half_the_widest_gap(n: int, seed: int, fmt: ScaleFormat) -> None:
    x = _outliers(n, seed, 1.0)
    y, scale, _ = _round_trip(x, 4, QuantScheme.NF4, 64, fmt)
    gap = float((NF4_CODEBOOK[1:] - NF4_CODEBOOK[:-1]).max())
    assert bool(((y - x).abs() <= scale * gap / 2 * (1 + 1e-5)).all())


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "a.weight": torch.randn(24, 70, generator=g),
        "b.weight": torch.randn(5, 9, generator=g) * 1e-3,
        "b.bias": torch.randn(5, generator=g),
    }


@pytest.mark.parametrize(
    "text",
    [
        "quant=8:block64",
        "quant=4:nf4",
        "quant=4:nf4:block32:dq",
        "quant=4:nf4:channel",
        "quant=2:pow2:block32",
        "quant=3:symmetric:block128:bf16:stochastic",
        "prune=l1:0.6,quant=8:block32:fp32",
        "quant=8:block64:dq,levels=2+2+4",
    ],
)
def test_models_round_trip_as_version_3(text: str) -> None:
    state = _state()
    spec = parse_spec(text)
    encoded = encode_state(state, spec, seed=0)
    data = encoded.to_bytes()
    assert data[3] == BLOCKWISE_VERSION
    decoded = decode_state(EncodedModel.from_bytes(data))
    for name, t in state.items():
        rel = float((decoded[name] - t).norm() / t.norm())
        lossy = "prune" in text or "=2:" in text or "=3:" in text
        assert rel < (1.0 if lossy else 0.12), name
    assert torch.equal(decoded["b.bias"], state["b.bias"])


def test_models_without_new_features_keep_their_versions() -> None:
    state = _state()
    assert encode_state(state, parse_spec("quant=8")).to_bytes()[3] == FORMAT_VERSION
    assert encode_state(state, parse_spec("quant=8,levels=4+4")).to_bytes()[3] == (
        PROGRESSIVE_VERSION
    )


def test_fp16_scales_refuse_values_beyond_fp16() -> None:
    state = {"w.weight": torch.full((4, 40), 1e6)}
    with pytest.raises(CodecError, match="65504"):
        encode_state(state, parse_spec("quant=8:block32"))
    decoded = decode_state(encode_state(state, parse_spec("quant=8:block32:bf16")))
    assert torch.allclose(decoded["w.weight"], state["w.weight"], rtol=1e-2)


# ------------------------------------------------------------------ spec forms
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("quant=8:block64", QuantSpec(8, granularity=BLOCK, block_size=64)),
        ("quant=4:nf4", QuantSpec(4, QuantScheme.NF4, BLOCK, block_size=64)),
        (
            "quant=8:block128:dq",
            QuantSpec(8, granularity=BLOCK, block_size=128, scale_format=ScaleFormat.DQ8),
        ),
        (
            "quant=4:bf16:symmetric:block32",
            QuantSpec(
                4, QuantScheme.SYMMETRIC, BLOCK, block_size=32, scale_format=ScaleFormat.BF16
            ),
        ),
    ],
)
def test_spec_text_bytes_and_proto_round_trip(text: str, expected: QuantSpec) -> None:
    spec = parse_spec(text)
    assert spec.quant == expected
    assert spec.quant is not None and spec.quant.scale_format is not None
    assert parse_spec(format_spec(spec)) == spec
    assert CodecSpec.from_bytes(spec.to_bytes()) == spec
    assert codec_spec_from_proto(codec_spec_to_proto(spec)) == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("quant=8:block16", "32..4096"),
        ("quant=8:block8192", "32..4096"),
        ("quant=8:blockx", "blockB"),
        ("quant=8:nf4", "4-bit"),
        ("quant=8:dq", "need blocks"),
        ("quant=3:kmeans:block64", "per-tensor"),
        ("quant=8:block64:channel", "conflicts"),
        ("quant=8:block64:fp16:dq", "conflicts"),
        ("rank=2,quant=8:block64", "blocks"),
    ],
)
def test_bad_block_specs_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_spec(text)


def test_compact_form_refuses_unknown_quant_options() -> None:
    data = bytearray(parse_spec("quant=8:block64").to_bytes())
    data[2] |= 0x40  # an option bit no version defines
    with pytest.raises(FormatError):
        CodecSpec.from_bytes(bytes(data))


# ------------------------------------------------------------------ hostile bytes
def _block_model() -> tuple[bytes, int]:
    """An encoded one-tensor block-wise model and the offset of its extended descriptor."""
    state = {"w.weight": torch.randn(4, 64, generator=torch.Generator().manual_seed(1))}
    spec = parse_spec("quant=8:block64,entropy=0")
    data = encode_state(state, spec).to_bytes()
    stream = data[:-4]
    desc = stream.index(bytes([0x08 | 0x80, 1, 64]))  # bits | extended, AFFINE, block 64
    return stream, desc


def _with_crc(stream: bytes) -> bytes:
    import zlib

    return stream + struct.pack("<I", zlib.crc32(stream) & 0xFFFFFFFF)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (lambda s, d: s[: d + 2] + b"\x10" + s[d + 3 :], "block size"),  # 16 < 32
        (lambda s, d: s[: d + 2] + b"\x80\x40" + s[d + 3 :], "block size"),  # 8192
        (lambda s, d: s[: d + 3] + b"\x09" + s[d + 4 :], "scale format"),
        (lambda s, d: s[: d + 4] + b"\x80\x80\x80\x04" + s[d + 5 :], "block count"),
        (lambda s, d: s[: d + 1] + b"\x04" + s[d + 2 :], "KMEANS"),
        (lambda s, d: s[: d + 5] + b"\x00\x7c" + s[d + 7 :], "finite"),  # fp16 +Inf
        (lambda s, d: s[: d + 5] + b"\x00\x00" + s[d + 7 :], "finite and positive"),
        (lambda s, d: s[: d + 8], "truncated"),
    ],
)
def test_hostile_block_headers_raise_codec_errors(patch: object, message: str) -> None:
    stream, desc = _block_model()
    bad = patch(stream, desc)  # type: ignore[operator]
    with pytest.raises(CodecError, match=message):
        decode_state(EncodedModel.from_bytes(_with_crc(bad)))


def test_a_block_count_that_does_not_cover_the_values_is_refused() -> None:
    stream, _ = _block_model()
    model = EncodedModel.from_bytes(_with_crc(stream))
    (record,) = model.records
    q = record.quant
    assert q is not None and q.blocks == 4
    # three blocks' scales and zero points: a well-formed header, the wrong count
    fewer = replace(q, blocks=3, params=q.params[:6] + q.params[8:11])
    bad = replace(model, records=(replace(record, quant=fewer),))
    with pytest.raises(FormatError, match="3 blocks of 64 for 256 values"):
        decode_state(EncodedModel.from_bytes(bad.to_bytes()))


def test_block_records_in_older_versions_are_refused() -> None:
    stream, _ = _block_model()
    old = stream[:3] + bytes([PROGRESSIVE_VERSION]) + stream[4:]
    with pytest.raises(FormatError, match="version 2"):
        EncodedModel.from_bytes(_with_crc(old))


def test_inspect_names_the_blocks() -> None:
    from fedsqueeze.codec.inspect import describe

    encoded = encode_state({"a.weight": torch.randn(10, 100)}, parse_spec("quant=4:nf4:dq"))
    (info,) = describe(encoded)
    assert info.stages.startswith("nf4 4-bit 16 blocks of 64, dq8 scales")


@pytest.mark.parametrize(
    "fields",
    [
        {"granularity": "GRANULARITY_PER_BLOCK"},  # no block size
        {"granularity": "GRANULARITY_PER_BLOCK", "block_size": 16},
        {"granularity": "GRANULARITY_PER_TENSOR", "block_size": 64},
        {"granularity": "GRANULARITY_PER_TENSOR", "scale_format": "SCALE_FORMAT_DQ8"},
        {"granularity": "GRANULARITY_PER_BLOCK", "block_size": 64, "scale_format": 9},
        {"granularity": "GRANULARITY_PER_BLOCK", "block_size": 64, "bits": 8, "scheme": 5},
    ],
)
def test_proto_block_specs_out_of_range_are_refused(fields: dict[str, object]) -> None:
    from fedsqueeze.errors import InvalidRequestError
    from fedsqueeze.wire import transfer_pb2 as pb

    msg = codec_spec_to_proto(parse_spec("quant=4:block64"))
    msg.quant.ClearField("block_size")
    msg.quant.scale_format = pb.SCALE_FORMAT_UNSPECIFIED
    for key, value in fields.items():
        setattr(msg.quant, key, value)
    with pytest.raises(InvalidRequestError):
        codec_spec_from_proto(msg)


@pytest.mark.parametrize("n", [1, 255, 256, 257, 5 * 256 + 3, 40_000])
def test_double_quantized_scales_in_steps_equal_one_call(
    n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps of whole groups on every core give the codes and exponents of one call,
    whatever the last group's length (its padding) and the spread of magnitudes."""
    rng = np.random.default_rng(n)
    r = (rng.random(n) * 10.0 ** rng.integers(-30, 30, n)).astype(np.float32) + 1e-30
    one = blockwise._double_quantize(r)  # n <= STEP: one call
    monkeypatch.setattr(blockwise, "STEP", 512)
    stepped = blockwise._double_quantize(r)
    assert torch.equal(one.codes, stepped.codes)
    assert torch.equal(one.exponents, stepped.exponents)
