"""The distilling Deep Compression recipe for students, on a tiny schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from coordinator.distill import DistillConfig
from coordinator.student_recipe import (
    ByteBound,
    StudentCompression,
    compress_student,
    fp32_fraction_bound,
)
from fedsqueeze.cli import main
from fedsqueeze.codec import decode_state
from fedsqueeze.errors import ConfigError
from fedsqueeze.recipes import DeepCompressionConfig
from fedsqueeze.tasks import get_task


def test_the_student_is_pruned_shared_and_decodes_to_what_was_measured() -> None:
    task = get_task("digits-cnn")
    assert task.build_student is not None
    data = task.load_data()
    seen: list[str] = []
    result = compress_student(
        task.build_model(0),
        task.build_student(0),
        data.x_train[:64],
        lambda m: task.evaluate(m, data.x_test, data.y_test).accuracy,
        distill_config=DistillConfig(epochs=1, mixup=False),
        recipe=DeepCompressionConfig(schedule=(0.5, 0.9), finetune_epochs=1, centroid_epochs=1),
        progress=lambda step, done, total: seen.append(step),
    )
    assert len(seen) == 4 and seen[0] == "distil" and seen[-1] == "share"
    decoded = decode_state(result.encoded)
    assert all(torch.equal(decoded[k], v) for k, v in result.final_state.items())
    weights = torch.cat([v.flatten() for k, v in decoded.items() if k.endswith("weight")])
    assert abs(float((weights == 0).float().mean()) - 0.9) < 0.01  # global over all weights
    assert result.encoded_bytes == len(result.encoded.to_bytes()) < result.fp32_bytes // 10
    assert [s.step for s in result.history] == [
        "distil",
        "prune 0.5",
        "prune 0.9",
        "share + encode",
    ]


def test_the_distillation_settings_reach_every_step_translated_copies_included() -> None:
    task = get_task("digits-cnn")
    assert task.build_student is not None
    data = task.load_data()
    sizes: list[int] = []
    teacher = task.build_model(0)

    class Spy(torch.nn.Module):  # the teacher, recording the batches it labels
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            sizes.append(int(x.shape[0]))
            out: torch.Tensor = teacher(x)
            return out

    compress_student(
        Spy(),
        task.build_student(0),
        data.x_train[:32],
        lambda m: 0.0,
        distill_config=DistillConfig(epochs=1, batch_size=32, shift=1),
        recipe=DeepCompressionConfig(schedule=(0.5,), finetune_epochs=1, centroid_epochs=1),
    )
    # distil and prune: the batch, its mixes, its moved copy; then the centroids' targets
    assert sizes == [96, 96, 32]


def _tiny(max_bytes: int | None, *, step: float = 0.02, max_steps: int = 10) -> StudentCompression:
    task = get_task("digits-cnn")
    assert task.build_student is not None
    data = task.load_data()
    return compress_student(
        task.build_model(0),
        task.build_student(0),
        data.x_train[:64],
        lambda m: task.evaluate(m, data.x_test, data.y_test).accuracy,
        distill_config=DistillConfig(epochs=1, mixup=False),
        recipe=DeepCompressionConfig(schedule=(0.5, 0.8), finetune_epochs=1, centroid_epochs=1),
        byte_bound=None if max_bytes is None else ByteBound(max_bytes, step, max_steps),
    )


def test_a_bound_the_schedule_misses_is_met_by_extra_pruning_steps() -> None:
    free = _tiny(None)
    assert free.extra_steps == 0 and free.sparsity == 0.8
    bound = free.encoded_bytes - 60  # a few steps of 0.02 (about 95 weights each) below
    result = _tiny(bound)
    assert result.extra_steps >= 1
    assert result.encoded_bytes == len(result.encoded.to_bytes()) <= bound
    assert result.sparsity == pytest.approx(0.8 + 0.02 * result.extra_steps)
    decoded = decode_state(result.encoded)
    assert all(torch.equal(decoded[k], v) for k, v in result.final_state.items())
    weights = torch.cat([v.flatten() for k, v in decoded.items() if k.endswith("weight")])
    assert abs(float((weights == 0).float().mean()) - result.sparsity) < 0.01
    rejected = [s for s in result.history if s.step.startswith("encode ")]
    assert len(rejected) == result.extra_steps
    assert all(int(s.step.split()[1]) > bound and math.isnan(s.accuracy) for s in rejected)
    assert rejected[0].step == f"encode {free.encoded_bytes} B"  # the same start as unbounded
    assert result.history[-1].step == "share + encode"


def test_a_bound_already_met_changes_nothing() -> None:
    free = _tiny(None)
    for bound in (free.encoded_bytes, 10**6):
        result = _tiny(bound)
        assert result.extra_steps == 0
        assert result.encoded.to_bytes() == free.encoded.to_bytes()
        assert [s.step for s in result.history] == [s.step for s in free.history]


def test_an_impossible_bound_is_a_clear_error_naming_the_bytes_reached() -> None:
    with pytest.raises(
        ConfigError,
        match=r"is \d[\d,]* B after 2 extra pruning steps .*"
        r"over the bound of 50 B",
    ):
        _tiny(50, max_steps=2)
    with pytest.raises(ConfigError, match=r"after 0 extra pruning steps"):
        _tiny(50, max_steps=0)


def test_the_bound_is_checked() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        ByteBound(0)
    with pytest.raises(ValueError, match="step"):
        ByteBound(700, step=1.0)
    with pytest.raises(ValueError, match="max_steps"):
        ByteBound(700, max_steps=-1)
    with pytest.raises(TypeError, match="max_bytes"):
        ByteBound(700.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="byte_bound"):
        compress_student(
            torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), torch.zeros(1, 1), lambda m: 0.0,
            distill_config=DistillConfig(epochs=0), recipe=DeepCompressionConfig(),
            byte_bound=765,  # type: ignore[arg-type]
        )  # fmt: skip


def test_the_200x_rule_gives_765_bytes_for_the_digits_cnn_teacher() -> None:
    teacher = get_task("digits-cnn").build_model(0)
    fp32 = 4 * sum(p.numel() for p in teacher.parameters())
    assert fp32 == 153_128 and fp32_fraction_bound(fp32) == 765
    assert fp32 / 765 >= 200 > fp32 / 766


def test_max_bytes_needs_compress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.pt"
    assert main(["distill", str(out), "--max-bytes", "700"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-bytes" in err[0] and "--compress" in err[0], err
