"""Support levels (progressive sparsity, format version 7): positions arrive in groups,
every prefix decodes, the distance to the full decode never rises, hostile records and
prefixes raise CodecError, and the loss-driven order keeps the stream valid."""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import replace

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from fedsqueeze.codec import (
    CodecSpec,
    EncodedModel,
    EntropyCoder,
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
from fedsqueeze.codec.container import (
    GLOBAL_ORDER_VERSION,
    ROTATED_VERSION,
    SUPPORT_LEVELS_VERSION,
    PositionsHeader,
    TensorRecord,
)
from fedsqueeze.codec.loss_order import reorder_by_loss
from fedsqueeze.codec.pruning import global_magnitude_masks
from fedsqueeze.codec.spec_text import format_spec, parse_spec
from fedsqueeze.codec.stream_decode import decode_stream_into, scan_stream
from fedsqueeze.codec.stream_encode import encode_stream, plan_parts
from fedsqueeze.errors import CodecError, ConfigError, FormatError
from fedsqueeze.wire.spec_convert import codec_spec_from_proto, codec_spec_to_proto
from tests.codec.test_progressive import _record_ends, _sq, _state, _stream

GLOBAL = "prune=global:0.8,quant=4:symmetric,levels=2+2,grow=0.95+0.9"
SPECS = [
    parse_spec(GLOBAL),
    parse_spec("prune=global:0.7,quant=4,levels=1+1+2,float=fp16,grow=0.9"),
    parse_spec("prune=l1:0.5,quant=8:channel,levels=2+2+4,grow=0.9+0.8+0.6"),
    parse_spec("prune=l1:0.6,quant=4:kmeans,levels=2+2,grow=0.8"),
    parse_spec("prune=global:0.6,quant=4:pow2:channel,levels=1+3,grow=0.95+0.7"),
]


class _ListStore:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def put(self, body: bytes | memoryview) -> int:
        self.bodies.append(bytes(body))
        return len(self.bodies) - 1


def test_grow_round_trips_through_text_bytes_and_proto() -> None:
    spec = parse_spec(GLOBAL)
    assert spec.grow == (0.95, 0.9)
    assert parse_spec(format_spec(spec)) == spec
    assert CodecSpec.from_bytes(spec.to_bytes()) == spec
    assert codec_spec_from_proto(codec_spec_to_proto(spec)) == spec
    plain = spec.with_changes(grow=())
    # without support levels the level count's top bit is clear: the bytes of before
    assert bytes([2 | 0x80, 2, 2]) in spec.to_bytes()
    assert bytes([2, 2, 2]) in plain.to_bytes()
    assert len(spec.to_bytes()) > len(plain.to_bytes())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prune=global:0.9,quant=4,levels=2+2,grow=0.9", "fall strictly"),
        ("prune=global:0.9,quant=4,levels=2+2,grow=0.93+0.95", "fall strictly"),
        ("prune=global:0.9,quant=4,grow=0.95", "needs progressive levels"),
        ("prune=threshold:0.1,quant=4,levels=2+2,grow=0.95", "magnitude pruning"),
        ("prune=channel:0.5,quant=4,levels=2+2,grow=0.95", "magnitude pruning"),
        ("prune=l1:0.5,quant=4:block32,levels=2+2,grow=0.9", "block-wise"),
        ("prune=l1:0.5,quant=4,levels=2+2,grow=0.9+x", "sparsities joined"),
        ("prune=l1:0.5,quant=4,levels=2+2,grow=0.9+0.8+0.7+0.66+0.6+0.55+0.52", "at most 6"),
    ],
)
def test_bad_grow_is_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_spec(text)


def test_an_older_reader_would_refuse_the_spec() -> None:
    # The level count with bit 7 set is over MAX_LEVELS for a reader without grow.
    data = parse_spec(GLOBAL).to_bytes()
    assert any(b & 0x80 and (b & 0x7F) == 2 for b in data)


