"""A model of a few hundred MB served and fetched through the data plane in bounded memory.

A server process and a client process (``fedsqueeze.bench.bigfetch``), each polled for
its anonymous memory as in ``test_bigmodel_memory.py``, with the same bound: 10% of the
model's size plus a fixed allowance of 16 MiB. Nothing here measures or asserts a time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fedsqueeze.bench.bigfetch import measure
from fedsqueeze.bench.bigmodel import model_shapes, write_model

ALLOWANCE = 16 << 20
SHARE = 0.10
PARAMS = 70_000_000  # about 280 MB of fp32: over the default spool threshold (256 MiB)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_serving_and_fetching_stay_within_a_tenth_of_the_model(tmp_path: Path) -> None:
    model = tmp_path / "model.safetensors"
    raw = 4 * write_model(model, model_shapes(PARAMS, 8))
    bound = SHARE * raw + ALLOWANCE
    got = measure(model, "int8", tmp_path / "work")
    server, client = got["server"], got["client"]
    assert server["spooled"] and client["spooled"]
    assert server["spool_files_left"] == 0
    assert server["extra"] <= bound, f"server: {server['extra'] / 1e6:.1f} MB beyond the input"
    assert client["extra"] <= bound, f"client: {client['extra'] / 1e6:.1f} MB beyond the output"
    assert client["out_bytes"] == raw
    assert not (tmp_path / "work" / "fetched.safetensors").exists()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_dataplane_bench_runs_in_short_form(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedsqueeze.cli import main

    out = tmp_path / "rows.json"
    args = ["bench", "bigmodel", "--dataplane", "--params", "200K", "--specs", "lossless"]
    assert main([*args, "--layers", "2", "--dir", str(tmp_path), "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["exact"] is True and row["server"]["encoded_bytes"] > 0
    assert row["server"]["peak_anon"] > 0 and row["client"]["baseline_anon"] > 0
    assert not row["client"]["spooled"]  # 800 kB: below the threshold, in memory
    assert "data plane" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["rows.json"]  # files removed
