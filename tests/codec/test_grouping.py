"""Byte-grouped lossless coding (format version 4): bit-exact on every float dtype, chosen
only when smaller, hostile bodies refused, golden vectors.

Regenerate the golden vectors (only together with a format version change) with:
    python -m tests.codec.test_grouping
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.codec import EncodedModel, decode_state, encode_state
from fedsqueeze.codec.bytesio import write_varint
from fedsqueeze.codec.container import BUCKETS_VERSION, GROUPED_VERSION, ValueKind
from fedsqueeze.codec.finite import NonFinite
from fedsqueeze.codec.grouping import (
    GROUPED_DTYPES,
    MIN_CHUNK_LOG2,
    decode_grouped,
    encode_grouped,
    holds_buckets,
)
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.errors import FormatError, UnsupportedVersionError
from tests.codec.test_golden import check_golden, regenerate

GOLDEN = Path(__file__).parent.parent / "golden" / "v4"
CARRY = NonFinite.CARRY
_INT_VIEWS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_SPECIAL = {
    torch.float32: [0x7FC00001, 0xFFBADBAD, 0x80000000, 0x00000001, 0x807FFFFF, 0x7F800000],
    torch.float16: [0x7C01, 0xFE55, 0x8000, 0x0001, 0x83FF, 0xFC00],
    torch.bfloat16: [0x7F81, 0xFFC1, 0x8000, 0x0001, 0x807F, 0xFF80],
    torch.float64: [0x7FF0000000000001, -1, -(1 << 63), 1, 0x800FFFFFFFFFFFFF - (1 << 64), 1 << 62],
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEWS[t.element_size()])


def _floats(dtype: torch.dtype, n: int, seed: int, special: bool) -> torch.Tensor:
    """Trained-weight-like values with NaN payloads, −0.0, subnormals and Inf mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g, dtype=torch.float64) * 0.05).to(dtype)
    if special and n:
        bits = _bits(x).clone()
        specials = torch.tensor(_SPECIAL[dtype], dtype=torch.int64).to(bits.dtype)
        where = torch.randint(0, n, (min(n, 64),), generator=g)
        bits[where] = specials[torch.arange(where.numel()) % specials.numel()]
        x = bits.view(dtype)
    return x


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(GROUPED_DTYPES),
    n=st.integers(0, 5000),
    seed=st.integers(0, 2**16),
    special=st.booleans(),
    chunk_log2=st.integers(MIN_CHUNK_LOG2, 13),
)
def test_grouped_body_round_trips_bit_exactly(
    dtype: torch.dtype, n: int, seed: int, special: bool, chunk_log2: int
) -> None:
    x = _floats(dtype, n, seed, special)
    body = encode_grouped(x, dtype, chunk_log2)
    assert _same_bits(decode_grouped(body, dtype, n), x)


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(GROUPED_DTYPES),
    n=st.integers(1, 3000),
    seed=st.integers(0, 2**16),
    special=st.booleans(),
    delta=st.booleans(),
)
def test_lossless_models_round_trip_bit_exactly(
    dtype: torch.dtype, n: int, seed: int, special: bool, delta: bool
) -> None:
    state = {"w": _floats(dtype, n, seed, special), "v": _floats(dtype, 7, seed + 1, special)}
    base = None
    if delta:
        base = {k: _floats(dtype, t.numel(), seed + 2, special) for k, t in state.items()}
        # Mostly unchanged, as between two versions of a model.
        state = {k: torch.where(torch.rand(t.shape) < 0.2, t, base[k]) for k, t in state.items()}
    blob = encode_state(state, parse_spec("lossless"), base, nonfinite=CARRY).to_bytes()
    decoded = decode_state(EncodedModel.from_bytes(blob), base)
    assert all(_same_bits(decoded[k], t) for k, t in state.items())


@pytest.mark.parametrize("dtype", GROUPED_DTYPES)
def test_many_chunks_and_blocks_round_trip_bit_exactly(dtype: torch.dtype) -> None:
    # Several chunks (coded on all cores) and a chunk of several blocks.
    x = _floats(dtype, 600_001, 3, True)
    for chunk_log2 in (17, 20):
        body = encode_grouped(x, dtype, chunk_log2)
        buckets = holds_buckets(body, dtype, x.numel())
        assert _same_bits(decode_grouped(body, dtype, x.numel(), buckets), x)


def test_grouped_coding_from_many_threads_at_once() -> None:
    from concurrent.futures import ThreadPoolExecutor

    tensors = [_floats(torch.bfloat16, 70_000 + i, i, True) for i in range(6)]
    alone = [bytes(encode_grouped(t, torch.bfloat16, 14)) for t in tensors]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda t: bytes(encode_grouped(t, torch.bfloat16, 14)), tensors))
        decoded = list(
            pool.map(lambda b: decode_grouped(b[0], torch.bfloat16, b[1]),
                     [(body, t.numel()) for body, t in zip(alone, tensors, strict=True)])
        )  # fmt: skip
    assert together == alone
    assert all(_same_bits(d, t) for d, t in zip(decoded, tensors, strict=True))


