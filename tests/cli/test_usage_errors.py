"""Usage errors of the run commands.

Each must end with exit status 2 and one line on stderr naming the problem: no
traceback, and nothing written (no output folder, no JSON, no state directory). The
first runs as the real command in a subprocess, the rest in this process
(:func:`tests.cli.inproc.run_cli`: the same ``main``, without importing torch each time).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.inproc import run_cli
from tests.subproc import run_module


def _usage_error(*argv: str, real: bool = False) -> str:
    proc = run_module("fedsqueeze", *argv, timeout=120) if real else run_cli(*argv)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


def test_sweep_refuses_an_unknown_arm_and_lists_the_known_ones(tmp_path: Path) -> None:
    out = tmp_path / "out"
    line = _usage_error("sweep", "--set", "arms=fedavg-fp32,nosuch", "--out", str(out), real=True)
    assert "unknown arm 'nosuch'" in line
    assert "fedavg-fp32, fp16, int8, topk-ef, adaptive" in line
    assert not out.exists()


def test_simulate_refuses_an_unknown_arm_in_arms(tmp_path: Path) -> None:
    out = tmp_path / "out"
    line = _usage_error("simulate", "--config", "smoke", "--set", "arms=nosuch", "--out", str(out))
    assert "unknown arm 'nosuch'" in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--payload-mb", "0"), ("--payload-mb", "-1"), ("--fanout-mb", "0"), ("--runs", "0")],
)
def test_bench_transport_refuses_sizes_it_cannot_use(tmp_path: Path, flag: str, value: str) -> None:
    report = tmp_path / "bench.json"
    line = _usage_error("bench", "transport", flag, value, "--json", str(report))
    assert f"{flag} must be" in line
    assert not report.exists()


@pytest.mark.parametrize("value", ["0", "64,-1", "x", "nan"])
def test_bench_transport_refuses_flower_sizes_it_cannot_use(tmp_path: Path, value: str) -> None:
    report = tmp_path / "bench.json"
    line = _usage_error("bench", "transport", "--flower-mb", value, "--json", str(report))
    assert "--flower-mb" in line
    assert not report.exists()


def test_bench_transport_flower_only_needs_sizes(tmp_path: Path) -> None:
    line = _usage_error("bench", "transport", "--flower-only", "--flower-mb", "none")
    assert "--flower-only needs sizes in --flower-mb" in line


def test_coordinator_needs_at_least_one_node(tmp_path: Path) -> None:
    state = tmp_path / "state"
    line = _usage_error("coordinator", "--min-nodes", "0", "--state-dir", str(state))
    assert line.endswith("--min-nodes must be >= 1, got 0")
    assert not state.exists()


def test_bench_progressive_refuses_an_unknown_part(tmp_path: Path) -> None:
    report = tmp_path / "p.json"
    line = _usage_error("bench", "progressive", "--parts", "gptq,nosuch", "--json", str(report))
    assert "unknown parts ['nosuch']" in line and "gptq" in line
    assert not report.exists()
