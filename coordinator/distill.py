"""Knowledge distillation on the coordinator's proxy set (Hinton et al., 2015).

A student matches its teacher's softened outputs on the proxy inputs
(:mod:`fedsqueeze.tasks.proxy`): the loss is ``KL(softmax(t/T) ‖ softmax(s/T)) · T²`` (the ``T²``
keeps the gradients' scale independent of the temperature), optionally mixed with the
cross-entropy on the labels where the proxy has them. The teacher is any function from inputs
to logits: one model (offline distillation, the student track) or the average of several
models' logits (:func:`ensemble`, FedDF's fusion).

With ``mixup`` on (floating inputs only) every batch is also mixed with a shuffled copy of
itself and the teacher labels the mixed images: the teacher can answer for any input, so a
few hundred proxy images give many more training points (the augmentation idea of FD+FAug,
without a generator). With ``shift`` set (image inputs ``[B, C, H, W]`` only) every batch also
gets a copy of itself translated by up to ``shift`` pixels, again labelled by the teacher: the
student then matches the teacher around the proxy images as well, not only on them.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coordinator.averaging import average_states
from fedsqueeze.recipes.deep_compression import states_equal
from fedsqueeze.tasks import Optimizer
from fedsqueeze.tasks.training import apply_masks, make_optimizer

__all__ = [
    "DistillConfig",
    "DistillResult",
    "ProgressFn",
    "TeacherFn",
    "distill",
    "distillation_loss",
    "ensemble",
    "fuse",
    "logits_of",
    "shifted",
    "translate",
]

logger = logging.getLogger(__name__)

TeacherFn = Callable[[Tensor], Tensor]
"""Inputs ``[B, ...]`` → logits ``float32 [B, C]``, without gradients."""

ProgressFn = Callable[[int, int, float], None]
"""Called as ``progress(epoch_done, epochs, epoch_loss)`` after every epoch."""


@dataclass(frozen=True)
class DistillConfig:
    """How :func:`distill` trains.

    Attributes
    ----------
    temperature : float
        Softens both distributions (``T`` in the loss), ``> 0``.
    epochs : int
        Passes over the proxy set, ``>= 0``.
    lr : float
        Learning rate, ``> 0``.
    batch_size : int
        Proxy examples per step, ``>= 1``.
    optimizer : Optimizer
        Adam (default) or SGD with momentum 0.9.
    ce_weight : float
        Weight ``w`` of the cross-entropy in ``(1 − w)·KD + w·CE``, in ``[0, 1]``; ``> 0``
        needs labels.
    mixup : bool
        Also train on mixes of pairs of proxy inputs, labelled by the teacher (floating
        inputs only; ignored for token ids).
    shift : int
        ``>= 0``; when positive, also train on copies of every batch translated by a random
        ``-shift..shift`` pixels in each direction (zero fill), labelled by the teacher
        (floating inputs of at least 3 dimensions, ``[B, ..., H, W]``; ignored otherwise).
        0 (the default) adds nothing.
    proxy_size : int
        How many training examples the coordinator holds as its proxy set (see
        :func:`fedsqueeze.tasks.proxy.split_proxy`).
    seed : int
        Seeds the shuffling and the mixing.
    """

    temperature: float = 4.0
    epochs: int = 40
    lr: float = 3e-3
    batch_size: int = 64
    optimizer: Optimizer = Optimizer.ADAM
    ce_weight: float = 0.0
    mixup: bool = True
    shift: int = 0
    proxy_size: int = 360
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(f"optimizer must be an Optimizer, got {self.optimizer!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ValueError(f"ce_weight must be in [0, 1], got {self.ce_weight}")
        if isinstance(self.shift, bool) or not isinstance(self.shift, int):
            raise TypeError(f"shift must be an int, got {type(self.shift).__name__}")
        if self.shift < 0:
            raise ValueError(f"shift must be >= 0, got {self.shift}")
        if self.proxy_size < 1:
            raise ValueError(f"proxy_size must be >= 1, got {self.proxy_size}")


@dataclass(frozen=True, eq=False)
class DistillResult:
    """What :func:`distill` returns (``eq=False``: it holds a model).

    Attributes
    ----------
    student : nn.Module
        The trained student (a copy; the model passed in is unchanged), in eval mode.
    loss : float
        Mean training loss of the last epoch (on the proxy and, with mixup, its mixes).
    seconds : float
        Wall-clock time.
    """

    student: nn.Module
    loss: float
    seconds: float


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    *,
    labels: Tensor | None = None,
    ce_weight: float = 0.0,
) -> Tensor:
    """``(1 − w)·KL(softmax(t/T) ‖ softmax(s/T))·T² + w·CE(s, labels)``, batch mean.

    Parameters
    ----------
    student_logits, teacher_logits : Tensor
        ``float [B, C]``; the teacher's are treated as constants.
    temperature : float
        ``T > 0``.
    labels : Tensor or None, optional
        ``int64 [B]``; needed when ``ce_weight > 0``.
    ce_weight : float, optional
        ``w`` in ``[0, 1]``.

    Returns
    -------
    Tensor
        A scalar.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(
            f"logits must both be [B, C], got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}")
    if ce_weight > 0 and labels is None:
        raise ValueError("ce_weight > 0 needs labels")
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kd = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2
    if ce_weight == 0 or labels is None:
        return kd
    return (1.0 - ce_weight) * kd + ce_weight * F.cross_entropy(student_logits, labels)


