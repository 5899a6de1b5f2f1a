"""Federated rounds end to end on Flower's simulation engine, over the real data plane.

Each run is a subprocess with a hard timeout: a misconfigured Flower simulation logs an
error and then hangs instead of failing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.subproc import run_module


def _run(tmp_path: Path, *flags: str) -> dict:  # type: ignore[type-arg]
    out = tmp_path / "state-out.json"
    proc = run_module(
        "tests.integration.faulty_run",
        str(tmp_path / "state"),
        str(out),
        *flags,
        timeout=420,
        ray=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rounds_raise_accuracy_count_bytes_and_resume_after_a_stop(tmp_path: Path) -> None:
    first = _run(tmp_path, "--rounds", "2")
    assert first["completed_round"] == 2
    state = _run(tmp_path, "--rounds", "3", "--resume")
    metrics = state["round_metrics"]
    assert (
        metrics["1"] == first["round_metrics"]["1"] and metrics["2"] == first["round_metrics"]["2"]
    )
    assert state["completed_round"] == 3
    assert metrics["3"]["accuracy"] > metrics["1"]["accuracy"]
    for r in ("1", "2", "3"):
        assert metrics[r]["updates-accepted"] == 4
        assert metrics[r]["bytes-up"] > 0
    # round 1 rebuilds the initial model from the shared seed: only a manifest comes down
    assert metrics["1"]["bytes-down"] < 4 * 2000
    assert metrics["2"]["bytes-down"] > metrics["1"]["bytes-down"]
    assert len(list((tmp_path / "state" / "versions").glob("*.fsq"))) >= 3


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_dead_edge_and_lost_upload_are_dropped_and_they_rejoin(tmp_path: Path) -> None:
    state = _run(tmp_path, "--faults")
    metrics = state["round_metrics"]
    assert state["completed_round"] == 3
    # round 2: one edge crashed (an error reply), one upload never arrived (rejected)
    assert metrics["2"]["updates-accepted"] == 2
    assert metrics["2"]["updates-rejected"] == 1
    # round 3: both are back, each fetching a delta from whatever version it holds
    assert metrics["3"]["updates-accepted"] == 4
    assert metrics["3"]["accuracy"] > metrics["1"]["accuracy"]


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_an_existing_flower_app_gains_compression_with_the_mod_and_wrapper() -> None:
    proc = run_module("tests.integration.dropin_app", timeout=420, ray=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # "round R: mse M[, D B down, U B up, A updates]", one line per round (README's example)
    pattern = r"^round (\d+): mse ([0-9.]+)(?:, (\d+) B down, (\d+) B up, (\d+) updates)?$"
    mse: dict[int, float] = {}
    moved: dict[int, tuple[int, int, int]] = {}
    for m in re.finditer(pattern, proc.stdout, re.MULTILINE):
        mse[int(m[1])] = float(m[2])
        if m[3]:
            moved[int(m[1])] = (int(m[3]), int(m[4]), int(m[5]))
    assert sorted(mse) == [0, 1, 2, 3] and sorted(moved) == [1, 2, 3], proc.stdout[-2000:]
    assert mse[3] < mse[0] / 2  # it learned
    fp32_bytes = (8 * 16 + 16 + 16 + 1) * 4
    for down, up, accepted in moved.values():
        assert accepted == 2
        assert 0 < up < 2 * fp32_bytes  # compressed updates, counted on the wire
        assert down > 0


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_a_run_where_every_fetch_fails_is_logged_counted_and_fails(tmp_path: Path) -> None:
    out = tmp_path / "state-out.json"
    proc = run_module(
        "tests.integration.faulty_run",
        str(tmp_path / "state"),
        str(out),
        "--no-fetch",
        "--rounds",
        "3",
        timeout=420,
        ray=True,
    )
    assert proc.returncode == 3, proc.stderr[-4000:]
    state = json.loads(out.read_text())
    # max-failed-rounds = 0: the run stops after the first round that trained nothing
    assert state["completed_round"] == 1
    metrics = state["round_metrics"]["1"]
    assert metrics["round-failed"] == 1.0 and metrics["updates-accepted"] == 0.0
    assert metrics["edges-failed"] == 4.0
    assert "round 1 FAILED, it aggregated nothing: 0 updates accepted; 4 edges failed" in (
        proc.stderr
    )
    assert "unreachable" in proc.stderr
    assert "run failed: round 1 aggregated nothing (4 edges failed" in proc.stderr
