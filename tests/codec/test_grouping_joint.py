"""Exponent planes coded jointly with the top mantissa bits (format version 12,
fedsqueeze.codec.plane_joint): bit-exact round trips of fp32 and bf16 values and XOR
deltas, the compiled kernels equal to NumPy, the choice (a chunk whose exponents do not
fit, or whose top bits carry nothing, keeps the older codings), the version and the
switch, part-by-part decoding, hostile joint headers and rests refused with a
FormatError, and golden vectors.

Regenerate the golden vectors (only together with a format version change) with:
    python -m tests.codec.test_grouping_joint
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsqueeze.codec import EncodedModel, decode_state, encode_state, grouping, jit, jit_bytes
from fedsqueeze.codec import plane_joint as pj
from fedsqueeze.codec.bytesio import write_varint
from fedsqueeze.codec.container import BUCKETS_VERSION, GROUPED_VERSION, JOINT_VERSION
from fedsqueeze.codec.grouping import (
    PlaneCoding,
    decode_grouped,
    encode_grouped,
    holds_buckets,
    holds_joint,
    stream_grouped,
)
from fedsqueeze.codec.planes import split_planes
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.codec.streaming import decode_into
from fedsqueeze.errors import FormatError
from tests.codec.test_golden import check_golden, regenerate
from tests.codec.test_grouping_buckets import N, same_bits, table, weights

GOLDEN = Path(__file__).parent.parent / "golden" / "v12"
SWAPPED = (torch.float32, torch.bfloat16)


def trained(dtype: torch.dtype, n: int = N, seed: int = 0) -> torch.Tensor:
    """Gaussian weights (a trained layer's shape of distribution), a few exact zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 0.05
    x[torch.rand(n, generator=g) < 0.01] = 0.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", SWAPPED)
@pytest.mark.parametrize("n", [N, N + 5, 3 * (1 << 17) + 13])
@pytest.mark.parametrize("gaussian", [True, False])
def test_joint_round_trip_is_bit_exact_and_smaller(
    dtype: torch.dtype, n: int, gaussian: bool
) -> None:
    x = trained(dtype, n, seed=n) if gaussian else weights(dtype, n, seed=n)
    body = bytes(encode_grouped(x, dtype, 17))
    assert same_bits(decode_grouped(body, dtype, n, buckets=True, joint=True), x)
    plain = bytes(encode_grouped(x, dtype, 17, buckets=False, joint=False))
    assert len(body) < len(plain)
    if gaussian:
        # A trained layer's top mantissa bits are what depends on the exponent: coded
        # jointly, and smaller than in buckets.
        assert holds_joint(body, dtype, n) and not holds_buckets(body, dtype, n)
        assert len(body) <= len(bytes(encode_grouped(x, dtype, 17, joint=False)))
    chunks = stream_grouped(_reader(body), len(body), dtype, n, buckets=True, joint=True)
    streamed = torch.cat([v for _, v in chunks])
    assert same_bits(streamed, x)


def _reader(body: bytes):  # type: ignore[no-untyped-def]
    at = 0

    def read(count: int) -> bytes:
        nonlocal at
        at += count
        return body[at - count : at]

    return read


@pytest.mark.parametrize("dtype", SWAPPED)
def test_numpy_path_reads_and_writes_the_same_bodies(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without numba (FEDSQUEEZE_JIT=0) the same bytes are written and read back."""
    x = trained(dtype, N + 3)
    compiled = bytes(encode_grouped(x, dtype, 17))
    monkeypatch.setattr(jit, "ENABLED", False)
    assert bytes(encode_grouped(x, dtype, 17)) == compiled
    assert same_bits(decode_grouped(compiled, dtype, N + 3, joint=True), x)


@pytest.mark.parametrize("dtype", SWAPPED)
def test_joint_xor_delta_round_trip(dtype: torch.dtype) -> None:
    base = trained(dtype)
    x = base.clone()
    moved = torch.rand(N, generator=torch.Generator().manual_seed(3)) < 0.2
    x[moved] = (x[moved].float() * 1.01).to(dtype)
    body = bytes(encode_grouped(x, dtype, 17, base=base))
    out = decode_grouped(body, dtype, N, buckets=True, joint=True)
    signed = {2: torch.int16, 4: torch.int32}[dtype.itemsize]
    assert torch.equal(out.view(signed) ^ base.view(signed), x.view(signed))


def _words(e: np.ndarray, p: np.ndarray, lower: list[np.ndarray], width: int) -> np.ndarray:
    """fp32 (``width`` 4) or bf16 (2) words of exponent bytes ``e``, next-plane bytes
    ``p`` (sign above 7 mantissa bits) and, for fp32, planes 2 and 3."""
    dtype = np.uint16 if width == 2 else np.uint32
    top = (e.astype(dtype) << (8 * width - 9)) | ((p.astype(dtype) & 0x80) << (8 * width - 8))
    top |= (p.astype(dtype) & 0x7F) << (8 * width - 16)
    if width == 4:
        top |= (lower[0].astype(dtype) << 8) | lower[1]
    return top


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 65_541])
def test_compiled_kernels_equal_numpy(k: int, n: int) -> None:
    rng = np.random.default_rng(n * 10 + k)
    lo = int(rng.integers(1, 257 - (1 << (8 - k)) + 1))
    e = rng.integers(lo, lo + (1 << (8 - k)) - 1, n).astype(np.uint8)
    e[rng.random(n) < 0.1] = 0
    p = rng.integers(0, 256, n, dtype=np.uint8)
    lower = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(2)]
    coded, rest = np.empty(n, np.uint8), np.empty(pj.rest_length(n, k), np.uint8)
    pj._split(e, p, lo, k, coded, rest)
    if not jit.ready():
        pytest.skip("numba is not installed")
    for width in (2, 4):
        words = _words(e, p, lower, width)
        c2, r2 = np.empty_like(coded), np.empty_like(rest)
        p2, p3 = np.zeros(n, np.uint8), np.zeros(n, np.uint8)
        jit_bytes.joint_split(words, pj._prm(lo), k, c2, r2, p2, p3)
        assert np.array_equal(coded, c2) and np.array_equal(rest, r2)
        if width == 4:  # fp32: planes 2 and 3 in the same pass
            assert np.array_equal(p2, lower[0]) and np.array_equal(p3, lower[1])
        back = np.empty(n, words.dtype)
        jit_bytes.joint_words(coded, rest, lower[0], lower[1], pj._prm(lo), k, back)
        e2, q2 = np.empty(n, np.uint8), np.empty(n, np.uint8)
        pj._merge(coded, rest, lo, k, e2, q2)
        assert np.array_equal(e2, e) and np.array_equal(q2, p)
        assert np.array_equal(back, words)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 17, 1000, 65_537])
@pytest.mark.parametrize("step", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("width", [2, 4])
def test_compiled_joint_stats_count_what_numpy_counts(n: int, step: int, width: int) -> None:
    """Every ``step``-th value's exponent, top three mantissa bits and next-plane byte,
    read from fp32 or bf16 words."""
    if not jit.ready():
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(n * 31 + step)
    e = rng.choice(np.array([0, 120, 121, 122], np.uint8), n)  # crowded bins, as models
    p = rng.integers(0, 256, n, dtype=np.uint8)
    lower = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(2)]
    hist = np.full((256, 8), 5, dtype=np.int64)  # stale counts: zeroed by the kernel
    counts = np.full(256, 5, dtype=np.int64)
    jit_bytes.joint_stats(_words(e, p, lower, width), step, np.zeros(2, np.int64), hist, counts)
    want = np.zeros((256, 8), dtype=np.int64)
    np.add.at(want, (e[::step], (p[::step] >> 4) & 7), 1)
    assert np.array_equal(hist, want)
    assert np.array_equal(counts, np.bincount(p[::step], minlength=256))


@pytest.mark.parametrize("seed", range(6))
def test_compiled_plan_equals_numpy_plan(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan from the words (compiled statistics and code lengths) is the plan NumPy
    makes from the planes, on chunks that code jointly with each k and on some that do
    not (too wide a span, nothing in the top bits, every value zero)."""
    if not jit.ready():
        pytest.skip("numba is not installed")
    g = torch.Generator().manual_seed(seed)
    n = 70_001 + seed
    cases = [
        trained(torch.float32, n, seed),
        torch.randn(n, generator=g) * 10.0 ** (seed - 3),
        torch.ldexp(torch.ones(n), torch.randint(-100, 100, (n,), generator=g)),
        torch.ldexp(1 + torch.rand(n, generator=g), torch.randint(-6, -2, (n,), generator=g)),
        torch.zeros(n),
        torch.distributions.Laplace(0.0, 0.02).sample((n,)),
    ]
    kinds = set()
    for x in cases:
        for dtype in SWAPPED:
            words = grouping._words(x.to(dtype))
            planned, top = pj.plan_words(words)
            e, p = np.empty(n, np.uint8), np.empty(n, np.uint8)
            split_planes(words, {0: e, 1: p}, grouping._layout(dtype))
            assert top == int(e.max())
            monkeypatch.setattr(jit, "ENABLED", False)
            assert pj.plan(e, p) == planned
            monkeypatch.setattr(jit, "ENABLED", True)
            kinds.add(None if planned is None else planned.k)
    assert None in kinds and len(kinds) >= 2


def test_chunks_that_do_not_fit_or_gain_keep_the_older_codings() -> None:
    dtype = torch.float32
    g = torch.Generator().manual_seed(0)
    # exponents over 200 binades: no k fits, the chunk is coded as before
    wide = torch.ldexp(torch.ones(N), torch.randint(-100, 100, (N,), generator=g))
    body = bytes(encode_grouped(wide, dtype, 17))
    assert not holds_joint(body, dtype, N)
    assert same_bits(decode_grouped(body, dtype, N, buckets=True, joint=True), wide)
    # uniformly random mantissas: the top bits add nothing to the exponent's code
    flat = torch.ldexp(1 + torch.rand(N, generator=g), torch.randint(-6, -2, (N,), generator=g))
    assert not holds_joint(bytes(encode_grouped(flat, dtype, 17)), dtype, N)
    # float16 and float64 (no 8-bit exponent): never
    half = trained(torch.float16)
    assert not holds_joint(bytes(encode_grouped(half, torch.float16, 17)), torch.float16, N)


def test_models_are_version_12_stream_part_by_part_and_switch_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = {
        "a.weight": trained(torch.bfloat16).reshape(256, -1),
        "b.weight": trained(torch.float32),
    }
    model = encode_state(state, parse_spec("lossless"))
    assert model.header.version == JOINT_VERSION and all(r.joint for r in model.records)
    blob = model.to_bytes()
    decoded = decode_state(EncodedModel.from_bytes(blob))
    target = {n: torch.empty_like(t) for n, t in state.items()}
    payload = blob[:-4]  # the stream without its checksum, in pieces
    decode_into([payload[i : i + 4096] for i in range(0, len(payload), 4096)], target)
    for name, t in state.items():
        assert same_bits(decoded[name], t) and same_bits(target[name], t)
    monkeypatch.setattr(grouping, "JOINT", False)
    assert encode_state(state, parse_spec("lossless")).header.version == BUCKETS_VERSION
    monkeypatch.setattr(grouping, "JOINT", True)
    monkeypatch.setattr(grouping, "BUCKETS", False)  # FEDSQUEEZE_BUCKETS=0: joint off too
    assert encode_state(state, parse_spec("lossless")).header.version == GROUPED_VERSION


def _rebuilt(body: bytes, entries: list[tuple[int, int, int]], pieces: dict[int, bytes],
             codings: dict[int, int] | None = None) -> bytes:  # fmt: skip
    """``body`` with entry ``i``'s data replaced by ``pieces[i]`` (coding ``codings[i]``)."""
    head = bytearray([body[0]])
    data = []
    for i, (coding, n, at) in enumerate(entries):
        piece = pieces.get(i, body[at : at + n])
        head.append((codings or {}).get(i, coding))
        write_varint(head, len(piece))
        data.append(piece)
    return bytes(head) + b"".join(data)


@pytest.mark.parametrize("dtype", SWAPPED)
def test_hostile_joint_planes_are_refused(dtype: torch.dtype) -> None:
    width = dtype.itemsize
    x = trained(dtype)
    body = bytes(encode_grouped(x, dtype, 17))
    _, entries = table(body, width, 1)
    assert entries[0][0] == entries[1][0] == PlaneCoding.JOINT
    head_at, head_n = entries[0][2], entries[0][1]
    head = body[head_at : head_at + head_n]
    rest = body[entries[1][2] : entries[1][2] + entries[1][1]]
    k = head[0]
    bad_heads = [
        bytes([0]) + head[1:],  # k = 0
        bytes([4]) + head[1:],  # k = 4
        head[:1] + bytes([0]) + head[2:],  # lo = 0
        head[:1] + bytes([258 - (1 << (8 - k))]) + head[2:],  # lo past the last exponent
        head[:2] + bytes([7]) + head[3:],  # an unknown coding
        head[:2] + bytes([0]) + head[3:],  # a zstd plane called raw (its length is wrong)
        head[:2],  # no coding byte
        head[:-1],  # a truncated frame
        head + b"\x00",  # trailing bytes in the frame
    ]
    for hostile in bad_heads:
        with pytest.raises(FormatError):
            decode_grouped(_rebuilt(body, entries, {0: hostile}), dtype, N, joint=True)
    for hostile in (rest[:-1], rest + b"\x00"):
        with pytest.raises(FormatError):
            decode_grouped(_rebuilt(body, entries, {1: hostile}), dtype, N, joint=True)
    # where joint planes may not be: before version 12, alone, below plane 1
    with pytest.raises(FormatError, match="before format version 12"):
        decode_grouped(body, dtype, N, buckets=True, joint=False)
    alone = _rebuilt(body, entries, {1: bytes(N)}, {1: PlaneCoding.RAW})
    with pytest.raises(FormatError, match="without its pair"):
        decode_grouped(alone, dtype, N, joint=True)
    if width == 4:
        low = _rebuilt(body, entries, {}, {2: PlaneCoding.JOINT})
        with pytest.raises(FormatError, match="as plane 2"):
            decode_grouped(low, dtype, N, joint=True)
    half = bytes(encode_grouped(weights(torch.float16), torch.float16, 17))
    _, h_entries = table(half, 2, 1)
    marked = _rebuilt(half, h_entries, {}, {0: PlaneCoding.JOINT, 1: PlaneCoding.JOINT})
    with pytest.raises(FormatError, match="as plane 0"):
        decode_grouped(marked, torch.float16, N, joint=True)
    rng = np.random.default_rng(0)
    for _ in range(40):  # flipped bytes: refused or decoded to N values, nothing else
        flipped = bytearray(head + rest)
        flipped[int(rng.integers(0, len(flipped)))] ^= int(rng.integers(1, 256))
        pieces = {0: bytes(flipped[: len(head)]), 1: bytes(flipped[len(head) :])}
        try:
            out = decode_grouped(_rebuilt(body, entries, pieces), dtype, N, joint=True)
        except FormatError:
            continue
        assert out.numel() == N


def test_inspect_names_joint_planes() -> None:
    from fedsqueeze.codec.inspect import stages_of

    encoded = EncodedModel.from_bytes(_encode("lossless-bf16-joint"))
    assert "top mantissa bits (v12)" in stages_of(encoded.records[0])


# ------------------------------------------------------------------ golden vectors
CASES = {"lossless-bf16-joint": torch.bfloat16, "lossless-fp32-joint": torch.float32}


def _golden_state(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"layer.weight": trained(dtype, 69_632, seed=11).reshape(128, -1)}


def _encode(name: str) -> bytes:
    return encode_state(_golden_state(CASES[name]), parse_spec("lossless")).to_bytes()


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_v12_bytes_unchanged(name: str) -> None:
    decoded = check_golden(GOLDEN, name, _encode(name), JOINT_VERSION, None)
    state = _golden_state(CASES[name])
    assert same_bits(decoded["layer.weight"], state["layer.weight"])
    assert EncodedModel.from_bytes(_encode(name)).records[0].joint


if __name__ == "__main__":
    regenerate(GOLDEN, CASES, _encode)
    sys.exit(0)
