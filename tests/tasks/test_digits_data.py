"""The digits data set: shapes, scaling, split and caching."""

from __future__ import annotations

import torch

from fedsqueeze.tasks import load_digits_data


def test_split_shapes_and_dtypes() -> None:
    data = load_digits_data()
    assert data.x_train.shape == (1437, 1, 8, 8)
    assert data.x_test.shape == (360, 1, 8, 8)
    assert data.x_train.dtype == data.x_test.dtype == torch.float32
    assert data.y_train.shape == (1437,)
    assert data.y_test.shape == (360,)
    assert data.y_train.dtype == data.y_test.dtype == torch.int64
    assert data.num_classes == 10


def test_pixels_are_scaled_to_unit_interval() -> None:
    data = load_digits_data()
    for x in (data.x_train, data.x_test):
        assert float(x.min()) == 0.0
        assert float(x.max()) == 1.0


def test_split_is_stratified() -> None:
    data = load_digits_data()
    train_counts = torch.bincount(data.y_train, minlength=10)
    test_counts = torch.bincount(data.y_test, minlength=10)
    assert int(test_counts.min()) >= 35
    assert int(test_counts.max()) <= 37
    assert torch.all((train_counts - 4 * test_counts).abs() <= 4)


def test_loading_is_cached() -> None:
    assert load_digits_data() is load_digits_data()
