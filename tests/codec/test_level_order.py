"""The global rate-distortion order of refinements (format version 5)."""

from __future__ import annotations

import itertools
import zlib
from dataclasses import replace

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from fedsqueeze.codec import (
    CodecSpec,
    EncodedModel,
    Granularity,
    QuantScheme,
    QuantSpec,
    decode_prefix,
    decode_state,
    encode_state,
    smallest_prefix,
)
from fedsqueeze.codec.container import GLOBAL_ORDER_VERSION, GROUPED_VERSION
from fedsqueeze.codec.level_order import LevelOrder, LevelScore, refinement_order
from fedsqueeze.codec.spec import Rotation
from fedsqueeze.errors import FormatError

SPEC = CodecSpec(quant=QuantSpec(8, granularity=Granularity.PER_CHANNEL), levels=(1, 1, 2, 4))


def mixed_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small tensor and a large one: the small one's refinements buy more per byte."""
    g = torch.Generator().manual_seed(seed)
    return {
        "small.weight": torch.randn(4, 8, generator=g),
        "small.bias": torch.randn(4, generator=g),
        "large.weight": torch.randn(96, 128, generator=g) * 0.05,
    }


def _chain(tensor: int, gains: list[float], nbytes: list[int]) -> list[LevelScore]:
    return [
        LevelScore(tensor, level, g, b, 1.0)
        for level, (g, b) in enumerate(zip(gains, nbytes, strict=True), start=1)
    ]


def test_hull_merges_a_poor_level_with_the_good_one_behind_it() -> None:
    # tensor 0: level 1 buys 1 per byte, level 2 buys 10 per byte: one run at 5.5 per byte
    # tensor 1: 6 per byte, then 2 per byte
    scores = _chain(0, [10.0, 100.0], [10, 10]) + _chain(1, [60.0, 20.0], [10, 10])
    order = refinement_order(scores, LevelOrder.SQUARED)
    assert [(scores[i].tensor, scores[i].level) for i in order] == [(1, 1), (0, 1), (0, 2), (1, 2)]
    by_level = refinement_order(scores, LevelOrder.BY_LEVEL)
    assert [(scores[i].tensor, scores[i].level) for i in by_level] == [
        (1, 1), (0, 1), (0, 2), (1, 2)
    ]  # fmt: skip


def test_relative_order_divides_by_the_tensor_energy() -> None:
    loud = [LevelScore(0, 1, 100.0, 10, 1000.0)]
    quiet = [LevelScore(1, 1, 10.0, 10, 1.0)]
    squared = refinement_order(loud + quiet, LevelOrder.SQUARED)
    relative = refinement_order(loud + quiet, LevelOrder.RELATIVE)
    assert squared == [0, 1] and relative == [1, 0]


def test_levels_out_of_order_in_the_scores_are_a_caller_error() -> None:
    with pytest.raises(ValueError, match="level 2 after 0"):
        refinement_order([LevelScore(0, 2, 1.0, 1, 1.0)], LevelOrder.SQUARED)
    with pytest.raises(TypeError):
        refinement_order([], "squared")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode_state(mixed_state(), SPEC, order="relative")  # type: ignore[arg-type]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    tensors=st.integers(1, 4),
    levels=st.sampled_from([(2, 2, 4), (1, 1, 2, 4), (4, 4), (1, 1, 1, 1, 4), (2, 2)]),
    quant=st.sampled_from(["channel", "block32", "nf4"]),
    order=st.sampled_from(list(LevelOrder)),
    delta=st.booleans(),
    rotation=st.sampled_from(list(Rotation)),
)
def test_every_order_never_moves_a_prefix_away_from_the_full_decode(
    seed: int,
    tensors: int,
    levels: tuple[int, ...],
    quant: str,
    order: LevelOrder,
    delta: bool,
    rotation: Rotation,
) -> None:
    g = torch.Generator().manual_seed(seed)
    state = {
        f"t{i}.weight": torch.randn(int(torch.randint(1, 12, (1,), generator=g)), 24, generator=g)
        * float(torch.rand(1, generator=g)) ** 3
        for i in range(tensors)
    }
    base = {k: v + torch.randn(v.shape, generator=g) * 0.1 for k, v in state.items()}
    if quant == "nf4":
        if sum(levels) != 4:
            levels = (2, 2)
        q = QuantSpec(4, QuantScheme.NF4, Granularity.PER_BLOCK, block_size=32)
    elif quant == "block32":
        q = QuantSpec(sum(levels), granularity=Granularity.PER_BLOCK, block_size=32)
    else:
        q = QuantSpec(sum(levels), granularity=Granularity.PER_CHANNEL)
    spec = CodecSpec(quant=replace(q, rotation=rotation), levels=levels)
    weights = None
    if order is LevelOrder.WEIGHTED:  # any sensitivities, zero included
        weights = {k: float(torch.randint(0, 3, (1,), generator=g)) ** 4 for k in state}
    encoded = encode_state(
        state, spec, base if delta else None, seed=0, order=order, weights=weights
    )
    stream = encoded.to_bytes()[:-4]
    full = decode_state(EncodedModel.from_bytes(encoded.to_bytes()), base if delta else None)
    ends, pos = [], len(encoded.header.to_bytes())
    for record in encoded.records:
        pos += len(record.header_bytes()) + len(record.body)
        ends.append(pos)
    distances = []
    for end in (e for e in ends if e >= smallest_prefix(encoded)):
        got = decode_prefix(stream[:end], base if delta else None).state
        distances.append(sum(float((got[k] - full[k]).double().square().sum()) for k in full))
    for before, after in itertools.pairwise(distances):
        assert after <= before * (1 + 1e-3) + 1e-9
    assert distances[-1] == 0.0
    held: dict[int | None, int] = {}
    for record in encoded.records:  # each tensor's levels in order, whatever the order
        if record.level:
            assert record.level == held.get(record.index, 0) + 1
            held[record.index] = record.level


