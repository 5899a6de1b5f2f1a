"""Bytes to the sweep's target and to the steadier one, from results.csv files."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from simulations.target_ratios import Curve, main, read_curves, targets


def _write(path: Path, arms: dict[str, list[tuple[float, int]]]) -> None:
    path.parent.mkdir(parents=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["arm", "round", "accuracy", "cumulative_bytes"])
        for arm, rows in arms.items():
            for i, (acc, cum) in enumerate(rows):
                writer.writerow([arm, i + 1, acc, cum])


def test_targets_and_first_rounds() -> None:
    base = Curve((0.5, 0.8, 0.9, 0.95, 0.93, 0.96), (10, 20, 30, 40, 50, 60))
    final, steady = targets(base, 0.01, 5)
    assert final == pytest.approx(0.95)
    assert steady == pytest.approx((0.8 + 0.9 + 0.95 + 0.93 + 0.96) / 5 - 0.01)
    assert base.reach(final) == (4, 40) and base.reach(steady) == (3, 30)
    assert base.reach(0.99) is None


def test_rounds_are_read_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "seed-0" / "results.csv"
    path.parent.mkdir(parents=True)
    path.write_text("arm,round,accuracy,cumulative_bytes\nx,0,0.1,0\nx,1,0.5,10\nx,2,0.9,20\n")
    assert read_curves(path)["x"].reach(0.8) == (2, 20)


def test_table_and_medians(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = [(0.5, 100), (0.8, 200), (0.9, 300), (0.95, 400), (0.93, 500), (0.96, 600)]
    for seed, arm in ((0, [(0.9, 1), (0.96, 2)]), (1, [(0.85, 4), (0.9, 8)])):
        _write(tmp_path / f"seed-{seed}" / "results.csv", {"fedavg-fp32": base, "x": arm})
    assert set(read_curves(tmp_path / "seed-0" / "results.csv")) == {"fedavg-fp32", "x"}
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # seed 0: target 0.95 at round 2 (2 B) against 400 B; steady 0.898 at round 1
    assert "200.0× (round 2 / 4)" in out and "300.0× (round 1 / 3)" in out
    # seed 1 never reaches 0.95; reaches the steady target at round 2 (8 B)
    assert "never" in out and "37.5× (round 2 / 3)" in out
    assert "– (1 seeds never)" in out and "**168.8×** (min 37.5×)" in out


def test_baseline_from_another_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = [(0.5, 100), (0.8, 200), (0.9, 300), (0.95, 400), (0.93, 500), (0.96, 600)]
    _write(tmp_path / "base" / "seed-0" / "results.csv", {"fedavg-fp32": base})
    _write(tmp_path / "new" / "seed-0" / "results.csv", {"x": [(0.9, 1), (0.96, 2)]})
    _write(tmp_path / "new" / "seed-1" / "results.csv", {"x": [(0.9, 1)]})
    with pytest.raises(SystemExit, match="seed-1"):
        main([str(tmp_path / "new"), "--baseline-from", str(tmp_path / "base")])
    (tmp_path / "new" / "seed-1" / "results.csv").unlink()
    capsys.readouterr()
    assert main([str(tmp_path / "new"), "--baseline-from", str(tmp_path / "base")]) == 0
    assert "200.0× (round 2 / 4)" in capsys.readouterr().out
