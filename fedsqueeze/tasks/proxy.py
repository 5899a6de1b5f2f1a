"""The proxy set: a held-out part of a task's training split that the coordinator keeps.

Knowledge distillation (:mod:`coordinator.distill`) needs inputs on which the teacher's
outputs can be matched; the coordinator holds a few of the task's examples for that. They are
taken from the **training** split, never from the test split, by a seeded permutation: the
proxy is the first ``size`` examples of ``randperm(N_train, seed)`` and the clients' training
data is the rest, so a federation that holds a proxy set out trains on disjoint data. Labels
travel with the proxy only when the caller allows them (``labelled=True``); by default the
coordinator sees inputs alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedsqueeze.tasks import TaskData

__all__ = ["PROXY_SEED", "ProxySet", "split_proxy"]

PROXY_SEED = 0
"""The default seed of the permutation that picks the proxy examples."""


@dataclass(frozen=True, eq=False)
class ProxySet:
    """The coordinator's proxy examples (``eq=False``: it holds tensors).

    Attributes
    ----------
    x : Tensor
        Inputs, ``[size, ...]``, rows of the task's ``x_train``.
    y : Tensor or None
        Their labels, ``int64 [size]``, only when labels were allowed; ``None`` otherwise.
    indices : Tensor
        ``int64 [size]``: the rows of the task's ``x_train`` they are, ascending.
    """

    x: Tensor
    y: Tensor | None
    indices: Tensor

    @property
    def size(self) -> int:
        """The number of proxy examples."""
        return int(self.x.shape[0])


def split_proxy(
    data: TaskData, size: int, *, seed: int = PROXY_SEED, labelled: bool = False
) -> tuple[ProxySet, TaskData]:
    """Hold ``size`` training examples out as the proxy set.

    Parameters
    ----------
    data : TaskData
        The task's data; not modified (the results hold new tensors).
    size : int
        How many training examples to hold out, ``1 <= size < N_train``.
    seed : int, optional
        Seeds the permutation that picks them (:data:`PROXY_SEED` by default).
    labelled : bool, optional
        Keep the proxy's labels (for a cross-entropy term); ``False`` by default.

    Returns
    -------
    tuple[ProxySet, TaskData]
        The proxy set, and ``data`` with those rows removed from the training split (test
        split unchanged): what the clients train on.

    Raises
    ------
    ValueError
        ``size`` out of range.
    """
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"size must be an int, got {type(size).__name__}")
    n = int(data.x_train.shape[0])
    if not 1 <= size < n:
        raise ValueError(
            f"proxy size must be in 1..{n - 1} (the training split has {n}), got {size}"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    proxy_rows = order[:size].sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[proxy_rows] = False
    proxy = ProxySet(
        x=data.x_train[proxy_rows].clone(),
        y=data.y_train[proxy_rows].clone() if labelled else None,
        indices=proxy_rows,
    )
    rest = TaskData(
        x_train=data.x_train[keep].clone(),
        y_train=data.y_train[keep].clone(),
        x_test=data.x_test,
        y_test=data.y_test,
        num_classes=data.num_classes,
        groups_train=None if data.groups_train is None else data.groups_train[keep].clone(),
    )
    return proxy, rest
