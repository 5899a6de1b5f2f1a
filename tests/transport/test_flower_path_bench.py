"""``fedsqueeze bench transport --flower-only`` in its short form: a 4 MB model through
Flower's own path (real SuperLink, SuperNode and ``flwr run`` on 127.0.0.1) and through
the data plane. A smoke test of the measurement, not of its figures: no time is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
from multiprocessing import resource_tracker
from pathlib import Path

import pytest

from fedsqueeze.bench import transport as transport_bench
from fedsqueeze.bench.flowerpath import FLOWER_HOPS, FlowerPathOptions
from tests.deploy.procs import MARKER_KEY, kill_marked, wait_until_none

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

#: Flower 1.42 cuts arrays into objects of at most this many bytes.
FLOWER_CHUNK_BYTES = 5 * 1024 * 1024


@pytest.mark.timeout(420)
def test_a_small_model_goes_through_both_paths_and_nothing_is_left_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # multiprocessing's resource tracker lives as long as this test process: started
    # before the marker is set, it does not carry it (nor is it killed below).
    resource_tracker.ensure_running()
    # Every process started below inherits the marker: whatever is left is found by it.
    marker = f"flower-path-{tmp_path.name}"
    monkeypatch.setenv(MARKER_KEY, marker)
    parser = argparse.ArgumentParser()
    transport_bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(
        ["--flower-only", "--flower-mb", "4", "--runs", "1", "--json", str(out)]
    )
    try:
        assert transport_bench.main(args) == 0
        left = wait_until_none(marker, timeout=30)
        assert not left, f"processes left running: {left}"
    finally:
        kill_marked(marker)
    report = json.loads(out.read_text())
    assert set(report) == {"machine", "flower"}  # --flower-only: no other part
    flower = report["flower"]
    assert flower["hops"] == FLOWER_HOPS
    (row,) = flower["sizes"]
    assert row["megabytes"] == 4
    model_bytes = row["plane"]["bytes"]
    assert 3.9e6 < model_bytes < 4.1e6
    # The same model on both paths (the benchmark checks the digests; here the sizes).
    # ArrayRecord.count_bytes() adds each array's dtype and shape to its data.
    assert model_bytes <= row["flower"]["bytes"] < model_bytes * 1.001
    assert row["flower"]["model_digest"] == row["plane"]["model_digest"]
    # Flower's objects carry the arrays and their framing; every array travels whole.
    assert row["flower"]["object_bytes"] > model_bytes
    assert row["flower"]["objects"] >= model_bytes // FLOWER_CHUNK_BYTES
    # Raw through the data plane: every byte, plus the manifest and framing (< 1%).
    assert model_bytes < row["plane"]["wire_bytes"] < model_bytes * 1.01
    # Times are ordered: the tensors come after the bytes, on either path.
    for path in (row["flower"], row["plane"]):
        assert 0 < path["to_bytes_s"] <= path["to_tensors_s"]
    assert row["plane"]["prepare_s"] > 0
    # Every process was measured.
    assert set(row["flower"]["cpu_ms_per_mib"]) == {
        "serverapp",
        "superlink",
        "supernode",
        "clientapp",
    }
    tiny_cpu = flower["tiny"]["cpu_s"]
    assert tiny_cpu["serverapp"] > 0 and tiny_cpu["clientapp"] > 0
    assert tiny_cpu["superlink"] >= 0 and tiny_cpu["supernode"] >= 0
    assert set(row["plane"]["cpu_ms_per_mib"]) == {"server (prepare)", "server (serve)", "client"}
    assert row["plane"]["segment_digest"] in {"sha256", "blake3"}
    printed = capsys.readouterr().out
    assert "Flower (ArrayRecord" in printed and "data plane (prepare" in printed


def test_the_options_refuse_what_cannot_be_sent() -> None:
    with pytest.raises(ValueError):
        FlowerPathOptions(sizes_mb=())
    with pytest.raises(ValueError):
        FlowerPathOptions(sizes_mb=(64.0, 0.0))
    with pytest.raises(ValueError):
        FlowerPathOptions(runs=0)
    with pytest.raises(ValueError):
        transport_bench.TransportBenchOptions(flower_mb=(), flower_only=True)
