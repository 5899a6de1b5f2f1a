"""The built-in models for the digits tasks, and seeded construction."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DigitsCNN",
    "DigitsMLP",
    "build_digits_cnn",
    "build_digits_cnn_student",
    "build_digits_mlp",
    "build_digits_mlp_student",
    "build_seeded",
]

#: The digits-cnn student: conv 1→4, conv 4→8, linear 128→32→10 (4,794 parameters, 12.5% of
#: the teacher's 38,282).
CNN_STUDENT_CHANNELS = (4, 8)
CNN_STUDENT_HIDDEN = 32
#: The digits-mlp student: 64→64→32→10 (6,570 parameters, 13.0% of the teacher's 50,610).
MLP_STUDENT_HIDDEN = (64, 32)


class DigitsCNN(nn.Module):
    """A small CNN for 8×8 digits: 38,282 parameters with the default widths.

    conv 1→16 (3×3, padding 1), ReLU, conv 16→32 (3×3, padding 1), ReLU, max-pool 2,
    linear 512→64, ReLU, linear 64→10. ``channels`` and ``hidden`` narrow it (the task's
    student uses ``(4, 8)`` and 32).

    The ``state_dict`` keys are ``conv1.weight, conv1.bias, conv2.weight, conv2.bias,
    fc1.weight, fc1.bias, fc2.weight, fc2.bias``.
    """

    def __init__(
        self, num_classes: int = 10, channels: tuple[int, int] = (16, 32), hidden: int = 64
    ) -> None:
        super().__init__()
        if min(*channels, hidden, num_classes) < 1:
            raise ValueError(f"widths must be >= 1, got {channels}, {hidden}, {num_classes}")
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(c2 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Compute logits.

        Parameters
        ----------
        x : Tensor
            ``float32 [B, 1, 8, 8]`` images.

        Returns
        -------
        Tensor
            ``float32 [B, num_classes]`` logits.
        """
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        h = F.max_pool2d(h, 2)
        h = F.relu(self.fc1(h.flatten(1)))
        logits: Tensor = self.fc2(h)
        return logits


class DigitsMLP(nn.Module):
    """LeNet-300-100 on the 64 pixels of an 8×8 digit: 64→300→100→10 with ReLU.

    ``hidden`` narrows it (the task's student uses ``(64, 32)``).

    The ``state_dict`` keys are ``fc1.*, fc2.*, fc3.*`` (weight and bias each).
    """

    def __init__(
        self, num_inputs: int = 64, num_classes: int = 10, hidden: tuple[int, int] = (300, 100)
    ) -> None:
        super().__init__()
        if min(num_inputs, num_classes, *hidden) < 1:
            raise ValueError(f"widths must be >= 1, got {num_inputs}, {hidden}, {num_classes}")
        h1, h2 = hidden
        self.fc1 = nn.Linear(num_inputs, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Compute logits.

        Parameters
        ----------
        x : Tensor
            ``float32 [B, 1, 8, 8]`` images (or anything with 64 values per example); flattened
            here.

        Returns
        -------
        Tensor
            ``float32 [B, num_classes]`` logits.
        """
        h = F.relu(self.fc1(x.flatten(1)))
        h = F.relu(self.fc2(h))
        logits: Tensor = self.fc3(h)
        return logits


def build_seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a model with its initial weights drawn from ``seed``.

    The global RNG is seeded inside :func:`torch.random.fork_rng`, so the same seed gives
    bit-identical weights and the caller's RNG state is left untouched.

    Parameters
    ----------
    factory : Callable[[], nn.Module]
        Builds the model; it may draw from the global CPU RNG.
    seed : int
        The seed of the initial weights.

    Returns
    -------
    nn.Module
        The new model, on the CPU, in training mode.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return factory()


def build_digits_cnn(seed: int) -> nn.Module:
    """Build a :class:`DigitsCNN` with weights drawn from ``seed``."""
    return build_seeded(DigitsCNN, seed)


def build_digits_mlp(seed: int) -> nn.Module:
    """Build a :class:`DigitsMLP` with weights drawn from ``seed``."""
    return build_seeded(DigitsMLP, seed)


def build_digits_cnn_student(seed: int) -> nn.Module:
    """Build the digits-cnn student (:data:`CNN_STUDENT_CHANNELS`, :data:`CNN_STUDENT_HIDDEN`)."""
    return build_seeded(
        lambda: DigitsCNN(channels=CNN_STUDENT_CHANNELS, hidden=CNN_STUDENT_HIDDEN), seed
    )


def build_digits_mlp_student(seed: int) -> nn.Module:
    """Build the digits-mlp student (:data:`MLP_STUDENT_HIDDEN`)."""
    return build_seeded(lambda: DigitsMLP(hidden=MLP_STUDENT_HIDDEN), seed)
