"""``python -m fedsqueeze.bench.gpucheck``: its CPU dry run, exit statuses and report
(small sizes; no wall-clock thresholds)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fedsqueeze.bench import gpucheck
from fedsqueeze.codec import fused
from tests.subproc import ROOT, run_module

DRY = ["--device", "cpu", "--params", "40K,80K", "--reps", "1", "--compile", "off"]


@pytest.fixture(autouse=True)
def _restore_fused() -> object:
    types = set(fused.DEVICE_TYPES)
    yield
    fused.DEVICE_TYPES.clear()
    fused.DEVICE_TYPES.update(types)
    fused.set_compile(None)


def test_help_is_lazy() -> None:
    code = (
        "import sys\nfrom fedsqueeze.bench import gpucheck\n"
        "try:\n    gpucheck.main(['--help'])\nexcept SystemExit as e:\n    print('EXIT', e.code)\n"
        "print('HEAVY', sorted(m for m in ('torch', 'flwr', 'grpc') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert "EXIT 0" in proc.stdout and "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    assert "--device cpu --params 1M,4M" in proc.stdout or "dry run" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_without_cuda_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpucheck.main([]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA device" in out


def test_cpu_dry_run_is_equal(capsys: pytest.CaptureFixture[str]) -> None:
    # 1.1M values in the equality model: the fused sampled pruning path runs too.
    status = gpucheck.main([*DRY, "--equality-params", "1.1M", "--no-sim"])
    out = capsys.readouterr().out
    assert status == 0, out
    cases = ("copy (clone)", "int8", "nf4-block64", "select 90%", "prune90+nf4", "topk1%+int8")
    for case in (*cases, "rank8"):
        assert f"speed    {case}" in out
    assert out.count(" equal") >= len(gpucheck.EQUALITY_SPECS)
    assert "all equal" in out


def test_a_mismatch_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = fused.encode_values

    def corrupt(*args: object, **kwargs: object) -> object:
        got = real(*args, **kwargs)  # type: ignore[arg-type]
        if got is None:
            return None
        qp, packed, decoded = got
        return qp, packed ^ 1, decoded

    monkeypatch.setattr(fused, "encode_values", corrupt)
    status = gpucheck.main([*DRY, "--params", "40K", "--equality-params", "40K", "--no-sim"])
    out = capsys.readouterr().out
    assert status == 1
    assert "MISMATCH (bytes differ" in out


def test_parse_params() -> None:
    assert gpucheck.parse_params("25M,250M,1B") == [25_000_000, 250_000_000, 1_000_000_000]
    assert gpucheck.parse_params("1.5M, 40k") == [1_500_000, 40_000]
    for bad in ("", "x", "8K", "-5M"):
        with pytest.raises(ValueError, match="--params"):
            gpucheck.parse_params(bad)


def test_targets_are_judged_against_the_copy() -> None:
    rows = [
        gpucheck.Row("speed", "prune90+nf4", 250_000_000, "compiled", 2.0, 1.0, 1.0, 1),
        gpucheck.Row("speed", "prune90+nf4", 1_000_000_000, "eager", 1.0, 2.0, 1.0, 1),
        gpucheck.Row("speed", "prune90+nf4", 25_000_000, "eager", 9.0, 9.0, 1.0, 1),
        gpucheck.Row("speed", "int8", 250_000_000, "eager", 9.0, 9.0, 1.0, 1),
    ]
    lines = gpucheck.target_lines(rows)
    assert lines == [
        "target prune90+nf4 at 250M (compiled): encode 0.50x copy (met, >= 0.5), "
        "decode 1.00x (met, >= 0.6)",
        "target prune90+nf4 at 1B (eager): encode 1.00x copy (met, >= 0.5), "
        "decode 0.50x (MISSED, >= 0.6)",
    ]


@pytest.mark.slow
def test_the_whole_dry_run_with_its_simulation() -> None:
    # In its own process: Ray's workers and their files belong there.
    proc = run_module(
        "fedsqueeze.bench.gpucheck", *DRY, "--equality-params", "40K", timeout=600, ray=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "simulate digits, CPU clients (dry run)" in proc.stdout
    assert "ok: fedavg-fp32" in proc.stdout and "all equal" in proc.stdout