def logits_of(model: nn.Module) -> TeacherFn:
    """A teacher function: ``model``'s logits in eval mode, without gradients.

    The model's train/eval mode is restored after every call.
    """

    def teacher(x: Tensor) -> Tensor:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out: Tensor = model(x)
            return out
        finally:
            model.train(was_training)

    return teacher


def ensemble(models: Sequence[nn.Module], weights: Sequence[float] | None = None) -> TeacherFn:
    """A teacher function: the (weighted) average of ``models``' logits (FedDF's ensemble).

    Parameters
    ----------
    models : Sequence[nn.Module]
        At least one model; all map the same inputs to ``[B, C]``.
    weights : Sequence[float] or None, optional
        Non-negative, not all zero (e.g. the clients' example counts); equal by default.
    """
    if not models:
        raise ValueError("an ensemble needs at least one model")
    w = [1.0] * len(models) if weights is None else [float(v) for v in weights]
    if len(w) != len(models) or min(w) < 0 or sum(w) <= 0:
        raise ValueError(f"need one non-negative weight per model, not all zero; got {w}")
    total = sum(w)
    members = [(logits_of(m), v / total) for m, v in zip(models, w, strict=True)]

    def teacher(x: Tensor) -> Tensor:
        return torch.stack([v * fn(x) for fn, v in members]).sum(0)

    return teacher


def shifted(base: TeacherFn, after: TeacherFn, before: TeacherFn, gain: float) -> TeacherFn:
    """A teacher function: ``base(x) + gain · (after(x) − before(x))``.

    ``after − before`` is how a model's outputs moved (e.g. the student's over a round of its
    clients' training); adding it to ``base`` carries that change over to another model,
    whatever the two architectures, in function space rather than parameter space.

    Parameters
    ----------
    base, after, before : TeacherFn
        Functions to ``[B, C]`` logits of the same inputs.
    gain : float
        ``>= 0``; 0 gives ``base`` back.
    """
    if not gain >= 0:
        raise ValueError(f"gain must be >= 0, got {gain}")

    def teacher(x: Tensor) -> Tensor:
        return base(x) + gain * (after(x) - before(x))

    return teacher


