"""Hostile bytes: from_bytes / decode_state may only ever raise CodecError."""

from __future__ import annotations

import contextlib
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsqueeze.codec import (
    CodecSpec,
    DecodeLimits,
    EncodedModel,
    EntropyCoder,
    FloatFormat,
    Granularity,
    PruneMethod,
    PruneSpec,
    QuantScheme,
    QuantSpec,
    Rotation,
    Rounding,
    ScaleFormat,
    decode_prefix,
    decode_state,
    encode_state,
    grouping,
)
from fedsqueeze.codec.container import (
    BUCKETS_VERSION,
    DEFERRED_VERSION,
    GLOBAL_ORDER_VERSION,
    JOINT_VERSION,
    PLANE_ANS_VERSION,
    ROW_TIERS_VERSION,
    SUPPORT_LEVELS_VERSION,
    WIDE_TIERS_VERSION,
    crc32,
)
from fedsqueeze.codec.nested_gptq import Calibration
from fedsqueeze.codec.spec import PRESETS
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.errors import CodecError, LimitExceededError
from tests.codec.conftest import make_state
from tests.codec.test_grouping_buckets import weights as bucket_weights
from tests.codec.test_grouping_joint import trained
from tests.codec.test_level_order import SPEC as GLOBAL_SPEC
from tests.codec.test_level_order import mixed_state

BASE = make_state(1)
SPECS = [
    CodecSpec(),
    CodecSpec(prune=PruneSpec(PruneMethod.L1_GLOBAL, 0.8), quant=QuantSpec(3, QuantScheme.KMEANS)),
    CodecSpec(
        topk=0.1, quant=QuantSpec(4, rounding=Rounding.STOCHASTIC), targets=("*",), min_ndim=1
    ),
    CodecSpec(rank=2, quant=QuantSpec(4), targets=("*",), min_ndim=1),
    CodecSpec(rank=1, float_format=FloatFormat.FP16),
    # progressive levels (format version 2): hostile prefixes and records too
    CodecSpec(quant=QuantSpec(8), levels=(2, 2, 4)),
    CodecSpec(
        prune=PruneSpec(PruneMethod.L1_UNSTRUCTURED, 0.6),
        quant=QuantSpec(4, QuantScheme.KMEANS),
        levels=(2, 2),
    ),
    # block-wise and NF4 (format version 3): hostile block headers too
    CodecSpec(quant=QuantSpec(8, granularity=Granularity.PER_BLOCK, block_size=32)),
    CodecSpec(
        prune=PruneSpec(PruneMethod.L1_UNSTRUCTURED, 0.5),
        quant=QuantSpec(
            4, QuantScheme.NF4, Granularity.PER_BLOCK, block_size=64, scale_format=ScaleFormat.DQ8
        ),
        levels=(2, 2),
    ),
    CodecSpec(
        quant=QuantSpec(
            3,
            QuantScheme.SYMMETRIC,
            Granularity.PER_BLOCK,
            block_size=48,
            scale_format=ScaleFormat.BF16,
        )
    ),
    CodecSpec(
        quant=QuantSpec(
            2,
            QuantScheme.POW2,
            granularity=__import__(
                "fedsqueeze.codec", fromlist=["Granularity"]
            ).Granularity.PER_CHANNEL,
        )
    ),
    # rotated before quantization (format version 6): hostile rotation prefixes too
    CodecSpec(
        quant=QuantSpec(8, granularity=Granularity.PER_CHANNEL, rotation=Rotation.HADAMARD),
        levels=(2, 1, 1, 4),
    ),
    CodecSpec(
        quant=QuantSpec(
            4,
            granularity=Granularity.PER_BLOCK,
            block_size=32,
            scale_format=ScaleFormat.DQ8,
            rotation=Rotation.HADAMARD,
        )
    ),
]


