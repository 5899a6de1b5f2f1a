"""``--no-plots`` reaches every seed of a multi-seed sweep (no engine started here)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from simulations import runner
from simulations.config import load_config


def test_run_seeds_passes_plots_to_every_seed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[dict[str, Any]] = []

    def fake_run_sweep(config: Any, **kwargs: Any) -> SimpleNamespace:
        calls.append({"seed": config.seed, **kwargs})
        return SimpleNamespace(summary=None)

    monkeypatch.setattr(runner, "run_sweep", fake_run_sweep)
    monkeypatch.setattr(runner, "median_summary", lambda summaries: {})
    monkeypatch.setattr(runner, "write_medians", lambda *a: None)
    config = load_config(None, ["arms=fedavg-fp32"])
    runner.run_seeds(config, [0, 1], out_dir=tmp_path, plots=False)
    assert [(c["seed"], c["plots"]) for c in calls] == [(0, False), (1, False)]
    assert [c["out_dir"] for c in calls] == [tmp_path / "seed-0", tmp_path / "seed-1"]
    calls.clear()
    runner.run_seeds(config, [3], out_dir=tmp_path)
    assert calls[0]["plots"] is True


@pytest.mark.parametrize(("flag", "plots"), [(["--no-plots"], False), ([], True)])
def test_the_sweep_command_hands_no_plots_to_a_multi_seed_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flag: list[str], plots: bool
) -> None:
    from fedsqueeze.cli import main

    seen: dict[str, Any] = {}

    def fake_run_seeds(config: Any, seeds: Any, **kwargs: Any) -> tuple[list[Any], dict[str, Any]]:
        seen.update(kwargs, seeds=list(seeds))
        return [], {}

    monkeypatch.setattr(runner, "run_seeds", fake_run_seeds)
    args = ["sweep", "--seeds", "0,1", "--set", "arms=fedavg-fp32", "--out", str(tmp_path)]
    assert main([*args, *flag]) == 0
    assert seen["seeds"] == [0, 1] and seen["plots"] is plots
