"""The coordinator's proxy rows are in no client's partition when a run holds them out."""

from __future__ import annotations

import pytest
import torch

from edge.app import _partition
from fedsqueeze.runconfig import Aggregation, Partitioning, RunSettings
from fedsqueeze.tasks import get_task
from fedsqueeze.tasks.proxy import split_proxy


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.reshape(x.shape[0], -1)}


@pytest.mark.parametrize("partitioning", [Partitioning.IID, Partitioning.DIRICHLET])
def test_partitions_cover_exactly_the_training_split_without_the_proxy(
    partitioning: Partitioning,
) -> None:
    data = get_task("digits-cnn").load_data()
    proxy, rest = split_proxy(data, 360)
    parts = [_partition("digits-cnn", partitioning, 0.5, 0, p, 5, 360) for p in range(5)]
    held = torch.cat([p[0] for p in parts])
    assert held.shape[0] == rest.x_train.shape[0] == data.x_train.shape[0] - 360
    assert _rows(held) == _rows(rest.x_train)
    assert not _rows(held) & _rows(proxy.x)
    # without a hold-out the clients hold every training example
    whole = torch.cat([_partition("digits-cnn", partitioning, 0.5, 0, p, 5)[0] for p in range(5)])
    assert whole.shape[0] == data.x_train.shape[0]


def test_held_out_proxy_follows_distillation_or_the_flag() -> None:
    assert RunSettings().held_out_proxy == 0
    assert RunSettings(student_refresh_every=5).held_out_proxy == 360
    assert RunSettings(aggregation=Aggregation.FEDDF, proxy_size=100).held_out_proxy == 100
    assert RunSettings(hold_out_proxy=True, proxy_size=50).held_out_proxy == 50
