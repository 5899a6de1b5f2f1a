"""Frozen parts on the coordinator: what the wrapped strategy sees and what it never does.

A run's frozen tensors (the codec spec key ``freeze``, e.g. a pretrained backbone) travel
at most once: in an edge's first full download, or not at all when the edge rebuilds the
initial model from the task and seed. Deltas down and updates up leave them out, so the
coordinator must not aggregate them either. :class:`FrozenParts` splits a state into the
trainable arrays the wrapped Flower strategy sees and the frozen ones it never sees, and
puts the aggregate back together with the frozen tensors taken unchanged, bit for bit,
from the global model (averaging identical tensors would otherwise drift by a few ulp).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedsqueeze.errors import ConfigError

State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class FrozenParts:
    """The glob patterns of a run's frozen tensor names (empty: nothing frozen)."""

    patterns: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def is_frozen(self, name: str) -> bool:
        """Whether the tensor ``name`` is frozen."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.patterns)

    def trainable(self, state: State) -> dict[str, torch.Tensor]:
        """The tensors of ``state`` that are not frozen, in its order (no copies)."""
        return {name: t for name, t in state.items() if not self.is_frozen(name)}

    def merge(self, trainable: State, global_state: State) -> dict[str, torch.Tensor]:
        """The whole model: ``trainable`` (an aggregate) with the frozen tensors of
        ``global_state``, in the global model's order.

        Raises
        ------
        ValueError
            ``trainable`` lacks a trainable tensor of the global model.
        """
        out: dict[str, torch.Tensor] = {}
        for name, g in global_state.items():
            if self.is_frozen(name):
                out[name] = g
            elif name in trainable:
                out[name] = trainable[name]
            else:
                raise ValueError(f"the aggregate lacks the trainable tensor {name!r}")
        return out

    def check(self, state: State, model: str) -> None:
        """Refuse, in one line, patterns that cannot be meant for ``state``.

        Raises
        ------
        ConfigError
            A pattern matches no tensor (a typo would freeze nothing, silently), or the
            patterns together freeze every floating tensor (nothing would train).
        """
        for pattern in self.patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in state):
                raise ConfigError(
                    f"freeze pattern {pattern!r} matches no tensor of {model} "
                    f"(its tensors are named like {_example(state)})"
                )
        if self.patterns and all(
            self.is_frozen(name) for name, t in state.items() if t.is_floating_point()
        ):
            raise ConfigError(
                f"freeze {'|'.join(self.patterns)!r} freezes every floating tensor of "
                f"{model}: nothing would train"
            )


def _example(state: State) -> str:
    names = list(state)[:3]
    return ", ".join(repr(n) for n in names) + (", ..." if len(state) > 3 else "")
