"""Splitting encoded models into segments and joining them back."""

from __future__ import annotations

import random

import pytest
import torch

from fedsqueeze.codec import (
    CodecSpec,
    Segment,
    decode_state,
    encode_state,
    join_segments,
    split_segments,
)
from fedsqueeze.errors import CodecError


def _model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "big.weight": torch.randn(300, 200, generator=g),  # 240 KB: spans segments
        "small.weight": torch.randn(4, 4, generator=g),
        "small.bias": torch.randn(4, generator=g),
    }


@pytest.mark.parametrize("max_bytes", [64, 1000, 50_000, 1 << 20])
def test_split_join_round_trip_any_order(max_bytes: int) -> None:
    state = _model()
    encoded = encode_state(state, CodecSpec(entropy_level=0))
    segments = split_segments(encoded, max_bytes)
    assert all(len(s.payload) <= max_bytes for s in segments)
    assert [s.priority for s in segments] == sorted(s.priority for s in segments)
    assert sum(len(s.payload) for s in segments) == encoded.nbytes - 4
    shuffled = segments[:]
    random.Random(0).shuffle(shuffled)
    joined = join_segments(shuffled)
    out = decode_state(joined)
    assert all(torch.equal(out[k], state[k]) for k in state)
    names = {n for s in segments for n in s.tensor_names}
    assert names == set(state)


def test_small_model_is_one_segment() -> None:
    encoded = encode_state({"w": torch.ones(3)}, CodecSpec())
    assert len(split_segments(encoded)) == 1


@pytest.mark.parametrize("max_bytes", [1000, 50_000])
def test_no_segment_holds_only_the_stream_header(max_bytes: int) -> None:
    # The first record (240 KB) is larger than a segment: it starts right after the
    # header instead of leaving a 9-byte segment (and its descriptor) on its own.
    encoded = encode_state(_model(), CodecSpec(entropy_level=0))
    segments = split_segments(encoded, max_bytes)
    assert segments[0].tensor_names and len(segments[0].payload) == max_bytes
    assert all(s.tensor_names for s in segments)


def test_missing_duplicate_or_corrupt_segments_raise() -> None:
    segments = split_segments(encode_state(_model(), CodecSpec(entropy_level=0)), 50_000)
    with pytest.raises(CodecError):
        join_segments(segments[:-1])
    with pytest.raises(CodecError):
        join_segments([*segments, segments[1]])
    with pytest.raises(CodecError):
        join_segments([])
    bad = Segment(
        segments[1].index, segments[1].tensor_names, 1, 0, segments[1].payload[:-1] + b"\x00"
    )
    # the codec cannot see a flipped value byte once the stream is rejoined: that is what
    # each segment's sha256 is for, and the transport checks it
    assert bad.sha256 != segments[1].sha256
    with pytest.raises(ValueError):
        split_segments(encode_state(_model(), CodecSpec()), 10)
