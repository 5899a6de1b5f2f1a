"""Randomized Hadamard rotation before quantization (format version 6)."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from fedsqueeze.codec import (
    CodecSpec,
    EncodedModel,
    Granularity,
    PruneMethod,
    PruneSpec,
    QuantScheme,
    QuantSpec,
    decode_prefix,
    decode_state,
    encode_state,
    smallest_prefix,
)
from fedsqueeze.codec.container import GLOBAL_ORDER_VERSION, ROTATED_VERSION, crc32
from fedsqueeze.codec.rotation import (
    MAX_HADAMARD,
    hadamard_block,
    rotate,
    rotation_seed,
    signs,
    unrotate,
)
from fedsqueeze.codec.spec import Rotation, ScaleFormat
from fedsqueeze.codec.spec_text import format_spec, parse_spec
from fedsqueeze.errors import ConfigError, FormatError


def _hadamard(b: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(b)


def test_rotation_is_the_signed_block_hadamard_matrix() -> None:
    x = torch.randn(5, 48, dtype=torch.float64)
    seed = 1234
    b = hadamard_block(48)
    assert b == 16
    s = signs(seed, 48).double()
    blocks = (x * s).reshape(5, 3, b) @ _hadamard(b)  # H is symmetric
    assert torch.allclose(rotate(x, seed).double(), blocks.reshape(5, 48), atol=1e-5)


@pytest.mark.parametrize(
    ("n", "block"), [(1, 1), (7, 1), (384, 128), (1536, 512), (1 << 14, MAX_HADAMARD), (96, 32)]
)
def test_block_is_the_largest_power_of_two_dividing_the_row(n: int, block: int) -> None:
    assert hadamard_block(n) == block


def test_signs_are_fixed_by_the_seed() -> None:
    assert torch.equal(signs(7, 100), signs(7, 100))
    assert not torch.equal(signs(7, 100), signs(8, 100))
    assert set(signs(7, 1000).tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="32-bit"):
        signs(1 << 32, 4)
    assert rotation_seed("a.weight") != rotation_seed("b.weight")


@settings(max_examples=60, deadline=None)
@given(
    shape=st.sampled_from([(3, 64), (1, 12), (17,), (4, 3, 3, 3), (2, 1536), (5, 7), (0, 8)]),
    seed=st.integers(0, (1 << 32) - 1),
)
def test_unrotate_inverts_rotate_and_keeps_norms(shape: tuple[int, ...], seed: int) -> None:
    x = torch.randn(shape)
    y = rotate(x, seed)
    assert y.shape == x.shape
    assert math.isclose(float(y.norm()), float(x.norm()), rel_tol=1e-5, abs_tol=1e-6)
    back = unrotate(y.reshape(-1), seed, shape)
    assert torch.allclose(back, x, atol=1e-5)


def test_unrotate_refuses_values_of_another_shape() -> None:
    with pytest.raises(FormatError):
        unrotate(torch.zeros(10), 0, (3, 4))
    with pytest.raises(TypeError):
        rotate(torch.arange(4), 0)


def _outliers(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 128, generator=g) * 0.02
    w[:, 5] += 1.0  # one outlier column, as in transformer weights
    return {"lin.weight": w, "lin.bias": torch.randn(32, generator=g)}


@pytest.mark.parametrize(
    "text", ["quant=4:channel", "quant=4:block64", "quant=4:nf4:block64", "quant=3"]
)
def test_rotation_lowers_the_error_of_outlier_rows(text: str) -> None:
    state = _outliers()
    plain = parse_spec(text)
    assert plain.quant is not None
    rotated = plain.with_changes(
        quant=QuantSpec(**{**vars(plain.quant), "rotation": Rotation.HADAMARD})
    )
    errors = {}
    for spec in (plain, rotated):
        got = decode_state(EncodedModel.from_bytes(encode_state(state, spec, seed=0).to_bytes()))
        errors[spec] = float((got["lin.weight"] - state["lin.weight"]).norm())
        assert torch.equal(got["lin.bias"], state["lin.bias"])
    assert errors[rotated] < 0.75 * errors[plain]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    rows=st.integers(1, 9),
    cols=st.sampled_from([1, 6, 32, 40, 96]),
    bits=st.sampled_from([2, 3, 4, 8]),
    delta=st.booleans(),
)
def test_error_is_within_half_a_step_in_l2(
    seed: int, rows: int, cols: int, bits: int, delta: bool
) -> None:
    # Per tensor: every rotated value is within scale/2 of its code, and the rotation is
    # orthonormal, so the decoded tensor is within ‖scale/2‖₂ = scale/2·√n of the input.
    g = torch.Generator().manual_seed(seed)
    state = {"w.weight": torch.randn(rows, cols, generator=g).pow(3)}
    base = {"w.weight": torch.randn(rows, cols, generator=g)} if delta else None
    spec = CodecSpec(quant=QuantSpec(bits, rotation=Rotation.HADAMARD))
    encoded = encode_state(state, spec, base, seed=0)
    assert encoded.header.version == ROTATED_VERSION
    got = decode_state(EncodedModel.from_bytes(encoded.to_bytes()), base)["w.weight"]
    sent = state["w.weight"] - (base["w.weight"] if base else 0)
    y = rotate(sent, rotation_seed("w.weight"))
    # The affine range always includes 0 (choose_qparams), so a one-signed tensor's step
    # spans from 0 (hypothesis found seed 2831, a 2x1 delta of two positive values).
    scale = float(y.max().clamp(min=0) - y.min().clamp(max=0)) / (2**bits - 1)
    bound = scale / 2 * math.sqrt(sent.numel())
    err = float((got - state["w.weight"]).double().norm())
    assert err <= bound * (1 + 1e-4) + 1e-5


SPECS = [
    "quant=8:channel:hadamard,levels=2+1+1+2+2",
    "quant=8:block64:dq:hadamard,levels=3+1+4",
    "quant=4:nf4:block32:hadamard,levels=2+2",
]


@pytest.mark.parametrize("text", SPECS)
@pytest.mark.parametrize("delta", [False, True])
def test_rotated_levels_decode_from_every_prefix_and_never_get_worse(
    text: str, delta: bool
) -> None:
    state, base = _outliers(0), (_outliers(1) if delta else None)
    encoded = encode_state(state, parse_spec(text), base, seed=0)
    assert encoded.header.version == ROTATED_VERSION
    stream = encoded.to_bytes()[:-4]
    full = decode_state(encoded, base)
    once = decode_state(encode_state(state, parse_spec(text).with_changes(levels=None), base), base)
    assert torch.equal(full["lin.weight"], once["lin.weight"])
    previous = math.inf
    ends, pos = [], len(encoded.header.to_bytes())
    for record in encoded.records:
        pos += len(record.header_bytes()) + len(record.body)
        ends.append(pos)
    for end in (e for e in ends if e >= smallest_prefix(encoded)):
        got = decode_prefix(stream[:end], base).state["lin.weight"]
        d = float((got - full["lin.weight"]).double().square().sum())
        assert d <= previous * (1 + 1e-3) + 1e-9
        previous = d
    assert previous == 0.0


def test_spec_text_and_bytes_round_trip() -> None:
    spec = parse_spec("quant=8:channel:hadamard,levels=2+2+4")
    assert spec.quant is not None and spec.quant.rotation is Rotation.HADAMARD
    assert parse_spec(format_spec(spec)) == spec
    assert "hadamard" in format_spec(spec)
    assert CodecSpec.from_bytes(spec.to_bytes()) == spec
    plain = spec.with_changes(quant=QuantSpec(8, granularity=Granularity.PER_CHANNEL))
    assert plain.to_bytes() != spec.to_bytes()
    assert CodecSpec.from_bytes(plain.to_bytes()) == plain


@pytest.mark.parametrize(
    "text",
    [
        "prune=l1:0.5,quant=4:hadamard",
        "topk=0.1,quant=4:hadamard",
        "rank=2,quant=8:hadamard",
    ],
)
def test_rotation_is_refused_where_values_are_not_dense(text: str) -> None:
    with pytest.raises(ConfigError, match="rotation"):
        parse_spec(text)


def test_hadamard_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="conflicts"):
        parse_spec("quant=8:hadamard:hadamard")


def _rotated_model() -> bytes:
    spec = CodecSpec(quant=QuantSpec(4, QuantScheme.AFFINE, Granularity.PER_CHANNEL,
                                     rotation=Rotation.HADAMARD))  # fmt: skip
    return encode_state(_outliers(), spec, seed=0).to_bytes()


def _with_crc(body: bytes) -> bytes:
    return body + crc32(body).to_bytes(4, "little")


def test_a_rotated_record_in_an_earlier_version_is_refused() -> None:
    data = bytearray(_rotated_model())
    assert data[3] == ROTATED_VERSION
    data[3] = GLOBAL_ORDER_VERSION
    with pytest.raises(FormatError, match="rotated record in a version 5"):
        EncodedModel.from_bytes(_with_crc(bytes(data[:-4])))


def test_an_unknown_rotation_and_a_mismatched_descriptor_are_refused() -> None:
    data = _rotated_model()
    prefix = bytes([4, 1]) + rotation_seed("lin.weight").to_bytes(4, "little")
    at = data.index(prefix)
    unknown = data[: at + 1] + bytes([9]) + data[at + 2 : -4]
    with pytest.raises(FormatError, match="unknown rotation"):
        EncodedModel.from_bytes(_with_crc(unknown))
    other_bits = data[: at + 6] + bytes([data[at + 6] ^ 0x0C]) + data[at + 7 : -4]
    with pytest.raises(FormatError):
        EncodedModel.from_bytes(_with_crc(other_bits))


def test_dq_block_scales_and_rotation_together() -> None:
    spec = CodecSpec(
        quant=QuantSpec(
            4,
            granularity=Granularity.PER_BLOCK,
            block_size=64,
            scale_format=ScaleFormat.DQ8,
            rotation=Rotation.HADAMARD,
        )
    )
    got = decode_state(EncodedModel.from_bytes(encode_state(_outliers(), spec).to_bytes()))
    err = float((got["lin.weight"] - _outliers()["lin.weight"]).norm())
    assert err < 0.1 * float(_outliers()["lin.weight"].norm())


def test_pruning_spec_keeps_its_meaning_without_rotation() -> None:
    spec = CodecSpec(prune=PruneSpec(PruneMethod.L1_UNSTRUCTURED, 0.5), quant=QuantSpec(4))
    assert spec.quant is not None and spec.quant.rotation is Rotation.NONE


def test_part_by_part_decoding_refuses_rotations_and_the_tensor_path_takes_them() -> None:
    from fedsqueeze.codec.stream_decode import decode_stream_into, scan_stream
    from fedsqueeze.codec.streaming import decode_into

    data = _rotated_model()
    target = {k: torch.zeros_like(v) for k, v in _outliers().items()}
    with pytest.raises(FormatError, match="rotation"):
        decode_into([data], target)
    layout = scan_stream(data[:-4])
    decode_stream_into(data[:-4], layout, target)
    expected = decode_state(EncodedModel.from_bytes(data))
    assert all(torch.equal(target[k], expected[k]) for k in target)


def test_rotation_travels_in_the_proto_spec() -> None:
    from fedsqueeze.errors import InvalidRequestError
    from fedsqueeze.wire import transfer_pb2 as pb
    from fedsqueeze.wire.spec_convert import codec_spec_from_proto, codec_spec_to_proto

    spec = parse_spec("quant=8:block384:dq:hadamard,levels=2+1+1+1+1+2")
    msg = codec_spec_to_proto(spec)
    assert msg.quant.rotation == pb.ROTATION_HADAMARD
    assert codec_spec_from_proto(msg) == spec
    plain = parse_spec("quant=8:block64")
    assert codec_spec_to_proto(plain).quant.rotation == pb.ROTATION_UNSPECIFIED  # as before
    msg.quant.rotation = 7  # type: ignore[assignment]
    with pytest.raises(InvalidRequestError, match="rotation"):
        codec_spec_from_proto(msg)


def test_a_large_rotated_record_decodes_through_the_pipelined_path() -> None:
    from fedsqueeze.codec import dense_decode

    g = torch.Generator().manual_seed(0)
    w = torch.randn(12000, 384, generator=g)
    w[:, 7] *= 30
    spec = parse_spec("quant=8:channel:hadamard,entropy=0")
    encoded = encode_state({"x.weight": w}, spec)
    assert len(encoded.records[0].body) > dense_decode.PIPELINE_ABOVE
    got = decode_state(EncodedModel.from_bytes(encoded.to_bytes()))["x.weight"]
    plain = decode_state(encode_state({"x.weight": w}, parse_spec("quant=8:channel")))
    err = float((got - w).norm())
    assert err < 0.5 * float((plain["x.weight"] - w).norm())


def test_inspect_names_the_rotation() -> None:
    from fedsqueeze.codec.inspect import stages_of

    encoded = encode_state(_outliers(), parse_spec("quant=4:channel:hadamard"))
    stages = stages_of(next(r for r in encoded.records if r.name == "lin.weight"))
    assert f"hadamard-rotated (seed {rotation_seed('lin.weight')})" in stages
