"""The seed paper's whole recipe, Deep Compression (Han et al., 2016), as one function.

``train dense → iterative global magnitude pruning, fine-tuning with the masks fixed →
k-means weight sharing with centroid fine-tuning → encode with the codec (positions,
bit-packed codes, zstd)``; the reported accuracy is that of the model **decoded** from the
encoded bytes.

Example::

    from fedsqueeze.recipes import DeepCompressionConfig, compress_task
    from fedsqueeze.tasks import get_task

    result = compress_task(get_task("digits-cnn"), DeepCompressionConfig(), seed=0)
    print(result.ratio, result.dense_accuracy, result.final_accuracy)
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedsqueeze.codec import (
    CodecSpec,
    EncodedModel,
    FloatFormat,
    PruneMethod,
    PruneSpec,
    QuantScheme,
    QuantSpec,
    decode_state,
    encode_state,
)
from fedsqueeze.codec.pruning import global_magnitude_masks
from fedsqueeze.recipes.config import DeepCompressionConfig, ProgressFn, Stage
from fedsqueeze.recipes.weight_sharing import finetune_centroids, share_weights, shared_state
from fedsqueeze.tasks import Task

__all__ = [
    "CompressionResult",
    "StepRecord",
    "compress_task",
    "recipe_spec",
    "round_float",
    "state_sparsity",
    "states_equal",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepRecord:
    """One row of a run's history.

    Attributes
    ----------
    stage : Stage
        Which step.
    sparsity : float
        Fraction of the shared/pruned weights that are zero after the step.
    accuracy : float
        Test accuracy after the step, in ``[0, 1]``.
    seconds : float
        Wall-clock time of the step.
    """

    stage: Stage
    sparsity: float
    accuracy: float
    seconds: float


@dataclass(frozen=True)
class CompressionResult:
    """What :func:`compress_task` reports.

    Attributes
    ----------
    task : str
        The task's name.
    seed : int
        The seed of the model and of the training.
    config : DeepCompressionConfig
        The configuration used.
    dense_accuracy : float
        Test accuracy of the dense model.
    final_accuracy : float
        Test accuracy of the model decoded from :attr:`encoded`.
    encoded_bytes : int
        Length of ``encoded.to_bytes()``.
    fp32_bytes : int
        Size of the model's floating tensors as fp32 (4 bytes per value).
    spec : CodecSpec
        The spec the model was encoded with.
    encoded : EncodedModel
        The encoded model.
    history : tuple[StepRecord, ...]
        Accuracy, sparsity and time after every step.
    decoded_matches : bool
        Whether the decoded weights equal the fine-tuned shared weights exactly.
    seconds : float
        Wall-clock time of the whole run.
    num_threads : int
        ``torch.get_num_threads()`` during the run.
    dense_state : Mapping[str, Tensor]
        The dense model's weights (for comparisons).
    compressed_state : Mapping[str, Tensor]
        The model handed to the encoder (shared weights, rounded biases).
    """

    task: str
    seed: int
    config: DeepCompressionConfig
    dense_accuracy: float
    final_accuracy: float
    encoded_bytes: int
    fp32_bytes: int
    spec: CodecSpec
    encoded: EncodedModel = field(repr=False)
    history: tuple[StepRecord, ...] = field(repr=False)
    decoded_matches: bool
    seconds: float
    num_threads: int
    dense_state: Mapping[str, Tensor] = field(repr=False, compare=False)
    compressed_state: Mapping[str, Tensor] = field(repr=False, compare=False)

    @property
    def ratio(self) -> float:
        """``fp32_bytes / encoded_bytes``."""
        return self.fp32_bytes / self.encoded_bytes

    @property
    def accuracy_loss(self) -> float:
        """``dense_accuracy − final_accuracy`` (a fraction; ×100 for points)."""
        return self.dense_accuracy - self.final_accuracy


def recipe_spec(config: DeepCompressionConfig) -> CodecSpec:
    """The codec spec that stores the recipe's final model.

    Global magnitude pruning at the schedule's last sparsity finds exactly the recipe's
    zeros (they are the smallest magnitudes, and the shared values are never zero);
    k-means with ``2^bits`` centroids finds exactly the shared values.
    """
    return CodecSpec(
        prune=PruneSpec(PruneMethod.L1_GLOBAL, config.schedule[-1]),
        quant=QuantSpec(config.bits, QuantScheme.KMEANS),
        float_format=config.bias_format,
        entropy_level=config.entropy_level,
    )


def compress_task(
    task: Task,
    config: DeepCompressionConfig | None = None,
    *,
    seed: int,
    progress: ProgressFn | None = None,
) -> CompressionResult:
    """Run Deep Compression on ``task``'s model and report the decoded model's accuracy.

    Parameters
    ----------
    task : Task
        E.g. ``get_task("digits-cnn")``.
    config : DeepCompressionConfig or None, optional
        The schedule; the defaults when ``None``.
    seed : int
        Seeds the model's initial weights and every training step.
    progress : ProgressFn or None, optional
        Called after every unit of work (see :attr:`DeepCompressionConfig.total_units`).

    Returns
    -------
    CompressionResult
        Sizes, accuracies, history and the encoded model.
    """
    cfg = config or DeepCompressionConfig()
    with _threads(cfg.num_threads):
        return _run(task, cfg, seed, progress or _no_progress)


def _run(
    task: Task, cfg: DeepCompressionConfig, seed: int, progress: ProgressFn
) -> CompressionResult:
    started = time.perf_counter()
    data = task.load_data()
    spec = recipe_spec(cfg)
    model = task.build_model(seed)
    total = cfg.total_units
    done = 0
    history: list[StepRecord] = []

    def accuracy() -> float:
        return task.evaluate(model, data.x_test, data.y_test).accuracy

    def tick(stage: Stage) -> None:
        nonlocal done
        done += 1
        progress(stage, done, total)

    t0 = time.perf_counter()
    # One train() call per epoch so progress moves; SGD's momentum restarts every epoch,
    # a small departure from one long call, accepted for the progress bar.
    for epoch in range(cfg.dense_epochs):
        task.train(
            model, data.x_train, data.y_train, epochs=1, lr=cfg.lr,
            batch_size=cfg.batch_size, seed=seed * 1000 + epoch,
        )  # fmt: skip
        tick(Stage.DENSE)
    dense_accuracy = accuracy()
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    history.append(StepRecord(Stage.DENSE, 0.0, dense_accuracy, time.perf_counter() - t0))
    logger.info("%s seed %d: dense accuracy %.4f", task.name, seed, dense_accuracy)

    targets = [
        name
        for name, p in model.named_parameters()
        if spec.is_target(name, p.ndim, p.is_floating_point())
    ]
    masks: dict[str, Tensor] = {}
    for step, sparsity in enumerate(cfg.schedule):
        t0 = time.perf_counter()
        params = dict(model.named_parameters())
        masks = global_magnitude_masks({n: params[n].detach() for n in targets}, sparsity)
        with torch.no_grad():
            for name, mask in masks.items():
                params[name].masked_fill_(~mask, 0.0)
        for epoch in range(cfg.finetune_epochs):
            task.train(
                model, data.x_train, data.y_train, epochs=1, lr=cfg.finetune_lr,
                batch_size=cfg.finetune_batch_size, seed=seed * 1000 + 100 * (step + 1) + epoch,
                masks=masks,
            )  # fmt: skip
            tick(Stage.PRUNE)
        acc = accuracy()
        history.append(StepRecord(Stage.PRUNE, sparsity, acc, time.perf_counter() - t0))
        logger.info("sparsity %.3f: accuracy %.4f", sparsity, acc)

    t0 = time.perf_counter()
    shared = share_weights(model.state_dict(), masks, cfg.bits)
    shared = finetune_centroids(
        model, shared, data.x_train, data.y_train, epochs=cfg.centroid_epochs,
        lr=cfg.centroid_lr, batch_size=cfg.centroid_batch_size, seed=seed * 1000 + 999,
        on_epoch=lambda: tick(Stage.SHARE),
    )  # fmt: skip
    compressed = shared_state(model, shared)
    if cfg.bias_format is not FloatFormat.FP32:
        compressed = {
            name: round_float(t, cfg.bias_format) if name not in shared else t
            for name, t in compressed.items()
        }
    model.load_state_dict(compressed)
    share_sparsity = state_sparsity(compressed, targets)
    history.append(StepRecord(Stage.SHARE, share_sparsity, accuracy(), time.perf_counter() - t0))

    t0 = time.perf_counter()
    encoded = encode_state(compressed, spec)
    blob = encoded.to_bytes()
    decoded = decode_state(EncodedModel.from_bytes(blob))
    matches = states_equal(decoded, compressed)
    if not matches:
        logger.warning(
            "decoded weights differ from the fine-tuned shared weights (max |diff| %.3g)",
            _max_diff(decoded, compressed),
        )
    model.load_state_dict(decoded)
    final_accuracy = accuracy()
    tick(Stage.ENCODE)
    history.append(
        StepRecord(
            Stage.ENCODE, state_sparsity(decoded, targets), final_accuracy, time.perf_counter() - t0
        )
    )
    fp32_bytes = sum(4 * t.numel() for t in compressed.values() if t.is_floating_point())
    logger.info(
        "%s seed %d: %d → %d bytes (%.1f×), accuracy %.4f → %.4f",
        task.name, seed, fp32_bytes, len(blob), fp32_bytes / len(blob),
        dense_accuracy, final_accuracy,
    )  # fmt: skip
    return CompressionResult(
        task=task.name,
        seed=seed,
        config=cfg,
        dense_accuracy=dense_accuracy,
        final_accuracy=final_accuracy,
        encoded_bytes=len(blob),
        fp32_bytes=fp32_bytes,
        spec=spec,
        encoded=encoded,
        history=tuple(history),
        decoded_matches=matches,
        seconds=time.perf_counter() - started,
        num_threads=torch.get_num_threads(),
        dense_state=dense_state,
        compressed_state=compressed,
    )


def _no_progress(stage: Stage, done: int, total: int) -> None:
    del stage, done, total


@contextlib.contextmanager
def _threads(num_threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_FLOAT_DTYPES = {
    FloatFormat.FP32: torch.float32,
    FloatFormat.FP16: torch.float16,
    FloatFormat.BF16: torch.bfloat16,
}


def round_float(t: Tensor, fmt: FloatFormat) -> Tensor:
    """``t`` rounded to the float format ``fmt`` and back to its dtype (integers as they are)."""
    if not t.is_floating_point():
        return t
    return t.to(_FLOAT_DTYPES[fmt]).to(t.dtype)


def state_sparsity(state: Mapping[str, Tensor], names: list[str]) -> float:
    """The fraction of zeros over the tensors ``names`` of ``state`` (0 when they are empty)."""
    total = sum(state[n].numel() for n in names)
    zeros = sum(int((state[n] == 0).sum()) for n in names)
    return zeros / total if total else 0.0


def states_equal(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    """Whether two state dicts have the same names and bit-equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _max_diff(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    return max(
        (float((a[k].double() - b[k].double()).abs().max()) for k in a if k in b and a[k].numel()),
        default=0.0,
    )
