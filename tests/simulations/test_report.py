"""The summary tables the simulate and sweep commands print."""

from __future__ import annotations

from rich.console import Console

from simulations.report import summary_table
from simulations.results import ArmSummary, SweepSummary


def _arm(name: str, **ratios: float | int | None) -> ArmSummary:
    values: dict[str, float | int | None] = {
        "rounds_to_target": None,
        "bytes_to_target": None,
        "time_to_target_s": None,
        "ratio_bytes_to_target": None,
        "ratio_total_bytes": None,
        "ratio_time_to_target": None,
        **ratios,
    }
    return ArmSummary(
        arm=name,
        description="",
        final_accuracy=0.8123,
        best_accuracy=0.8456,
        total_bytes=3_500_000,
        total_bytes_down=2_000_000,
        total_bytes_up=1_500_000,
        sim_time_s=42.25,
        clients_dropped=1,
        clients_skipped=2,
        wall_s=12.5,
        **values,  # type: ignore[arg-type]
    )


def _text(summary: SweepSummary) -> str:
    console = Console(width=200, record=True)
    console.print(summary_table(summary))
    return console.export_text()


def test_one_arm_without_the_baseline_shows_bytes_accuracy_and_time() -> None:
    text = _text(SweepSummary("smoke", 0, "fedavg-fp32", None, (_arm("adaptive"),)))
    assert "n/a" not in text and "never" not in text and "–" not in text
    assert "without fedavg-fp32, so no target or ratios" in text
    row = next(line for line in text.splitlines() if "adaptive" in line)
    for figure in ("0.8123", "0.8456", "2.000", "1.500", "3.500", "42.2", "12.5"):
        assert figure in row, figure


def test_a_sweep_with_the_baseline_shows_the_target_and_ratios() -> None:
    arms = (_arm("fedavg-fp32", ratio_total_bytes=1.0), _arm("int8", ratio_total_bytes=3.9))
    text = _text(SweepSummary("smoke", 0, "fedavg-fp32", 0.8, arms))
    assert "target accuracy 0.8000" in text and "3.9×" in text
