"""ANS-coded refinement planes (``entropy=ans`` with levels, format version 9): the same
tensors as the zstd stream at every prefix, smaller streams, the version written only
when a refinement uses it, and hostile refinements refused."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch

from fedsqueeze.codec import EncodedModel, decode_prefix, decode_state, encode_state
from fedsqueeze.codec.container import ANS_VERSION, PLANE_ANS_VERSION, TensorRecord
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.codec.stream_decode import decode_stream_into, scan_stream
from fedsqueeze.codec.stream_encode import encode_stream, plan_parts
from fedsqueeze.codec.streaming import decode_into
from fedsqueeze.errors import CodecError, FormatError
from tests.codec.test_progressive import _record_ends, _stream

SPECS = [
    # support levels: a group's later planes and (where it pays) its first plane
    "prune=global:0.88,quant=4:symmetric,levels=1+1+2,float=fp16,grow=0.94",
    "prune=l1:0.6,quant=8:channel,levels=2+2+4,grow=0.9+0.8",
    # plain levels: full models, per channel, k-means, pruned
    "quant=8:channel,levels=2+2+4",
    "quant=4:symmetric,levels=1+1+2",
    "quant=4:kmeans,levels=2+2",
    "prune=global:0.8,quant=4:symmetric,levels=1+1+2,float=fp16",
    "topk=0.3,quant=8,levels=4+4",
    "quant=4:pow2,levels=1+1+2",
    # block-wise scales, NF4 and rotations
    "quant=8:block64:dq,levels=2+2+4",
    "quant=4:nf4:block32,levels=1+1+2",
    "quant=8:channel:hadamard,levels=2+1+1+2+2",
]


def _state(seed: int) -> dict[str, torch.Tensor]:
    # Weights with a bulk and tails (as trained ones): their planes depend on the bits above.
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(16, 3, 3, 3, generator=g) * 0.3,
        "conv.bias": torch.randn(16, generator=g),
        "fc1.weight": torch.randn(64, 144, generator=g).pow(3) * 0.05,
        "fc2.weight": torch.randn(10, 64, generator=g) * 0.1,
        "steps": torch.tensor(3),
    }


def _pair(text: str, delta: bool) -> tuple[EncodedModel, EncodedModel, dict[str, torch.Tensor]]:
    base = _state(1) if delta else None
    state = _state(0)
    # The same zstd level for what stays zstd (entropy=ans defaults to 19).
    zstd = encode_state(state, parse_spec(text + ",entropy=19"), base, seed=0)
    coded = encode_state(state, parse_spec(text + ",entropy=ans:19"), base, seed=0)
    return zstd, coded, base or {}


def _key(record: TensorRecord) -> tuple[int | None, int, int]:
    """A refinement's tensor (its base level's index), group and plane."""
    if record.group is None:
        return record.index, 0, record.level
    return record.index, record.group, record.plane


def _zstd_twin(zstd: EncodedModel, coded: EncodedModel) -> EncodedModel:
    """``zstd``'s records in ``coded``'s order (sizes differ, so the rate-distortion
    order may too), each refinement's level renumbered as its step in ``coded``."""
    assert [r for r in zstd.records if r.level == 0] == [
        r for r in coded.records if r.level == 0
    ]  # base levels are never ANS-coded: the same records
    plain = {_key(r): r for r in zstd.records if r.level > 0}
    records = [
        r if r.level == 0 else replace(plain.pop(_key(r)), level=r.level) for r in coded.records
    ]
    assert not plain
    return replace(zstd, records=tuple(records))


@pytest.mark.parametrize("text", SPECS)
@pytest.mark.parametrize("delta", [False, True])
def test_ans_refinements_decode_to_the_zstd_streams_tensors_at_every_prefix(
    text: str, delta: bool
) -> None:
    zstd, coded, base_map = _pair(text, delta)
    base = base_map or None
    data = coded.to_bytes()
    assert data[3] == PLANE_ANS_VERSION
    assert any(r.ans and r.level > 0 for r in coded.records)
    assert not any(r.ans for r in zstd.records)
    assert len(data) < len(zstd.to_bytes())
    full = decode_state(EncodedModel.from_bytes(data), base)
    expected = decode_state(zstd, base)
    assert all(torch.equal(full[k], expected[k]) for k in expected)
    # Anytime decoding: the prefix of k records decodes as the same k records coded
    # with zstd (the codes are the same; only the bodies differ).
    twin = _zstd_twin(zstd, coded)
    ours, theirs = _stream(coded), _stream(twin)
    ends = list(zip(_record_ends(coded), _record_ends(twin), strict=True))
    for end_a, end_b in ends[coded.base_records - 1 :]:
        a = decode_prefix(ours[:end_a], base)
        b = decode_prefix(theirs[:end_b], base)
        assert a.complete == b.complete
        assert all(torch.equal(a.state[k], b.state[k]) for k in b.state)