def test_a_bad_plane_in_a_later_chunk_is_refused() -> None:
    # Chunks decode on worker threads: their errors reach the caller.
    n = 3 << 10
    planes = [(1, b"\x00\x01\x02") if i == 4 else (0, bytes(1024)) for i in range(6)]
    with pytest.raises(FormatError):
        decode_grouped(_body(10, planes), torch.float16, n)


def test_bodies_parsed_from_bytes_are_views_and_from_buffers_copies() -> None:
    blob = encode_state({"w": _floats(torch.float32, 8192, 0, False)}, parse_spec("lossless"))
    data = blob.to_bytes()
    parsed = EncodedModel.from_bytes(data)
    body = parsed.records[0].body
    assert isinstance(body, memoryview) and body.obj is data
    mutable = bytearray(data)
    copied = EncodedModel.from_bytes(mutable)  # type: ignore[arg-type]  # accepted at run time
    assert isinstance(copied.records[0].body, bytes)
    expected = decode_state(copied)["w"].clone()
    mutable[len(mutable) // 2] ^= 0xFF  # the caller's buffer changes after parsing
    assert _same_bits(decode_state(copied)["w"], expected)
    assert parsed.to_bytes() == data


def test_large_float_tensors_are_grouped_and_smaller() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        state = {"w": _floats(dtype, 1 << 19, 0, True)}
        plain = encode_state(state, parse_spec("lossless,entropy=0"), nonfinite=CARRY).nbytes
        model = encode_state(state, parse_spec("lossless"), nonfinite=CARRY)
        assert model.records[0].value_kind is ValueKind.GROUPED
        # Planes in buckets (fp32 and bf16 only, when smaller) need version 10.
        buckets = holds_buckets(model.records[0].body, dtype, 1 << 19)
        assert not (buckets and dtype is torch.float16)
        assert model.header.version == (BUCKETS_VERSION if buckets else GROUPED_VERSION)
        assert model.nbytes < 0.9 * plain
        base = {"w": _floats(dtype, 1 << 19, 1, False)}
        delta = encode_state(state, parse_spec("lossless"), base, nonfinite=CARRY)
        assert delta.records[0].value_kind is ValueKind.GROUPED_XOR


def test_mid_sized_weights_that_plain_zstd_codes_smaller_stay_plain() -> None:
    """A model's own weights of 128 KiB to 1 MiB are grouped without a sampled guess
    first; where plain zstd is smaller (a pruned tensor: 97% zeros, whose runs zstd's
    matches code and the planes split apart), the recorded sizes still keep the plain
    record."""
    gen = torch.Generator().manual_seed(3)
    n = 96 * 1024  # fp32: 384 KiB, in the sampled band
    kept = torch.rand(n, generator=gen) >= 0.97
    state = {"w": torch.where(kept, torch.randn(n, generator=gen), 0.0)}
    model = encode_state(state, parse_spec("lossless"))
    record = model.records[0]
    assert record.value_kind is ValueKind.RAW and record.raw_length is not None
    assert len(record.body) < len(encode_grouped(state["w"], torch.float32))
    assert _same_bits(decode_state(model)["w"], state["w"])
    # Weights with no zeros are grouped, as before.
    dense = {"w": torch.randn(n, generator=gen)}
    assert encode_state(dense, parse_spec("lossless")).records[0].value_kind is ValueKind.GROUPED


def test_models_it_does_not_help_keep_their_version_1_bytes() -> None:
    # Tiny tensors and integers: the plain record is smaller, so nothing changes.
    state = {"w": torch.arange(12, dtype=torch.float32), "n": torch.arange(5)}
    model = encode_state(state, parse_spec("lossless"))
    assert model.header.version == 1
    assert {r.value_kind for r in model.records} == {ValueKind.RAW}


def _grouped_blob() -> bytes:
    return encode_state(
        {"w": _floats(torch.float32, 4096, 0, False)}, parse_spec("lossless")
    ).to_bytes()


def test_old_decoders_refuse_version_4_by_its_version_byte() -> None:
    blob = _grouped_blob()
    assert blob[3] == GROUPED_VERSION
    from fedsqueeze.codec import container

    old = container.SUPPORTED_VERSIONS
    try:
        container.SUPPORTED_VERSIONS = old[:3]  # type: ignore[assignment]
        with pytest.raises(UnsupportedVersionError):
            EncodedModel.from_bytes(blob)
    finally:
        container.SUPPORTED_VERSIONS = old


def test_a_grouped_kind_in_a_version_3_stream_is_refused() -> None:
    import zlib

    blob = bytearray(_grouped_blob())
    blob[3] = 3
    blob[-4:] = (zlib.crc32(blob[:-4]) & 0xFFFFFFFF).to_bytes(4, "little")
    with pytest.raises(FormatError, match="unknown value kind"):
        EncodedModel.from_bytes(bytes(blob))


def _body(chunk_log2: int, entries: list[tuple[int, bytes]]) -> bytes:
    table = bytearray([chunk_log2])
    for coding, data in entries:
        table.append(coding)
        write_varint(table, len(data))
    return bytes(table) + b"".join(data for _, data in entries)


def test_hostile_bodies_are_refused() -> None:
    import zstandard

    n = 1000
    good = [(0, bytes(n))] * 2
    assert decode_grouped(_body(10, good), torch.float16, n).numel() == n
    bomb = zstandard.ZstdCompressor().compress(bytes(1 << 24))[4:]  # magicless: 16 MB of 0
    cases = [
        _body(9, good),  # chunk below the minimum
        _body(40, good),  # above the maximum
        _body(10, good[:1]),  # a plane missing
        _body(10, [(0, bytes(n - 1)), (0, bytes(n))]),  # a raw plane of the wrong size
        _body(10, [(7, bytes(n)), (0, bytes(n))]),  # an unknown coding
        _body(10, [(1, bomb), (0, bytes(n))]),  # a decompression bomb
        _body(10, [(1, b"\x00\x01\x02"), (0, bytes(n))]),  # corrupt zstd
        _body(10, good) + b"\x00",  # trailing bytes
        _body(10, good)[:-1],  # truncated
    ]
    for body in cases:
        with pytest.raises(FormatError):
            decode_grouped(body, torch.float16, n)
    with pytest.raises(FormatError):
        decode_grouped(_body(10, good), torch.int16, n)  # not a float dtype


def test_grouped_decoding_writes_at_most_what_the_header_says() -> None:
    # A frame that declares a bigger content size is refused before decompressing.
    import zstandard

    frame = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(2000))[4:]
    with pytest.raises(FormatError):
        decode_grouped(_body(10, [(1, frame), (0, bytes(1000))]), torch.float16, 1000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_part_by_part_decoding_streams_grouped_records_and_deltas(dtype: torch.dtype) -> None:
    from fedsqueeze.codec import state_digest
    from fedsqueeze.codec.streaming import decode_into

    base = {"w": _floats(dtype, 3 << 18, 1, False)}
    state = {
        "w": torch.where(torch.rand(3 << 18) < 0.3, _floats(dtype, 3 << 18, 0, False), base["w"])
    }
    for b in (None, base):
        stream = encode_state(state, parse_spec("lossless"), b).to_bytes()[:-4]
        target = {"w": base["w"].clone() if b is not None else torch.zeros(3 << 18, dtype=dtype)}
        digest = state_digest(base) if b is not None else None
        pieces = [stream[i : i + 65536] for i in range(0, len(stream), 65536)]
        stats = decode_into(pieces, target, base_digest=digest)
        assert stats.streamed == 1 and stats.largest_held == 0
        assert _same_bits(target["w"], state["w"])


# ------------------------------------------------------------------ golden vectors
def _golden_state(seed: int) -> dict[str, torch.Tensor]:
    # Exact binary fractions from integers: identical on every platform.
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-4096, 4096, (64, 64), generator=g).float() / 4096
    return {"fc.weight": w, "fc.bias": torch.zeros(64), "emb.weight": w.to(torch.bfloat16)}


GOLDEN_CASES = {"lossless-grouped": False, "lossless-grouped-delta": True}


def _golden(name: str) -> bytes:
    base = _golden_state(1) if GOLDEN_CASES[name] else None
    state = _golden_state(0)
    if base is not None:
        # A fine-tuning-like step: every value moved by a few 2^-16.
        g = torch.Generator().manual_seed(2)
        state = {
            k: (b.float() + torch.randint(-4, 5, b.shape, generator=g).float() / 65536).to(b.dtype)
            for k, b in base.items()
        }
    return encode_state(state, parse_spec("lossless"), base).to_bytes()


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_v4_bytes_unchanged(name: str) -> None:
    base = _golden_state(1) if GOLDEN_CASES[name] else None
    decoded = check_golden(GOLDEN, name, _golden(name), GROUPED_VERSION, base)
    assert set(decoded) == set(_golden_state(0))
    assert np.isfinite(decoded["fc.weight"].numpy()).all()


if __name__ == "__main__":
    regenerate(GOLDEN, GOLDEN_CASES, _golden)
