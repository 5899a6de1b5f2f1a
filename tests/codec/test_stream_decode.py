"""Decoding a whole stream into given tensors: what decode_state returns, levels too."""

from __future__ import annotations

import pytest
import torch

from fedsqueeze.codec import decode_state, encode_state, state_digest
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.codec.stream_decode import decode_stream_into, scan_stream
from fedsqueeze.errors import BaseMismatchError, FormatError, TruncatedError

SPECS = [
    "lossless",
    "fp16",
    "int8",
    "quant=4:symmetric:block64",
    "quant=4:nf4:block64",
    "prune90-int4",
    "topk10-int4",
    "rank=4,quant=8",
    "quant=8,levels=2+2+4",
    "prune=l1:0.5,quant=4,levels=2+2",
    "quant=4:channel:hadamard",
    "quant=8:block64:dq:hadamard,levels=2+2+4",
]


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {f"l{i}.weight": torch.randn(64, 40 + 8 * i, generator=g) for i in range(3)}
    state["l0.bias"] = torch.randn(64, generator=g)
    state["h.weight"] = torch.randn(10, 64, generator=g).half()
    state["steps"] = torch.tensor(5 + seed)
    state["flags"] = torch.tensor([True, seed % 2 == 0])
    return state


@pytest.mark.parametrize("text", SPECS)
@pytest.mark.parametrize("delta", [False, True])
def test_fills_the_tensors_decode_state_returns(text: str, delta: bool) -> None:
    state, base = _state(0), (_state(1) if delta else None)
    encoded = encode_state(state, parse_spec(text), base, seed=0)
    expected = decode_state(encoded, base)
    stream = encoded.to_bytes()[:-4]
    layout = scan_stream(stream, base)
    assert [s.name for s in layout.tensors] == list(expected)
    target = {s.name: torch.full(s.shape, 7).to(s.dtype) for s in layout.tensors}
    if base is not None:
        for name, t in target.items():
            t.copy_(base[name])
    digest = state_digest(base) if base is not None else None
    decode_stream_into(stream, layout, target, base_digest=digest)
    for name, t in expected.items():
        assert torch.equal(target[name], t), name


def test_frozen_tensors_a_delta_leaves_out_are_named() -> None:
    state, base = _state(0), _state(1)
    encoded = encode_state(state, parse_spec("int8,freeze=l1.*"), base)
    layout = scan_stream(encoded.to_bytes()[:-4], base)
    assert [s.name for s in layout.kept_from_base] == ["l1.weight"]
    assert "l1.weight" not in {s.name for s in layout.tensors}


def test_hostile_streams_raise_codec_errors() -> None:
    state = _state(0)
    stream = encode_state(state, parse_spec("quant=8,levels=4+4")).to_bytes()[:-4]
    with pytest.raises((TruncatedError, FormatError)):
        scan_stream(stream[:-3])
    with pytest.raises(FormatError):
        scan_stream(stream + b"\0")
    delta = encode_state(state, parse_spec("int8"), _state(1)).to_bytes()[:-4]
    with pytest.raises(BaseMismatchError, match="pass its base"):
        scan_stream(delta)
    layout = scan_stream(delta, _state(1))
    target = {s.name: torch.zeros(s.shape, dtype=s.dtype) for s in layout.tensors}
    with pytest.raises(BaseMismatchError, match="another model"):
        decode_stream_into(delta, layout, target, base_digest=b"\0" * 32)
