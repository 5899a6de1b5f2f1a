"""The adaptive rANS stage (``entropy=ans``, format version 8): exact round trips, sizes
near the codes' entropy, and hostile bodies refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.codec import EncodedModel, EntropyCoder, decode_state, encode_state, entropy
from fedsqueeze.codec.ans import (
    MAX_CODES,
    MAX_CONTEXTS,
    decode_codes,
    decode_context_codes,
    encode_codes,
    encode_context_codes,
)
from fedsqueeze.codec.bitpack import pack_bits
from fedsqueeze.codec.bytesio import ByteReader
from fedsqueeze.codec.container import (
    ANS_VERSION,
    DecodeLimits,
    QParamsSizer,
    RecordFlags,
    parse_record,
)
from fedsqueeze.codec.spec import CodecSpec
from fedsqueeze.codec.spec_text import format_spec, parse_spec
from fedsqueeze.codec.streaming import decode_into
from fedsqueeze.errors import BaseMismatchError, ConfigError, FormatError


def _gaussian_codes(n: int, bits: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    top = (1 << bits) - 1
    return np.clip(np.rint(rng.normal(top / 2, top / 6, n)), 0, top).astype(np.uint8)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([1, 2, 3, 4, 8]),
    data=st.data(),
)
def test_round_trip_is_exact(bits: int, data: st.DataObject) -> None:
    codes = data.draw(
        st.lists(st.integers(0, (1 << bits) - 1), min_size=1, max_size=600), label="codes"
    )
    coded = encode_codes(np.array(codes), bits)
    assert decode_codes(coded, len(codes), bits).tolist() == codes


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 4096])
def test_constant_and_long_inputs_round_trip(n: int) -> None:
    for codes in (np.zeros(n, np.uint8), np.full(n, 15, np.uint8), _gaussian_codes(n, 4, n)):
        assert np.array_equal(decode_codes(encode_codes(codes, 4), n, 4), codes)


def test_size_is_near_the_empirical_entropy_and_below_zstd() -> None:
    codes = _gaussian_codes(4000, 4, 0)
    counts = np.bincount(codes, minlength=16)
    p = counts[counts > 0] / len(codes)
    entropy_bytes = -(counts[counts > 0] * np.log2(p)).sum() / 8
    coded = len(encode_codes(codes, 4))
    # Learning 16 probabilities costs about (16 - 1) / 2 * log2(n) bits, plus the state.
    assert entropy_bytes <= coded <= entropy_bytes + 7.5 * math.log2(4000) / 8 + 8
    packed = bytes(pack_bits(torch.from_numpy(codes), 4).numpy())
    zstd = entropy.compress(packed, 19)
    assert zstd is not None and coded < len(zstd)


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError):
        encode_codes(np.array([16]), 4)
    with pytest.raises(ValueError):
        encode_codes(np.array([-1]), 4)
    with pytest.raises(ValueError):
        encode_codes(np.array([], dtype=np.uint8), 4)
    with pytest.raises(ValueError):
        encode_codes(np.array([1]), 5)
    with pytest.raises(ValueError):
        decode_codes(b"\0" * 8, MAX_CODES + 1, 4)


def test_hostile_bodies_raise_format_error() -> None:
    codes = _gaussian_codes(500, 4, 1)
    coded = encode_codes(codes, 4)
    with pytest.raises(FormatError):
        decode_codes(coded[:-1], len(codes), 4)  # truncated
    with pytest.raises(FormatError):
        decode_codes(coded + b"\0", len(codes), 4)  # a byte left over
    with pytest.raises(FormatError):
        decode_codes(coded[:3], len(codes), 4)  # shorter than the state
    with pytest.raises(FormatError):
        decode_codes(coded, len(codes) + 1, 4)  # more codes than were coded
    rng = np.random.default_rng(0)
    for _ in range(50):
        junk = rng.integers(0, 256, len(coded), dtype=np.uint8).tobytes()
        with pytest.raises(FormatError):
            decode_codes(junk, len(codes), 4)


def test_spec_text_and_bytes_carry_the_coder() -> None:
    spec = parse_spec("rank=6,quant=4,entropy=ans,targets=*,min-ndim=1")
    assert spec.entropy_coder is EntropyCoder.ANS and spec.entropy_level == 19
    assert parse_spec(format_spec(spec)) == spec
    assert CodecSpec.from_bytes(spec.to_bytes()) == spec
    assert parse_spec("quant=4,entropy=ans:3").entropy_level == 3
    assert parse_spec("quant=4,entropy=3").entropy_coder is EntropyCoder.ZSTD
    # An older reader sees a zstd level over 22 in the entropy byte and refuses it.
    assert spec.to_bytes()[-4] & 0x80
    with pytest.raises(ConfigError, match="entropy"):
        parse_spec("quant=4,entropy=ans:23")
    # a misspelt coder is named in one clear line, not a bare int() error
    for text in ("rans", "ans:x", "zstd"):
        with pytest.raises(ConfigError, match=rf"ans or ans:LEVEL, got '{text.split(':')[-1]}'"):
            parse_spec(f"quant=4,entropy={text}")


def _model_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fc.weight": torch.randn(64, 96, generator=g),
        "fc.bias": torch.randn(64, generator=g),
        "out.weight": torch.randn(10, 64, generator=g),
    }


@pytest.mark.parametrize(
    "text",
    ["rank=4,quant=4,targets=*,min-ndim=1", "quant=4", "quant=8:channel", "quant=2:kmeans"],
)
def test_ans_models_decode_to_what_zstd_ones_do_and_are_smaller(text: str) -> None:
    state, base = _model_state(0), _model_state(1)
    zstd = encode_state(state, parse_spec(text + ",entropy=19"), base, seed=0)
    coded = encode_state(state, parse_spec(text + ",entropy=ans:19"), base, seed=0)
    data = coded.to_bytes()
    assert data[3] == ANS_VERSION
    assert any(r.ans for r in coded.records)
    assert len(data) < len(zstd.to_bytes())
    ours, theirs = decode_state(EncodedModel.from_bytes(data), base), decode_state(zstd, base)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_ans_flag_on_a_record_without_dense_codes_is_refused() -> None:
    # A float record (value kind FP32) with ENTROPY and a raw length of 0 in a v8 stream.
    record = bytes([RecordFlags.NAMED | RecordFlags.ENTROPY, 1]) + b"w"
    record += bytes([1, 1, 4, 2, 0, 4]) + b"\0" * 4
    reader = ByteReader(record)
    with pytest.raises(FormatError, match="ANS"):
        parse_record(reader, DecodeLimits(), QParamsSizer(), ANS_VERSION)


def test_a_corrupt_ans_record_is_refused_by_the_decoder() -> None:
    state, base = _model_state(0), _model_state(1)
    coded = encode_state(state, parse_spec("rank=4,quant=4,entropy=ans"), base, seed=0)
    index = next(i for i, r in enumerate(coded.records) if r.ans)
    body = bytearray(coded.records[index].body)
    body[len(body) // 2] ^= 0x5A
    records = list(coded.records)
    records[index] = type(records[index])(**{**records[index].__dict__, "body": bytes(body)})
    tampered = EncodedModel(coded.spec, coded.base_digest, tuple(records))
    with pytest.raises(FormatError):
        decode_state(tampered, base)


def test_a_v8_delta_may_leave_its_base_digest_to_its_carrier() -> None:
    state, base = _model_state(0), _model_state(1)
    coded = encode_state(state, parse_spec("rank=4,quant=4,entropy=ans"), base, seed=0)
    assert coded.can_omit_base and coded.base_digest is not None
    whole, compact = coded.to_bytes(), coded.to_bytes(omit_base=True)
    assert len(compact) == len(whole) - 32 and compact[4] == 0x02
    with pytest.raises(FormatError, match="base_digest"):
        EncodedModel.from_bytes(compact)
    back = EncodedModel.from_bytes(compact, base_digest=coded.base_digest)
    assert back.to_bytes() == whole  # the same model, naming its base again
    with pytest.raises(FormatError):  # readers of parts cannot be told the base
        EncodedModel.parse_prefix(compact[:-4])
    with pytest.raises(FormatError):
        decode_into([compact[:-4]], {k: v.clone() for k, v in base.items()})
    # A wrong digest is a base mismatch when decoding, as for any delta.
    wrong = EncodedModel.from_bytes(compact, base_digest=bytes(32))
    with pytest.raises(BaseMismatchError):
        decode_state(wrong, base)


def test_only_v8_deltas_leave_their_base_out() -> None:
    state, base = _model_state(0), _model_state(1)
    zstd = encode_state(state, parse_spec("rank=4,quant=4"), base, seed=0)
    assert not zstd.can_omit_base and zstd.to_bytes(omit_base=True) == zstd.to_bytes()
    whole = encode_state(state, parse_spec("rank=4,quant=4,entropy=ans"), None, seed=0)
    assert not whole.can_omit_base and whole.to_bytes(omit_base=True) == whole.to_bytes()
    # The implied-base flag in an older version, or with a digest too, is refused.
    data = bytearray(zstd.to_bytes())
    data[4] = 0x02
    with pytest.raises(FormatError, match="flags"):
        EncodedModel.parse_stream(bytes(data[:-4]), base_digest=bytes(32))
    v8 = bytearray(encode_state(state, parse_spec("quant=4,entropy=ans"), base, seed=0).to_bytes())
    v8[4] = 0x03
    with pytest.raises(FormatError, match="flags"):
        EncodedModel.parse_stream(bytes(v8[:-4]), base_digest=bytes(32))


# ------------------------------------------------- the context-adaptive variant (v9)
@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4, 8]), data=st.data())
def test_context_round_trip_is_exact(bits: int, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 500), label="n")
    codes = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=n, max_size=n))
    contexts = data.draw(st.lists(st.integers(0, MAX_CONTEXTS - 1), min_size=n, max_size=n))
    coded = encode_context_codes(np.array(codes), np.array(contexts), bits)
    assert decode_context_codes(coded, np.array(contexts), bits).tolist() == codes


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_one_context_is_the_order_0_coder_byte_for_byte(bits: int) -> None:
    codes = _gaussian_codes(3000, 8, bits) >> (8 - bits)
    for context in (0, 200):
        same = np.full(len(codes), context)
        assert encode_context_codes(codes, same, bits) == encode_codes(codes, bits)


def test_contexts_that_predict_the_codes_cost_almost_nothing() -> None:
    rng = np.random.default_rng(3)
    contexts = rng.integers(0, 16, 5000)
    codes = (contexts >> 3).astype(np.uint8)  # determined by the context
    coded = encode_context_codes(codes, contexts, 1)
    assert len(coded) < 30 < len(encode_codes(codes, 1)) // 20
    assert np.array_equal(decode_context_codes(coded, contexts, 1), codes)


def test_context_coder_golden_bytes() -> None:
    # Pinned: these bytes are format version 9 (change them only with a version bump).
    contexts = np.array([i % 3 for i in range(48)])
    codes = np.array([(c * 5 + (i * i) % 7) % 4 for i, c in enumerate(contexts)])
    coded = encode_context_codes(codes, contexts, 2)
    assert coded.hex() == "0bbd0dd9a6103513f93ce5d43b1a"
    assert decode_context_codes(coded, contexts, 2).tolist() == codes.tolist()


def test_context_coder_bad_arguments_are_value_errors() -> None:
    one = np.array([1])
    with pytest.raises(ValueError):
        encode_context_codes(one, np.array([MAX_CONTEXTS]), 2)
    with pytest.raises(ValueError):
        encode_context_codes(one, np.array([-1]), 2)
    with pytest.raises(ValueError):
        encode_context_codes(one, np.array([0, 0]), 2)
    with pytest.raises(ValueError):
        encode_context_codes(np.array([4]), np.array([0]), 2)
    with pytest.raises(ValueError):
        decode_context_codes(b"\0" * 8, np.array([], dtype=np.int64), 2)
    with pytest.raises(ValueError):
        decode_context_codes(b"\0" * 8, np.zeros(MAX_CODES + 1, dtype=np.int64), 2)


def test_hostile_context_bodies_raise_format_error() -> None:
    rng = np.random.default_rng(5)
    contexts = rng.integers(0, 8, 600)
    codes = (contexts + rng.integers(0, 2, 600)) % 4
    coded = encode_context_codes(codes, contexts, 2)
    for bad in (coded[:-1], coded + b"\0", coded[:3], b""):
        with pytest.raises(FormatError):
            decode_context_codes(bad, contexts, 2)
    with pytest.raises(FormatError):
        decode_context_codes(coded, np.concatenate([contexts, [0]]), 2)
    for _ in range(50):
        junk = rng.integers(0, 256, len(coded), dtype=np.uint8).tobytes()
        with pytest.raises(FormatError):
            decode_context_codes(junk, contexts, 2)
    # A long junk body: the work stays linear in the code count (it ends or fails).
    with pytest.raises(FormatError):
        decode_context_codes(bytes(1 << 16), contexts, 2)
