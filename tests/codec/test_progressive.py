"""Progressive levels: nested planes, anytime decoding of every prefix, hostile prefixes."""

from __future__ import annotations

import itertools

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
    join_prefix,
    progressive,
    smallest_prefix,
    split_segments,
)
from fedsqueeze.codec.container import (
    BLOCKWISE_VERSION,
    GLOBAL_ORDER_VERSION,
    PROGRESSIVE_VERSION,
    ROTATED_VERSION,
)
from fedsqueeze.codec.progressive import bucket_table, plane, reconstruct, top_codes
from fedsqueeze.codec.quantization import choose_qparams, dequantize, quantize
from fedsqueeze.codec.spec import EntropyCoder, Rotation, Rounding, ScaleFormat
from fedsqueeze.codec.spec_text import format_spec, parse_spec
from fedsqueeze.errors import ConfigError, FormatError, TruncatedError
from fedsqueeze.wire.spec_convert import codec_spec_from_proto, codec_spec_to_proto


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g) * 0.3,
        "conv.bias": torch.randn(8, generator=g),
        "fc.weight": torch.randn(10, 72, generator=g) * 0.1,
        "fc.weight2": torch.randn(16, 40, generator=g).pow(3),  # heavy tails
        "steps": torch.tensor(3),
    }


def _spec(levels: tuple[int, ...], **quant: object) -> CodecSpec:
    return CodecSpec(quant=QuantSpec(sum(levels), **quant), levels=levels)  # type: ignore[arg-type]


def _stream(encoded: EncodedModel) -> bytes:
    return encoded.to_bytes()[:-4]


def _record_ends(encoded: EncodedModel) -> list[int]:
    ends, pos = [], len(encoded.header.to_bytes())
    for record in encoded.records:
        pos += len(record.header_bytes()) + len(record.body)
        ends.append(pos)
    return ends


