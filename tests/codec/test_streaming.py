"""Part-by-part decoding into existing tensors: same tensors as decode_state, hostile input."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from fedsqueeze.codec import encode_state, state_digest
from fedsqueeze.codec.model import decode_state
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.codec.streaming import decode_into
from fedsqueeze.errors import BaseMismatchError, CodecError, FormatError, TruncatedError

SPECS = [
    "lossless",
    "int8",
    "quant=8:channel",
    "quant=2:pow2",
    "quant=4:kmeans",
    "fp16",
    "float=bf16,targets=*,min-ndim=0",
    "entropy=0,quant=3",
    "prune=l1:0.5,quant=4",
    "prune=channel:0.5",
    "topk=0.2,quant=4:channel,targets=*,min-ndim=1",
    "rank=4,quant=8",
    "rank=4,quant=4,entropy=ans,targets=*,min-ndim=1",
    "quant=4,entropy=ans:3",
    "quant=4:block64",
    "quant=4:nf4:block64",
    "quant=8:block64:dq",
    "quant=3:block48",
    "quant=4:symmetric:block40:bf16",
    "prune=l1:0.5,quant=4:block32",
    "topk=0.2,quant=2:block32:dq,targets=*,min-ndim=1",
]


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(64, 300, generator=g),
        "a.bias": torch.randn(64, generator=g),
        "h.weight": torch.randn(10, 64, generator=g).half(),
        "steps": torch.tensor(5 + seed),
        "flag": torch.tensor([True, seed % 2 == 0]),
        "same": torch.ones(3),
    }


def _chunks(data: bytes, rng: random.Random) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        size = rng.choice([1, 7, 97, 4096, 1 << 20])
        out.append(data[pos : pos + size])
        pos += size
    return out


@pytest.mark.parametrize("text", SPECS)
@pytest.mark.parametrize("delta", [False, True])
def test_writes_exactly_what_decode_state_returns(text: str, delta: bool) -> None:
    state, base = _state(0), (_state(1) if delta else None)
    encoded = encode_state(state, parse_spec(text), base, seed=0)
    expected = decode_state(encoded, base)
    stream = encoded.to_bytes()[:-4]
    for seed in range(3):
        target = {k: v.clone() for k, v in (base or _state(2)).items()}
        digest = state_digest(target) if delta else None
        stats = decode_into(
            _chunks(stream, random.Random(seed)), target, base_digest=digest, chunk_values=64
        )
        assert stats.tensors == len(expected) and stats.stream_bytes == len(stream)
        for name, tensor in expected.items():
            assert torch.equal(target[name], tensor), (text, name)


@pytest.mark.parametrize(
    "text",
    [
        "quant=8:channel",
        "prune=l1:0.9,quant=4",
        "lossless",
        "quant=4:block64",
        "quant=4:nf4:block64:dq",
        "prune=l1:0.9,quant=4:block48",
    ],
)
def test_large_records_stream_and_are_never_held_whole(text: str) -> None:
    state = {"big.weight": torch.randn(512, 1024)}
    encoded = encode_state(state, parse_spec(text))
    stream = encoded.to_bytes()[:-4]
    target = {"big.weight": torch.full((512, 1024), 7.0)}
    stats = decode_into([stream[i : i + 65536] for i in range(0, len(stream), 65536)], target)
    assert stats.streamed == 1 and stats.largest_held == 0
    assert torch.equal(target["big.weight"], decode_state(encoded)["big.weight"])


def test_a_delta_needs_the_digest_of_the_base_the_tensors_hold() -> None:
    state, base = _state(0), _state(1)
    stream = encode_state(state, parse_spec("int8"), base).to_bytes()[:-4]
    target = {k: v.clone() for k, v in base.items()}
    with pytest.raises(BaseMismatchError):
        decode_into([stream], target)
    with pytest.raises(BaseMismatchError):
        decode_into([stream], target, base_digest=state_digest(_state(3)))
    for name in base:  # refused before anything was written
        assert torch.equal(target[name], base[name])


def test_a_target_without_the_streams_tensor_is_refused() -> None:
    stream = encode_state(_state(0), parse_spec("int8")).to_bytes()[:-4]
    target = {k: v.clone() for k, v in _state(0).items() if k != "a.bias"}
    with pytest.raises(BaseMismatchError, match=r"a\.bias"):
        decode_into([stream], target)
    wrong = {**_state(0), "a.weight": torch.zeros(64, 299)}
    with pytest.raises(BaseMismatchError, match=r"a\.weight"):
        decode_into([stream], wrong)


def test_short_long_and_progressive_streams_are_refused() -> None:
    encoded = encode_state(_state(0), parse_spec("int8"))
    stream = encoded.to_bytes()[:-4]
    fresh = _state(2)
    with pytest.raises(TruncatedError):
        decode_into([stream[:-3]], {k: v.clone() for k, v in fresh.items()})
    with pytest.raises(FormatError, match="after the last record"):
        decode_into([stream, b"\x00"], {k: v.clone() for k, v in fresh.items()})
    levels = encode_state(_state(0), parse_spec("quant=8,levels=4+4")).to_bytes()[:-4]
    with pytest.raises(FormatError, match="decode_prefix"):
        decode_into([levels], {k: v.clone() for k, v in fresh.items()})


def test_mutated_streams_raise_only_codec_errors() -> None:
    rng = random.Random(7)
    for text in (
        "int8",
        "quant=8:channel",
        "lossless",
        "prune=l1:0.5,quant=4",
        "quant=4:block64:dq",
        "prune=l1:0.5,quant=4:nf4:block32",
    ):
        stream = encode_state(_state(0), parse_spec(text), seed=0).to_bytes()[:-4]
        for _ in range(150):
            buf = bytearray(stream)
            for _ in range(rng.randint(1, 3)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            target = {k: v.clone() for k, v in _state(2).items()}
            with contextlib.suppress(CodecError):
                decode_into(_chunks(bytes(buf), rng), target, chunk_values=64)
