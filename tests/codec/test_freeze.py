"""Frozen parts in the codec: the ``freeze`` spec key, and deltas that leave them out."""

from __future__ import annotations

import pytest
import torch

from fedsqueeze.codec import (
    CodecSpec,
    EncodedModel,
    decode_prefix,
    decode_state,
    encode_state,
)
from fedsqueeze.codec.spec import PRESETS
from fedsqueeze.codec.spec_text import format_spec, parse_spec, with_freeze
from fedsqueeze.errors import BaseMismatchError, ConfigError, FormatError
from fedsqueeze.wire.convert import codec_spec_from_proto, codec_spec_to_proto


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "frozen.embed.weight": torch.randn(64, 32, generator=g),
        "frozen.norm.bias": torch.randn(32, generator=g),
        "trainable.head.weight": torch.randn(4, 32, generator=g),
        "trainable.head.bias": torch.randn(4, generator=g),
    }


def _trained(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v + 0.5 for k, v in base.items()}  # frozen ones changed too: must not travel


@pytest.mark.parametrize(
    "text",
    [
        "lossless,freeze=frozen.*",
        "int8,freeze=frozen.*|*.norm.*",
        "topk10-int4,freeze=enc[0-3].*",
        "quant=8,levels=4+4,freeze=backbone.*",
    ],
)
def test_freeze_round_trips_through_text_bytes_and_proto(text: str) -> None:
    spec = parse_spec(text)
    assert spec.freeze
    assert parse_spec(format_spec(spec)) == spec
    assert CodecSpec.from_bytes(spec.to_bytes()) == spec
    assert codec_spec_from_proto(codec_spec_to_proto(spec)) == spec


def test_specs_without_freeze_keep_their_bytes() -> None:
    assert CodecSpec().to_bytes() == bytes.fromhex("000903")
    suffix = bytes([1, len("frozen.*")]) + b"frozen.*"
    for spec in PRESETS.values():
        plain = spec.to_bytes()
        ext = spec.with_changes(freeze=("frozen.*",)).to_bytes()
        # one byte differs (the float-format byte's extension bit), the patterns follow
        assert ext.endswith(suffix) and len(ext) == len(plain) + len(suffix)
        diff = [i for i, (a, b) in enumerate(zip(plain, ext, strict=False)) if a != b]
        assert len(diff) == 1 and ext[diff[0]] == plain[diff[0]] | 0x80
        assert not codec_spec_to_proto(spec).freeze


def test_pattern_order_is_canonical() -> None:
    assert parse_spec("int8,freeze=b.*|a.*") == parse_spec("int8,freeze=a.*|b.*")
    assert with_freeze("int8", ()) == "int8"
    assert parse_spec(with_freeze("int8,freeze=a.*", ("b.*", "a.*"))).freeze == ("a.*", "b.*")


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("*", "freezes every tensor"),
        ("**", "freezes every tensor"),
        ("a.[0-3", "unbalanced"),
        ("a.*||b.*", "1 to 200 characters"),
        ("a.*|a.*", "twice"),
        ("x" * 201, "1 to 200 characters"),
        ("a b", "space"),
    ],
)
def test_bad_patterns_are_refused_in_one_line(value: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_spec(f"int8,freeze={value}")
    message = str(err.value)
    assert why in message and "\n" not in message and "freeze" in message


def test_an_extension_bit_without_patterns_is_malformed() -> None:
    data = bytearray(CodecSpec().to_bytes())
    data[1] |= 0x80
    with pytest.raises(FormatError):
        CodecSpec.from_bytes(bytes(data) + b"\x00")


@pytest.mark.parametrize("text", ["lossless", "int8", "topk10-int4", "quant=8,levels=4+4"])
def test_a_delta_carries_no_frozen_tensor_and_decodes_with_the_base_ones(text: str) -> None:
    base = _model()
    trained = _trained(base)
    spec = parse_spec(text).with_changes(freeze=("frozen.*",))
    encoded = encode_state(trained, spec, base)
    named = {r.index for r in encoded.records if r.level == 0}
    frozen_index = {i for i, n in enumerate(sorted(base)) if n.startswith("frozen.")}
    assert not named & frozen_index, "no record at all, not even a ZERO one"
    assert len([r for r in encoded.records if r.level == 0]) == 2
    back = EncodedModel.from_bytes(encoded.to_bytes())
    decoded = decode_state(back, base)
    assert set(decoded) == set(base)
    for name in base:
        if name.startswith("frozen."):
            assert torch.equal(decoded[name], base[name]), name
            assert decoded[name].data_ptr() != base[name].data_ptr()
    if spec.lossless:
        assert torch.equal(decoded["trainable.head.weight"], trained["trainable.head.weight"])


def test_unchanged_frozen_tensors_cost_no_zero_record() -> None:
    base = _model()
    trained = {k: (v + 0.5 if k.startswith("trainable.") else v) for k, v in base.items()}
    plain = encode_state(trained, CodecSpec(), base)
    frozen = encode_state(trained, CodecSpec(freeze=("frozen.*",)), base)
    assert decode_state(plain, base).keys() == decode_state(frozen, base).keys()
    assert len(frozen.records) == len(plain.records) - 2
    assert sum(r.zero for r in plain.records) == 2 and not any(r.zero for r in frozen.records)


def test_a_full_model_carries_its_frozen_tensors() -> None:
    model = _model()
    encoded = encode_state(model, CodecSpec(freeze=("frozen.*",)))
    decoded = decode_state(encoded)
    assert all(torch.equal(decoded[k], v) for k, v in model.items())


def test_a_frozen_tensor_the_model_lacks_is_refused() -> None:
    base = _model()
    trained = {k: v for k, v in base.items() if k != "frozen.norm.bias"}
    with pytest.raises(BaseMismatchError, match=r"frozen\.norm\.bias"):
        encode_state(trained, CodecSpec(freeze=("frozen.*",)), base)


def test_a_frozen_tensor_new_or_reshaped_is_sent() -> None:
    base = _model()
    trained = dict(base)
    trained["frozen.embed.weight"] = torch.randn(8, 8)
    trained["frozen.extra"] = torch.ones(3)
    encoded = encode_state(trained, CodecSpec(freeze=("frozen.*",)), base)
    decoded = decode_state(encoded, base)
    assert torch.equal(decoded["frozen.embed.weight"], trained["frozen.embed.weight"])
    assert torch.equal(decoded["frozen.extra"], trained["frozen.extra"])


def test_a_prefix_of_a_frozen_delta_keeps_the_base_frozen_tensors() -> None:
    base = _model()
    spec = parse_spec("quant=8,levels=4+4,targets=*,min-ndim=1,freeze=frozen.*")
    encoded = encode_state(_trained(base), spec, base)
    stream = encoded.to_bytes()[:-4]
    for cut in (len(encoded.header.to_bytes()), len(stream) // 2, len(stream)):
        got = decode_prefix(stream[:cut], base)
        assert set(got.state) == set(base)
        assert torch.equal(got.state["frozen.embed.weight"], base["frozen.embed.weight"])
