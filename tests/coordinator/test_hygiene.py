"""Update hygiene: malformed updates are rejected, long ones clipped."""

from __future__ import annotations

import math

import pytest
import torch

from coordinator.hygiene import check_update, clip_update, update_norm

REF = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}


def test_accepts_a_good_update() -> None:
    assert check_update("e", {"w": torch.ones(2, 3), "b": torch.ones(3)}, REF) is None


@pytest.mark.parametrize(
    "update",
    [
        {"w": torch.ones(2, 3)},
        {"w": torch.ones(3, 2), "b": torch.ones(3)},
        {"w": torch.full((2, 3), float("nan")), "b": torch.ones(3)},
        {"w": torch.ones(2, 3), "b": torch.tensor([1.0, float("inf"), 0.0])},
        {"w": torch.ones(2, 3), "b": torch.ones(3), "extra": torch.ones(1)},
    ],
)
def test_rejects_bad_updates(update: dict[str, torch.Tensor]) -> None:
    rejection = check_update("edge-7", update, REF)
    assert rejection is not None and rejection.edge == "edge-7"


def test_clipping_scales_to_the_bound_and_leaves_short_updates() -> None:
    update = {"w": torch.full((2, 3), 2.0), "b": torch.zeros(3)}
    norm = update_norm(update)
    assert math.isclose(norm, math.sqrt(24))
    clipped, before = clip_update(update, 1.0)
    assert math.isclose(before, norm)
    assert math.isclose(update_norm(clipped), 1.0, rel_tol=1e-6)
    assert torch.equal(update["w"], torch.full((2, 3), 2.0))  # input untouched
    same, _ = clip_update(update, 100.0)
    assert torch.equal(same["w"], update["w"])
    with pytest.raises(ValueError):
        clip_update(update, 0.0)