def _samples() -> list[tuple[bytes, bool]]:
    state = make_state(0)
    out = []
    for spec in SPECS:
        out.append((encode_state(state, spec, seed=0).to_bytes(), False))
        out.append((encode_state(state, spec, BASE, seed=0).to_bytes(), True))
    # refinements in one order over all tensors (format version 5): hostile orders too
    v5 = encode_state(mixed_state(), GLOBAL_SPEC, seed=0).to_bytes()
    assert v5[3] == GLOBAL_ORDER_VERSION
    out.append((v5, False))
    # positions in groups (support levels, format version 6): hostile group records too
    grown = CodecSpec(
        prune=PruneSpec(PruneMethod.L1_GLOBAL, 0.6),
        quant=QuantSpec(4, QuantScheme.SYMMETRIC),
        levels=(2, 2),
        grow=(0.9, 0.8),
    )
    for base in (None, BASE):
        v6 = encode_state(state, grown, base, seed=0).to_bytes()
        assert v6[3] == SUPPORT_LEVELS_VERSION
        out.append((v6, base is not None))
        # refinement planes ANS-coded with their coarser bits as context (version 9):
        # hostile rANS bodies, tables and positions of group and plain refinements too
        for ans_spec in (
            replace(grown, entropy_coder=EntropyCoder.ANS),
            CodecSpec(
                prune=PruneSpec(PruneMethod.L1_UNSTRUCTURED, 0.5),
                quant=QuantSpec(4, QuantScheme.SYMMETRIC),
                levels=(1, 1, 2),
                entropy_coder=EntropyCoder.ANS,
            ),
        ):
            v9 = encode_state(state, ans_spec, base, seed=0).to_bytes()
            assert v9[3] == PLANE_ANS_VERSION
            out.append((v9, base is not None))
    # a byte-grouped plane in buckets by exponent (format version 10): hostile tables
    leaning = {"w.weight": bucket_weights(torch.bfloat16, 69_632, seed=11)}
    joint, grouping.JOINT = grouping.JOINT, False  # buckets are what version 12 prefers to
    try:
        v10 = encode_state(leaning, PRESETS["lossless"], seed=0).to_bytes()
    finally:
        grouping.JOINT = joint
    assert v10[3] == BUCKETS_VERSION
    out.append((v10, False))
    # planes coded jointly (format version 12): hostile joint headers and rests too
    gaussian = {"w.weight": trained(torch.bfloat16, 69_632, seed=11)}
    v12 = encode_state(gaussian, PRESETS["lossless"], seed=0).to_bytes()
    assert v12[3] == JOINT_VERSION
    out.append((v12, False))
    # a table's rows in tiers (format version 11): hostile tier maps and parts too
    read = torch.tensor([4.0**-i for i in range(16)])
    tiers = Calibration(rows={"fc1.weight": read}, defer=False)
    tiered = parse_spec("quant=8:symmetric:block32:hadamard,levels=2+1+1+4")
    for base in (None, BASE):
        v11 = encode_state(state, tiered, base, seed=0, calibration=tiers).to_bytes()
        assert v11[3] == ROW_TIERS_VERSION
        out.append((v11, base is not None))
    # deferred tiers with fill rows (format version 13, which today's encoder no longer
    # writes: its golden vector) and the lightest band cut in several (version 14):
    # hostile counts and fills too
    v13 = (Path(__file__).parent.parent / "golden" / "v13").glob("*.fsq")
    out.append((min(v13).read_bytes(), False))
    assert out[-1][0][3] == DEFERRED_VERSION
    v14 = encode_state(
        state, tiered, seed=0, calibration=Calibration(rows={"fc1.weight": read}, defer=True)
    ).to_bytes()
    assert v14[3] == WIDE_TIERS_VERSION
    out.append((v14, False))
    # a larger table, whose second planes travel in context order: hostile orders too
    g = torch.Generator().manual_seed(0)
    table = {"emb.weight": torch.randn(256, 64, generator=g)}
    read = torch.zeros(256)
    read[:64] = 4.0 ** -torch.arange(64).float().clamp(max=3)
    in_order = Calibration(rows={"emb.weight": read}, defer=False)
    ordered = encode_state(
        table, parse_spec("quant=8:symmetric:block32,levels=2+1+1+4"), seed=0, calibration=in_order
    )
    assert any(r.context_order for r in ordered.records)
    out.append((ordered.to_bytes(), False))
    return out


