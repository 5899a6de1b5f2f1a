"""IID and Dirichlet partitioning."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from fedsqueeze.errors import ConfigError
from fedsqueeze.tasks import (
    load_digits_data,
    partition_by_group,
    partition_dirichlet,
    partition_iid,
)


def _labels() -> Tensor:
    return load_digits_data().y_train


def _assert_exact_cover(parts: list[Tensor], num_examples: int) -> None:
    assert all(p.dtype == torch.int64 and p.ndim == 1 for p in parts)
    everything = torch.cat(parts)
    assert everything.numel() == num_examples
    assert torch.equal(everything.sort().values, torch.arange(num_examples))


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _dominant_share(parts: list[Tensor], labels: Tensor) -> float:
    """Mean fraction of a partition's examples that belong to its most common class."""
    shares = [torch.bincount(labels[p]).max().item() / len(p) for p in parts if len(p) > 0]
    return sum(shares) / len(shares)


@given(
    num_examples=st.integers(1, 300),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=50, deadline=None)
def test_iid_is_an_exact_balanced_cover(num_examples: int, data: st.DataObject, seed: int) -> None:
    num_partitions = data.draw(st.integers(1, num_examples))
    parts = partition_iid(num_examples, num_partitions, seed)
    assert len(parts) == num_partitions
    _assert_exact_cover(parts, num_examples)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_is_deterministic_by_seed() -> None:
    assert _same(partition_iid(1437, 10, 3), partition_iid(1437, 10, 3))
    assert not _same(partition_iid(1437, 10, 3), partition_iid(1437, 10, 4))


def test_iid_handles_1000_partitions() -> None:
    parts = partition_iid(1437, 1000, 0)
    _assert_exact_cover(parts, 1437)
    assert {len(p) for p in parts} == {1, 2}


@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=200),
    data=st.data(),
    alpha=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=50, deadline=None)
def test_dirichlet_is_an_exact_cover_with_min_size(
    labels: list[int], data: st.DataObject, alpha: float, seed: int
) -> None:
    num_partitions = data.draw(st.integers(1, len(labels)))
    min_size = data.draw(st.integers(0, len(labels) // num_partitions))
    parts = partition_dirichlet(torch.tensor(labels), num_partitions, alpha, seed, min_size)
    assert len(parts) == num_partitions
    _assert_exact_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= min_size


def test_dirichlet_is_deterministic_by_seed() -> None:
    labels = _labels()
    assert _same(partition_dirichlet(labels, 10, 0.5, 1), partition_dirichlet(labels, 10, 0.5, 1))
    assert not _same(
        partition_dirichlet(labels, 10, 0.5, 1), partition_dirichlet(labels, 10, 0.5, 2)
    )


def test_small_alpha_skews_labels_and_large_alpha_does_not() -> None:
    labels = _labels()
    skewed = partition_dirichlet(labels, 10, 0.05, 0)
    even = partition_dirichlet(labels, 10, 1000.0, 0)
    _assert_exact_cover(skewed, len(labels))
    assert _dominant_share(skewed, labels) > 0.6
    assert _dominant_share(even, labels) < 0.2


def test_dirichlet_handles_1000_partitions_of_the_training_set() -> None:
    labels = _labels()
    parts = partition_dirichlet(labels, 1000, 0.5, 0)
    _assert_exact_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 1
    assert _same(parts, partition_dirichlet(labels, 1000, 0.5, 0))


def test_without_fallback_an_unsatisfiable_min_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="1000 partitions"):
        partition_dirichlet(_labels(), 1000, 0.5, 0, max_retries=3, allow_fallback=False)


@pytest.mark.parametrize(
    ("num_examples", "num_partitions", "seed"),
    [(0, 1, 0), (10, 0, 0), (10, 11, 0), (10, 2, -1)],
)
def test_bad_iid_arguments_are_value_errors(
    num_examples: int, num_partitions: int, seed: int
) -> None:
    with pytest.raises(ValueError):
        partition_iid(num_examples, num_partitions, seed)


@pytest.mark.parametrize(
    ("labels", "num_partitions", "alpha", "min_size"),
    [
        (torch.zeros(10, dtype=torch.int64), 0, 1.0, 1),
        (torch.zeros(10, dtype=torch.int64), 11, 1.0, 1),
        (torch.zeros(10, dtype=torch.int64), 2, 0.0, 1),
        (torch.zeros(10, dtype=torch.int64), 2, -1.0, 1),
        (torch.zeros(10, dtype=torch.int64), 2, float("inf"), 1),
        (torch.zeros(10, dtype=torch.int64), 3, 1.0, 4),
        (torch.zeros(10, dtype=torch.int64), 3, 1.0, -1),
        (torch.zeros(10), 2, 1.0, 1),
        (torch.zeros(2, 5, dtype=torch.int64), 2, 1.0, 1),
        (torch.zeros(0, dtype=torch.int64), 1, 1.0, 0),
    ],
)
def test_bad_dirichlet_arguments_are_value_errors(
    labels: Tensor, num_partitions: int, alpha: float, min_size: int
) -> None:
    with pytest.raises(ValueError):
        partition_dirichlet(labels, num_partitions, alpha, 0, min_size)


def test_by_group_keeps_groups_whole_and_covers_everything() -> None:
    groups = torch.tensor([3, 3, 1, 7, 7, 7, 1, 2, 9, 9], dtype=torch.int64)
    parts = partition_by_group(groups, 3, seed=0)
    _assert_exact_cover(parts, len(groups))
    owners = {int(g): i for i, part in enumerate(parts) for g in groups[part]}
    for i, part in enumerate(parts):
        assert len(part) > 0
        assert all(owners[int(g)] == i for g in groups[part])
    assert _same(parts, partition_by_group(groups, 3, seed=0))


def test_by_group_needs_as_many_groups_as_partitions() -> None:
    with pytest.raises(ValueError, match="groups cannot fill"):
        partition_by_group(torch.tensor([0, 0, 1]), 3, seed=0)
