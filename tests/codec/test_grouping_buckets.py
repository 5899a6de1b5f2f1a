"""Byte-grouped planes in buckets by exponent (format version 10): exact round trips
(whole, streamed part by part, compiled or NumPy scatter), smaller than the version-4
coding on weights whose mantissa leans with the exponent, refused before version 10 and
where they cannot be, and hostile bucket tables refused with a FormatError; golden
vectors of format version 10.

Regenerate the golden vectors (only together with a format version change) with:
    python -m tests.codec.test_grouping_buckets
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsqueeze.codec import EncodedModel, decode_state, encode_state, jit
from fedsqueeze.codec.bytesio import ByteReader, write_varint
from fedsqueeze.codec.container import BUCKETS_VERSION, GROUPED_VERSION
from fedsqueeze.codec.grouping import (
    PlaneCoding,
    decode_grouped,
    encode_grouped,
    holds_buckets,
)
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.codec.streaming import decode_into
from fedsqueeze.errors import FormatError
from tests.codec.test_golden import check_golden, regenerate

GOLDEN = Path(__file__).parent.parent / "golden" / "v10"
N = 1 << 17


@pytest.fixture(autouse=True)
def _buckets_not_joint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Version 12 codes these planes jointly where it can (test_grouping_joint.py):
    the buckets of version 10 are what these tests check."""
    from fedsqueeze.codec import grouping

    monkeypatch.setattr(grouping, "JOINT", False)


def weights(dtype: torch.dtype, n: int = N, seed: int = 0) -> torch.Tensor:
    """Values whose mantissa leans with the exponent: low in even binades, high in odd
    ones (one table for the whole plane sees a mix; a table per exponent sees the lean).
    Real weights lean less (all-MiniLM-L6-v2: 0.56% of the model; BENCHMARKS.md)."""
    g = torch.Generator().manual_seed(seed)
    exponent = torch.randint(-8, -2, (n,), generator=g)
    u = torch.rand(n, generator=g) ** 3
    lean = torch.where(exponent % 2 == 0, u, 1 - u)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return (sign * torch.ldexp(1 + lean * 0.999, exponent)).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8)
    )


def table(body: bytes, width: int, chunks: int) -> tuple[int, list[tuple[int, int, int]]]:
    """(chunk log2, [(coding, length, data offset)]) of a grouped body."""
    reader = ByteReader(body)
    log2 = reader.u8("chunk size")
    entries = [(reader.u8("c"), reader.varint("l", len(body))) for _ in range(width * chunks)]
    at = len(body) - reader.remaining
    out = []
    for coding, length in entries:
        out.append((coding, length, at))
        at += length
    return log2, out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk_log2", [17, 20])
def test_buckets_round_trip_and_save_bytes(dtype: torch.dtype, chunk_log2: int) -> None:
    x = weights(dtype)
    body = bytes(encode_grouped(x, dtype, chunk_log2))
    plain = bytes(encode_grouped(x, dtype, chunk_log2, buckets=False))
    assert holds_buckets(body, dtype, N) and not holds_buckets(plain, dtype, N)
    assert len(body) < len(plain)
    assert same_bits(decode_grouped(body, dtype, N, buckets=True), x)
    assert same_bits(decode_grouped(plain, dtype, N), x)
    with pytest.raises(FormatError, match="before format version 10"):
        decode_grouped(body, dtype, N)


def test_compiled_and_numpy_buckets_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    x = weights(torch.bfloat16, seed=3)
    monkeypatch.setattr(jit, "MIN_VALUES", 1)
    fast = bytes(encode_grouped(x, torch.bfloat16, 16))
    monkeypatch.setattr(jit, "ENABLED", False)
    slow = bytes(encode_grouped(x, torch.bfloat16, 16))
    assert fast == slow
    assert same_bits(decode_grouped(fast, torch.bfloat16, N, buckets=True), x)


@pytest.mark.parametrize("n", [0, 1, 5, 4096, 100_003])
@pytest.mark.parametrize("step", [1, 3, 4, 7])
def test_compiled_bucket_histogram_counts_every_stepth_byte(n: int, step: int) -> None:
    if not jit.ready():
        pytest.skip("numba is not installed")
    from fedsqueeze.codec import jit_bytes

    rng = np.random.default_rng(n + step)
    e = rng.choice(np.array([0, 120, 121, 122, 130], np.uint8), n)
    p = rng.integers(0, 256, n, dtype=np.uint8)
    ranks = np.full(256, 3, dtype=np.uint16)
    ranks[[120, 121, 122]] = [0, 1, 2]
    hist = np.full((4, 256), 9, dtype=np.int64)  # stale: zeroed by the kernel
    jit_bytes.bucket_histogram(e, ranks, p, step, hist)
    want = np.zeros((4, 256), dtype=np.int64)
    np.add.at(want, (ranks[e[::step]], p[::step]), 1)
    assert np.array_equal(hist, want)


def test_models_with_buckets_are_version_10_and_stream_part_by_part() -> None:
    state = {"a.weight": weights(torch.bfloat16).reshape(256, -1), "b.bias": torch.zeros(7)}
    model = encode_state(state, parse_spec("lossless"))
    assert model.header.version == BUCKETS_VERSION
    blob = model.to_bytes()
    decoded = decode_state(EncodedModel.from_bytes(blob))
    assert all(same_bits(decoded[k], v) for k, v in state.items())
    target = {k: torch.empty_like(v) for k, v in state.items()}
    decode_into([blob[:-4]], target)
    assert all(same_bits(target[k], v) for k, v in state.items())
    # float16 has no 8-bit exponent: no buckets, version 4 as before
    half = encode_state({"a.weight": weights(torch.float16)}, parse_spec("lossless"))
    assert half.header.version == GROUPED_VERSION


