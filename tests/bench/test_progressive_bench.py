"""The progressive benchmark's parts on small inputs (figures are for BENCHMARKS.md)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from fedsqueeze.bench.level_designs import compare_designs
from fedsqueeze.bench.progressive import prefix_curve, stdlib_sentences
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.errors import ConfigError


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(16, 48, generator=g), "a.bias": torch.randn(16, generator=g)}


def test_designs_report_every_level_and_errors_fall() -> None:
    designs = compare_designs(_state())
    assert set(designs) == {
        f"{d}/{g}"
        for d in ("nested-means", "nested-midpoint", "residual")
        for g in ("tensor", "channel")
    }
    for levels in designs.values():
        assert len(levels) == 3
        errors = [row["rel_l2"] for row in levels]
        assert errors == sorted(errors, reverse=True)
    # the kept design is never worse than plain midpoints at the same bytes
    for g in ("tensor", "channel"):
        means, mids = designs[f"nested-means/{g}"], designs[f"nested-midpoint/{g}"]
        assert all(a["rel_l2"] <= b["rel_l2"] + 1e-9 for a, b in zip(means, mids, strict=True))


def test_prefix_curve_grows_to_the_whole_stream() -> None:
    state = _state()
    target = state["a.weight"]

    def closeness(s: dict[str, torch.Tensor]) -> float:
        return -float((s["a.weight"] - target).norm())

    curve = prefix_curve(state, parse_spec("quant=8:channel,levels=2+2+4"), closeness)  # type: ignore[arg-type]
    sizes = [row["bytes"] for row in curve["curve"]]
    assert sizes == sorted(sizes) and sizes[0] == curve["smallest_prefix"]
    assert sizes[-1] == curve["stream_bytes"] - 4
    assert curve["curve"][-1]["quality"] >= curve["curve"][0]["quality"]
    assert 1.0 <= curve["overhead"] < 1.3


def test_sentences_are_real_stdlib_text_and_enough() -> None:
    sentences = stdlib_sentences()
    assert len(sentences) >= 200
    assert sentences == sorted(set(sentences))
    assert all(30 <= len(s) <= 200 for s in sentences)


def test_partwise_memory_runs_both_ways_in_fresh_processes() -> None:
    from fedsqueeze.bench.partwise import measure

    row = measure({"w.weight": torch.randn(256, 256)}, "quant=8:channel")
    assert row["model_bytes"] == 256 * 256 * 4
    assert float(row["stream_bytes"]) > 0
    assert (
        float(row["whole_extra_peak_bytes"]) >= 0 and float(row["partwise_extra_peak_bytes"]) >= 0
    )


def test_prefix_curve_takes_the_refinement_order() -> None:
    from fedsqueeze.codec.level_order import LevelOrder

    state = {**_state(), "b.weight": torch.randn(64, 128, generator=torch.Generator())}
    spec = parse_spec("quant=8:channel,levels=1+1+2+4")
    for order in LevelOrder:
        weights = {k: 1.0 for k in state} if order is LevelOrder.WEIGHTED else None
        curve = prefix_curve(state, spec, lambda s: 0.0, order=order, count=4, weights=weights)
        assert curve["order"] == order.value
        assert len(curve["curve"]) <= 4


def test_plane_entropy_reports_each_level_and_refuses_what_it_cannot_measure() -> None:
    import pytest

    from fedsqueeze.bench.plane_entropy import plane_entropy
    from fedsqueeze.bench.progressive import run

    rows = plane_entropy(_state(), parse_spec("quant=8:channel,levels=2+2+4"))
    assert [r["bits"] for r in rows] == [2, 2, 4]
    for r in rows:
        # an entropy never exceeds the plane's width; knowing the coarser bits never hurts
        assert 0 < r["conditional_bits_per_value"] <= r["order0_bits_per_value"] + 1e-9
        assert r["order0_bits_per_value"] <= r["bits"] + 1e-9
        assert r["sent_bits_per_value"] > 0
    with pytest.raises(ValueError, match="progressive"):
        plane_entropy(_state(), parse_spec("quant=8"))
    with pytest.raises(ValueError, match="dense"):
        plane_entropy(_state(), parse_spec("quant=8:block32,levels=4+4"))
    with pytest.raises(ConfigError, match="unknown parts"):
        run(parts=("curves",))


def test_curve_arguments_parse_spec_and_order() -> None:
    import pytest

    from fedsqueeze.bench.progressive import parse_curve
    from fedsqueeze.codec.level_order import LevelOrder

    assert parse_curve("quant=8,levels=4+4@by-level") == ("quant=8,levels=4+4", LevelOrder.BY_LEVEL)
    assert parse_curve("quant=8,levels=4+4")[1] is LevelOrder.RELATIVE
    assert parse_curve("quant=8:hadamard,levels=4+4@weighted")[1] is LevelOrder.WEIGHTED
    with pytest.raises(ValueError, match="unknown refinement order"):
        parse_curve("quant=8,levels=4+4@sideways")


def test_support_curve_measures_every_record_and_the_drops() -> None:
    from fedsqueeze.bench.support_curve import at, largest_drop, record_curve
    from fedsqueeze.codec import encode_state

    state = {**_state(), "b.weight": torch.randn(16, 32, generator=torch.Generator())}
    spec = parse_spec("prune=global:0.7,quant=4:symmetric,levels=1+1+2,grow=0.95+0.85")
    encoded = encode_state(state, spec, seed=0)
    rows = record_curve(encoded, lambda s: float(sum(int(t.count_nonzero()) for t in s.values())))
    sizes = [r["bytes"] for r in rows]
    assert sizes == sorted(sizes) and sizes[-1] == encoded.nbytes - 4
    # nonzero values only grow as groups open: a count never falls
    assert largest_drop([r["quality"] for r in rows]) == 0.0
    assert largest_drop([3.0, 1.0, 2.0, 0.5]) == 2.5
    assert at(rows, sizes[0] - 1) is None and at(rows, sizes[-1]) == rows[-1]["quality"]


def test_stream_costs_weigh_each_stream_against_one_shot() -> None:
    from fedsqueeze.bench.support_curve import COST_SPECS, stream_costs

    g = torch.Generator().manual_seed(0)
    state = {"a.weight": torch.randn(32, 64, generator=g), "a.bias": torch.randn(32, generator=g)}
    costs = stream_costs(state)
    for key in COST_SPECS:
        assert costs[f"{key}_zstd"] > 0 and costs[f"{key}_ans"] > 0
    assert costs["grow_ans_vs_one_shot"] == costs["grow_ans"] / costs["one_shot_ans"]
    # the context-coded planes make the progressive streams smaller than with zstd
    assert costs["grow_ans"] < costs["grow_zstd"] and costs["levels_ans"] < costs["levels_zstd"]


def test_gptq_suffix_asks_for_calibrated_codes() -> None:
    from fedsqueeze.bench.progressive import curve_options

    spec = "quant=8:hadamard,levels=2+1+1+4"
    assert curve_options(f"{spec}@weighted+gptq") == (f"{spec}@weighted", 8, None)
    assert curve_options(f"{spec}@weighted+gptq3") == (f"{spec}@weighted", 3, None)
    assert curve_options(f"{spec}+gptq0") == (spec, 0, None)
    assert curve_options(f"{spec}@weighted") == (f"{spec}@weighted", None, None)
    assert curve_options(f"{spec}@weighted+rows") == (f"{spec}@weighted", None, "calibration")
    assert curve_options(f"{spec}@weighted+gptq2+rows") == (f"{spec}@weighted", 2, "calibration")
    assert curve_options(f"{spec}@weighted+rows+gptq") == (f"{spec}@weighted", 8, "calibration")
    assert curve_options(f"{spec}@weighted+rows=domain+gptq") == (
        f"{spec}@weighted",
        8,
        "domain",
    )
    assert curve_options(f"{spec}+gptq2+rows=calibration") == (spec, 2, "calibration")
    with pytest.raises(ValueError):
        curve_options(f"{spec}@weighted+gptqx")
    assert curve_options(f"{spec}+rows=test") == (spec, None, "test")
    assert curve_options(f"{spec}+rows=backoff") == (spec, None, "backoff")
    for bad in ("+rows=tests", "+rows=", "+rowsdomain"):
        with pytest.raises(ValueError, match="row-weight source"):
            curve_options(f"{spec}@weighted{bad}")


def test_defer_option_is_taken_off_before_the_other_suffixes() -> None:
    from fedsqueeze.bench.progressive import defer_option

    spec = "quant=8:hadamard,levels=2+1+1+4"
    assert defer_option(f"{spec}@weighted+gptq+rows+defer") == (f"{spec}@weighted+gptq+rows", True)
    assert defer_option(f"{spec}@weighted+defer+rows=domain") == (
        f"{spec}@weighted+rows=domain",
        True,
    )
    assert defer_option(f"{spec}@weighted+rows") == (f"{spec}@weighted+rows", False)
    assert defer_option(spec) == (spec, False)


def test_defer_without_rows_is_a_one_line_error() -> None:
    from tests.cli.inproc import run_cli

    proc = run_cli(
        "bench", "progressive", "--parts", "minilm", "--minilm-curves",
        "quant=8,levels=2+2+4@weighted+defer",
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "'+defer' needs '+rows'" in lines[0]


def test_loss_split_takes_each_side_from_the_prefix_alone() -> None:
    from fedsqueeze.codec import decode_prefix, encode_state, smallest_prefix
    from fedsqueeze.codec.level_order import LevelOrder

    g = torch.Generator().manual_seed(1)
    state = {
        "a.weight": torch.randn(32, 48, generator=g),
        "b.weight": torch.randn(24, 40, generator=g),
    }

    def error(s: Mapping[str, torch.Tensor]) -> float:
        return sum(float((s[k] - state[k]).square().sum()) for k in state)

    spec = parse_spec("quant=8,levels=2+2+4")
    encoded = encode_state(state, spec, seed=0, order=LevelOrder.RELATIVE)
    stream = encoded.to_bytes()[:-4]
    size = smallest_prefix(encoded)
    curve = prefix_curve(state, spec, error, (size,), count=4, split=({"a.weight"}, (size, 1)))
    (row,) = curve["loss_split"]  # 1 byte is no point of the curve: nothing there
    decoded = decode_prefix(stream[:size]).state
    table = float((decoded["a.weight"] - state["a.weight"]).square().sum())
    rest = float((decoded["b.weight"] - state["b.weight"]).square().sum())
    assert table > 0 and rest > 0
    assert row == {
        "bytes": size,
        "tables_only": pytest.approx(table),
        "rest_only": pytest.approx(rest),
    }
