"""Splitting a training set among federated clients.

All partitioners return one ``int64`` index tensor per partition; together the partitions
hold every index exactly once. The same arguments (seed included) always give the same
partitions, on any machine: the draws come from a local ``numpy.random.Generator``.
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from fedsqueeze.errors import ConfigError

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "partition_by_group",
    "partition_dirichlet",
    "partition_iid",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_RETRIES = 100

_Indices = npt.NDArray[np.int64]


def partition_iid(num_examples: int, num_partitions: int, seed: int) -> list[Tensor]:
    """Split ``range(num_examples)`` uniformly at random into near-equal partitions.

    Parameters
    ----------
    num_examples : int
        Size of the data set, ``>= 1``.
    num_partitions : int
        Number of partitions, ``1 <= num_partitions <= num_examples``.
    seed : int
        Seed of the shuffle, ``>= 0``.

    Returns
    -------
    list[Tensor]
        ``num_partitions`` sorted ``int64 [n_i]`` index tensors whose sizes differ by at most
        one and sum to ``num_examples``.

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    _check_counts(num_examples, num_partitions)
    _check_seed(seed)
    order = np.random.default_rng(seed).permutation(num_examples).astype(np.int64)
    return [_to_tensor(part) for part in np.array_split(order, num_partitions)]


def partition_dirichlet(
    labels: Tensor,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    *,
    max_retries: int = DEFAULT_MAX_RETRIES,
    allow_fallback: bool = True,
) -> list[Tensor]:
    """Split a labelled data set with Dirichlet label skew (Hsu et al., 2019).

    For every class, the class's examples are shuffled and divided among the partitions in
    proportions drawn from ``Dirichlet(alpha, ..., alpha)``; a small ``alpha`` gives each
    partition few classes, a large one approaches an IID split. The whole draw is repeated
    until every partition holds at least ``min_size`` examples, at most ``max_retries`` times.

    When no draw succeeds (typical when there are about as many partitions as examples, e.g.
    1,000 partitions of 1,437 images) and ``allow_fallback`` is true, the split falls back to
    giving every partition ``min_size`` examples drawn uniformly at random first and dividing
    the rest by the same per-class Dirichlet draw. The fallback always succeeds, at the price
    of a little less skew in the smallest partitions; it is logged at INFO.

    Parameters
    ----------
    labels : Tensor
        Integer labels, ``int64 [N]`` (any integer dtype), ``N >= 1``.
    num_partitions : int
        Number of partitions, ``1 <= num_partitions <= N``.
    alpha : float
        Dirichlet concentration, ``> 0``.
    seed : int
        Seed of the draws, ``>= 0``.
    min_size : int, optional
        Least number of examples in every partition, ``0 <= min_size`` and
        ``min_size * num_partitions <= N``.
    max_retries : int, optional
        How many full draws to try before the fallback (or the error), ``>= 1``.
    allow_fallback : bool, optional
        Whether to fall back as described above instead of raising.

    Returns
    -------
    list[Tensor]
        ``num_partitions`` sorted ``int64 [n_i]`` index tensors into ``labels``, each with
        ``n_i >= min_size``, holding every index exactly once.

    Raises
    ------
    ValueError
        If an argument is out of range.
    ConfigError
        If ``allow_fallback`` is false and no draw gave every partition ``min_size`` examples.
    """
    if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} {labels.shape}")
    if labels.dtype == torch.bool:
        raise ValueError("labels must be integers, not booleans")
    num_examples = int(labels.shape[0])
    _check_counts(num_examples, num_partitions)
    _check_seed(seed)
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    if min_size < 0 or min_size * num_partitions > num_examples:
        raise ValueError(
            f"min_size must be in [0, {num_examples // num_partitions}] for {num_partitions} "
            f"partitions of {num_examples} examples, got {min_size}"
        )
    if max_retries < 1:
        raise ValueError(f"max_retries must be >= 1, got {max_retries}")

    rng = np.random.default_rng(seed)
    label_array = labels.detach().cpu().numpy().astype(np.int64)
    all_indices = np.arange(num_examples, dtype=np.int64)
    for _ in range(max_retries):
        owner = _dirichlet_owners(label_array, num_partitions, alpha, rng)
        if np.bincount(owner, minlength=num_partitions).min() >= min_size:
            return _group(all_indices, owner, num_partitions)
    if not allow_fallback:
        raise ConfigError(
            f"no Dirichlet(alpha={alpha}) split of {num_examples} examples into "
            f"{num_partitions} partitions gave every partition at least {min_size} examples "
            f"in {max_retries} draws; use fewer partitions, a larger alpha or a smaller min_size"
        )
    logger.info(
        "Dirichlet split: no draw gave all %d partitions %d examples in %d tries; "
        "seeding each partition with %d random examples first",
        num_partitions,
        min_size,
        max_retries,
        min_size,
    )
    order = rng.permutation(num_examples).astype(np.int64)
    num_seeded = min_size * num_partitions
    seeded_owner = np.repeat(np.arange(num_partitions, dtype=np.int64), min_size)
    rest = order[num_seeded:]
    rest_owner = _dirichlet_owners(label_array[rest], num_partitions, alpha, rng)
    return _group(
        np.concatenate([order[:num_seeded], rest]),
        np.concatenate([seeded_owner, rest_owner]),
        num_partitions,
    )


