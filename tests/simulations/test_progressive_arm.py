"""The ``progressive`` sweep arm end to end: 2 rounds, 6 clients, a round deadline.

Budgets and the deadline truncate each client's download instead of skipping or
dropping it; the sweep also writes its prefix curve. A subprocess with a hard timeout.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.subproc import run_module


@pytest.mark.timeout(400)
def test_progressive_arm_skips_and_drops_nobody(tmp_path: Path) -> None:
    args = ["sweep", "--config", "smoke", "--out", str(tmp_path)]
    for s in ("arms=progressive", "num-rounds=2", "deadline-s=10", "compute-s=0.5"):
        args += ["--set", s]
    proc = run_module("tests.simulations.cli_run", *args, timeout=380, ray=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with (tmp_path / "results.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["round"] != "0"]
    assert len(rows) == 2
    for row in rows:
        assert row["clients_skipped"] == row["clients_dropped"] == row["clients_failed"] == "0"
        # 3 clients a round, each within 3.7 kB down (data plane) as the arm's budget says.
        assert int(row["data_bytes_down"]) <= 3 * 3700
    with (tmp_path / "clients.csv").open() as fh:
        clients = [r for r in csv.DictReader(fh) if r["round"] == "2"]
    # a rung of the progressive ladder, each client within its 3.7 kB on the wire
    assert all("levels=1+1" in r["down_spec"] for r in clients)
    assert all(int(r["data_bytes_down"]) <= 3700 for r in clients)
    with (tmp_path / "prefix_curve.csv").open() as fh:
        curve = list(csv.DictReader(fh))
    sizes = [int(r["bytes"]) for r in curve]
    assert len(curve) >= 8 and sizes == sorted(sizes)
    # each point is a real evaluation: a count of the 360 digits test images
    for r in curve:
        correct = float(r["accuracy"]) * 360
        assert 0 <= round(correct) <= 360 and abs(correct - round(correct)) < 0.01
