"""x_to_proto / x_from_proto pairs round-trip, and hostile messages are refused."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fedsqueeze.codec import PRESETS
from fedsqueeze.codec.spec import (
    CodecSpec,
    EntropyCoder,
    FloatFormat,
    Granularity,
    PruneMethod,
    PruneSpec,
    QuantScheme,
    QuantSpec,
    Rounding,
)
from fedsqueeze.errors import InvalidRequestError
from fedsqueeze.wire import convert
from fedsqueeze.wire import transfer_pb2 as pb
from fedsqueeze.wire.segment_reader import read_segment_response
from fedsqueeze.wire.types import (
    Manifest,
    ManifestRequest,
    SegmentData,
    SegmentInfo,
    SegmentRequest,
    UpdateMetadata,
    UpdateReceipt,
)

D1, D2, D3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32


@st.composite
def codec_specs(draw: st.DrawFn) -> CodecSpec:
    prune = PruneSpec(
        draw(st.sampled_from(PruneMethod)),
        draw(st.floats(0.0, 0.999, allow_nan=False)),
        draw(st.floats(0.0, 10.0, allow_nan=False)),
    )
    try:
        quant = (
            QuantSpec(
                draw(st.sampled_from((2, 3, 4, 8))),
                draw(st.sampled_from(QuantScheme)),
                draw(st.sampled_from(Granularity)),
                draw(st.sampled_from(Rounding)),
            )
            if draw(st.booleans())
            else None
        )
        return CodecSpec(
            prune=prune,
            topk=draw(st.none() | st.floats(0.001, 1.0, allow_nan=False)),
            quant=quant,
            float_format=draw(st.sampled_from(FloatFormat)),
            entropy_level=draw(st.integers(0, 22)),
            targets=tuple(draw(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=4))),
            min_ndim=draw(st.integers(0, 8)),
        )
    except ValueError:
        assume(False)
        raise


@given(codec_specs())
def test_codec_spec_round_trips_exactly(spec):
    msg = convert.codec_spec_to_proto(spec)
    again = pb.CodecSpec.FromString(msg.SerializeToString())
    assert convert.codec_spec_from_proto(again) == spec


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip(name):
    spec = PRESETS[name]
    assert convert.codec_spec_from_proto(convert.codec_spec_to_proto(spec)) == spec


KEY = b"k" * 16
REQUEST = ManifestRequest("global", D2, PRESETS["int8"])


def _manifest() -> Manifest:
    segments = (
        SegmentInfo(1, ("b",), 0, 0, 10, D2),
        SegmentInfo(0, ("a", "b"), 1, 1, 20, D3),
    )
    return Manifest(KEY, D1, D2, PRESETS["int8"], 1000, D3, segments)


def test_messages_round_trip():
    manifest = _manifest()
    assert manifest.encoded_bytes == 30
    response = convert.manifest_response_to_proto(manifest, REQUEST)
    assert convert.manifest_response_from_proto(response, REQUEST) == manifest
    full = Manifest(KEY, D1, None, CodecSpec(), 1, D1, (SegmentInfo(0, (), 0, 0, 5, D3),))
    assert convert.manifest_from_proto(convert.manifest_to_proto(full, REQUEST), REQUEST) == full
    for request in (
        ManifestRequest("global", None, CodecSpec()),
        ManifestRequest("ab" * 32, D1, PRESETS["int4"], byte_budget=1234),
    ):
        msg = convert.manifest_request_to_proto(request)
        assert convert.manifest_request_from_proto(msg) == request
        fetch = convert.fetch_request_to_proto(request)
        assert convert.fetch_request_from_proto(fetch) == (request, None)
        held = SegmentRequest(KEY, frozenset({4, 2}))
        fetch = convert.fetch_request_to_proto(request, held)
        assert list(fetch.held_segment_ids) == [2, 4]
        assert convert.fetch_request_from_proto(fetch) == (request, held)
    seg_req = SegmentRequest(KEY, frozenset({3, 1}))
    seg_msg = convert.segment_request_to_proto(seg_req)
    assert list(seg_msg.held_segment_ids) == [1, 3]
    assert convert.segment_request_from_proto(seg_msg) == seg_req
    data = SegmentData(7, b"payload")
    assert convert.segment_from_proto(convert.segment_to_proto(data)) == data
    for meta in (UpdateMetadata("u-1", D1, 10, D2), UpdateMetadata("u-1", None, 10, D2)):
        assert convert.update_metadata_from_proto(convert.update_metadata_to_proto(meta)) == meta
    assert convert.update_chunk_from_proto(convert.update_chunk_to_proto(b"abc")) == b"abc"
    receipt = UpdateReceipt(10, duplicate=True)
    assert convert.receipt_from_proto(convert.receipt_to_proto(receipt)) == receipt


def test_manifest_leaves_out_what_the_request_says():
    by_digest = ManifestRequest(D1.hex(), D2, PRESETS["int8"])
    lossless = Manifest(KEY, D1, D2, PRESETS["int8"], 1000, D1, _manifest().segments)
    msg = convert.manifest_to_proto(lossless, by_digest)
    assert msg.model_digest == b"" and msg.decoded_digest == b"" and msg.delta
    assert not msg.HasField("codec_spec")
    assert convert.manifest_from_proto(msg, by_digest) == lossless
    # Asked by track: the digest is news to the client; another spec is named.
    other = Manifest(KEY, D1, None, PRESETS["int4"], 1000, D3, _manifest().segments)
    msg = convert.manifest_to_proto(other, ManifestRequest("global", D2, PRESETS["int8"]))
    assert msg.model_digest == D1 and msg.decoded_digest == D3 and not msg.delta
    assert convert.codec_spec_from_proto(msg.codec_spec) == PRESETS["int4"]
    with pytest.raises(ValueError):  # a delta from a base the request did not name
        convert.manifest_to_proto(_manifest(), ManifestRequest("global", D3, CodecSpec()))
    # A request by digest travels as 32 raw bytes, not 64 hex characters.
    fetch = convert.fetch_request_to_proto(by_digest)
    assert fetch.model == "" and fetch.model_digest == D1


def test_manifest_from_proto_needs_what_it_left_out():
    msg = convert.manifest_to_proto(_manifest(), ManifestRequest(D1.hex(), D2, CodecSpec()))
    with pytest.raises(InvalidRequestError, match="digest"):  # asked by track now
        convert.manifest_from_proto(msg, ManifestRequest("global", D2, CodecSpec()))
    with pytest.raises(InvalidRequestError, match="base"):  # a delta, but no base asked
        convert.manifest_from_proto(msg, ManifestRequest(D1.hex(), None, CodecSpec()))


def _bad_manifests() -> Iterator[pb.Manifest]:
    good = convert.manifest_to_proto(_manifest(), ManifestRequest("global", D2, CodecSpec()))

    def edit(fn: Callable[[pb.Manifest], object]) -> pb.Manifest:
        msg = pb.Manifest()
        msg.CopyFrom(good)
        fn(msg)
        return msg

    yield edit(lambda m: setattr(m, "model_digest", b"short"))
    yield edit(lambda m: setattr(m, "decoded_digest", b"short"))
    yield edit(lambda m: setattr(m, "manifest_key", b""))
    yield edit(lambda m: setattr(m, "manifest_key", b"x" * 33))
    yield edit(lambda m: m.segments[0].__setattr__("segment_id", 0))
    yield edit(lambda m: m.segments[0].__setattr__("sha256", b"short"))
    yield edit(lambda m: m.ClearField("segments"))
    yield edit(lambda m: m.codec_spec.__setattr__("float_format", 0))
    yield edit(lambda m: m.codec_spec.quant.__setattr__("bits", 5))
    yield edit(lambda m: m.codec_spec.quant.__setattr__("scheme", 0))
    yield edit(lambda m: m.codec_spec.__setattr__("entropy_level", 99))
    yield edit(lambda m: m.codec_spec.targets.append(""))
    yield edit(lambda m: m.codec_spec.prune.__setattr__("method", 0))
    yield edit(lambda m: m.codec_spec.prune.__setattr__("method", 77))
    yield edit(lambda m: m.codec_spec.__setattr__("topk", 0.0))


@pytest.mark.parametrize("msg", list(_bad_manifests()))
def test_hostile_manifests_are_invalid_requests(msg):
    with pytest.raises(InvalidRequestError):
        convert.manifest_from_proto(msg, ManifestRequest("global", D2, CodecSpec()))


def test_codec_spec_leaves_defaults_out():
    msg = convert.codec_spec_to_proto(PRESETS["prune95-kmeans3"])
    assert list(msg.targets) == []  # the default, "*weight"
    assert not convert.codec_spec_to_proto(CodecSpec()).HasField("prune")
    assert convert.codec_spec_from_proto(msg) == PRESETS["prune95-kmeans3"]


def test_hostile_requests_are_invalid_requests():
    spec = convert.codec_spec_to_proto(CodecSpec())
    bad: list[Callable[[], object]] = [
        lambda: convert.manifest_request_from_proto(pb.GetManifestRequest(model="global")),
        lambda: convert.manifest_request_from_proto(pb.GetManifestRequest(codec_spec=spec)),
        lambda: convert.manifest_request_from_proto(
            pb.GetManifestRequest(model="g", codec_spec=spec, base_digest=b"x")
        ),
        lambda: convert.manifest_request_from_proto(
            pb.GetManifestRequest(model="g", codec_spec=spec, byte_budget=0)
        ),
        lambda: convert.manifest_request_from_proto(
            pb.GetManifestRequest(model="g", model_digest=D1, codec_spec=spec)
        ),
        lambda: convert.fetch_request_from_proto(
            pb.FetchRequest(model_digest=b"short", codec_spec=spec)
        ),
        lambda: convert.fetch_request_from_proto(
            pb.FetchRequest(model="g", codec_spec=spec, held_segment_ids=[1])
        ),
        lambda: convert.fetch_request_from_proto(
            pb.FetchRequest(
                model="g", codec_spec=spec, held_manifest_key=KEY, held_segment_ids=[1 << 20]
            )
        ),
        lambda: convert.segment_request_from_proto(
            pb.StreamSegmentsRequest(manifest_key=KEY, held_segment_ids=[1 << 20])
        ),
        lambda: convert.segment_request_from_proto(pb.StreamSegmentsRequest()),
        lambda: convert.update_metadata_from_proto(pb.PushUpdateRequest(chunk=b"x")),
        lambda: convert.update_metadata_from_proto(
            pb.PushUpdateRequest(metadata=pb.UpdateMetadata(update_id="u"))
        ),
        lambda: convert.update_metadata_from_proto(
            pb.PushUpdateRequest(
                metadata=pb.UpdateMetadata(
                    update_id="bad id", base_digest=D1, total_bytes=1, sha256=D1
                )
            )
        ),
        lambda: convert.update_chunk_from_proto(pb.PushUpdateRequest()),
        lambda: convert.segment_from_proto(pb.StreamSegmentsResponse()),
        lambda: convert.receipt_from_proto(pb.PushUpdateResponse()),
        lambda: convert.receipt_from_proto(pb.PushUpdateResponse(receipt=pb.UpdateReceipt())),
        lambda: convert.manifest_response_from_proto(pb.GetManifestResponse(), REQUEST),
        lambda: convert.fetch_part_from_message(pb.FetchResponse().SerializeToString()),
        lambda: convert.fetch_part_from_message(b"\x0f"),
    ]
    for call in bad:
        with pytest.raises(InvalidRequestError):
            call()


def test_value_types_validate_on_creation():
    with pytest.raises(ValueError):
        SegmentInfo(-1, (), 0, 0, 1, D1)
    with pytest.raises(ValueError):
        UpdateMetadata("u", None, 0, D1)
    with pytest.raises(ValueError):
        UpdateReceipt(0, duplicate=False)
    with pytest.raises(ValueError):
        SegmentRequest(b"", frozenset())
    manifest = _manifest()
    assert manifest.segment(1).byte_length == 10 and manifest.has_segment(0)
    assert not manifest.has_segment(2)


def _with_unknown_fields(message: bytes) -> bytes:
    """``message`` (a StreamSegmentsResponse) with unknown fields inside its segment."""
    parsed = pb.StreamSegmentsResponse.FromString(message)
    extra = (
        bytes([(9 << 3) | 0, 0x96, 0x01])  # field 9, varint 150
        + bytes([(10 << 3) | 2, 3]) + b"abc"  # field 10, 3 bytes
        + bytes([(11 << 3) | 5]) + b"\x00" * 4  # field 11, fixed32
        + bytes([(12 << 3) | 1]) + b"\x00" * 8  # field 12, fixed64
    )  # fmt: skip
    inner = parsed.segment.SerializeToString() + extra
    return bytes([(1 << 3) | 2]) + _encode_varint(len(inner)) + inner


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@given(st.integers(0, (1 << 32) - 1), st.binary(max_size=3000))
def test_fast_segment_reader_agrees_with_protobuf(segment_id, payload):
    data = SegmentData(segment_id, payload)
    message = convert.segment_message(data)
    assert convert.segment_from_message(message) == data
    assert convert.segment_from_proto(pb.StreamSegmentsResponse.FromString(message)) == data
    assert convert.segment_from_message(_with_unknown_fields(message)) == data
    view = convert.segment_view_from_message(message)
    assert view == data and isinstance(view.payload, memoryview)
    # The same bytes are a Fetch response carrying the segment.
    assert pb.FetchResponse.FromString(message).segment.payload == payload
    assert convert.fetch_part_from_message(message) == data


def test_fetch_part_is_a_manifest_or_a_segment():
    manifest = convert.manifest_to_proto(_manifest(), REQUEST)
    message = pb.FetchResponse(manifest=manifest).SerializeToString()
    assert convert.fetch_part_from_message(message) == manifest
    assert convert.fetch_manifest_message(_manifest(), REQUEST) == message
    # A segment field followed by a manifest: the oneof's last member wins.
    both = convert.segment_message(SegmentData(1, b"x")) + message
    assert convert.fetch_part_from_message(both) == manifest


def test_fast_segment_reader_falls_back_or_refuses():
    data = SegmentData(3, b"payload")
    message = convert.segment_message(data)
    # A field repeated: protobuf semantics (the last one wins) via the protobuf parser.
    inner = pb.StreamSegmentsResponse.FromString(message).segment.SerializeToString()
    twice = inner + b"\x1a\x01x"  # field 3 (payload) again
    twice = b"\x0a" + _encode_varint(len(twice)) + twice
    assert convert.segment_from_message(twice) == SegmentData(3, b"x")
    # The retired manifest_id (field 1) is skipped like any unknown field.
    old = b"\x0a\x02m1" + inner
    old = b"\x0a" + _encode_varint(len(old)) + old
    assert read_segment_response(old) == data
    for bad in (message[:-1], b"\x0a\xff", b"\x0f"):
        with pytest.raises(InvalidRequestError):
            convert.segment_from_message(bad)
    with pytest.raises(InvalidRequestError):
        convert.segment_from_message(b"")  # no segment at all


def test_enum_tables_cover_both_sides():
    from dataclasses import fields

    from fedsqueeze.wire import spec_convert

    tables: list[tuple[Any, Any, Any]] = [
        (spec_convert._PRUNE_METHODS, PruneMethod, pb.PruneMethod),
        (spec_convert._QUANT_SCHEMES, QuantScheme, pb.QuantScheme),
        (spec_convert._GRANULARITIES, Granularity, pb.Granularity),
        (spec_convert._ROUNDINGS, Rounding, pb.Rounding),
        (spec_convert._FLOAT_FORMATS, FloatFormat, pb.FloatFormat),
    ]
    # The default coder is the wire's unspecified value (every message before the field).
    assert set(spec_convert._CODERS) == set(EntropyCoder)
    assert sorted(spec_convert._CODERS.values()) == sorted(pb.EntropyCoder.values())
    for table, python_enum, wire_enum in tables:
        assert set(table) == set(python_enum)
        assert sorted(table.values()) == sorted(v for v in wire_enum.values() if v != 0)
    # A new CodecSpec field needs a new field in the wire message (and here).
    assert [f.name for f in fields(CodecSpec)] == [f.name for f in pb.CodecSpec.DESCRIPTOR.fields]
    assert [f.name for f in fields(QuantSpec)] == [f.name for f in pb.QuantSpec.DESCRIPTOR.fields]
    assert [f.name for f in fields(PruneSpec)] == [f.name for f in pb.PruneSpec.DESCRIPTOR.fields]
