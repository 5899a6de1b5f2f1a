"""The distilling Deep Compression recipe for students, on a tiny schedule."""

from __future__ import annotations

import torch

from coordinator.distill import DistillConfig
from coordinator.student_recipe import compress_student
from fedsqueeze.codec import decode_state
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
