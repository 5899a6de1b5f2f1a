"""The edge's data split: computed once per process, the same as splitting anew."""

from __future__ import annotations

import torch

from edge.app import _partition, _split
from fedsqueeze.runconfig import Partitioning
from fedsqueeze.tasks import get_task, partition_dirichlet, partition_iid


def test_a_client_gets_exactly_its_partition_of_a_fresh_split() -> None:
    data = get_task("digits-cnn").load_data()
    fresh = partition_dirichlet(data.y_train, 50, 0.5, 3)
    for pid in (0, 17, 49):
        x, y, _, _ = _partition("digits-cnn", Partitioning.DIRICHLET, 0.5, 3, pid, 50)
        assert torch.equal(y, data.y_train[fresh[pid]])
        assert torch.equal(x, data.x_train[fresh[pid]])


def test_the_split_is_computed_once_for_all_clients_of_a_process() -> None:
    _split.cache_clear()
    for pid in range(20):
        _partition("digits-cnn", Partitioning.IID, 0.5, 4, pid, 300)
    assert _split.cache_info().misses == 1


def test_more_clients_than_examples_share_partitions() -> None:
    data = get_task("digits-cnn").load_data()
    n = len(data.y_train)
    per_example = partition_iid(n, n, 5)
    for pid in (0, n - 1, n, 9_999):
        _, y, _, _ = _partition("digits-cnn", Partitioning.IID, 0.5, 5, pid, 10_000)
        assert torch.equal(y, data.y_train[per_example[pid % n]])
