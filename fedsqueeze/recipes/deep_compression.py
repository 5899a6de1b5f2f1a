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
import enum
import logging
import time
from collections.abc import Callable, Iterator, Mapping
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
from fedsqueeze.recipes.weight_sharing import finetune_centroids, share_weights, shared_state
from fedsqueeze.tasks import Task

__all__ = [
    "QUICK_CONFIG",
    "CompressionResult",
    "DeepCompressionConfig",
    "ProgressFn",
    "Stage",
    "StepRecord",
    "compress_task",
    "recipe_spec",
]

logger = logging.getLogger(__name__)


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
    """What :func:`compress_task` does; the defaults reproduce FINDINGS.md's best setting.

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
    finetune_epochs: int = 15
    finetune_lr: float = 0.02
    finetune_batch_size: int = 64
    bits: int = 3
    centroid_epochs: int = 15
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
            self.dense_epochs
            + len(self.schedule) * self.finetune_epochs
            + self.centroid_epochs
            + 1
        )


QUICK_CONFIG = DeepCompressionConfig(
    dense_epochs=12,
    schedule=(0.6, 0.85, 0.95),
    finetune_epochs=6,
    centroid_epochs=6,
)
"""A shorter schedule for demos and tests (about a third of the default's work)."""


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


def _run(task: Task, cfg: DeepCompressionConfig, seed: int, progress: ProgressFn) -> CompressionResult:
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
    )  # fmt: skip
    compressed = shared_state(model, shared)
    if cfg.bias_format is not FloatFormat.FP32:
        compressed = {
            name: _round_float(t, cfg.bias_format) if name not in shared else t
            for name, t in compressed.items()
        }
    model.load_state_dict(compressed)
    tick(Stage.SHARE)
    share_sparsity = _sparsity(compressed, targets)
    history.append(
        StepRecord(Stage.SHARE, share_sparsity, accuracy(), time.perf_counter() - t0)
    )

    t0 = time.perf_counter()
    encoded = encode_state(compressed, spec)
    blob = encoded.to_bytes()
    decoded = decode_state(EncodedModel.from_bytes(blob))
    matches = _states_equal(decoded, compressed)
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
            Stage.ENCODE, _sparsity(decoded, targets), final_accuracy, time.perf_counter() - t0
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


def _round_float(t: Tensor, fmt: FloatFormat) -> Tensor:
    if not t.is_floating_point():
        return t
    return t.to(_FLOAT_DTYPES[fmt]).to(t.dtype)


def _sparsity(state: Mapping[str, Tensor], names: list[str]) -> float:
    total = sum(state[n].numel() for n in names)
    zeros = sum(int((state[n] == 0).sum()) for n in names)
    return zeros / total if total else 0.0


def _states_equal(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _max_diff(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    return max(
        (float((a[k].double() - b[k].double()).abs().max()) for k in a if k in b and a[k].numel()),
        default=0.0,
    )
