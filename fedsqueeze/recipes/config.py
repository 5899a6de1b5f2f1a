"""The knobs of the Deep Compression recipe and the stages it reports progress in."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from fedsqueeze.codec import FloatFormat

__all__ = ["QUICK_CONFIG", "DeepCompressionConfig", "ProgressFn", "Stage"]


class Stage(enum.Enum):
    """The steps of the recipe, in order."""

    DENSE = "dense training"
    PRUNE = "prune + fine-tune"
    SHARE = "weight sharing"
    ENCODE = "encode + decode"


ProgressFn = Callable[[Stage, int, int], None]
"""Called as ``progress(stage, done, total)`` after every unit of work (an epoch, mostly)."""


@dataclass(frozen=True)
class DeepCompressionConfig:
    """What :func:`~fedsqueeze.recipes.compress_task` does.

    The defaults follow FINDINGS.md's best setting (global sparsity 0.95 reached in four
    steps, 3-bit weight sharing with centroid fine-tuning, fp16 biases) with shorter
    fine-tuning (25 epochs per step instead of 40), which keeps one run near 30 s on 2 cores.

    Attributes
    ----------
    dense_epochs : int
        Epochs of dense training (SGD, momentum 0.9, batch ``batch_size``).
    lr : float
        Learning rate of dense training.
    batch_size : int
        Batch size of dense training.
    schedule : tuple[float, ...]
        Global sparsities of the iterative pruning steps, strictly increasing in ``(0, 1)``.
    finetune_epochs : int
        Epochs of fine-tuning (masks fixed) after every pruning step.
    finetune_lr : float
        Learning rate of that fine-tuning (SGD, momentum 0.9).
    finetune_batch_size : int
        Its batch size.
    bits : int
        Code width of weight sharing: ``2^bits`` shared values per weight tensor (2, 3, 4, 8).
    centroid_epochs : int
        Epochs of centroid fine-tuning (Adam).
    centroid_lr : float
        Adam's learning rate for the centroids (and the biases).
    centroid_batch_size : int
        Its batch size.
    bias_format : FloatFormat
        How the tensors that are not shared (biases) travel; :attr:`FloatFormat.FP16` rounds
        them before the final evaluation, so the decoded model is exactly the trained one.
    entropy_level : int
        zstandard level of the encoded records.
    num_threads : int or None
        ``torch.set_num_threads`` while the recipe runs (restored afterwards): results depend
        on it, so it is fixed by default. ``None`` leaves the current setting.
    """

    dense_epochs: int = 30
    lr: float = 0.05
    batch_size: int = 32
    schedule: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)
    finetune_epochs: int = 25
    finetune_lr: float = 0.02
    finetune_batch_size: int = 64
    bits: int = 3
    centroid_epochs: int = 20
    centroid_lr: float = 3e-4
    centroid_batch_size: int = 64
    bias_format: FloatFormat = FloatFormat.FP16
    entropy_level: int = 22
    num_threads: int | None = 1

    def __post_init__(self) -> None:
        if not isinstance(self.bias_format, FloatFormat):
            raise TypeError(f"bias_format must be a FloatFormat, got {self.bias_format!r}")
        if min(self.dense_epochs, self.finetune_epochs, self.centroid_epochs) < 0:
            raise ValueError("epoch counts must be >= 0")
        if min(self.batch_size, self.finetune_batch_size, self.centroid_batch_size) < 1:
            raise ValueError("batch sizes must be >= 1")
        if not (self.lr > 0 and self.finetune_lr > 0 and self.centroid_lr > 0):
            raise ValueError("learning rates must be > 0")
        if not self.schedule or any(not 0.0 < s < 1.0 for s in self.schedule):
            raise ValueError(f"schedule must be sparsities in (0, 1), got {self.schedule}")
        if any(b <= a for a, b in zip(self.schedule, self.schedule[1:], strict=False)):
            raise ValueError(f"schedule must be strictly increasing, got {self.schedule}")
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, got {self.bits}")
        if not 1 <= self.entropy_level <= 22:
            raise ValueError(f"entropy_level must be in 1..22, got {self.entropy_level}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads}")

    @property
    def total_units(self) -> int:
        """How many progress units a run reports (epochs, plus one for encoding)."""
        return (
            self.dense_epochs + len(self.schedule) * self.finetune_epochs + self.centroid_epochs + 1
        )


QUICK_CONFIG = DeepCompressionConfig(
    dense_epochs=12,
    schedule=(0.6, 0.85, 0.95),
    finetune_epochs=6,
    centroid_epochs=6,
)
"""A shorter schedule for demos and tests (about a third of the default's work)."""
