"""Rows, targets, ratios and the files they go to, on made-up runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from simulations.baselines import ArmConfig
from simulations.clock import RoundTime
from simulations.grid import RoundTraffic
from simulations.plots import ACCURACY_VS_MB, ACCURACY_VS_TIME, write_plots
from simulations.results import RoundRecord, round_records, summarize, write_all
from simulations.server import ArmRun


def _run(name: str, accs: list[float], per_round: int, seconds: float, dropped: int = 0) -> ArmRun:
    run = ArmRun(ArmConfig(name))
    run.accuracy = dict(enumerate(accs))
    run.loss = {r: 1.0 - a for r, a in run.accuracy.items()}
    for r in range(1, len(accs)):
        run.traffic[r] = RoundTraffic(
            server_round=r,
            sampled=(0, 1),
            skipped=(),
            failed=(),
            dropped=tuple(range(dropped)),
            control_down=per_round // 4,
            control_up=per_round // 4,
            data_down=per_round // 4,
            data_up=per_round // 4,
            time=RoundTime(seconds, {}, tuple(range(dropped))),
        )
    return run


RUNS = [
    _run("base", [0.1, 0.5, 0.8, 0.9, 0.95], per_round=1000, seconds=10.0),
    _run("small", [0.1, 0.3, 0.6, 0.85, 0.94], per_round=20, seconds=2.0, dropped=1),
    _run("never", [0.1, 0.2, 0.3, 0.4, 0.5], per_round=10, seconds=1.0),
]


def test_rows_accumulate_bytes_and_time() -> None:
    rows = [r for r in round_records(RUNS) if r.arm == "base"]
    assert [r.round for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0].cumulative_bytes == 0 and rows[0].sim_time_s == 0
    assert [r.cumulative_bytes for r in rows] == [0, 1000, 2000, 3000, 4000]
    assert rows[-1].sim_time_s == 40.0 and rows[1].bytes_down == 500


def test_target_and_ratios() -> None:
    summary = summarize(round_records(RUNS), config="t", seed=0, baseline="base", target_drop=0.01)
    assert summary.target_accuracy == pytest.approx(0.94)
    by = {a.arm: a for a in summary.arms}
    assert by["base"].rounds_to_target == 4 and by["base"].bytes_to_target == 4000
    assert by["base"].ratio_bytes_to_target == 1.0
    assert by["small"].rounds_to_target == 4 and by["small"].bytes_to_target == 80
    assert by["small"].ratio_bytes_to_target == pytest.approx(50.0)
    assert by["small"].ratio_total_bytes == pytest.approx(50.0)
    assert by["small"].ratio_time_to_target == pytest.approx(5.0)
    assert by["small"].clients_dropped == 4
    assert by["never"].bytes_to_target is None and by["never"].ratio_bytes_to_target is None
    no_base = summarize(
        round_records(RUNS[1:]), config="t", seed=0, baseline="base", target_drop=0.01
    )
    assert no_base.target_accuracy is None
    assert all(a.ratio_total_bytes is None for a in no_base.arms)


def test_files_and_columns(tmp_path: Path) -> None:
    rows = round_records(RUNS)
    summary = summarize(rows, config="t", seed=0, baseline="base", target_drop=0.01)
    write_all(tmp_path, rows, summary)
    with (tmp_path / "results.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == list(RoundRecord.__dataclass_fields__)
    assert len(table) == 15
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["baseline"] == "base" and len(doc["arms"]) == 3
    md = (tmp_path / "summary.md").read_text()
    assert "| small |" in md and "50.0×" in md and "never" in md
    paths = write_plots(tmp_path, rows, summary.target_accuracy, "t")
    assert [p.name for p in paths] == [ACCURACY_VS_MB, ACCURACY_VS_TIME]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
