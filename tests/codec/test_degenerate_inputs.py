"""Degenerate inputs: unchanged and near-zero deltas, constant and all-zero tensors.

Every preset must round-trip them through bytes, within its own error bound, and under
decode limits no larger than the tensor; what has nothing to send is a ZERO record.
"""

from __future__ import annotations

import dataclasses
import tracemalloc

import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.codec import (
    PRESETS,
    CodecSpec,
    DecodeLimits,
    EncodedModel,
    FloatFormat,
    QuantScheme,
    Rounding,
    decode_state,
    encode_state,
    entropy,
)
from fedsqueeze.codec.inspect import describe
from fedsqueeze.codec.positions import max_payload_bytes
from fedsqueeze.codec.pruning import count_to_prune
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.errors import FormatError

SIZES = (1, 999, 1000, 4096, 100_000)
SHAPES = {1: (1, 1), 999: (27, 37), 1000: (40, 25), 4096: (64, 64), 100_000: (400, 250)}
CASES = ("zero-delta", "one-nonzero-delta", "few-nonzero-delta", "constant", "all-zero")
NAME = "layer.weight"  # a target of every preset


def _inputs(case: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tensor, base or None) for one case."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(shape, generator=g)
    n = base.numel()
    if case == "zero-delta":
        return base.clone(), base
    if case == "one-nonzero-delta":
        t = base.clone()
        t.view(-1)[n // 2] += 0.5
        return t, base
    if case == "few-nonzero-delta":
        t = base.clone()
        picks = torch.randperm(n, generator=g)[:5]
        t.view(-1)[picks] += torch.tensor([0.5, -0.25, 0.125, -1.0, 2.0])[: picks.numel()]
        return t, base
    if case == "constant":
        return torch.full(shape, 0.375), None
    return torch.zeros(shape), None


def _kept_at_most(spec: CodecSpec, n: int) -> int:
    if spec.topk is not None:
        return n - count_to_prune(n, 1.0 - spec.topk)
    if spec.prune.active:
        return n - count_to_prune(n, spec.prune.sparsity)
    return n


def _error_bound(spec: CodecSpec, d: torch.Tensor) -> float:
    """Largest |error| ``spec`` may make on a target tensor whose delta is ``d``."""
    a = d.abs().reshape(-1).to(torch.float64)
    n = a.numel()
    dropped = n - _kept_at_most(spec, n)
    # Magnitude selection drops the smallest values: none is larger than this.
    cutoff = float(torch.sort(a).values[dropped - 1]) if dropped else 0.0
    span = float(d.clamp(min=0).max() - d.clamp(max=0).min())
    q = spec.quant
    if q is None:
        if spec.float_format is FloatFormat.FP16:
            value_error = float(a.max()) * 2.0**-11 + 2.0**-25
        else:
            value_error = 0.0
    elif q.scheme is QuantScheme.KMEANS:
        value_error = span / 2
    else:
        half_range = (1 << (q.bits - 1)) - 1
        step = {
            QuantScheme.AFFINE: span / ((1 << q.bits) - 1),
            QuantScheme.SYMMETRIC: float(a.max()) / half_range,
            QuantScheme.POW2: 2 * float(a.max()) / half_range,  # scale rounded up ≤ 2×
        }[q.scheme]
        # Per-tensor steps bound per-channel ones (each channel's range is narrower).
        value_error = step if q.rounding is Rounding.STOCHASTIC else step / 2
    return max(cutoff, value_error)


def _round_trip(
    state: dict[str, torch.Tensor], spec: CodecSpec, base: dict[str, torch.Tensor] | None
) -> tuple[EncodedModel, dict[str, torch.Tensor]]:
    encoded = encode_state(state, spec, base, seed=0)
    total = sum(t.numel() for t in state.values())
    # Limits no larger than the model: every bound must still accept what was encoded.
    limits = DecodeLimits(
        max_elements=max(t.numel() for t in state.values()), max_total_elements=total
    )
    parsed = EncodedModel.from_bytes(encoded.to_bytes(), limits)
    return encoded, decode_state(parsed, base, limits=limits)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("preset_name", sorted(PRESETS))
def test_presets_round_trip_degenerate_inputs(preset_name: str, case: str, size: int) -> None:
    spec = parse_spec(preset_name)
    t, b = _inputs(case, SHAPES[size])
    base = {NAME: b} if b is not None else None
    encoded, decoded = _round_trip({NAME: t}, spec, base)
    out = decoded[NAME]
    assert out.dtype == t.dtype and out.shape == t.shape
    if case in ("zero-delta", "all-zero"):
        assert torch.equal(out, t)
        (record,) = encoded.records
        assert record.zero
        assert record.body == b""
        if case == "zero-delta":
            assert len(record.to_bytes()) == 2  # flags and the index in the base
        return
    reference = b if b is not None else torch.zeros_like(t)
    d, got = t - reference, out - reference
    err = float((got - d).abs().max())
    slack = 4 * torch.finfo(torch.float32).eps * (1.0 + float(t.abs().max()))
    assert err <= _error_bound(spec, d) + slack, (err, _error_bound(spec, d))
    assert int(torch.count_nonzero(got)) <= _kept_at_most(spec, t.numel())
    if spec.lossless:
        assert torch.equal(out, t)


@pytest.mark.parametrize("preset_name", sorted(PRESETS))
def test_unchanged_model_costs_two_bytes_a_tensor(preset_name: str) -> None:
    g = torch.Generator().manual_seed(3)
    state = {
        "conv.weight": torch.randn(16, 8, 3, 3, generator=g),
        "conv.bias": torch.randn(16, generator=g),
        "steps": torch.tensor(5),
        "mask": torch.tensor([True, False]),
        "half.weight": torch.randn(32, 32, generator=g).half(),
    }
    encoded, decoded = _round_trip(state, PRESETS[preset_name], state)
    assert all(r.zero and len(r.to_bytes()) == 2 for r in encoded.records)
    for name, t in state.items():
        assert torch.equal(decoded[name], t) and decoded[name].dtype == t.dtype
    assert {row.stages for row in describe(encoded, state)} == {"unchanged"}


@pytest.mark.parametrize(
    "text",
    [
        "quant=4:affine:channel",
        "quant=3:symmetric:channel",
        "quant=2:pow2:channel:stochastic",
        "prune=l1:0.5,quant=8:affine:channel",
        "prune=channel:0.25,quant=4:symmetric:channel",
        "prune=threshold:0.3,quant=3:kmeans",
        "prune=global:0.9,float=bf16",
    ],
)
def test_zero_and_constant_channels_quantize_with_a_valid_scale(text: str) -> None:
    spec = parse_spec(text)
    t = torch.zeros(8, 125)
    t[1] = 0.5  # constant channels (scale 0 if taken alone) beside all-zero ones
    t[2] = -3.0
    t[5, ::7] = 1.25
    for base in (None, {NAME: torch.zeros_like(t)}):
        _, decoded = _round_trip({NAME: t}, spec, base)
        err = float((decoded[NAME] - t).abs().max())
        assert err <= _error_bound(spec, t) + 1e-6, (text, err)
        assert torch.equal(decoded[NAME][[0, 3, 4, 6, 7]], torch.zeros(5, 125))


def test_negative_zero_is_not_a_zero_record_when_lossless() -> None:
    t = torch.tensor([0.0, -0.0, 0.0, 0.0])
    encoded, decoded = _round_trip({"v": t}, CodecSpec(), None)
    assert not encoded.records[0].zero
    assert torch.equal(decoded["v"].view(torch.int32), t.view(torch.int32))


def test_kept_exact_zeros_cost_no_positions() -> None:
    g = torch.Generator().manual_seed(5)
    base = {NAME: torch.randn(100, 1000, generator=g)}
    new = {NAME: base[NAME].clone()}
    new[NAME].view(-1)[[10, 5000, 99_999]] += 1.0
    for name in ("prune90-int4", "prune95-kmeans3", "topk10-int4"):
        encoded, decoded = _round_trip(new, PRESETS[name], base)
        (record,) = encoded.records
        assert record.positions is not None and record.positions.count == 3
        assert len(record.to_bytes()) < 40
        assert torch.allclose(decoded[NAME], new[NAME], atol=0.1)


def test_topk_residual_of_an_unchanged_tensor_is_zero() -> None:
    t = torch.randn(64, 64)
    encoded = encode_state({NAME: t}, PRESETS["topk10-int4"], {NAME: t}, seed=0)
    assert encoded.records[0].zero
    assert encoded.residual is not None
    assert torch.equal(encoded.residual[NAME], torch.zeros_like(t))


@settings(max_examples=60, deadline=None)
@given(
    preset_name=st.sampled_from(sorted(PRESETS)),
    numel=st.integers(1, 3000),
    nonzero=st.integers(0, 40),
    scale=st.sampled_from([0.0, 1e-6, 1.0, 1e3]),
    seed=st.integers(0, 2**31),
)
def test_sparse_deltas_round_trip_within_the_spec_bound(
    preset_name: str, numel: int, nonzero: int, scale: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, 1, generator=g)
    delta = torch.zeros(numel)
    picks = torch.randperm(numel, generator=g)[:nonzero]
    delta[picks] = scale * torch.randn(picks.numel(), generator=g)
    new = base + delta.view(numel, 1)
    spec = PRESETS[preset_name]
    encoded, decoded = _round_trip({NAME: new}, spec, {NAME: base})
    d = new - base  # what the encoder sees (float32 subtraction)
    err = float((decoded[NAME] - base - d).abs().max())
    slack = 4 * torch.finfo(torch.float32).eps * (1.0 + float(new.abs().max()))
    assert err <= _error_bound(spec, d) + slack
    if not bool(d.any()):
        assert encoded.records[0].zero and torch.equal(decoded[NAME], base)


# ------------------------------------------------------------------ hostile lengths
def _sparse_record_model() -> tuple[EncodedModel, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(9)
    state = {NAME: torch.randn(256, 256, generator=g)}
    encoded = encode_state(state, PRESETS["prune90-int4"])
    (record,) = encoded.records
    assert record.positions is not None and record.raw_length is not None
    return encoded, state


def _with_record(encoded: EncodedModel, **changes: object) -> EncodedModel:
    record = dataclasses.replace(encoded.records[0], **changes)  # type: ignore[arg-type]
    return dataclasses.replace(encoded, records=(record,))


@pytest.fixture
def no_decompression(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(data: bytes | memoryview, size: int) -> bytes:
        raise AssertionError("decompressed a body whose header is inconsistent")

    monkeypatch.setattr(entropy, "decompress", refuse)


@pytest.mark.usefixtures("no_decompression")
def test_positions_longer_than_a_bitmap_are_rejected_before_decompressing() -> None:
    encoded, _ = _sparse_record_model()
    record = encoded.records[0]
    assert record.positions is not None
    too_long = max_payload_bytes(256 * 256) + 1
    bad = _with_record(
        encoded, positions=dataclasses.replace(record.positions, payload_bytes=too_long)
    )
    with pytest.raises(FormatError, match="positions header"):
        decode_state(bad)


@pytest.mark.usefixtures("no_decompression")
def test_a_raw_length_other_than_the_header_implies_is_rejected_before_decompressing() -> None:
    encoded, _ = _sparse_record_model()
    assert encoded.records[0].raw_length is not None
    bad = _with_record(encoded, raw_length=encoded.records[0].raw_length + 1)
    with pytest.raises(FormatError, match="header implies"):
        decode_state(bad)


def test_parser_bounds_positions_length_by_the_largest_bitmap() -> None:
    encoded, _ = _sparse_record_model()
    record = encoded.records[0]
    assert record.positions is not None
    limits = DecodeLimits(max_elements=256 * 256)
    bad = _with_record(
        encoded,
        positions=dataclasses.replace(
            record.positions, payload_bytes=max_payload_bytes(limits.max_elements) + 1
        ),
    )
    with pytest.raises(FormatError, match="positions length"):
        EncodedModel.from_bytes(bad.to_bytes(), limits)


def test_a_zstd_bomb_is_not_expanded() -> None:
    # ~64 MiB of zeros in a few kilobytes, without a content size in its frame
    compressor = zstandard.ZstdCompressor(write_content_size=False, write_checksum=False)
    cobj = compressor.compressobj()
    chunk = bytes(1 << 20)
    frame = b"".join(cobj.compress(chunk) for _ in range(64)) + cobj.flush()
    tracemalloc.start()
    try:
        with pytest.raises(FormatError):
            entropy.decompress(frame[4:], 4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_frame_declaring_a_huge_size_is_rejected_without_allocating() -> None:
    plain = zstandard.ZstdCompressor(write_content_size=False, write_checksum=False)
    frame = plain.compress(bytes(4096))[4:]
    assert frame[0] == 0  # descriptor: no content size, window byte follows
    # The same blocks under a header that claims 1 TiB (8-byte content size field).
    huge = bytes([0xC0, frame[1]]) + (1 << 40).to_bytes(8, "little") + frame[2:]
    params = zstandard.get_frame_parameters(huge, format=zstandard.FORMAT_ZSTD1_MAGICLESS)
    assert params.content_size == 1 << 40
    with pytest.raises(FormatError, match="declares"):
        entropy.decompress(huge, 4096)
