"""Row tiers (format version 11): a lookup table's rows split by how often they are read,
each tier a progressive tensor of its own, joined again by every decoder."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsqueeze.codec import EncodedModel, decode_prefix, decode_state, encode_state
from fedsqueeze.codec.bytesio import ByteReader, write_varint
from fedsqueeze.codec.container import (
    DEFERRED_VERSION,
    ROW_TIERS_VERSION,
    WIDE_TIERS_VERSION,
    DecodeLimits,
)
from fedsqueeze.codec.digest import state_digest
from fedsqueeze.codec.level_order import LevelOrder
from fedsqueeze.codec.model import smallest_prefix
from fedsqueeze.codec.nested_gptq import Calibration
from fedsqueeze.codec.row_tiers import (
    BANDS,
    MAX_TIERS,
    RowSplit,
    join_state,
    parse_splits,
    part_name,
    split_state,
    tier_rows,
    write_splits,
)
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.codec.stream_decode import decode_stream_into, scan_stream
from fedsqueeze.codec.stream_encode import encode_stream
from fedsqueeze.codec.tier_plan import DEFERRED_TIERS, plan_tiers
from fedsqueeze.errors import FormatError, TruncatedError

SPEC = parse_spec("quant=8:block32:hadamard,levels=1+1+2+4")


def _state(seed: int, rows: int = 300, dim: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "emb.weight": torch.randn(rows, dim, generator=g),
        "lin.weight": torch.randn(dim, dim, generator=g) * 0.2,
        "lin.bias": torch.randn(dim, generator=g),
    }


def _weights(rows: int = 300, unseen_from: int = 150) -> torch.Tensor:
    w = (1.0 / torch.arange(1, rows + 1, dtype=torch.float64)) ** 1.5 * 100
    w[unseen_from:] = 0.0
    return w


def _weighted_error(decoded: torch.Tensor, value: torch.Tensor, w: torch.Tensor) -> float:
    per_row = (decoded.double() - value.double()).square().sum(dim=1)
    return float((per_row * w).sum())


# ----------------------------------------------------------------- tiers and the header


def test_tiers_are_bands_of_a_factor_of_four_below_the_heaviest_row() -> None:
    w = torch.tensor([1.0, 0.3, 0.26, 0.2, 0.05, 0.01, 0.0, 1e-9])
    tiers = tier_rows(w)
    assert tiers is not None
    # bands 0, 1, 1, 1, 2, 3, (none: last), 7 -> renumbered without the empty bands
    assert tiers.tolist() == [0, 0, 0, 1, 2, 3, 4, 4]
    assert tier_rows(torch.tensor([1.0, 0.5, 0.3])) is None  # one band: nothing to split
    assert tier_rows(torch.tensor([1.0, 0.0]), max_tiers=2) is not None


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        (torch.tensor([1.0, -1.0]), "at least 0"),
        (torch.tensor([1.0, float("nan")]), "finite"),
        (torch.zeros(3), "all 0"),
        (torch.ones(2, 2), "1-D"),
        (torch.tensor([True, False]), "numbers"),
    ],
)
def test_bad_row_weights_are_refused(weights: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tier_rows(weights)
    with pytest.raises(ValueError, match=r"emb\.weight"):
        Calibration(rows={"emb.weight": weights})


def _header(splits: list[RowSplit]) -> bytes:
    out = bytearray()
    write_splits(out, splits)
    return bytes(out)


def _parse(data: bytes) -> tuple[RowSplit, ...]:
    return parse_splits(ByteReader(data), 10, 1 << 20, 1024)


def test_the_split_list_round_trips_raw_and_compressed() -> None:
    mostly_last = bytes([0, 1] + [2] * 5000)
    few = bytes([1, 0, 1])
    splits = [RowSplit("emb.weight", mostly_last, 3), RowSplit("pos.weight", few, 2)]
    data = _header(splits)
    assert len(data) < 200  # the long map is zstd-compressed, the short one raw
    assert _parse(data) == tuple(splits)


def _raw_split(name: bytes, rows: int, tiers: int, body: bytes, length: int | None = None) -> bytes:
    out = bytearray()
    write_varint(out, 1)
    write_varint(out, len(name))
    out += name
    write_varint(out, rows)
    out.append(tiers)
    write_varint(out, len(body) if length is None else length)
    out += body
    return bytes(out)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_raw_split(b"t", 3, 1, bytes([0, 0, 0])), "tiers"),
        (_raw_split(b"t", 3, MAX_TIERS + 1, bytes([0, 1, 2])), "tiers"),
        (_raw_split(b"t", 3, 3, bytes([0, 1, 1])), "empty"),
        (_raw_split(b"t", 3, 2, bytes([0, 1, 5])), "beyond"),
        (_raw_split(b"t", 2, 3, bytes([0, 1])), "tiers over"),
        (_raw_split(b"t", 3, 2, bytes([0, 1, 1]), length=4), "length"),
        (_raw_split(b"t", 3, 2, bytes([0, 1]), length=3), "truncated"),
        (_raw_split(b"t", 3, 2, bytes([0, 1])), "zstd"),
        (_raw_split(b"\xff", 3, 2, bytes([0, 1, 1])), "UTF-8"),
        (_raw_split(b"t", 1 << 21, 2, b""), "split rows"),
        (_raw_split(b"t", 3, 2, b"\x28\xb5\x2f\xfd", length=2), "."),
    ],
)
def test_hostile_split_lists_raise_format_errors(data: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        _parse(data)


def test_more_than_eight_tiers_are_version_14_alone() -> None:
    rows = bytes(range(12)) * 2
    wide = RowSplit("t", rows, 12)
    data = _raw_split(b"t", 24, 12, rows) + b"\x00"  # no deferred tier
    with pytest.raises(FormatError, match="12 tiers over 24 rows"):
        parse_splits(ByteReader(data), 10, 1 << 20, 1024, deferring=True)  # versions 11 to 13
    assert parse_splits(ByteReader(data), 10, 1 << 20, 1024, deferring=True, wide=True) == (wide,)
    too_many = _raw_split(b"t", 24, MAX_TIERS + 1, rows) + b"\x00"
    with pytest.raises(FormatError, match="17 tiers"):
        parse_splits(ByteReader(too_many), 10, 1 << 20, 1024, deferring=True, wide=True)
    with pytest.raises(ValueError, match="12 tiers needs format version 14"):
        write_splits(bytearray(), [wide], deferring=True)
    out = bytearray()
    write_splits(out, [wide], deferring=True, wide=True)
    assert bytes(out) == data
    with pytest.raises(ValueError, match=f"2 to {MAX_TIERS} tiers"):
        RowSplit("t", bytes(range(17)), 17)


def test_a_table_split_twice_is_refused() -> None:
    one = _header([RowSplit("t", bytes([0, 1]), 2)])
    twice = bytearray(_header([RowSplit("t", bytes([0, 1]), 2), RowSplit("t", bytes([1, 0]), 2)]))
    assert _parse(one)
    with pytest.raises(FormatError, match="twice"):
        _parse(bytes(twice))


def test_split_and_join_are_inverse_and_keep_positions() -> None:
    state = _state(0)
    tiers = tier_rows(_weights())
    assert tiers is not None
    split = RowSplit("emb.weight", tiers.numpy().tobytes(), int(tiers.max()) + 1)
    parts = split_state(state, [split])
    assert list(parts)[: split.count] == split.parts()
    assert sum(parts[p].shape[0] for p in split.parts()) == 300
    joined = join_state(parts, [split])
    assert list(joined) == list(state)
    assert torch.equal(joined["emb.weight"], state["emb.weight"])
    del parts[part_name("emb.weight", 1)]
    with pytest.raises(FormatError, match="lacks"):
        join_state(parts, [split])
    # a delta's prefix: the missing tier is the base's rows
    base = split_state(_state(1), [split])
    mixed = join_state(parts, [split], base)["emb.weight"]
    rows = split.indices[1]
    assert torch.equal(mixed[rows], _state(1)["emb.weight"][rows])


# ------------------------------------------------------------------ streams with tiers


def _calibration(rows: int = 300, defer: bool = False) -> Calibration:
    return Calibration(rows={"emb.weight": _weights(rows)}, defer=defer)


def test_a_tiered_stream_is_version_11_and_decodes_as_its_parts_would() -> None:
    state = _state(0)
    encoded = encode_state(state, SPEC, seed=0, calibration=_calibration())
    data = encoded.to_bytes()
    assert data[3] == ROW_TIERS_VERSION
    (split,) = encoded.splits
    assert split.count >= 3
    back = EncodedModel.from_bytes(data)
    assert back.splits == encoded.splits
    decoded = decode_state(back)
    assert set(decoded) == set(state)
    # every tier is an ordinary tensor: the same as encoding the parts themselves
    parts = split_state(state, [split])
    alone = decode_state(encode_state(parts, SPEC.with_changes(targets=("*weight*",)), seed=0))
    assert torch.equal(decoded["emb.weight"], join_state(alone, [split])["emb.weight"])
    rel = (decoded["emb.weight"] - state["emb.weight"]).norm() / state["emb.weight"].norm()
    assert rel < 0.02


def test_without_levels_or_targets_the_weights_change_nothing() -> None:
    state = _state(0)
    for spec in (parse_spec("quant=8:block32"), parse_spec("quant=8,levels=2+2+4,targets=lin.*")):
        plain = encode_state(state, spec, seed=0)
        tiered = encode_state(state, spec, seed=0, calibration=_calibration())
        assert tiered.to_bytes() == plain.to_bytes()
        assert not tiered.splits


def test_the_most_read_rows_are_refined_first() -> None:
    state = _state(0, rows=2000, dim=64)
    w = _weights(2000, unseen_from=400)
    encoded = encode_state(state, SPEC, seed=0, calibration=Calibration(rows={"emb.weight": w}))
    stream = encoded.to_bytes()[:-4]
    start = smallest_prefix(encoded)
    middle = decode_prefix(stream[: start + (len(stream) - start) // 4])
    (split,) = encoded.splits
    held = middle.levels
    # (a deferred tier not held yet counts as level -1)
    lightest = held.get(part_name("emb.weight", split.count - 1), -1)
    assert held[part_name("emb.weight", 0)] > lightest
    # and the row-weighted error at that prefix is below the untiered stream's
    plain = encode_state(state, SPEC, seed=0)
    plain_stream = plain.to_bytes()[:-4]
    same = decode_prefix(plain_stream[: middle.used_bytes])
    value = state["emb.weight"]
    assert _weighted_error(middle.state["emb.weight"], value, w) < _weighted_error(
        same.state["emb.weight"], value, w
    )


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    delta=st.booleans(),
    spec=st.sampled_from(
        [
            "quant=8:block32:hadamard,levels=1+1+2+4",
            "quant=8:channel,levels=2+2+4",
            "quant=4:nf4:block32,levels=1+1+2",
            "quant=8:symmetric:block32,levels=1+1+2+4,entropy=ans",
        ]
    ),
)
def test_the_weighted_error_never_rises_over_prefixes(seed: int, delta: bool, spec: str) -> None:
    g = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(40, 200, (1,), generator=g))
    state = _state(seed, rows=rows)
    base = _state(seed + 1, rows=rows) if delta else None
    w = torch.rand(rows, generator=g, dtype=torch.float64) ** 6
    w[torch.rand(rows, generator=g) < 0.3] = 0.0
    w[0] = 1.0
    encoded = encode_state(
        state, parse_spec(spec), base, seed=0, calibration=Calibration(rows={"emb.weight": w})
    )
    stream = encoded.to_bytes()[:-4]
    held = w.clone()
    held[held == 0] = 1e-12  # zero-weight rows still count, a little
    last = float("inf")
    cuts = sorted({smallest_prefix(encoded), *range(smallest_prefix(encoded), len(stream), 97)})
    for cut in [*cuts, len(stream)]:
        got = decode_prefix(stream[:cut], base).state["emb.weight"]
        error = _weighted_error(got, state["emb.weight"], held)
        assert error <= last * (1 + 1e-3) + 1e-9
        last = error


def test_deltas_streams_and_prefixes_agree() -> None:
    base, new = _state(1), _state(2)
    cal = _calibration()
    encoded = encode_state(new, SPEC, base, seed=0, calibration=cal)
    data = encoded.to_bytes()
    assert data[3] == ROW_TIERS_VERSION
    whole = decode_state(EncodedModel.from_bytes(data), base)
    # the tiers are differences to the base's rows: index-coded, delta records
    assert all(r.delta for r in encoded.records if r.level == 0 and r.quant is not None)
    stream = memoryview(data[:-4])
    layout = scan_stream(stream, base)
    assert {s.name: s.shape for s in layout.tensors} == {n: tuple(t.shape) for n, t in new.items()}
    target = {n: t.clone() for n, t in base.items()}
    decode_stream_into(stream, layout, target, base_digest=state_digest(base))
    for name in new:
        assert torch.equal(target[name], whole[name]), name
    # a delta's prefix that holds some tiers: the others keep the base's rows
    (split,) = encoded.splits
    cut = len(encoded.header.to_bytes())
    for record in encoded.records:
        cut += len(record.header_bytes()) + len(record.body)
        partial = decode_prefix(data[:cut], base)
        held = [p for p in split.parts() if p in partial.levels]
        if 0 < len(held) < split.count:
            break
    else:
        raise AssertionError("no prefix holds some tiers and not others")
    assert set(partial.state) == set(new)
    assert not partial.complete
    table = partial.state["emb.weight"]
    for p, rows in zip(split.parts(), split.indices, strict=True):
        if p not in held:  # not reached yet: the base's rows
            assert torch.equal(table[rows], base["emb.weight"][rows])
        else:
            assert not torch.equal(table[rows], base["emb.weight"][rows])


def test_the_streaming_encoder_writes_the_same_stream() -> None:
    class Store:
        def __init__(self) -> None:
            self.bodies: list[bytes] = []

        def put(self, body: bytes | memoryview) -> int:
            self.bodies.append(bytes(body))
            return len(self.bodies) - 1

    state = _state(0)
    for base, defer in ((None, False), (_state(1), False), (None, True)):
        store = Store()
        plan = encode_stream(
            state, SPEC, store, base, seed=0, workers=1, calibration=_calibration(defer=defer)
        )
        streamed = plan.header.to_bytes() + b"".join(
            r.header_bytes() + store.bodies[r.token] for r in plan.records
        )
        whole = encode_state(state, SPEC, base, seed=0, calibration=_calibration(defer=defer))
        assert streamed == whole.to_bytes()[:-4]
        assert streamed[3] == (WIDE_TIERS_VERSION if defer else ROW_TIERS_VERSION)


def test_weighted_order_gives_each_tier_its_tables_weight() -> None:
    state = _state(0)

    def first_refined(weights: dict[str, float]) -> str:
        encoded = encode_state(
            state, SPEC, seed=0, order=LevelOrder.WEIGHTED, weights=weights,
            calibration=_calibration(),
        )  # fmt: skip
        bases = [r for r in encoded.records if r.level == 0]
        first = next(r for r in encoded.records if r.level > 0)
        assert first.index is not None
        name = bases[first.index].name
        assert name is not None
        return name

    # the tiers weigh what their table weighs: heavy, a tier's refinement leads; light,
    # the Linear's does
    assert first_refined({"emb.weight": 1e6, "lin.weight": 1e-6}).startswith("emb.weight#tier")
    assert first_refined({"emb.weight": 1e-6, "lin.weight": 1e6}) == "lin.weight"
    with pytest.raises(ValueError, match="no weight"):
        encode_state(
            state,
            SPEC,
            seed=0,
            order=LevelOrder.WEIGHTED,
            weights={"lin.weight": 1.0},
            calibration=_calibration(),
        )


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ({"lin.bias": torch.ones(32)}, "not a table"),
        ({"emb.weight": torch.ones(299)}, "299 row weights"),
    ],
)
def test_row_weights_that_do_not_fit_the_model_are_refused(
    rows: dict[str, torch.Tensor], match: str
) -> None:
    state = _state(0)
    before = {n: t.clone() for n, t in state.items()}
    with pytest.raises(ValueError, match=match):
        encode_state(state, SPEC, seed=0, calibration=Calibration(rows=rows))
    assert all(torch.equal(state[n], before[n]) for n in state)


def test_a_tensor_named_like_a_tier_is_refused() -> None:
    state = {**_state(0), "emb.weight#tier0": torch.zeros(3, 32)}
    with pytest.raises(ValueError, match="name of a row tier"):
        encode_state(state, SPEC, seed=0, calibration=_calibration())


def test_streams_without_a_tables_parts_are_refused() -> None:
    state = _state(0)
    encoded = encode_state(state, SPEC, seed=0, calibration=_calibration())
    (split,) = encoded.splits
    other = RowSplit("lin.weight", bytes([0, 1] * 16), 2)
    hostile = EncodedModel(encoded.spec, None, encoded.records, splits=(split, other))
    with pytest.raises(FormatError, match=r"lin\.weight.*(whole|lacks its parts)"):
        decode_state(EncodedModel.from_bytes(hostile.to_bytes()))
    with pytest.raises(FormatError, match=r"lin\.weight"):
        scan_stream(memoryview(hostile.to_bytes()[:-4]))
    # limits bound the split list like the records
    tight = DecodeLimits(max_elements=100)
    with pytest.raises(FormatError, match="split rows"):
        EncodedModel.from_bytes(encoded.to_bytes(), tight)


def test_inspect_has_a_row_per_tensor_and_tier_with_every_level_counted() -> None:
    from fedsqueeze.codec.inspect import describe

    state = _state(0)
    for calibration in (None, _calibration(), _calibration(defer=True)):
        for base in (None, _state(1)):
            encoded = encode_state(state, SPEC, base, seed=0, calibration=calibration)
            rows = describe(encoded, base)
            names = {r.name for r in rows}
            parts = {p for s in encoded.splits for p in s.parts()}
            tables = {s.name for s in encoded.splits}
            assert names == (set(state) - tables) | parts
            assert sum(r.payload_bytes for r in rows) == sum(len(r.body) for r in encoded.records)
            assert sum(r.raw_bytes for r in rows) == sum(t.numel() * 4 for t in state.values())
            late = {p for s in encoded.splits for p in s.deferred_parts()}
            assert {r.name for r in rows if "deferred" in r.stages} == late
            assert bool(late) == (calibration is not None and calibration.defer and base is None)


# --------------------------------------------------------- planes in context order


def _each_level(encoded: EncodedModel) -> dict[str, list[torch.Tensor]]:
    """Every tensor as decoded after each of its levels, in its own level order."""
    from fedsqueeze.codec.tensor_decode import ProgressiveTensor, TensorDecoder

    decoder = TensorDecoder(None, None)
    names: list[str] = []
    held: list[ProgressiveTensor | None] = []
    out: dict[str, list[torch.Tensor]] = {}
    for record in encoded.records:
        if record.level == 0:
            name, value = decoder.decode(record)
            names.append(name)
            if isinstance(value, ProgressiveTensor):
                held.append(value)
                out[name] = [value.tensor()]
            else:
                held.append(None)
                out[name] = [value]
            continue
        assert record.index is not None
        tensor = held[record.index]
        assert tensor is not None
        tensor.refine(record)
        out[names[record.index]].append(tensor.tensor())
    return out


def test_planes_in_context_order_decode_level_by_level_as_in_value_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedsqueeze.codec.tensor_encode import TensorEncoder

    state = _state(3, rows=400, dim=64)
    spec = parse_spec("quant=8:symmetric:block64:hadamard,levels=2+1+1+4")
    ordered = encode_state(state, spec, seed=0, calibration=_calibration(400))
    assert any(r.context_order for r in ordered.records)  # the sign-flipped second bits
    monkeypatch.setattr(TensorEncoder, "_context_ordered", lambda self, record, *a: record)
    plain = encode_state(state, spec, seed=0, calibration=_calibration(400))
    assert not any(r.context_order for r in plain.records)
    assert ordered.nbytes < plain.nbytes
    got, want = _each_level(EncodedModel.from_bytes(ordered.to_bytes())), _each_level(plain)
    assert got.keys() == want.keys()
    for name in want:
        assert len(got[name]) == len(want[name])
        for a, b in zip(got[name], want[name], strict=True):
            assert torch.equal(a, b), name


def test_context_order_is_refused_before_version_11_with_ans_and_with_positions() -> None:
    from fedsqueeze.codec.container import QParamsSizer, parse_record

    state = _state(3, rows=400, dim=64)
    spec = parse_spec("quant=8:symmetric:block64:hadamard,levels=2+1+1+4")
    encoded = encode_state(state, spec, seed=0, calibration=_calibration(400))
    record = next(r for r in encoded.records if r.context_order)
    data = record.header_bytes() + bytes(record.body)

    def parse(raw: bytes, version: int) -> object:
        return parse_record(ByteReader(raw), DecodeLimits(), QParamsSizer(), version)

    assert parse(data, ROW_TIERS_VERSION).context_order  # type: ignore[attr-defined]
    with pytest.raises(FormatError, match="flags"):
        parse(data, ROW_TIERS_VERSION - 1)
    from dataclasses import replace

    ans = replace(record, ans=True, raw_length=None)
    with pytest.raises(FormatError, match="context order"):
        parse(ans.header_bytes() + bytes(ans.body), ROW_TIERS_VERSION)


def test_smoothed_counts_give_the_unread_rows_the_unseen_mass() -> None:
    from fedsqueeze.codec.row_tiers import smoothed_counts

    counts = torch.tensor([5.0, 1.0, 1.0, 0.0, 0.0, 3.0, 0.0, 0.0])
    w = smoothed_counts(counts)
    assert w[:3].tolist() == [5.0, 1.0, 1.0] and float(w[5]) == 3.0
    # two rows read once: the four unread rows share a mass of 2
    assert torch.allclose(w[counts == 0], torch.full((4,), 0.5, dtype=torch.float64))
    assert smoothed_counts(torch.tensor([2.0, 0.0]))[1] == 1.0  # no row read once: 1
    with pytest.raises(ValueError, match="all 0"):
        smoothed_counts(torch.zeros(3))


def test_a_prior_shares_the_unseen_mass_by_its_own_counts() -> None:
    from fedsqueeze.codec.row_tiers import smoothed_counts

    counts = torch.tensor([5.0, 1.0, 1.0, 0.0, 0.0, 3.0, 0.0, 0.0])
    prior = torch.tensor([9.0, 0.0, 0.0, 6.0, 2.0, 0.0, 0.0, 0.0])
    w = smoothed_counts(counts, prior)
    assert torch.equal(w[counts > 0], smoothed_counts(counts)[counts > 0])
    # the same mass (2) as without a prior, shared 6 : 2 : 0.2 : 0.2 (the prior's five
    # unread rows share its own unseen mass of 1)
    assert float(w[counts == 0].sum()) == pytest.approx(2.0)
    shares = [6.0, 2.0, 0.2, 0.2]
    assert w[counts == 0].tolist() == pytest.approx([2 * x / 8.4 for x in shares])
    for bad, match in ((torch.ones(7), "prior counts for 7 rows"), (torch.zeros(8), "all 0")):
        with pytest.raises(ValueError, match=match):
            smoothed_counts(counts, bad)


@pytest.mark.parametrize(
    "spec",
    [
        "prune=l1:0.5,quant=8,levels=2+2+4",
        "prune=global:0.7,quant=4:symmetric,levels=1+1+2,grow=0.9",
        "quant=8:kmeans,levels=2+2+4",
        "quant=8:block32,levels=2+2+4,entropy=ans",
        "topk=0.2,quant=8,levels=2+2+4",
    ],
)
def test_tiers_combine_with_every_stage_in_full_models_and_deltas(spec: str) -> None:
    w = torch.zeros(300, dtype=torch.float64)
    w[:60] = torch.arange(60, 0, -1, dtype=torch.float64) ** 2
    w[60:] = 0.05
    calibration = Calibration(rows={"emb.weight": w})
    g = torch.Generator().manual_seed(0)

    def draw() -> dict[str, torch.Tensor]:
        return {
            "emb.weight": torch.randn(300, 32, generator=g),
            "lin.weight": torch.randn(32, 32, generator=g),
            "lin.bias": torch.randn(32, generator=g),
        }

    state = draw()
    for base in (None, draw()):
        encoded = encode_state(state, parse_spec(spec), base, seed=0, calibration=calibration)
        assert encoded.splits
        data = encoded.to_bytes()
        back = decode_state(EncodedModel.from_bytes(data), base)
        assert set(back) == set(state)
        assert torch.equal(back["emb.weight"], decode_state(encoded, base)["emb.weight"])
        half = decode_prefix(data[:-4][: len(data) // 2], base) if base is not None else None
        assert half is None or set(half.state) == set(state)


def test_the_feedback_residual_comes_back_under_the_tables_name() -> None:
    spec = parse_spec("topk=0.2,quant=8,levels=2+2+4")
    base, new, newer = _state(1), _state(2), _state(3)
    first = encode_state(new, spec, base, seed=0, calibration=_calibration())
    assert first.residual is not None and first.splits
    assert set(first.residual) == {"emb.weight", "lin.weight"}
    assert first.residual["emb.weight"].shape == (300, 32)
    # what top-k left of the table: the difference less what the receiver decodes
    got = decode_state(first, base)["emb.weight"]
    want = new["emb.weight"] - got
    assert torch.allclose(first.residual["emb.weight"], want, atol=1e-5)
    # and it feeds the next round as any residual does
    second = encode_state(
        newer, spec, new, residual=first.residual, seed=0, calibration=_calibration()
    )
    assert set(decode_state(second, new)) == set(newer)


def test_refinements_of_tiers_can_be_ordered_by_a_loss() -> None:
    from fedsqueeze.codec.loss_order import reorder_by_loss

    state, base = _state(0, rows=120, dim=16), _state(1, rows=120, dim=16)
    w = _weights(120, unseen_from=60)
    spec = parse_spec("quant=8:channel,levels=2+2+4")
    seen: list[set[str]] = []

    def loss(model: dict[str, torch.Tensor]) -> float:
        seen.append(set(model))
        weighted = (model["emb.weight"] - state["emb.weight"]).square().sum(dim=1) * w
        return float(weighted.sum() + (model["lin.weight"] - state["lin.weight"]).square().sum())

    for held in (None, base):
        encoded = encode_state(
            state, spec, held, seed=0, calibration=Calibration(rows={"emb.weight": w})
        )
        ordered = reorder_by_loss(encoded, loss, held)
        assert ordered.splits == encoded.splits
        assert all(names == set(state) for names in seen)  # the loss sees whole tables
        again = EncodedModel.from_bytes(ordered.to_bytes())
        for name, tensor in decode_state(encoded, held).items():
            assert torch.equal(decode_state(again, held)[name], tensor), name


# ------------------------------------------------------------ deferred tiers (version 13)


def test_a_full_model_defers_its_light_tiers_and_fills_them_with_their_mean_row() -> None:
    state = _state(0, rows=600, dim=32)
    state["emb.weight"] += 0.5  # a common offset the fill rows hold
    w = _weights(600, unseen_from=200)
    encoded = encode_state(
        state, SPEC, seed=0, calibration=Calibration(rows={"emb.weight": w}, defer=True)
    )
    data = encoded.to_bytes()
    # the lightest band in DEFERRED_TIERS tiers of as many rows, the heaviest rows first,
    # the other bands as they were: more than 8 tiers, so format version 14
    (split,) = encoded.splits
    eager_split = plan_tiers(state, True, {"emb.weight": w}, lambda n, t: True).splits[0]
    assert split.deferred == DEFERRED_TIERS
    assert split.count == eager_split.count - 1 + DEFERRED_TIERS > BANDS
    assert data[3] == WIDE_TIERS_VERSION
    kept = zip(split.indices[: split.first_deferred], eager_split.indices[:-1], strict=True)
    assert all(torch.equal(a, b) for a, b in kept)
    late_rows = split.indices[split.first_deferred :]
    assert torch.equal(torch.cat(late_rows).sort().values, eager_split.indices[-1])
    assert max(r.numel() for r in late_rows) - min(r.numel() for r in late_rows) <= 1
    for heavier, lighter in itertools.pairwise(late_rows):
        assert float(w[heavier].min()) >= float(w[lighter].max())
    assert EncodedModel.from_bytes(data).splits == encoded.splits
    late = set(split.deferred_parts())
    # the other base levels first (the header counts them), each deferred base level
    # later but before its own refinements
    names = [r.name for r in encoded.records if r.level == 0]
    assert encoded.base_records == len(names) - len(late)
    assert not late & set(names[: encoded.base_records])
    first_refinement = next(i for i, r in enumerate(encoded.records) if r.level > 0)
    assert any(r.level == 0 and r.name in late for r in encoded.records[first_refinement:]), (
        "the order put no deferred base level after a refinement"
    )
    # the smallest prefix lacks the lightest tier: its rows are their mean row
    stream = data[:-4]
    start = smallest_prefix(encoded)
    eager = encode_state(state, SPEC, seed=0, calibration=_calibration(600))
    assert start < smallest_prefix(eager)
    first = decode_prefix(stream[:start]).state["emb.weight"]
    table = state["emb.weight"]
    for k in range(split.first_deferred, split.count):
        rows = split.indices[k]
        mean = table[rows].to(torch.float64).mean(dim=0).to(torch.float32)
        assert torch.equal(first[rows], mean.expand(rows.numel(), -1))
    # the whole stream: every tier its part plus its fill row, as close as without deferral
    whole = decode_state(EncodedModel.from_bytes(data))["emb.weight"]
    assert (whole - table).norm() / table.norm() < 0.02
    # scanned and decoded into place the same way
    layout = scan_stream(memoryview(stream))
    target = {n: torch.empty_like(t) for n, t in state.items()}
    decode_stream_into(memoryview(stream), layout, target)
    assert torch.equal(target["emb.weight"], whole)


@pytest.mark.parametrize("light", [2, 3, 97])
def test_the_lightest_band_is_cut_by_weight_into_at_most_deferred_tiers_tiers(light: int) -> None:
    g = torch.Generator().manual_seed(light)
    table = torch.randn(20 + light, 8, generator=g)
    w = torch.cat([torch.full((10,), 1000.0), torch.full((10,), 100.0)])
    w = torch.cat([w, torch.rand(light, generator=g, dtype=torch.float64) * 1e-3])
    (split,) = plan_tiers({"t": table}, True, {"t": w}, lambda n, t: True, defer=True).splits
    assert 2 <= split.deferred <= min(DEFERRED_TIERS, light)
    assert split.count == 2 + split.deferred
    late = split.indices[split.first_deferred :]
    assert torch.equal(torch.cat(late).sort().values, torch.arange(20, 20 + light))
    for heavier, lighter in itertools.pairwise(late):
        assert float(w[heavier].min()) > float(w[lighter].max())
    for k, rows in enumerate(late, start=split.first_deferred):
        fill = split.fill_row(k, (8,))
        assert torch.equal(fill, table[rows].double().mean(dim=0).float())
    # without defer: the same bands, the lightest one tier
    (eager,) = plan_tiers({"t": table}, True, {"t": w}, lambda n, t: True).splits
    assert eager.count == 3 and eager.deferred == 0


def test_deferred_cuts_share_weight_and_rows_alike() -> None:
    from fedsqueeze.codec.tier_plan import _cuts

    f64 = torch.float64
    assert _cuts(torch.ones(16, dtype=f64), 4) == [4, 8, 12]  # even weights: equal counts
    assert _cuts(torch.zeros(12, dtype=f64), 4) == [3, 6, 9]
    # heavy rows in smaller runs: 4 rows hold 80% of the weight of 40 rows
    w = torch.tensor([20.0] * 4 + [0.5] * 36, dtype=f64)
    cuts = _cuts(w, 4)
    assert cuts[0] <= 4 and len(cuts) == 3
    # however the weight is spread, no run holds more than 2/parts of the rows
    for spread in (w, torch.tensor([1e9] + [1.0] * 99, dtype=f64)):
        bounds = [0, *_cuts(spread, 4), spread.numel()]
        assert max(b - a for a, b in itertools.pairwise(bounds)) <= spread.numel() // 2
    assert _cuts(torch.tensor([3.0, 2.0, 1.0], dtype=f64), 8) == [1, 2]
    assert _cuts(torch.ones(1, dtype=f64), 8) == []


def test_every_prefix_of_a_deferred_stream_decodes_and_the_error_falls() -> None:
    state = _state(3, rows=400, dim=32)
    state["emb.weight"] -= 0.3
    w = _weights(400, unseen_from=120)
    encoded = encode_state(
        state, SPEC, seed=0, calibration=Calibration(rows={"emb.weight": w}, defer=True)
    )
    stream = encoded.to_bytes()[:-4]
    start = smallest_prefix(encoded)
    with pytest.raises(TruncatedError):
        decode_prefix(stream[: start - 1])
    held = w.clone()
    held[held == 0] = 1e-12
    last = float("inf")
    for cut in [*range(start, len(stream), 61), len(stream)]:
        got = decode_prefix(stream[:cut])
        error = _weighted_error(got.state["emb.weight"], state["emb.weight"], held)
        assert error <= last * (1 + 1e-3) + 1e-9
        last = error
    assert got.complete


def test_deltas_sparse_specs_and_the_default_send_every_tier_first() -> None:
    state, base = _state(0), _state(1)
    w = _weights(300)
    for spec, held in ((SPEC, base), (parse_spec("prune=l1:0.5,quant=8,levels=2+2+4"), None)):
        encoded = encode_state(
            state, spec, held, seed=0, calibration=Calibration(rows={"emb.weight": w}, defer=True)
        )
        (split,) = encoded.splits
        assert split.deferred == 0 and encoded.to_bytes()[3] == ROW_TIERS_VERSION
    eager = encode_state(state, SPEC, seed=0, calibration=_calibration())
    assert eager.splits[0].deferred == 0  # off by default
    assert eager.base_records == sum(1 for r in eager.records if r.level == 0)


def test_center_and_join_are_inverse_and_a_missing_deferred_part_is_its_fill() -> None:
    table = torch.randn(40, 4, 3) + 2.0
    tiers = torch.tensor([0, 1, 2, 2] * 10, dtype=torch.uint8)
    plain = RowSplit("t", tiers.numpy().tobytes(), 3)
    means = [table[plain.indices[k]].mean(dim=0).flatten() for k in (1, 2)]
    split = replace(plain, deferred=2, fills=tuple(m.numpy().tobytes() for m in means))
    parts = split.center(split.split(table))
    assert torch.equal(parts["t#tier0"], table[split.indices[0]])
    assert torch.allclose(parts["t#tier2"].mean(dim=0), torch.zeros(4, 3), atol=1e-6)
    assert torch.allclose(split.join(parts), table, atol=1e-6)
    del parts["t#tier2"]
    joined = split.join(parts)
    assert torch.equal(joined[split.indices[2]][5], means[1].reshape(4, 3))
    with pytest.raises(FormatError, match="lacks"):
        plain.join(parts)
    with pytest.raises(FormatError, match="fill row of 12 values"):
        split.join({p: t[:, :2] for p, t in split.split(table).items()})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"deferred": 2}, "deferred tiers"),
        ({"deferred": 1}, "fill rows"),
        ({"deferred": 1, "fills": (b"\x00\x00",)}, "float32"),
        ({"deferred": 1, "fills": (torch.tensor([float("nan")]).numpy().tobytes(),)}, "finite"),
    ],
)
def test_bad_deferred_splits_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RowSplit("t", bytes([0, 1, 1]), 2, **kwargs)  # type: ignore[arg-type]


def _deferring(body: bytes) -> bytes:
    return _raw_split(b"t", 3, 2, bytes([0, 1, 1])) + body


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_deferring(bytes([2])), "deferred tiers of"),
        (_deferring(bytes([1, 0])), "empty fill row"),
        (_deferring(bytes([1, 4]) + b"\x00" * 8), "truncated"),
        (_deferring(bytes([1, 1]) + torch.tensor([float("inf")]).numpy().tobytes()), "finite"),
        (_deferring(b""), "truncated"),
    ],
)
def test_hostile_deferred_tiers_raise_format_errors(data: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        parse_splits(ByteReader(data), 10, 1 << 20, 1024, deferring=True)


def test_the_split_list_with_deferred_tiers_round_trips() -> None:
    fill = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    splits = [
        RowSplit("t", bytes([0, 1, 2, 2]), 3, 2, (fill, fill)),
        RowSplit("u", bytes([1, 0]), 2),
    ]
    out = bytearray()
    write_splits(out, splits, deferring=True)
    assert parse_splits(ByteReader(bytes(out)), 10, 1 << 20, 1024, deferring=True) == tuple(splits)
    with pytest.raises(ValueError, match="version 13"):
        write_splits(bytearray(), splits)


def test_deferred_streams_out_of_order_are_refused() -> None:
    state = _state(0, rows=600)
    w = _weights(600, unseen_from=200)
    encoded = encode_state(
        state, SPEC, seed=0, calibration=Calibration(rows={"emb.weight": w}, defer=True)
    )
    records = list(encoded.records)
    late = set(encoded.splits[0].deferred_parts())
    at = next(i for i, r in enumerate(records) if r.level == 0 and r.name in late)
    # a deferred base level among the others (the header's count then names it early)
    early = [records[at], *records[:at], *records[at + 1 :]]
    # a refinement of a deferred tier before its base level
    index = sum(1 for r in records[:at] if r.level == 0)
    refinement = next(r for r in records[at:] if r.level == 1 and r.index == index)
    moved = [r for r in records if r is not refinement]
    moved.insert(at, refinement)
    for hostile in (early, moved):
        data = EncodedModel(encoded.spec, None, tuple(hostile), splits=encoded.splits).to_bytes()
        with pytest.raises(FormatError, match=r"not one stream|refines"):
            decode_state(EncodedModel.from_bytes(data))
        with pytest.raises(FormatError, match=r"not one stream|refines"):
            decode_prefix(data[:-4])
    # a delta's header never defers
    delta = encode_state(state, SPEC, _state(1, rows=600), seed=0)
    header = replace(delta.header, version=DEFERRED_VERSION, splits=encoded.splits)
    with pytest.raises(ValueError, match="delta"):
        header.to_bytes()


def test_a_deferred_streams_segments_decode_from_the_smallest_prefix_on() -> None:
    from fedsqueeze.codec.segments import split_progressive

    state = _state(2, rows=500)
    w = _weights(500, unseen_from=100)
    encoded = encode_state(
        state, SPEC, seed=0, calibration=Calibration(rows={"emb.weight": w}, defer=True)
    )
    segments = split_progressive(encoded, 512, 4096)
    start = smallest_prefix(encoded)
    joined = b""
    decoded = 0
    for segment in segments:
        joined += segment.payload
        if len(joined) >= start and len(joined) < len(encoded.to_bytes()) - 4:
            got = decode_prefix(joined)
            assert set(got.state) == set(state) and not got.complete
            decoded += 1
    assert decoded >= 3 and joined == encoded.to_bytes()[:-4]
    # a deferred base level travels in a segment of level 0 among the refinements'
    late = set(encoded.splits[0].deferred_parts())
    first_refinement = next(i for i, s in enumerate(segments) if s.level > 0)
    assert any(late & set(s.tensor_names) and s.level == 0 for s in segments[first_refinement:])


def test_tier_costs_move_the_deferred_base_level_earlier_and_change_only_the_order() -> None:
    state = _state(4, rows=600)
    from fedsqueeze.codec.row_tiers import smoothed_counts

    w = smoothed_counts(_weights(600, unseen_from=150))  # the unread rows' weight above 0

    def where(costs: dict[str, tuple[float, float]]) -> tuple[int, EncodedModel]:
        cal = Calibration(rows={"emb.weight": w}, defer=True, tier_costs=costs)
        encoded = encode_state(state, SPEC, seed=0, calibration=cal)
        late = set(encoded.splits[0].deferred_parts())
        at = next(i for i, r in enumerate(encoded.records) if r.level == 0 and r.name in late)
        return at, encoded

    plain, encoded = where({})
    same, again = where({"emb.weight": (1.0, 1.0)})
    assert again.to_bytes() == encoded.to_bytes() and same == plain
    sooner, costly = where({"emb.weight": (3.0, 8.0)})
    later, _cheap = where({"emb.weight": (1e-4, 1.0)})
    assert sooner < plain < later
    # the same records, reordered: the same model in the end
    sizes = sorted(len(r.body) for r in encoded.records)
    assert sorted(len(r.body) for r in costly.records) == sizes
    for name, t in decode_state(encoded).items():
        assert torch.equal(decode_state(costly)[name], t), name


@pytest.mark.parametrize("costs", [(0.0, 1.0), (1.0, float("inf")), (1.0,), (-1.0, 2.0)])
def test_bad_tier_costs_are_refused(costs: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="tier costs"):
        Calibration(tier_costs={"emb.weight": costs})  # type: ignore[dict-item]


def test_a_table_with_non_finite_rows_is_not_deferred_and_its_policy_holds() -> None:
    from fedsqueeze.codec import NonFinite
    from fedsqueeze.errors import NonFiniteError

    state = _state(0)
    state["emb.weight"][299, 3] = float("nan")  # a row of the lightest tier
    cal = _calibration(defer=True)
    with pytest.raises(NonFiniteError, match=r"emb\.weight"):
        encode_state(state, SPEC, seed=0, calibration=cal)
    carried = encode_state(state, SPEC, seed=0, calibration=cal, nonfinite=NonFinite.CARRY)
    assert carried.splits[0].deferred == 0
    back = decode_state(EncodedModel.from_bytes(carried.to_bytes()))["emb.weight"]
    assert bool(back[299, 3].isnan())


def test_a_whole_stream_without_its_deferred_tier_is_refused() -> None:
    state = _state(0, rows=600)
    cal = Calibration(rows={"emb.weight": _weights(600, unseen_from=200)}, defer=True)
    encoded = encode_state(state, SPEC, seed=0, calibration=cal)
    late = set(encoded.splits[0].deferred_parts())
    at = next(i for i, r in enumerate(encoded.records) if r.level == 0 and r.name in late)
    rank = sum(1 for r in encoded.records[:at] if r.level == 0)
    kept = tuple(
        r for i, r in enumerate(encoded.records) if i != at and not (r.level and r.index == rank)
    )
    data = EncodedModel(encoded.spec, None, kept, splits=encoded.splits).to_bytes()
    with pytest.raises(FormatError, match="lacks its parts"):
        EncodedModel.from_bytes(data)
    with pytest.raises(FormatError, match="lacks its parts"):
        scan_stream(memoryview(data[:-4]))