def test_a_global_order_is_written_as_version_5_and_decodes_alike() -> None:
    state = mixed_state()
    glob = encode_state(state, SPEC, seed=0)
    by_level = encode_state(state, SPEC, seed=0, order=LevelOrder.BY_LEVEL)
    assert glob.header.version == GLOBAL_ORDER_VERSION
    assert by_level.header.version < GLOBAL_ORDER_VERSION
    assert glob.nbytes == by_level.nbytes
    a = decode_state(EncodedModel.from_bytes(glob.to_bytes()))
    b = decode_state(EncodedModel.from_bytes(by_level.to_bytes()))
    assert all(torch.equal(a[k], b[k]) for k in a)
    levels = [r.level for r in glob.records if r.level]
    assert levels != sorted(levels)  # the small tensor's last level before the large one's first


def _resealed(data: bytes) -> bytes:
    body = data[:-4]
    return body + (zlib.crc32(body) & 0xFFFFFFFF).to_bytes(4, "little")


def test_hostile_orders_raise_format_errors() -> None:
    encoded = encode_state(mixed_state(), SPEC, seed=0)
    records = list(encoded.records)
    # a global order labelled as a version-4 stream
    data = bytearray(encoded.to_bytes())
    data[3] = GROUPED_VERSION
    with pytest.raises(FormatError, match="out of order"):
        EncodedModel.from_bytes(_resealed(bytes(data)))
    with pytest.raises(FormatError, match="out of order"):
        decode_prefix(bytes(data[:-4]))
    # level 2 of a tensor before its level 1, in a version-5 stream
    first = next(i for i, r in enumerate(records) if r.level == 1)
    second = next(
        i for i, r in enumerate(records) if r.level == 2 and r.index == records[first].index
    )
    swapped = list(records)
    swapped[first], swapped[second] = swapped[second], swapped[first]
    stream = EncodedModel(encoded.spec, None, tuple(swapped)).to_bytes()
    assert stream[3] == GLOBAL_ORDER_VERSION
    with pytest.raises(FormatError, match="level 2 of tensor"):
        EncodedModel.from_bytes(stream)
    with pytest.raises(FormatError, match="level 2 of tensor"):
        decode_prefix(stream[:-4])
    # a refinement repeated
    doubled = EncodedModel(encoded.spec, None, (*records, records[-1])).to_bytes()
    with pytest.raises(FormatError):
        EncodedModel.from_bytes(doubled)
    # a refinement naming a tensor that has none (the bias, a plain record)
    bias = next(i for i, r in enumerate(records) if r.name == "small.bias")
    stray = [*records[:first], replace(records[first], index=bias), *records[first + 1 :]]
    with pytest.raises(FormatError):
        decode_state(
            EncodedModel.from_bytes(EncodedModel(encoded.spec, None, tuple(stray)).to_bytes())
        )


def test_weighted_order_with_inverse_energies_is_the_relative_order() -> None:
    state = mixed_state()
    relative = encode_state(state, SPEC, seed=0, order=LevelOrder.RELATIVE)
    weights = {k: 1.0 / float(v.double().square().sum()) for k, v in state.items()}
    weighted = encode_state(state, SPEC, seed=0, order=LevelOrder.WEIGHTED, weights=weights)
    assert weighted.to_bytes() == relative.to_bytes()


def test_weighted_order_sends_an_insensitive_tensor_last() -> None:
    state = mixed_state()
    for quiet in ("small.weight", "large.weight"):
        weights = {"small.weight": 1.0, "large.weight": 1.0, quiet: 0.0}
        encoded = encode_state(state, SPEC, seed=0, order=LevelOrder.WEIGHTED, weights=weights)
        names = [r.name for r in encoded.records if r.level == 0]
        loud_index = names.index(next(n for n in weights if n != quiet))
        refinements = [r.index for r in encoded.records if r.level > 0]
        # all the sensitive tensor's refinements, then the insensitive one's
        first_quiet = next(i for i, idx in enumerate(refinements) if idx != loud_index)
        assert all(idx != loud_index for idx in refinements[first_quiet:])
        assert first_quiet == len(SPEC.levels or ()) - 1


@pytest.mark.parametrize(
    ("order", "weights", "error", "match"),
    [
        (LevelOrder.WEIGHTED, None, ValueError, "needs weights"),
        (LevelOrder.RELATIVE, {"small.weight": 1.0}, ValueError, "weights are for"),
        (LevelOrder.WEIGHTED, {"small.weight": 1.0}, ValueError, "no weight for tensor"),
        (LevelOrder.WEIGHTED, {"small.weight": -1.0, "large.weight": 1.0}, ValueError, "finite"),
        (LevelOrder.WEIGHTED, {"small.weight": float("nan")}, ValueError, "finite"),
        (LevelOrder.WEIGHTED, {"small.weight": "1"}, TypeError, "number"),
        (LevelOrder.WEIGHTED, [1.0, 2.0], TypeError, "mapping"),
    ],
)
def test_bad_weights_are_caller_errors(
    order: LevelOrder, weights: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        encode_state(mixed_state(), SPEC, order=order, weights=weights)  # type: ignore[arg-type]
