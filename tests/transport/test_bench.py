"""``fedsqueeze bench transport`` on tiny sizes (a smoke test: no timing assertions)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from fedsqueeze.bench import transport as transport_bench
from fedsqueeze.wire.digests import blake3_available


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quick_bench_reports_every_part(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    transport_bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(
        ["--payload-mb", "2", "--chunk-kib", "256", "--runs", "1", "--clients", "4",
         "--fanout-mb", "0.2", "--flower-mb", "none", "--json", str(out)]
    )  # fmt: skip
    assert transport_bench.main(args) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"machine", "throughput", "digests", "resume", "fanout", "framing"}
    assert set(report["digests"]["mb_s"]) == (
        {"sha256", "blake3"} if blake3_available() else {"sha256"}
    )
    assert all(rate > 0 for rate in report["digests"]["mb_s"].values())
    throughput = report["throughput"]
    assert throughput["bare_gb_s"] > 0 and throughput["segments_gb_s"] > 0
    assert throughput["chunk_bytes"] == 256 * 1024
    cpu = throughput["cpu_ms_per_mib"]
    streams = {"bare", "unverified", "verified", "fetch"}
    if blake3_available():  # the same fetch with BLAKE3 segment digests, side by side
        streams |= {"verified_blake3", "fetch_blake3"}
        assert throughput["segments_blake3_gb_s"] > 0 and throughput["ratio_blake3"] > 0
    assert set(cpu) == streams
    assert all(v["client_cpu_ms_per_mib"] > 0 for v in cpu.values())
    assert 0 < throughput["ceiling_ratio"] <= 1
    assert report["framing"]["fetch_calls"] == 1
    resume = report["resume"]
    assert 0 <= resume["overhead_bytes"] <= resume["segment_bytes"]
    assert resume["resumed_segments"] == resume["cut_after_segments"]
    fanout = report["fanout"]
    assert fanout["clients"] == 4 and fanout["errors"] == 0 and fanout["encodes"] == 1
    assert "Fetch, verified (SHA-256) and kept" in capsys.readouterr().out


def test_register_adds_the_subcommand() -> None:
    parser = argparse.ArgumentParser()
    transport_bench.register(parser.add_subparsers())
    args = parser.parse_args(["transport", "--runs", "2"])
    assert args.runs == 2 and args._bench_main is transport_bench.main
    with pytest.raises(ValueError):
        transport_bench.TransportBenchOptions(runs=0)