def translate(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Every row of ``x`` translated by a random ``-shift..shift`` pixels in each direction.

    Parameters
    ----------
    x : Tensor
        ``float [B, ..., H, W]`` images; not modified.
    shift : int
        The largest translation, ``>= 0``; the uncovered border is zero-filled.
    generator : torch.Generator
        Draws the offsets: ``B`` horizontal ones, then ``B`` vertical ones.

    Returns
    -------
    Tensor
        Of ``x``'s shape and dtype.
    """
    if x.ndim < 3 or not x.is_floating_point():
        raise ValueError(
            f"translate needs floating [B, ..., H, W] images, got {x.dtype} {x.ndim}-d"
        )
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    b = int(x.shape[0])
    h, w = int(x.shape[-2]), int(x.shape[-1])
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=generator)
    padded = F.pad(x, (shift, shift, shift, shift))
    out = torch.empty_like(x)
    for oy in range(2 * shift + 1):
        for ox in range(2 * shift + 1):
            rows = (dy == oy) & (dx == ox)
            if bool(rows.any()):
                out[rows] = padded[rows][..., oy : oy + h, ox : ox + w]
    return out


def distill(
    student: nn.Module,
    teacher: TeacherFn,
    x: Tensor,
    config: DistillConfig,
    *,
    y: Tensor | None = None,
    masks: Mapping[str, Tensor] | None = None,
    progress: ProgressFn | None = None,
) -> DistillResult:
    """Train a copy of ``student`` to match ``teacher`` on the proxy inputs ``x``.

    Parameters
    ----------
    student : nn.Module
        The starting point; not modified.
    teacher : TeacherFn
        E.g. ``logits_of(model)`` or ``ensemble(models)``.
    x : Tensor
        Proxy inputs ``[N, ...]``.
    config : DistillConfig
        Temperature, epochs, optimizer, mixing.
    y : Tensor or None, optional
        ``int64 [N]`` labels; used only when ``config.ce_weight > 0`` (and then required).
    masks : Mapping[str, Tensor] or None, optional
        Boolean keep-masks by parameter name: masked weights are zeroed and stay zero (for a
        pruned student).
    progress : ProgressFn or None, optional
        Called after every epoch.

    Returns
    -------
    DistillResult
        The trained copy, its last epoch's loss and the time taken.
    """
    if config.ce_weight > 0 and y is None:
        raise ValueError("config.ce_weight > 0 needs the proxy's labels (y)")
    if y is not None and y.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    started = time.perf_counter()
    model = copy.deepcopy(student)
    params = dict(model.named_parameters())
    masked = [(params[name], mask.to(torch.bool)) for name, mask in (masks or {}).items()]
    apply_masks(masked)
    trainable = [p for p in params.values() if p.requires_grad]
    opt = make_optimizer(config.optimizer, trainable, config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    mix = config.mixup and x.is_floating_point()
    shift = config.shift if x.is_floating_point() and x.ndim >= 3 else 0
    labels = y if config.ce_weight > 0 else None
    n = int(x.shape[0])
    model.train()
    epoch_loss = 0.0
    for epoch in range(config.epochs):
        total, count = 0.0, 0
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, config.batch_size):
            rows = order[start : start + config.batch_size]
            xb = x[rows]
            yb = None if labels is None else labels[rows]
            parts = [xb]
            if mix:
                # Mixed inputs carry no label: the teacher alone speaks for them.
                lam = torch.rand(int(rows.shape[0]), generator=gen).view(-1, *[1] * (x.ndim - 1))
                partner = xb[torch.randperm(int(rows.shape[0]), generator=gen)]
                parts.append(lam * xb + (1 - lam) * partner)
            if shift:
                parts.append(translate(xb, shift, gen))  # labelled by the teacher too
            xb = torch.cat(parts)
            t = teacher(xb)
            s = model(xb)
            if yb is None:
                loss = distillation_loss(s, t, config.temperature)
            else:
                b = int(yb.shape[0])
                loss = distillation_loss(
                    s[:b], t[:b], config.temperature, labels=yb, ce_weight=config.ce_weight
                )
                if len(parts) > 1:
                    rest = distillation_loss(s[b:], t[b:], config.temperature)
                    loss = 0.5 * (loss + rest)
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            for p, m in masked:
                if p.grad is not None:
                    p.grad.masked_fill_(~m, 0.0)
            opt.step()
            apply_masks(masked)
            total += float(loss.detach()) * int(rows.shape[0])
            count += int(rows.shape[0])
        epoch_loss = total / max(1, count)
        if progress is not None:
            progress(epoch + 1, config.epochs, epoch_loss)
        logger.debug("distill epoch %d/%d: loss %.4f", epoch + 1, config.epochs, epoch_loss)
    model.eval()
    return DistillResult(student=model, loss=epoch_loss, seconds=time.perf_counter() - started)


def fuse(
    models: Sequence[nn.Module],
    x: Tensor,
    config: DistillConfig,
    *,
    weights: Sequence[float] | None = None,
) -> DistillResult:
    """FedDF's ensemble distillation (Lin et al., 2020): fuse client models into one.

    The fused model starts from the weighted average of the models' parameters and is then
    distilled towards the weighted average of their logits on the proxy inputs ``x``. When
    every model is the same, the ensemble is that model and it is returned unchanged.

    Parameters
    ----------
    models : Sequence[nn.Module]
        The round's client models, one architecture; not modified.
    x : Tensor
        Proxy inputs ``[N, ...]``, unlabelled.
    config : DistillConfig
        The distillation (``ce_weight`` must be 0: the proxy has no labels here).
    weights : Sequence[float] or None, optional
        E.g. the clients' example counts; equal by default.
    """
    if config.ce_weight > 0:
        raise ValueError("fusion distils on unlabelled proxy inputs: ce_weight must be 0")
    if not models:
        raise ValueError("fusion needs at least one model")
    w = [1.0] * len(models) if weights is None else [float(v) for v in weights]
    if len(w) != len(models):
        raise ValueError(f"need one weight per model, got {len(w)} for {len(models)}")
    # Identical members are merged first: averaging copies of one model in floating point
    # would not give it back exactly, and Adam turns rounding-sized gradients into full steps.
    states: list[dict[str, Tensor]] = []
    members: list[nn.Module] = []
    merged: list[float] = []
    for model, weight in zip(models, w, strict=True):
        state = model.state_dict()
        same = next((i for i, s in enumerate(states) if states_equal(s, state)), None)
        if same is None:
            states.append(state)
            members.append(model)
            merged.append(weight)
        else:
            merged[same] += weight
    if len(members) == 1:
        # The ensemble is the start itself: nothing to learn. (Distilling anyway would not be
        # a no-op: the no-grad and autograd forward passes may differ in the last bit.)
        return DistillResult(student=copy.deepcopy(members[0]).eval(), loss=0.0, seconds=0.0)
    teacher = ensemble(members, merged)
    start = copy.deepcopy(models[0])
    start.load_state_dict(average_states(states, merged))  # counters: the first model's
    return distill(start, teacher, x, config)
