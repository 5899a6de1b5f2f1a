"""Local training and evaluation of a classifier on in-memory tensors.

Training is deterministic for a fixed seed on the CPU: batches are shuffled with a local
generator and any randomness inside the model (dropout, say) draws from a global RNG that is
seeded inside :func:`torch.random.fork_rng`, so the caller's RNG state is left as it was.

Where training runs: the ``device`` argument, else the ``FEDSQUEEZE_TRAIN_DEVICE``
environment variable (``cuda``, ``cuda:1``; what a simulation with ``client-gpus > 0``
sets for its Ray workers, which Ray gives a GPU share each), else where the model's
parameters are. On a GPU the results are close to the CPU's, not bit-identical.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedsqueeze.errors import ConfigError
from fedsqueeze.tasks.base import EvalResult, Optimizer, TrainResult

__all__ = [
    "DEVICE_ENV",
    "SGD_MOMENTUM",
    "apply_masks",
    "check_device",
    "default_device",
    "evaluate",
    "make_optimizer",
    "train",
]

SGD_MOMENTUM = 0.9
#: Environment variable naming the device :func:`train` uses when it is given none.
DEVICE_ENV = "FEDSQUEEZE_TRAIN_DEVICE"
_DEVICE_TEXT = re.compile(r"cpu|cuda(:\d+)?")


def check_device(text: str, what: str) -> torch.device:
    """The device ``text`` names (``cpu``, ``cuda``, ``cuda:N``), one this process can use.

    Raises
    ------
    ConfigError
        Another name, or a CUDA device when torch sees none (or too few); ``what`` names
        the setting in the message.
    """
    if not isinstance(text, str) or not _DEVICE_TEXT.fullmatch(text):
        raise ConfigError(f"{what} must be cpu, cuda or cuda:N, got {text!r}")
    device = torch.device(text)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.index or 0
        if index >= count:
            raise ConfigError(
                f"{what} = {text!r} needs a CUDA device, and torch sees "
                f"{count or 'none'} (torch {torch.__version__}, "
                f"cuda available: {torch.cuda.is_available()})"
            )
    return device


def default_device() -> torch.device | None:
    """The device :data:`DEVICE_ENV` names (``None`` when unset or empty).

    Raises
    ------
    ConfigError
        As :func:`check_device`.
    """
    text = os.environ.get(DEVICE_ENV, "")
    return check_device(text, DEVICE_ENV) if text else None


# The layers whose ``weight`` the L1 penalty covers (biases and norm layers are left alone).
_L1_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 32,
    optimizer: Optimizer = Optimizer.SGD,
    l1_lambda: float = 0.0,
    seed: int,
    masks: Mapping[str, Tensor] | None = None,
    proximal_mu: float = 0.0,
    device: torch.device | None = None,
) -> TrainResult:
    """Train ``model`` in place with cross-entropy on ``(x, y)``.

    The loss minimised per batch is ``CE + l1_lambda·Σ|w| + proximal_mu/2·||θ − θ0||²``, where
    ``w`` runs over the weights (not biases) of the linear and convolution layers and ``θ0`` is
    the model's parameters when training starts (the FedProx anchor).

    The model is the only thing modified: its parameters, and nothing else (its train/eval
    mode and its device are restored before returning).

    Parameters
    ----------
    model : nn.Module
        A classifier mapping ``x``'s batches to ``[B, num_classes]`` logits. Updated in place.
    x : Tensor
        Inputs, ``float32 [N, ...]``, ``N >= 1``.
    y : Tensor
        Integer labels, ``int64 [N]``.
    epochs : int
        Number of passes over the data, ``>= 1``.
    lr : float
        Learning rate, ``> 0``.
    batch_size : int, optional
        Examples per step, ``>= 1``; the last batch of an epoch may be smaller.
    optimizer : Optimizer, optional
        :attr:`Optimizer.SGD` (momentum 0.9, the default) or :attr:`Optimizer.ADAM`.
    l1_lambda : float, optional
        Weight of the L1 penalty, ``>= 0``; pushes weights towards zero ahead of pruning.
    seed : int
        Seeds the shuffling and any randomness inside the model.
    masks : Mapping[str, Tensor] or None, optional
        Boolean keep-masks by parameter name (as in ``model.named_parameters()``), each of the
        parameter's shape; ``False`` marks a pruned weight. Pruned weights are set to zero
        before the first step, their gradients are zeroed before every step and they are reset
        to zero after every step, so they end exactly zero.
    proximal_mu : float, optional
        FedProx coefficient ``μ >= 0``; 0 disables the proximal term.
    device : torch.device or None, optional
        Where to train; ``None``: where :data:`DEVICE_ENV` says, else where the model's
        parameters are. The model is moved there for training and back afterwards.

    Returns
    -------
    TrainResult
        The mean cross-entropy of the last epoch, ``N`` and the wall-clock seconds.

    Raises
    ------
    ValueError
        If an argument is out of range, ``x`` and ``y`` do not match, or a mask does not fit
        the model.
    TypeError
        If ``optimizer`` is not an :class:`Optimizer` or a mask is not boolean.
    """
    _check_train_args(x, y, epochs=epochs, lr=lr, batch_size=batch_size, l1_lambda=l1_lambda)
    if proximal_mu < 0 or not math.isfinite(proximal_mu):
        raise ValueError(f"proximal_mu must be a finite number >= 0, got {proximal_mu}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be an Optimizer, got {optimizer!r}")
    params = dict(model.named_parameters())
    _check_masks(masks, params)

    original_device = _model_device(model)
    if device is None:
        device = default_device()
    target = original_device if device is None else torch.device(device)
    modes = _modes(model)
    started = time.perf_counter()
    try:
        model.to(target)
        keep = {} if masks is None else {n: m.to(target, torch.bool) for n, m in masks.items()}
        with _seeded(seed, target):
            loss = _run_epochs(
                model,
                x.to(target),
                y.to(target, torch.int64),
                keep,
                epochs=epochs,
                lr=lr,
                batch_size=batch_size,
                optimizer=optimizer,
                l1_lambda=l1_lambda,
                proximal_mu=proximal_mu,
                seed=seed,
            )
    finally:
        model.to(original_device)
        _restore_modes(modes)
    return TrainResult(
        loss=loss, num_examples=int(x.shape[0]), seconds=time.perf_counter() - started
    )


def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 256) -> EvalResult:
    """Evaluate ``model`` on ``(x, y)`` without changing it.

    Runs under :func:`torch.no_grad` with the model in eval mode, then restores the model's
    previous mode. The data is moved to the device of the model's parameters.

    Parameters
    ----------
    model : nn.Module
        A classifier mapping ``x``'s batches to ``[B, num_classes]`` logits.
    x : Tensor
        Inputs, ``float32 [N, ...]``, ``N >= 1``.
    y : Tensor
        Integer labels, ``int64 [N]``.
    batch_size : int, optional
        Examples per forward pass, ``>= 1``.

    Returns
    -------
    EvalResult
        Mean cross-entropy, accuracy in ``[0, 1]`` and ``N``.

    Raises
    ------
    ValueError
        If ``x`` is empty, ``x`` and ``y`` do not match or ``batch_size < 1``.
    """
    _check_data(x, y)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _model_device(model)
    modes = _modes(model)
    total_loss = 0.0
    correct = 0
    num_examples = int(x.shape[0])
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, num_examples, batch_size):
                xb = x[start : start + batch_size].to(device)
                yb = y[start : start + batch_size].to(device, torch.int64)
                logits = model(xb)
                total_loss += float(F.cross_entropy(logits, yb, reduction="sum"))
                correct += int((logits.argmax(dim=1) == yb).sum())
    finally:
        _restore_modes(modes)
    return EvalResult(
        loss=total_loss / num_examples,
        accuracy=correct / num_examples,
        num_examples=num_examples,
    )


def _run_epochs(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    keep: Mapping[str, Tensor],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    optimizer: Optimizer,
    l1_lambda: float,
    proximal_mu: float,
    seed: int,
) -> float:
    """Run the optimisation loop; return the mean cross-entropy of the last epoch."""
    params = dict(model.named_parameters())
    masked = [(params[name], mask) for name, mask in keep.items()]
    apply_masks(masked)
    anchor = [(p, p.detach().clone()) for p in params.values()] if proximal_mu > 0 else []
    l1_weights = _l1_weights(model) if l1_lambda > 0 else []
    opt = make_optimizer(optimizer, [p for p in params.values() if p.requires_grad], lr)
    shuffler = torch.Generator().manual_seed(seed)
    num_examples = int(x.shape[0])
    model.train()
    epoch_loss = 0.0
    for _ in range(epochs):
        epoch_loss = 0.0
        order = torch.randperm(num_examples, generator=shuffler).to(x.device)
        for start in range(0, num_examples, batch_size):
            batch = order[start : start + batch_size]
            logits = model(x[batch])
            data_loss = F.cross_entropy(logits, y[batch])
            loss = data_loss
            if l1_weights:
                loss = loss + l1_lambda * _total([w.abs().sum() for w in l1_weights])
            if anchor:
                drift = _total([(p - p0).pow(2).sum() for p, p0 in anchor])
                loss = loss + 0.5 * proximal_mu * drift
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            for param, mask in masked:
                if param.grad is not None:
                    param.grad.masked_fill_(~mask, 0.0)
            opt.step()
            apply_masks(masked)
            epoch_loss += float(data_loss.detach()) * int(batch.shape[0])
    return epoch_loss / num_examples


def _total(terms: list[Tensor]) -> Tensor:
    return torch.stack(terms).sum()


def apply_masks(masked: list[tuple[nn.Parameter, Tensor]]) -> None:
    """Zero each parameter where its boolean mask is False (in place: the model's own
    parameters are the point)."""
    with torch.no_grad():
        for param, mask in masked:
            param.masked_fill_(~mask, 0.0)


def _l1_weights(model: nn.Module) -> list[Tensor]:
    return [
        m.weight
        for m in model.modules()
        if isinstance(m, _L1_LAYERS) and isinstance(m.weight, Tensor) and m.weight.requires_grad
    ]


def make_optimizer(kind: Optimizer, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The optimizer every training loop here uses for ``kind`` (SGD with momentum
    :data:`SGD_MOMENTUM`, or Adam) over ``params`` at learning rate ``lr``."""
    if kind is Optimizer.SGD:
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM)
    return torch.optim.Adam(params, lr=lr)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNG of the CPU (and of ``device`` if a GPU) and restore it on exit."""
    cuda: list[int] = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(seed)
        yield


def _modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Record every submodule's train/eval flag (they need not all agree)."""
    return [(m, m.training) for m in model.modules()]


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _check_data(x: Tensor, y: Tensor) -> None:
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError("x must hold at least one example")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape [{x.shape[0]}], got {list(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer labels, got {y.dtype}")


def _check_train_args(
    x: Tensor, y: Tensor, *, epochs: int, lr: float, batch_size: int, l1_lambda: float
) -> None:
    _check_data(x, y)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if l1_lambda < 0 or not math.isfinite(l1_lambda):
        raise ValueError(f"l1_lambda must be a finite number >= 0, got {l1_lambda}")


def _check_masks(masks: Mapping[str, Tensor] | None, params: Mapping[str, nn.Parameter]) -> None:
    if masks is None:
        return
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"mask for unknown parameter {name!r}; parameters: {sorted(params)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask for {name!r} must be torch.bool, got {mask.dtype}")
        if mask.shape != params[name].shape:
            raise ValueError(
                f"mask for {name!r} has shape {list(mask.shape)}, "
                f"parameter has {list(params[name].shape)}"
            )