@pytest.mark.parametrize("spec", SPECS, ids=format_spec)
@pytest.mark.parametrize("delta", [False, True])
def test_every_prefix_decodes_and_approaches_the_full_decode(spec: CodecSpec, delta: bool) -> None:
    state, base = _state(0), (_state(1) if delta else None)
    encoded = encode_state(state, spec, base, seed=0)
    assert encoded.header.version == SUPPORT_LEVELS_VERSION
    assert any(r.group is not None and r.positions is not None for r in encoded.records)
    full = decode_state(EncodedModel.from_bytes(encoded.to_bytes()), base)
    stream = _stream(encoded)
    start = smallest_prefix(encoded)
    distances = []
    for end in [e for e in _record_ends(encoded) if e >= start]:
        got = decode_prefix(stream[:end], base)
        assert set(got.state) == set(full)
        distances.append(_sq(got.state, full))
    for before, after in itertools.pairwise(distances):
        assert after <= before * (1 + 1e-3) + 1e-9
    assert distances[-1] == 0.0
    for end in range(start, len(stream) + 1, max(1, len(stream) // 29)):
        assert decode_prefix(stream[:end], base).used_bytes <= end


@pytest.mark.parametrize("spec", SPECS, ids=format_spec)
def test_final_decode_equals_a_one_shot_encoding(spec: CodecSpec) -> None:
    state = _state(2)
    once = decode_state(encode_state(state, spec.with_changes(levels=None, grow=()), seed=0))
    grown = decode_state(encode_state(state, spec, seed=0))
    for name in state:
        assert torch.equal(once[name], grown[name]), name


def test_groups_hold_the_cuts_of_the_grow_sparsities_in_order() -> None:
    state = _state(3)
    spec = parse_spec(GLOBAL)
    encoded = encode_state(state, spec, seed=0)
    stream = _stream(encoded)
    targets = {k: v for k, v in state.items() if spec.is_target(k, v.ndim, v.is_floating_point())}
    cuts = [global_magnitude_masks(targets, s) for s in (*spec.grow, spec.prune.sparsity)]
    # the prefix just after each group opens holds exactly the values of that cut
    opened = 0
    for record, end in zip(encoded.records, _record_ends(encoded), strict=True):
        if end < smallest_prefix(encoded):
            continue
        if record.level == 0 or (record.group is not None and record.plane == 0):
            got = decode_prefix(stream[:end]).state
            held = sum(int(torch.count_nonzero(got[k])) for k in targets)
            assert held <= sum(int(c.sum()) for c in cuts[-1].values())
            opened += 1
    assert opened >= 2
    full = decode_state(encoded)
    for name in targets:
        assert torch.equal(full[name] != 0, cuts[-1][name] & (state[name] != 0)), name


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    rows=st.integers(1, 12),
    cols=st.integers(1, 40),
    levels=st.sampled_from([(2, 2), (1, 1, 2), (1, 3), (4, 4), (2, 1, 1)]),
    grow=st.sampled_from([(0.9,), (0.95, 0.8), (0.99, 0.9, 0.8, 0.7)]),
    per_channel=st.booleans(),
    delta=st.booleans(),
    coder=st.sampled_from(list(EntropyCoder)),  # ANS: context-coded planes (v9)
)
def test_distance_to_the_full_decode_never_rises(
    seed: int,
    rows: int,
    cols: int,
    levels: tuple[int, ...],
    grow: tuple[float, ...],
    per_channel: bool,
    delta: bool,
    coder: EntropyCoder,
) -> None:
    g = torch.Generator().manual_seed(seed)
    state = {"w.weight": torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)}
    base = {"w.weight": state["w.weight"] + torch.randn(rows, cols, generator=g)} if delta else None
    granularity = Granularity.PER_CHANNEL if per_channel else Granularity.PER_TENSOR
    spec = CodecSpec(
        prune=PruneSpec(PruneMethod.L1_UNSTRUCTURED, 0.5),
        quant=QuantSpec(sum(levels), granularity=granularity),
        levels=levels,
        grow=grow,
        entropy_coder=coder,
    )
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


@pytest.mark.parametrize("workers", [1, 3])
def test_streaming_encoder_and_decoder_agree(workers: int) -> None:
    state = _state(4)
    spec = parse_spec(GLOBAL)
    encoded = encode_state(state, spec, seed=0)
    store = _ListStore()
    plan = encode_stream(state, spec, store, workers=workers)
    parts = b"".join(bytes(p) for p in plan_parts(plan, lambda r: store.bodies[r.token]))
    assert parts == _stream(encoded)
    layout = scan_stream(parts)
    target = {s.name: torch.empty(s.shape, dtype=s.dtype) for s in layout.tensors}
    decode_stream_into(parts, layout, target)
    full = decode_state(encoded)
    for name, tensor in full.items():
        assert torch.equal(target[name], tensor), name


# ---------------------------------------------------------------------- hostile input
def _grown() -> EncodedModel:
    return encode_state(_state(0), parse_spec(GLOBAL), seed=0)


def _refinements(model: EncodedModel) -> list[int]:
    return [i for i, r in enumerate(model.records) if r.level > 0]


def _with(model: EncodedModel, i: int, record: TensorRecord) -> bytes:
    records = list(model.records)
    records[i] = record
    return _stream(replace(model, records=tuple(records)))


def _opening(model: EncodedModel) -> int:
    return next(i for i, r in enumerate(model.records) if r.group and r.plane == 0)


def _decode_all(stream: bytes) -> None:
    decode_state(EncodedModel.parse_stream(stream))


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda r: replace(r, group=r.group + 1), id="skips a group"),
        pytest.param(lambda r: replace(r, group=0, positions=None, plane=1), id="plane twice"),
        pytest.param(
            lambda r: replace(r, positions=replace(r.positions, count=10**6)), id="count > free"
        ),
        pytest.param(
            lambda r: replace(r, positions=replace(r.positions, coding=7)), id="unknown coding"
        ),
        pytest.param(
            lambda r: replace(
                r, positions=replace(r.positions, payload_bytes=r.positions.payload_bytes + 1)
            ),
            id="positions length",
        ),
        pytest.param(lambda r: replace(r, plane=3, positions=None), id="plane past the plan"),
    ],
)
def test_hostile_group_records_raise_codec_errors(mutate) -> None:  # type: ignore[no-untyped-def]
    model = _grown()
    i = _opening(model)
    with pytest.raises(CodecError):
        _decode_all(_with(model, i, mutate(model.records[i])))
    with pytest.raises(CodecError):
        stream = _with(model, i, mutate(model.records[i]))
        decode_prefix(stream)


