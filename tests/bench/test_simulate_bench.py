"""``fedsqueeze bench simulate``: the table's ratios, and the quick form end to end."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fedsqueeze.bench.simulate import SimRun, format_table, table
from tests.subproc import run_module

GIB = 2**30


def _run(arm: str, clients: int, wall: float, peak: float, repeat: int = 0) -> SimRun:
    return SimRun(arm, clients, repeat, wall, int(peak * GIB), int(peak * GIB / 4))


def test_ratios_are_against_flower_at_the_same_scale_and_the_arm_at_the_fewest() -> None:
    runs = [
        _run("flower", 100, 20.0, 2.0),
        _run("flower", 100, 22.0, 2.0, repeat=1),
        _run("adaptive", 100, 30.0, 2.0),
        _run("adaptive", 100, 34.0, 2.2, repeat=1),
        _run("flower", 1000, 25.0, 2.0),
        _run("adaptive", 1000, 30.0, 2.3),
    ]
    rows = {(r["clients"], r["arm"]): r for r in table(runs)}
    assert rows[100, "flower"]["wall_s"] == 21.0
    assert rows[100, "adaptive"]["wall_vs_flower"] == pytest.approx(32.0 / 21.0)
    assert rows[1000, "adaptive"]["wall_vs_flower"] == pytest.approx(30.0 / 25.0)
    assert rows[1000, "adaptive"]["peak_vs_smallest"] == pytest.approx(2.3 / 2.1)
    assert "| 1,000 | adaptive | 30.0 (30.0–30.0) | 1.20× |" in format_table(table(runs))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_quick_benchmark_runs() -> None:
    proc = run_module(
        "fedsqueeze", "bench", "simulate", "--quick", "--arms", "flower,adaptive", timeout=360
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| 20 | flower |" in proc.stdout and "| 20 | adaptive |" in proc.stdout


def test_each_run_starts_its_own_ray_even_with_ray_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Starting Ray is part of what the benchmark measures: a shared cluster would hide it.
    import subprocess

    from fedsqueeze.bench import simulate

    seen: dict[str, str] = {}

    class Child:
        pid = 0
        returncode = 0

        def __init__(self, cmd: list[str], env: dict[str, str], **kwargs: object) -> None:
            seen.update(env)

        def communicate(self, timeout: float | None = None) -> tuple[str, str]:
            run = SimRun("flower", 20, 0, 1.0, 1, 1)
            return "SIMBENCH-RESULT " + json.dumps(dataclasses.asdict(run)) + "\n", ""

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setattr(subprocess, "Popen", Child)
    monkeypatch.setattr("os.killpg", lambda pid, sig: None)
    assert simulate._spawn("flower", "scale", ["num-clients=20"], 60).wall_s == 1.0
    assert "RAY_ADDRESS" not in seen and "PATH" in seen