@pytest.mark.parametrize("text", [SPECS[0], SPECS[2]])
def test_stream_decoder_and_streaming_encoder_agree(text: str) -> None:
    spec = parse_spec(text + ",entropy=ans")
    state = _state(0)
    encoded = encode_state(state, spec, seed=0)
    store: list[bytes] = []

    class _Store:
        def put(self, body: bytes | memoryview) -> int:
            store.append(bytes(body))
            return len(store) - 1

    plan = encode_stream(state, spec, _Store(), workers=2)
    parts = b"".join(bytes(p) for p in plan_parts(plan, lambda r: store[r.token]))
    assert parts == _stream(encoded)
    layout = scan_stream(parts)
    target = {s.name: torch.empty(s.shape, dtype=s.dtype) for s in layout.tensors}
    decode_stream_into(parts, layout, target)
    full = decode_state(encoded)
    assert all(torch.equal(target[k], full[k]) for k in full)
    # Part-by-part decoding reads whole-model streams only, as for any progressive one.
    with pytest.raises(FormatError, match="progressive"):
        decode_into([parts], {k: v.clone() for k, v in full.items()})


def test_other_streams_keep_their_version() -> None:
    state = _state(0)
    # ANS on without levels: version 8; levels without ANS: the earlier versions.
    assert encode_state(state, parse_spec("quant=4,entropy=ans"), seed=0).to_bytes()[3] == (
        ANS_VERSION
    )
    plain = encode_state(state, parse_spec(SPECS[3]), seed=0).to_bytes()
    assert plain[3] < ANS_VERSION


def test_planes_too_large_for_the_coder_keep_zstd(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedsqueeze.codec import ans

    monkeypatch.setattr(ans, "MAX_CODES", 100)
    coded = encode_state(_state(0), parse_spec(SPECS[2] + ",entropy=ans"), seed=0)
    big = {r.index for r in coded.records if r.level == 0 and r.numel > 100}
    assert big
    for r in coded.records:
        if r.level > 0 and r.index in big:
            assert not r.ans


# ---------------------------------------------------------------------- hostile input
def _ans_model() -> EncodedModel:
    return encode_state(_state(0), parse_spec(SPECS[0] + ",entropy=ans"), seed=0)


def _with(model: EncodedModel, i: int, record: TensorRecord) -> bytes:
    records = list(model.records)
    records[i] = record
    return _stream(replace(model, records=tuple(records)))


def _ans_indices(model: EncodedModel) -> list[int]:
    return [i for i, r in enumerate(model.records) if r.ans and r.level > 0]


def _flip(record: TensorRecord, at: int) -> TensorRecord:
    body = bytearray(record.body)
    body[at % len(body)] ^= 0x41
    return replace(record, body=bytes(body))


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda r: replace(r, body=bytes(r.body)[:-1]), id="truncated"),
        pytest.param(lambda r: replace(r, body=bytes(r.body) + b"\0"), id="a byte more"),
        pytest.param(lambda r: replace(r, body=b""), id="empty"),
        pytest.param(lambda r: replace(r, body=bytes(r.body)[:3]), id="shorter than a state"),
        pytest.param(lambda r: _flip(r, -2), id="corrupt codes"),
    ],
)
def test_hostile_ans_refinements_raise_codec_errors(mutate) -> None:  # type: ignore[no-untyped-def]
    model = _ans_model()
    for i in _ans_indices(model):
        stream = _with(model, i, mutate(model.records[i]))
        with pytest.raises(CodecError):
            decode_state(EncodedModel.parse_stream(stream))
        with pytest.raises(CodecError):
            decode_prefix(stream)


def test_a_non_finite_table_in_an_ans_refinement_is_refused() -> None:
    model = _ans_model()
    levels = next(r.levels for r in model.records if r.levels)
    # Plane 1 of group 0 (of a 1+1+2 plan): its body starts with its 4-entry table.
    i = next(
        i
        for i in _ans_indices(model)
        if model.records[i].group == 0 and model.records[i].plane == 1
    )
    assert levels == (1, 1, 2)
    stream = _with(
        model, i, replace(model.records[i], body=b"\xff\xff" + model.records[i].body[2:])
    )
    with pytest.raises(FormatError, match="non-finite"):
        decode_state(EncodedModel.parse_stream(stream))


def test_ans_refinements_are_zstd_bodies_to_older_versions() -> None:
    # In a version 8 stream a raw length of 0 is no ANS flag: the body fails its length.
    stream = bytearray(_stream(_ans_model()))
    assert stream[3] == PLANE_ANS_VERSION
    stream[3] = ANS_VERSION
    with pytest.raises(FormatError):
        decode_state(EncodedModel.parse_stream(bytes(stream)))


def test_every_truncation_raises_only_codec_errors_or_decodes() -> None:
    stream = _stream(_ans_model())
    for end in range(len(stream)):
        with contextlib.suppress(CodecError):
            decode_prefix(stream[:end])
