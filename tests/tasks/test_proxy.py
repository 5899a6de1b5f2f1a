"""The proxy set: held out of the training split, never the test split."""

from __future__ import annotations

import pytest
import torch

from fedsqueeze.tasks import get_task
from fedsqueeze.tasks.proxy import split_proxy


def test_the_proxy_set_never_overlaps_the_test_split() -> None:
    data = get_task("digits-cnn").load_data()
    proxy, rest = split_proxy(data, 360)
    flat_test = {tuple(row.tolist()) for row in data.x_test.flatten(1)}
    flat_proxy = [tuple(row.tolist()) for row in proxy.x.flatten(1)]
    # by construction they are training rows; by content none of them is a test image
    assert torch.equal(proxy.x, data.x_train[proxy.indices])
    overlap = [r for r in flat_proxy if r in flat_test]
    # the digits data has a few duplicate images across its own splits; the proxy takes
    # none of the test split's rows, and no more duplicates than the training split has
    train_dupes = sum(tuple(r.tolist()) in flat_test for r in data.x_train.flatten(1))
    assert len(overlap) <= train_dupes * proxy.size / data.x_train.shape[0] + 3
    assert rest.x_test is data.x_test


def test_the_proxy_and_the_clients_data_partition_the_training_split() -> None:
    data = get_task("digits-cnn").load_data()
    proxy, rest = split_proxy(data, 100, seed=3)
    n = int(data.x_train.shape[0])
    assert proxy.size == 100 and int(rest.x_train.shape[0]) == n - 100
    assert proxy.y is None  # unlabelled by default
    assert bool((proxy.indices[1:] > proxy.indices[:-1]).all())
    keep = torch.ones(n, dtype=torch.bool)
    keep[proxy.indices] = False
    assert torch.equal(rest.x_train, data.x_train[keep])
    assert torch.equal(rest.y_train, data.y_train[keep])
    again, _ = split_proxy(data, 100, seed=3, labelled=True)
    assert torch.equal(again.indices, proxy.indices)
    assert again.y is not None and torch.equal(again.y, data.y_train[proxy.indices])


@pytest.mark.parametrize("size", [0, 1437, -1])
def test_sizes_out_of_range_are_refused(size: int) -> None:
    with pytest.raises(ValueError, match="proxy size"):
        split_proxy(get_task("digits-cnn").load_data(), size)
