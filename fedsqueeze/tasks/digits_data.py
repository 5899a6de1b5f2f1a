"""The scikit-learn digits data set (1,797 8×8 grey-scale images of the digits 0-9).

It ships with scikit-learn, so loading it needs no network.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from fedsqueeze.tasks.base import TaskData

__all__ = ["DIGITS_NUM_CLASSES", "DIGITS_SPLIT_SEED", "DIGITS_TEST_FRACTION", "load_digits_data"]

DIGITS_NUM_CLASSES = 10
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
_MAX_PIXEL = 16.0  # the raw digits pixels are integers in [0, 16]


@functools.lru_cache(maxsize=1)
def load_digits_data() -> TaskData:
    """Load the digits data set with a fixed, stratified 80/20 train/test split.

    The split is drawn with seed :data:`DIGITS_SPLIT_SEED`, giving 1,437 training and 360 test
    images. The result is cached in-process, so every call returns the same object: treat its
    tensors as read-only.

    Returns
    -------
    TaskData
        ``x_train`` ``float32 [1437, 1, 8, 8]`` and ``x_test`` ``float32 [360, 1, 8, 8]`` with
        pixel values scaled to ``[0, 1]``; ``y_train`` ``int64 [1437]`` and ``y_test``
        ``int64 [360]`` in ``[0, 10)``; ``num_classes`` 10.
    """
    # Imported here: scikit-learn costs seconds to import, and most processes that
    # import the tasks (every Flower ClientApp process) never load the data.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.asarray(bunch.data, dtype=np.float32).reshape(-1, 1, 8, 8) / _MAX_PIXEL
    labels = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        labels,
        test_size=DIGITS_TEST_FRACTION,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    return TaskData(
        x_train=torch.from_numpy(np.ascontiguousarray(x_train)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_train)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_test)),
        num_classes=DIGITS_NUM_CLASSES,
    )