def partition_by_group(groups: Tensor, num_partitions: int, seed: int) -> list[Tensor]:
    """Split a data set along its natural groups: every group goes whole to one partition.

    For ``minilm-text`` a group is a source module, so each client holds a few modules of the
    standard library (natural non-IID: topics and labels both skewed). The groups are shuffled
    with ``seed``, then, largest first (ties in shuffled order), each goes to the partition
    holding the fewest examples so far (the lowest index on ties), which keeps sizes close.

    Parameters
    ----------
    groups : Tensor
        Integer group ids, ``int64 [N]``, ``N >= 1``.
    num_partitions : int
        Number of partitions, ``1 <= num_partitions <=`` the number of distinct groups.
    seed : int
        Seed of the shuffle, ``>= 0``.

    Returns
    -------
    list[Tensor]
        ``num_partitions`` sorted, non-empty ``int64 [n_i]`` index tensors into ``groups``,
        holding every index exactly once; no group is split between partitions.

    Raises
    ------
    ValueError
        If an argument is out of range or there are fewer groups than partitions.
    """
    if groups.ndim != 1 or groups.is_floating_point() or groups.is_complex():
        raise ValueError(f"groups must be a 1-D integer tensor, got {groups.dtype} {groups.shape}")
    _check_counts(int(groups.shape[0]), num_partitions)
    _check_seed(seed)
    group_array = groups.detach().cpu().numpy().astype(np.int64)
    ids, counts = np.unique(group_array, return_counts=True)
    if len(ids) < num_partitions:
        raise ValueError(
            f"{len(ids)} groups cannot fill {num_partitions} partitions; use fewer partitions"
        )
    order = np.random.default_rng(seed).permutation(len(ids))
    order = order[np.argsort(-counts[order], kind="stable")]
    sizes = np.zeros(num_partitions, dtype=np.int64)
    owner_of_group = np.empty(len(ids), dtype=np.int64)
    for g in order:
        target = int(np.argmin(sizes))
        owner_of_group[g] = target
        sizes[target] += counts[g]
    owner = owner_of_group[np.searchsorted(ids, group_array)]
    return _group(np.arange(len(group_array), dtype=np.int64), owner, num_partitions)


def _dirichlet_owners(
    labels: _Indices, num_partitions: int, alpha: float, rng: np.random.Generator
) -> _Indices:
    """Draw the partition of every example with one Dirichlet draw per class.

    Parameters
    ----------
    labels : ndarray
        ``int64 [M]`` labels.

    Returns
    -------
    ndarray
        ``int64 [M]`` partition ids in ``[0, num_partitions)``.
    """
    owner = np.empty(len(labels), dtype=np.int64)
    partition_ids = np.arange(num_partitions, dtype=np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        proportions = rng.dirichlet(np.full(num_partitions, alpha))
        if not np.all(np.isfinite(proportions)):
            # Very small alphas can underflow; send the class to one random partition instead.
            proportions = np.zeros(num_partitions)
            proportions[rng.integers(num_partitions)] = 1.0
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        counts = np.diff(cuts, prepend=0, append=len(members))
        owner[members] = np.repeat(partition_ids, counts)
    return owner


def _group(indices: _Indices, owner: _Indices, num_partitions: int) -> list[Tensor]:
    """Split ``indices`` (``int64 [M]``) by their ``owner`` partition (``int64 [M]``)."""
    by_owner = np.argsort(owner, kind="stable")
    bounds = np.cumsum(np.bincount(owner, minlength=num_partitions))[:-1]
    return [_to_tensor(part) for part in np.split(indices[by_owner], bounds)]


def _to_tensor(indices: _Indices) -> Tensor:
    return torch.from_numpy(np.sort(indices).astype(np.int64))


def _check_counts(num_examples: int, num_partitions: int) -> None:
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    if not 1 <= num_partitions <= num_examples:
        raise ValueError(
            f"num_partitions must be in [1, {num_examples}] (the number of examples), "
            f"got {num_partitions}"
        )


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