def _sq(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(
        float((a[k].double() - b[k].double()).square().sum()) for k in b if b[k].is_floating_point()
    )


SPECS = [
    _spec((2, 2, 4)),
    _spec((2, 2, 4), granularity=Granularity.PER_CHANNEL),
    _spec((4, 4), scheme=QuantScheme.SYMMETRIC, granularity=Granularity.PER_CHANNEL),
    _spec((1, 1, 2, 4), scheme=QuantScheme.POW2),
    _spec((2, 2), scheme=QuantScheme.KMEANS),
    CodecSpec(prune=PruneSpec(PruneMethod.L1_UNSTRUCTURED, 0.7), quant=QuantSpec(4), levels=(2, 2)),
    CodecSpec(topk=0.3, quant=QuantSpec(8, rounding=Rounding.STOCHASTIC), levels=(4, 4)),
    # block-wise scales and NF4 (format version 3)
    _spec((2, 2, 4), granularity=Granularity.PER_BLOCK, block_size=64),
    _spec(
        (4, 4),
        scheme=QuantScheme.SYMMETRIC,
        granularity=Granularity.PER_BLOCK,
        block_size=32,
        scale_format=ScaleFormat.DQ8,
    ),
    _spec((2, 2), scheme=QuantScheme.NF4, granularity=Granularity.PER_BLOCK, block_size=64),
    _spec((1, 1, 2), scheme=QuantScheme.NF4, granularity=Granularity.PER_CHANNEL),
    CodecSpec(
        prune=PruneSpec(PruneMethod.L1_UNSTRUCTURED, 0.7),
        quant=QuantSpec(4, QuantScheme.NF4, Granularity.PER_BLOCK, block_size=32),
        levels=(2, 2),
    ),
    # rotated before quantization (format version 6)
    _spec((2, 1, 1, 2, 2), granularity=Granularity.PER_CHANNEL, rotation=Rotation.HADAMARD),
    _spec(
        (1, 1, 2),
        granularity=Granularity.PER_BLOCK,
        block_size=32,
        scale_format=ScaleFormat.DQ8,
        rotation=Rotation.HADAMARD,
    ),
]


@pytest.mark.parametrize("spec", SPECS, ids=format_spec)
@pytest.mark.parametrize("delta", [False, True])
def test_every_prefix_decodes_and_approaches_the_full_decode(spec: CodecSpec, delta: bool) -> None:
    state, base = _state(0), (_state(1) if delta else None)
    encoded = encode_state(state, spec, base, seed=0)
    full = decode_state(EncodedModel.from_bytes(encoded.to_bytes()), base)
    stream = _stream(encoded)
    assert stream[3] == encoded.header.version
    assert stream[3] in (
        PROGRESSIVE_VERSION,
        BLOCKWISE_VERSION,
        GLOBAL_ORDER_VERSION,
        ROTATED_VERSION,
    )
    start = smallest_prefix(encoded)
    distances = []
    for end in [e for e in _record_ends(encoded) if e >= start]:
        got = decode_prefix(stream[:end], base)
        assert set(got.state) == set(full)
        distances.append(_sq(got.state, full))
    # Every level brings the decode closer to the full-precision one (float16 tables).
    for before, after in itertools.pairwise(distances):
        assert after <= before * (1 + 1e-3) + 1e-9
    assert distances[-1] == 0.0
    # Cut anywhere (inside a record too): the complete records before the cut decode.
    for end in range(start, len(stream) + 1, max(1, len(stream) // 37)):
        got = decode_prefix(stream[:end], base)
        assert got.used_bytes <= end


@pytest.mark.parametrize("spec", SPECS, ids=format_spec)
def test_final_level_equals_a_one_shot_encoding(spec: CodecSpec) -> None:
    state = _state(2)
    once = decode_state(encode_state(state, spec.with_changes(levels=None), seed=0))
    progressive = decode_state(encode_state(state, spec, seed=0))
    for name in state:
        assert torch.equal(once[name], progressive[name]), name


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    rows=st.integers(1, 12),
    cols=st.integers(1, 40),
    levels=st.sampled_from([(2, 2, 4), (4, 4), (1, 1), (2, 1), (1, 1, 1, 1, 4), (3, 1), (1, 3, 4)]),
    granularity=st.sampled_from(list(Granularity)),
    delta=st.booleans(),
    rotation=st.sampled_from(list(Rotation)),
    coder=st.sampled_from(list(EntropyCoder)),  # ANS: context-coded planes (v9)
)
def test_distance_to_the_full_decode_never_rises(
    seed: int,
    rows: int,
    cols: int,
    levels: tuple[int, ...],
    granularity: Granularity,
    delta: bool,
    rotation: Rotation,
    coder: EntropyCoder,
) -> None:
    g = torch.Generator().manual_seed(seed)
    state = {"w.weight": torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)}
    base = {"w.weight": state["w.weight"] + torch.randn(rows, cols, generator=g)} if delta else None
    block = 32 if granularity is Granularity.PER_BLOCK else None
    quant = QuantSpec(sum(levels), granularity=granularity, block_size=block, rotation=rotation)
    spec = CodecSpec(quant=quant, levels=levels, entropy_coder=coder)
    encoded = encode_state(state, spec, base)
    stream = _stream(encoded)
    full = decode_state(encoded, base)
    previous = float("inf")
    for end in _record_ends(encoded):
        if end < smallest_prefix(encoded):
            continue
        d = _sq(decode_prefix(stream[:end], base).state, full)
        assert d <= previous * (1 + 1e-3) + 1e-9
        previous = d
    assert previous == 0.0


def test_nested_planes_rebuild_the_codes_and_tables_are_bucket_means() -> None:
    values = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    qp = choose_qparams(values, 8, QuantScheme.AFFINE, Granularity.PER_TENSOR)
    codes = quantize(values, qp, Rounding.NEAREST)
    levels = (2, 2, 4)
    rebuilt = torch.zeros_like(codes, dtype=torch.int64)
    for level, bits in enumerate(levels):
        rebuilt = (rebuilt << bits) | plane(codes, levels, level).to(torch.int64)
    assert torch.equal(rebuilt, codes.to(torch.int64))
    # with every bit held: plain dequantization
    every_bit = reconstruct(top_codes(codes, 8, 8), qp, 8, None, None)
    assert torch.equal(every_bit, dequantize(codes, qp))
    table = bucket_table(codes, qp, 2)
    top = top_codes(codes, 8, 2)
    for bucket in range(4):
        inside = codes[top == bucket].to(torch.float64) - bucket * 64
        if inside.numel():
            assert abs(float(table[bucket]) - float(inside.mean())) < 0.05


@pytest.mark.parametrize("spec", SPECS, ids=format_spec)
def test_tensors_cut_into_parts_encode_and_decode_as_whole_ones(
    spec: CodecSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Large tensors' tables, gains and decodes run over parts of progressive.CHUNK values
    # (bounded memory); parts of 64 values here must give the same bytes and values.
    state = _state(3)
    whole = encode_state(state, spec, seed=1)
    whole_decoded = decode_state(whole)
    monkeypatch.setattr(progressive, "CHUNK", 64)
    parts = encode_state(state, spec, seed=1)
    assert parts.to_bytes() == whole.to_bytes()
    decoded = decode_state(whole)
    assert decoded.keys() == whole_decoded.keys()
    for name, t in whole_decoded.items():
        assert torch.equal(decoded[name], t), name


def test_delta_prefix_keeps_the_base_for_tensors_not_reached() -> None:
    state, base = _state(0), _state(1)
    spec = _spec((2, 2, 4), granularity=Granularity.PER_CHANNEL)
    encoded = encode_state(state, spec, base)
    stream = _stream(encoded)
    header_only = decode_prefix(stream[: smallest_prefix(encoded)], base)
    assert not header_only.complete and header_only.levels == {}
    for name in base:
        assert torch.equal(header_only.state[name], base[name])
    whole = decode_prefix(stream, base)
    assert whole.complete
    assert set(whole.levels.values()) == {2}


def test_full_model_prefix_shorter_than_the_base_levels_is_refused() -> None:
    encoded = encode_state(_state(0), _spec((4, 4)))
    stream = _stream(encoded)
    with pytest.raises(TruncatedError, match="base level"):
        decode_prefix(stream[: smallest_prefix(encoded) - 1])
    with pytest.raises(TruncatedError):
        decode_prefix(stream[:5])  # inside the header


def test_segments_of_a_prefix_join_and_gaps_are_refused() -> None:
    encoded = encode_state(_state(0), _spec((2, 2, 4)))
    segments = split_segments(encoded, max_bytes=256)
    levels = [s.level for s in segments]
    # base-level segments first, never mixed with refinements; then refinements
    first = next(i for i, level in enumerate(levels) if level > 0)
    assert set(levels[:first]) == {0} and min(levels[first:]) > 0 and max(levels) == 2
    for k in range(1, len(segments) + 1):
        stream = join_prefix(segments[:k])
        if len(stream) >= smallest_prefix(encoded):
            decode_prefix(stream)
    with pytest.raises(FormatError, match="not a prefix"):
        join_prefix([segments[0], segments[2]])
    with pytest.raises(FormatError, match="not a prefix"):
        join_prefix(segments[1:3])


def test_records_that_are_not_a_prefix_raise_codec_errors() -> None:
    encoded = encode_state(_state(0), _spec((2, 2, 4)))
    records = list(encoded.records)
    refinements = [r for r in records if r.level > 0]
    bases = [r for r in records if r.level == 0]
    # a refinement before its base level (level 2 without level 1)
    skipped = [*bases, *[r for r in refinements if r.level == 2]]
    with pytest.raises(FormatError, match="level 2 after level 0"):
        decode_state(EncodedModel(encoded.spec, None, tuple(skipped)))
    # a refinement of a tensor that is not progressive (the bias, record 0)
    from dataclasses import replace

    stray = replace(refinements[0], index=0)
    with pytest.raises(FormatError, match="not a progressive tensor"):
        decode_state(EncodedModel(encoded.spec, None, (*bases, stray)))
    # base levels after refinements: not one stream
    shuffled = EncodedModel(encoded.spec, None, (*bases[:-1], refinements[0], bases[-1]))
    with pytest.raises(FormatError):
        EncodedModel.from_bytes(shuffled.to_bytes())
    # a level record in a version-1 stream
    data = bytearray(encoded.to_bytes())
    data[3] = 1
    import zlib

    data[-4:] = (zlib.crc32(bytes(data[:-4])) & 0xFFFFFFFF).to_bytes(4, "little")
    with pytest.raises(FormatError):
        EncodedModel.from_bytes(bytes(data))


def test_a_segment_of_another_model_is_refused() -> None:
    a = split_segments(encode_state(_state(0), _spec((2, 2, 4))), max_bytes=200)
    b = split_segments(encode_state(_state(5), _spec((4, 4))), max_bytes=200)
    foreign = type(b[1])(1, b[1].tensor_names, 1, b[1].level, b[1].payload)
    with pytest.raises(FormatError):
        decode_prefix(join_prefix([a[0], foreign]))


def test_whole_stream_costs_little_more_than_one_shot() -> None:
    state = _state(3)
    for spec in SPECS[:3]:
        once = encode_state(state, spec.with_changes(levels=None), seed=0).nbytes
        progressive = encode_state(state, spec, seed=0).nbytes
        assert progressive <= 1.25 * once  # tiny tensors: tables weigh most here


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("levels=2+2", "add quant"),
        ("quant=8,levels=2+2", "add up to 4"),
        ("quant=8,levels=8", "2..8 levels"),
        ("quant=8,levels=0+8", "1..4 bits"),
        ("quant=8,levels=a+b", "bits joined by"),
        ("rank=2,quant=4,levels=2+2", "low-rank"),
    ],
)
def test_bad_levels_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_spec(text)


def test_levels_round_trip_through_text_bytes_and_proto() -> None:
    spec = parse_spec("prune=l1:0.5,quant=8:channel,levels=2+2+4")
    assert spec.levels == (2, 2, 4)
    assert parse_spec(format_spec(spec)) == spec
    assert CodecSpec.from_bytes(spec.to_bytes()) == spec
    assert codec_spec_from_proto(codec_spec_to_proto(spec)) == spec
    plain = parse_spec("quant=8")
    assert CodecSpec.from_bytes(plain.to_bytes()) == plain
    assert codec_spec_from_proto(codec_spec_to_proto(plain)).levels is None
