"""A model of a few hundred MB encoded and decoded from files in bounded memory.

Each action runs in a fresh subprocess (``fedsqueeze.bench.bigmodel --child``) whose
anonymous memory the parent polls (:mod:`fedsqueeze.bench.memprobe`): the peak beyond the
child's baseline after its imports must stay within 10% of the model's size plus a fixed
allowance of 16 MiB for what any run takes whatever the model (zstd contexts, thread
stacks, allocator arenas, torch's first kernels). Nothing here measures or asserts a time.
The model's largest tensor is 4% of it: one tensor's working memory is most of the peak.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from fedsqueeze.bench.bigmodel import model_shapes, write_model
from fedsqueeze.bench.memprobe import run_measured

ALLOWANCE = 16 << 20
SHARE = 0.10
PARAMS = 60_000_000  # about 240 MB of fp32


def _child(*args: str) -> int:
    measured = run_measured(["-m", "fedsqueeze.bench.bigmodel", "--child", *args], timeout=900)
    assert measured.returncode == 0, measured.stderr[-2000:]
    assert measured.report["baseline_anon"] > 0
    return measured.extra


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_encode_and_decode_stay_within_a_tenth_of_the_model(tmp_path: Path) -> None:
    shapes = model_shapes(PARAMS, 8)
    model = tmp_path / "model.safetensors"
    raw = 4 * write_model(model, shapes)
    assert max(4 * math.prod(s) for _n, s in shapes) < SHARE * raw / 2
    bound = SHARE * raw + ALLOWANCE
    # int8 and lossless hold the bound both ways; block-wise NF4, pruning, top-k,
    # k-means and levels are measured at 1B parameters by `fedsqueeze bench bigmodel`
    # (BENCHMARKS.md, "Every spec at 1B parameters": NF4's encode keeps a per-worker
    # scratch of about 50 MB whatever the model, over the fixed allowance at this size)
    for spec in ("int8", "lossless"):
        encoded, decoded = tmp_path / "m.fsq", tmp_path / "out.safetensors"
        extra = _child("encode", str(model), str(encoded), "--spec", spec)
        assert extra <= bound, f"{spec} encode: {extra / 1e6:.1f} MB beyond the input"
        extra = _child("decode", str(encoded), str(decoded))
        assert extra <= bound, f"{spec} decode: {extra / 1e6:.1f} MB beyond input and output"
        assert decoded.stat().st_size > raw


@pytest.mark.slow  # 68 s on the shared machine (4 fresh subprocesses), 15 s of CPU
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_bench_runs_in_short_form(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedsqueeze.cli import main

    out = tmp_path / "rows.json"
    args = ["bench", "bigmodel", "--params", "200K", "--specs", "lossless", "--layers", "2"]
    assert main([*args, "--dir", str(tmp_path), "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["exact"] is True and row["encoded_bytes"] > 0
    assert row["encode"]["peak_anon"] > 0 and row["decode"]["baseline_anon"] > 0
    assert "bounded memory" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["rows.json"]  # model files removed