def test_group_refinements_are_refused_in_older_versions() -> None:
    model = _grown()
    stream = bytearray(_stream(model))
    assert stream[3] == SUPPORT_LEVELS_VERSION
    for older in (GLOBAL_ORDER_VERSION, ROTATED_VERSION):
        stream[3] = older
        with pytest.raises(FormatError):
            EncodedModel.parse_stream(bytes(stream))


def test_a_group_refinement_must_open_with_positions() -> None:
    model = _grown()
    i = _opening(model)
    record = model.records[i]
    # positions without a group (no QUANT flag) and a group's plane 0 without positions
    flags_only = replace(record, group=None, plane=0)
    with pytest.raises(CodecError):
        _decode_all(_with(model, i, flags_only))
    no_positions = replace(record, positions=None)
    with pytest.raises(CodecError):
        EncodedModel.parse_stream(_with(model, i, no_positions))
    group_zero = replace(record, group=0, positions=PositionsHeader(2, 0, 1, 1))
    with pytest.raises(CodecError):
        EncodedModel.parse_stream(_with(model, i, group_zero))


def test_every_truncation_raises_only_codec_errors_or_decodes() -> None:
    stream = _stream(_grown())
    for end in range(len(stream)):
        with contextlib.suppress(CodecError):
            decode_prefix(stream[:end])


# ---------------------------------------------------------------------- loss order
@pytest.mark.parametrize("lookahead", [1, 2])
def test_reorder_by_loss_keeps_the_stream_valid_and_follows_the_loss(lookahead: int) -> None:
    state = _state(5)
    spec = parse_spec(GLOBAL)
    encoded = encode_state(state, spec, seed=0)
    full = decode_state(encoded)

    def loss(s: dict[str, torch.Tensor]) -> float:
        return _sq(s, full)

    ordered = reorder_by_loss(encoded, loss, lookahead=lookahead)
    assert ordered.nbytes == encoded.nbytes
    assert sorted(bytes(r.body) for r in ordered.records) == sorted(
        bytes(r.body) for r in encoded.records
    )
    data = ordered.to_bytes()
    reparsed = EncodedModel.from_bytes(data)
    for name, tensor in decode_state(reparsed).items():
        assert torch.equal(tensor, full[name]), name
    stream = data[:-4]
    losses = [
        loss(decode_prefix(stream[:end]).state)
        for end in _record_ends(ordered)
        if end >= smallest_prefix(ordered)
    ]
    # every record lowers this loss, so the greedy order never lets it rise
    for before, after in itertools.pairwise(losses):
        assert after <= before * (1 + 1e-3) + 1e-9


def test_reorder_by_loss_prefers_what_the_loss_rewards() -> None:
    state = _state(6)
    encoded = encode_state(state, parse_spec(GLOBAL), seed=0)
    full = decode_state(encoded)

    def loss(s: dict[str, torch.Tensor]) -> float:  # only fc.weight counts
        return float((s["fc.weight"] - full["fc.weight"]).square().sum())

    ordered = reorder_by_loss(encoded, loss, lookahead=1)
    names = [r.name for r in ordered.records if r.level == 0]
    first = next(r for r in ordered.records if r.level > 0)
    assert first.index is not None and names[first.index] == "fc.weight"


def test_reorder_by_loss_refuses_bad_arguments() -> None:
    plain = encode_state(_state(0), parse_spec("quant=8"))
    with pytest.raises(ValueError, match="no refinements"):
        reorder_by_loss(plain, lambda s: 0.0)
    with pytest.raises(ValueError, match="lookahead"):
        reorder_by_loss(_grown(), lambda s: 0.0, lookahead=3)


def test_reorder_by_loss_also_orders_plain_progressive_tensors() -> None:
    spec = CodecSpec(quant=QuantSpec(4, QuantScheme.SYMMETRIC), levels=(1, 1, 2))
    encoded = encode_state(_state(7), spec, seed=0)
    full = decode_state(encoded)
    ordered = reorder_by_loss(encoded, lambda s: _sq(s, full))
    for name, tensor in decode_state(EncodedModel.from_bytes(ordered.to_bytes())).items():
        assert torch.equal(tensor, full[name]), name


def test_reorder_by_loss_of_a_delta_keeps_its_final_decode() -> None:
    state, base = _state(8), _state(9)
    encoded = encode_state(state, parse_spec(GLOBAL), base, seed=0)
    full = decode_state(encoded, base)
    ordered = reorder_by_loss(encoded, lambda s: _sq(s, full), base, lookahead=2)
    again = decode_state(EncodedModel.from_bytes(ordered.to_bytes()), base)
    for name, tensor in full.items():
        assert torch.equal(again[name], tensor), name
    stream = ordered.to_bytes()[:-4]
    for end in _record_ends(ordered):
        decode_prefix(stream[:end], base)
