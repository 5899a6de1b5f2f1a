"""A compact student from a teacher: distillation, then Deep Compression with distillation.

The Deep Compression recipe (:mod:`fedsqueeze.recipes.deep_compression`) applied to a
student that never sees a label: every training step is a distillation step on the
coordinator's proxy set (:func:`coordinator.distill.distill`):

``distil the dense student → iterative global magnitude pruning, distilling with the masks
fixed → k-means weight sharing, centroids fine-tuned against the teacher's logits → encode
with the recipe's spec``; the reported accuracy is that of the student **decoded** from the
bytes, on the task's test split.

A :class:`ByteBound` makes the encoded size a guarantee rather than a property of the seed:
when the encoding after the schedule is larger than the bound, the recipe goes back to the
pruned student before sharing, prunes a little further (``step`` of global sparsity), distils
as after every scheduled step, shares, tunes the centroids and encodes again, until the
encoding fits or ``max_steps`` extra steps are spent (then a
:class:`~fedsqueeze.errors.ConfigError` names the sizes reached). The choice looks at bytes
only, never at an accuracy; a bound that the schedule already meets changes nothing (the same
bytes as without it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from numbers import Integral, Real

from torch import Tensor, nn

from coordinator.distill import DistillConfig, distill, distillation_loss, logits_of
from fedsqueeze.codec import EncodedModel, FloatFormat, decode_state, encode_state
from fedsqueeze.codec.pruning import global_magnitude_masks
from fedsqueeze.errors import ConfigError
from fedsqueeze.recipes import DeepCompressionConfig, recipe_spec
from fedsqueeze.recipes.deep_compression import round_float, state_sparsity
from fedsqueeze.recipes.weight_sharing import finetune_centroids, share_weights, shared_state

__all__ = [
    "STUDENT_RECIPE",
    "ByteBound",
    "StudentCompression",
    "StudentStep",
    "compress_student",
    "fp32_fraction_bound",
]

logger = logging.getLogger(__name__)

StudentProgressFn = Callable[[str, int, int], None]
"""Called as ``progress(step_name, done, total)`` after every epoch."""

STUDENT_RECIPE = DeepCompressionConfig(
    schedule=(0.5, 0.7, 0.8, 0.86, 0.91),
    finetune_epochs=50,
    centroid_lr=3e-3,
)
"""The schedule BENCHMARKS.md measures for the digits-cnn student: global sparsity 0.91 in
five steps (a 4,794-parameter student has less to spare than the teacher's 0.95), 50
distillation epochs after each, 3-bit sharing with centroids tuned at Adam lr 3e-3 (the proxy
set is small: few steps per epoch), fp16 biases. The distillation itself is the caller's
:class:`~coordinator.distill.DistillConfig`; the figures are with ``fedsqueeze distill``'s
(mixup and copies translated by up to one pixel, ``shift=1``: without them one seed in six
missed the 2-point bound)."""


@dataclass(frozen=True)
class ByteBound:
    """An upper bound on the encoded student's size, kept by extra pruning steps.

    Attributes
    ----------
    max_bytes : int
        The largest encoding accepted, ``>= 1`` (``len(EncodedModel.to_bytes())``).
    step : float
        Global sparsity added by each extra step, in ``(0, 1)`` (default 0.002: about ten
        of the digits-cnn student's 4,700 weights, a few bytes).
    max_steps : int
        Extra steps at most, ``>= 0``; the sparsity never reaches 1 either.
    """

    max_bytes: int
    step: float = 0.002
    max_steps: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, Integral):
            raise TypeError(f"max_bytes must be an int, got {type(self.max_bytes).__name__}")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, Integral):
            raise TypeError(f"max_steps must be an int, got {type(self.max_steps).__name__}")
        if isinstance(self.step, bool) or not isinstance(self.step, Real):
            raise TypeError(f"step must be a number, got {type(self.step).__name__}")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")
        if not 0 < self.step < 1:
            raise ValueError(f"step must be in (0, 1), got {self.step}")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")


def fp32_fraction_bound(fp32_bytes: int, ratio: float = 200.0) -> int:
    """The largest size at least ``ratio`` times smaller than ``fp32_bytes``: ``⌊fp32 / ratio⌋``.

    The issue's digits-cnn target, a student at least 200× smaller than its fp32 teacher
    (38,282 parameters, 153,128 B), gives 765 B (766 B would be 199.9×).
    """
    if fp32_bytes < 1 or not ratio > 0:
        raise ValueError(f"need fp32_bytes >= 1 and ratio > 0, got {fp32_bytes}, {ratio}")
    return int(fp32_bytes // ratio)


@dataclass(frozen=True)
class StudentStep:
    """One row of :attr:`StudentCompression.history`: a step, its sparsity and accuracy."""

    step: str
    sparsity: float
    accuracy: float


@dataclass(frozen=True, eq=False)
class StudentCompression:
    """What :func:`compress_student` returns (``eq=False``: it holds tensors).

    Attributes
    ----------
    dense_accuracy : float
        Test accuracy of the distilled dense student.
    final_accuracy : float
        Test accuracy of the student decoded from :attr:`encoded`.
    encoded : EncodedModel
        The encoded student.
    encoded_bytes : int
        ``len(encoded.to_bytes())``.
    fp32_bytes : int
        The student's floating tensors at 4 bytes per value.
    dense_state, final_state : Mapping[str, Tensor]
        The distilled dense student, and the decoded compressed one.
    history : tuple[StudentStep, ...]
        Accuracy after every step (a rejected encoding's accuracy is not measured: its row
        is ``encode N B``, accuracy NaN).
    extra_steps : int
        Pruning steps taken after the schedule to meet a :class:`ByteBound` (0 without one).
    sparsity : float
        The global sparsity the encoding was made at (the schedule's last, or beyond).
    seconds : float
        Wall-clock time.
    """

    dense_accuracy: float
    final_accuracy: float
    encoded: EncodedModel = field(repr=False)
    encoded_bytes: int
    fp32_bytes: int
    dense_state: Mapping[str, Tensor] = field(repr=False)
    final_state: Mapping[str, Tensor] = field(repr=False)
    history: tuple[StudentStep, ...] = field(repr=False)
    extra_steps: int
    sparsity: float
    seconds: float


def compress_student(
    teacher: nn.Module,
    student: nn.Module,
    x_proxy: Tensor,
    evaluate: Callable[[nn.Module], float],
    *,
    distill_config: DistillConfig,
    recipe: DeepCompressionConfig,
    progress: StudentProgressFn | None = None,
    byte_bound: ByteBound | None = None,
) -> StudentCompression:
    """Distil ``teacher`` into ``student`` on ``x_proxy`` and compress it the Deep Compression way.

    Parameters
    ----------
    teacher : nn.Module
        The trained model; not modified.
    student : nn.Module
        The student's initial weights (e.g. ``task.build_student(seed)``); not modified.
    x_proxy : Tensor
        The proxy inputs ``[N, ...]`` (no labels are used).
    evaluate : Callable[[nn.Module], float]
        Test accuracy of a model (the task's ``evaluate`` on its test split).
    distill_config : DistillConfig
        The dense distillation; the fine-tuning after each pruning step uses it with
        ``recipe.finetune_epochs`` epochs.
    recipe : DeepCompressionConfig
        Pruning schedule, code width, centroid epochs and learning rate, bias format, zstd
        level (its dense and label-based settings are not used).
    progress : StudentProgressFn or None, optional
        Called after every epoch (``total`` grows by one step's epochs with every extra step).
    byte_bound : ByteBound or None, optional
        When given, the encoding is at most ``byte_bound.max_bytes`` long: extra pruning
        steps (see the module docstring) until it fits.

    Raises
    ------
    ConfigError
        ``byte_bound`` cannot be met within its ``max_steps`` (the message names the bytes
        reached).
    """
    if byte_bound is not None and not isinstance(byte_bound, ByteBound):
        raise TypeError(f"byte_bound must be a ByteBound, got {type(byte_bound).__name__}")
    started = time.perf_counter()
    teach = logits_of(teacher)
    total = (
        distill_config.epochs + len(recipe.schedule) * recipe.finetune_epochs
        + recipe.centroid_epochs
    )  # fmt: skip
    done = 0

    def tick(step: str) -> Callable[..., None]:
        def report(*_: object) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(step, done, total)

        return report

    history: list[StudentStep] = []
    model = distill(student, teach, x_proxy, distill_config, progress=tick("distil")).student
    dense_accuracy = evaluate(model)
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    history.append(StudentStep("distil", 0.0, dense_accuracy))
    spec = recipe_spec(recipe)
    targets = [
        name
        for name, p in model.named_parameters()
        if spec.is_target(name, p.ndim, p.is_floating_point())
    ]
    masks: dict[str, Tensor] = {}
    finetune = replace(distill_config, epochs=recipe.finetune_epochs)

    def prune(step: int, sparsity: float) -> None:
        nonlocal model, masks
        params = dict(model.named_parameters())
        masks = global_magnitude_masks({n: params[n].detach() for n in targets}, sparsity)
        model = distill(
            model, teach, x_proxy, replace(finetune, seed=finetune.seed + step + 1),
            masks=masks, progress=tick(f"prune {sparsity:g}"),
        ).student  # fmt: skip
        history.append(StudentStep(f"prune {sparsity:g}", sparsity, evaluate(model)))

    for step, sparsity in enumerate(recipe.schedule):
        prune(step, sparsity)

    targets_logits = teach(x_proxy)
    temperature = distill_config.temperature

    def share_and_encode(sparsity: float) -> tuple[EncodedModel, bytes]:
        # finetune_centroids writes into the model: the caller restores it to prune further
        shared = share_weights(model.state_dict(), masks, recipe.bits)
        shared = finetune_centroids(
            model, shared, x_proxy, targets_logits, epochs=recipe.centroid_epochs,
            lr=recipe.centroid_lr, batch_size=recipe.centroid_batch_size,
            seed=distill_config.seed + 999, on_epoch=tick("share"),
            loss_fn=lambda s, t: distillation_loss(s, t, temperature),
        )  # fmt: skip
        compressed = shared_state(model, shared)
        if recipe.bias_format is not FloatFormat.FP32:  # the codec stores them so: round now
            compressed = {
                n: t if n in shared else round_float(t, recipe.bias_format)
                for n, t in compressed.items()
            }
        # the spec's pruning finds exactly the masks' zeros at the sparsity they were cut at
        at = replace(spec, prune=replace(spec.prune, sparsity=sparsity))
        encoded = encode_state(compressed, at)
        return encoded, encoded.to_bytes()

    sparsity = recipe.schedule[-1]
    extra = 0
    sizes: list[int] = []
    while True:
        pruned = {k: v.detach().clone() for k, v in model.state_dict().items()}
        encoded, blob = share_and_encode(sparsity)
        sizes.append(len(blob))
        if byte_bound is None or len(blob) <= byte_bound.max_bytes:
            break
        history.append(StudentStep(f"encode {len(blob)} B", sparsity, float("nan")))
        following = round(sparsity + byte_bound.step, 6)
        if extra >= byte_bound.max_steps or following >= 1:
            raise ConfigError(
                f"the encoded student is {len(blob):,} B after {extra} extra pruning "
                f"step{'' if extra == 1 else 's'} (sparsity {sparsity:g}; smallest "
                f"{min(sizes):,} B), over the bound of {byte_bound.max_bytes:,} B; allow "
                "more steps, a larger step or a larger bound"
            )
        model.load_state_dict(pruned)
        extra += 1
        sparsity = following
        total += recipe.finetune_epochs + recipe.centroid_epochs
        logger.info(
            "student: %d B over the bound of %d B; extra pruning step %d to sparsity %g",
            len(blob), byte_bound.max_bytes, extra, sparsity,
        )  # fmt: skip
        prune(len(recipe.schedule) - 1 + extra, sparsity)

    decoded = decode_state(EncodedModel.from_bytes(blob))
    model.load_state_dict(decoded)
    final_accuracy = evaluate(model)
    history.append(StudentStep("share + encode", state_sparsity(decoded, targets), final_accuracy))
    fp32_bytes = sum(4 * t.numel() for t in decoded.values() if t.is_floating_point())
    logger.info(
        "student: %d → %d bytes, accuracy %.4f (dense) → %.4f (decoded)",
        fp32_bytes, len(blob), dense_accuracy, final_accuracy,
    )  # fmt: skip
    return StudentCompression(
        dense_accuracy=dense_accuracy,
        final_accuracy=final_accuracy,
        encoded=encoded,
        encoded_bytes=len(blob),
        fp32_bytes=fp32_bytes,
        dense_state=dense_state,
        final_state=decoded,
        history=tuple(history),
        extra_steps=extra,
        sparsity=sparsity,
        seconds=time.perf_counter() - started,
    )