SAMPLES = _samples()


def _try_decode(data: bytes, with_base: bool) -> None:
    limits = DecodeLimits(max_elements=1 << 20, max_total_elements=1 << 22)
    with contextlib.suppress(CodecError):  # anytime decoding of the stream, no checksum
        decode_prefix(data[:-4], BASE if with_base else None, limits=limits)
    try:
        encoded = EncodedModel.from_bytes(
            data, DecodeLimits(max_elements=1 << 20, max_total_elements=1 << 22)
        )
        decode_state(
            encoded,
            BASE if with_base else None,
            limits=DecodeLimits(max_elements=1 << 20, max_total_elements=1 << 22),
        )
    except CodecError:
        pass


def _refresh_crc(data: bytes) -> bytes:
    """Recompute the trailer so mutations reach the parser instead of the checksum."""
    body = data[:-4]
    return body + crc32(body).to_bytes(4, "little")


@pytest.mark.parametrize("index", range(len(SAMPLES)))
def test_thousands_of_mutations_raise_only_codec_errors(index: int) -> None:
    # 150 mutations of each of the samples (5,100 in all, twice: as they are, and with
    # the checksum made good so they reach the parser) and 200 cuts of each; one test
    # per sample, so that the suite's workers share them
    data, with_base = SAMPLES[index]
    rng = random.Random(1234 + index)
    for _ in range(150):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            pos = rng.randrange(len(buf))
            if op < 0.6:
                buf[pos] = rng.randrange(256)
            elif op < 0.8:
                del buf[pos : pos + rng.randint(1, 8)]
            else:
                buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        mutated = bytes(buf)
        _try_decode(mutated, with_base)  # caught by the checksum, mostly
        if len(mutated) > 4:
            _try_decode(_refresh_crc(mutated), with_base)  # reaches the parser
    for cut in range(0, len(data), max(1, len(data) // 200)):
        _try_decode(data[:cut], with_base)
        if cut > 4:
            _try_decode(_refresh_crc(data[:cut]), with_base)


@given(st.binary(max_size=512))
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_bytes_raise_only_codec_errors(data: bytes) -> None:
    _try_decode(data, False)
    _try_decode(b"FSQ\x01" + data, False)
    if len(data) > 4:
        _try_decode(_refresh_crc(b"FSQ\x01\x00" + data), True)


def test_absurd_sizes_are_rejected_before_allocating() -> None:
    # a named record claiming 2^40 elements in a few bytes
    from fedsqueeze.codec.bytesio import write_varint
    from fedsqueeze.codec.container import ContainerHeader

    header = ContainerHeader(1, None, CodecSpec(), 1).to_bytes()
    rec = bytearray([0x01])  # NAMED, dense raw
    write_varint(rec, 1)
    rec += b"w"
    rec += bytes([1, 2])  # float32, ndim 2
    write_varint(rec, 1 << 20)
    write_varint(rec, 1 << 20)
    rec += bytes([0])  # raw
    write_varint(rec, 0)  # body length
    body = header + bytes(rec)
    data = body + crc32(body).to_bytes(4, "little")
    with pytest.raises(LimitExceededError):
        EncodedModel.from_bytes(data)


def test_sparse_record_cannot_claim_a_huge_tensor() -> None:
    state = {"w": torch.zeros(1000)}
    state["w"][3] = 1.0
    spec = CodecSpec(prune=PruneSpec(PruneMethod.L1_UNSTRUCTURED, 0.99), targets=("*",), min_ndim=1)
    encoded = encode_state(state, spec)
    with pytest.raises(LimitExceededError):
        decode_state(encoded, limits=DecodeLimits(max_elements=999))
