"""The honest baseline beside the distilled student (BENCHMARKS.md, "Students").

The same student architecture trained **with labels** on the whole training split (no
teacher, no proxy set) and compressed by the plain Deep Compression recipe with the student's
schedule (:func:`fedsqueeze.recipes.compress_task` with ``build_model=task.build_student`` and
:data:`coordinator.student_recipe.STUDENT_RECIPE`; every training step cross-entropy).

``--shift N`` gives it the distilled recipe's augmentation, the fair comparison: every training
epoch (dense and fine-tuning) also sees one copy of every image translated by a random
``-N..N`` pixels (``coordinator.distill.translate``, fresh offsets each epoch, drawn from the
epoch's seed), keeping its label. The centroid tuning sees the plain split in both.

    python -m tests.coordinator.student_baseline_probe --seeds 0,1,2 --shift 1

Prints one line per seed: dense and decoded test accuracy, and the encoded bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from coordinator.distill import translate
from coordinator.student_recipe import STUDENT_RECIPE
from fedsqueeze.recipes import compress_task
from fedsqueeze.tasks import Task, TrainResult, get_task


def with_translations(task: Task, shift: int) -> Task:
    """``task`` whose student is the model and whose training adds translated copies."""
    if task.build_student is None:
        raise ValueError(f"task {task.name!r} has no student")
    if shift == 0:
        return dataclasses.replace(task, build_model=task.build_student)
    train = task.train

    def train_translated(
        model: nn.Module, x: Tensor, y: Tensor, *, seed: int, **kw: Any
    ) -> TrainResult:
        moved = translate(x, shift, torch.Generator().manual_seed(seed + 7919))
        return train(model, torch.cat([x, moved]), torch.cat([y, y]), seed=seed, **kw)

    return dataclasses.replace(task, build_model=task.build_student, train=train_translated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="digits-cnn")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--shift", type=int, default=1)
    args = parser.parse_args()
    task = with_translations(get_task(args.task), args.shift)
    for seed in (int(s) for s in args.seeds.split(",")):
        r = compress_task(task, STUDENT_RECIPE, seed=seed)
        print(
            f"{args.task} seed {seed} shift {args.shift}: dense {r.dense_accuracy:.4f}, "
            f"decoded {r.final_accuracy:.4f}, {r.encoded_bytes} B",
            flush=True,
        )


if __name__ == "__main__":
    main()
