"""End-to-end compression recipes built on the codec and the tasks.

:func:`compress_task` runs Deep Compression (prune → fine-tune → trained quantization →
entropy coding) on a task's model and reports the decoded model's accuracy and size.
"""

from __future__ import annotations

from fedsqueeze.recipes.config import QUICK_CONFIG, DeepCompressionConfig, ProgressFn, Stage
from fedsqueeze.recipes.deep_compression import (
    CompressionResult,
    StepRecord,
    compress_task,
    recipe_spec,
)
from fedsqueeze.recipes.weight_sharing import (
    SharedTensor,
    finetune_centroids,
    share_weights,
    shared_state,
)

__all__ = [
    "QUICK_CONFIG",
    "CompressionResult",
    "DeepCompressionConfig",
    "ProgressFn",
    "SharedTensor",
    "Stage",
    "StepRecord",
    "compress_task",
    "finetune_centroids",
    "recipe_spec",
    "share_weights",
    "shared_state",
]