def _bucket_entry(body: bytes) -> tuple[int, int]:
    """Offset and length of the first plane coded in buckets."""
    _, entries = table(body, 2, 1)
    for coding, length, at in entries:
        if coding == PlaneCoding.BUCKETS:
            return at, length
    raise AssertionError("no plane in buckets")


def _hostile(body: bytes, at: int, length: int, data: bytes) -> bytes:
    """``body`` with the bucket plane at ``at`` replaced by ``data`` (table fixed up)."""
    log2, entries = table(body, 2, 1)
    head = bytearray([log2])
    planes = []
    for coding, n, offset in entries:
        piece = data if offset == at else body[offset : offset + n]
        head.append(coding)
        write_varint(head, len(piece))
        planes.append(piece)
    return bytes(head) + b"".join(planes)


def test_hostile_bucket_tables_are_refused() -> None:
    dtype = torch.bfloat16
    x = weights(dtype)
    body = bytes(encode_grouped(x, dtype, 17))
    at, length = _bucket_entry(body)
    data = body[at : at + length]
    bad = [
        bytes([27]) + data[1:],  # buckets of 2^27 values
        data[:1] + bytes([PlaneCoding.BUCKETS]) + data[2:],  # a bucket in buckets
        data[:1] + bytes([9]) + data[2:],  # an unknown coding
        data[:-1],  # truncated
        data + b"\x00",  # trailing bytes
    ]
    if data[1] == PlaneCoding.RAW:
        bad.append(data[:2] + bytes([data[2] ^ 1]) + data[3:])  # a raw bucket's length
    for hostile in bad:
        with pytest.raises(FormatError):
            decode_grouped(_hostile(body, at, length, hostile), dtype, N, buckets=True)
    rng = np.random.default_rng(0)
    for _ in range(40):  # flipped bytes: refused or decoded to N values, nothing else
        flipped = bytearray(data)
        flipped[int(rng.integers(0, len(data)))] ^= int(rng.integers(1, 256))
        try:
            out = decode_grouped(_hostile(body, at, length, bytes(flipped)), dtype, N, True)
        except FormatError:
            continue
        assert out.numel() == N


def test_buckets_only_where_they_can_be() -> None:
    dtype = torch.bfloat16
    x = weights(dtype)
    body = bytes(encode_grouped(x, dtype, 17))
    log2, entries = table(body, 2, 1)
    # the exponent plane marked as in buckets: refused (it is what the buckets need)
    head = bytearray([log2])
    for i, (coding, n, _) in enumerate(entries):
        head.append(PlaneCoding.BUCKETS if i == 0 else coding)
        write_varint(head, n)
    moved = bytes(head) + body[len(body) - sum(n for _, n, _ in entries) :]
    with pytest.raises(FormatError, match="as plane 0"):
        decode_grouped(moved, dtype, N, buckets=True)
    # float16 (no 8-bit exponent): refused too
    half = bytes(encode_grouped(weights(torch.float16), torch.float16, 17))
    _, h_entries = table(half, 2, 1)
    head = bytearray([17])
    for i, (coding, n, _) in enumerate(h_entries):
        head.append(PlaneCoding.BUCKETS if i == 1 else coding)
        write_varint(head, n)
    with pytest.raises(FormatError, match="as plane 1"):
        decode_grouped(bytes(head) + half[len(half) - sum(n for _, n, _ in h_entries) :],
                       torch.float16, N, buckets=True)  # fmt: skip


# ------------------------------------------------------------------ golden vectors
CASES = {"lossless-bf16-buckets": torch.bfloat16}


def _golden_state(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"layer.weight": weights(dtype, 69_632, seed=11).reshape(128, -1)}


def _encode(name: str) -> bytes:
    return encode_state(_golden_state(CASES[name]), parse_spec("lossless")).to_bytes()


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_v10_bytes_unchanged(name: str) -> None:
    decoded = check_golden(GOLDEN, name, _encode(name), BUCKETS_VERSION, None)
    state = _golden_state(CASES[name])
    assert same_bits(decoded["layer.weight"], state["layer.weight"])
    assert EncodedModel.from_bytes(_encode(name)).records[0].buckets


if __name__ == "__main__":
    regenerate(GOLDEN, CASES, _encode)
    sys.exit(0)


def test_inspect_names_planes_in_buckets() -> None:
    from fedsqueeze.codec.inspect import stages_of

    encoded = EncodedModel.from_bytes(_encode("lossless-bf16-buckets"))
    assert "buckets by exponent" in stages_of(encoded.records[0])
    plain = encode_state({"a.weight": weights(torch.float16)}, parse_spec("lossless"))
    assert "buckets" not in stages_of(plain.records[0])


def test_the_switch_keeps_bodies_version_4(monkeypatch: pytest.MonkeyPatch) -> None:
    """FEDSQUEEZE_BUCKETS=0 (grouping.BUCKETS): no buckets, a model older builds read."""
    from fedsqueeze.codec import grouping

    state = {"a.weight": weights(torch.bfloat16).reshape(256, -1)}
    assert encode_state(state, parse_spec("lossless")).header.version == BUCKETS_VERSION
    monkeypatch.setattr(grouping, "BUCKETS", False)
    model = encode_state(state, parse_spec("lossless"))
    assert model.header.version == GROUPED_VERSION
    decoded = decode_state(EncodedModel.from_bytes(model.to_bytes()))
    assert same_bits(decoded["a.weight"], state["a.weight"])
