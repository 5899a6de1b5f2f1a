"""GPTQ rounding against nearest rounding on small random problems."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.codec.gptq import (
    Grid,
    gptq_codes,
    nearest_codes,
    output_error,
    refit_levels,
    uniform_grid,
)


def _problem(seed: int, rows: int = 24, cols: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64)
    x = torch.randn(4 * cols, cols, generator=g, dtype=torch.float64) @ mix
    return w, x.T @ x


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.integers(1, 4), scale=st.floats(0.1, 10.0))
def test_identity_hessian_gives_nearest_codes(seed: int, bits: int, scale: float) -> None:
    w, _ = _problem(seed)
    grid = uniform_grid(w, bits, group=16, clip=0.8)
    h = torch.eye(w.shape[1], dtype=torch.float64) * scale
    assert torch.equal(gptq_codes(w, h, grid, damp=0.0, block=7), nearest_codes(w, grid))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_gptq_lowers_output_error_on_correlated_inputs(seed: int, bits: int) -> None:
    w, h = _problem(seed)
    grid = uniform_grid(w, bits, group=w.shape[1], clip=0.8)
    rtn = output_error(w, grid.decode(nearest_codes(w, grid)), h)
    gptq = output_error(w, grid.decode(gptq_codes(w, h, grid)), h)
    assert gptq < 0.9 * rtn


def test_lazy_batches_do_not_change_the_codes() -> None:
    w, h = _problem(7)
    grid = uniform_grid(w, 2, group=8)
    assert torch.equal(gptq_codes(w, h, grid, block=1), gptq_codes(w, h, grid, block=128))


def test_codes_are_grid_indices_and_nearest_is_nearest() -> None:
    w, _ = _problem(3)
    grid = uniform_grid(w, 2, group=10, clip=0.6)
    codes = nearest_codes(w, grid)
    assert int(codes.min()) >= 0 and int(codes.max()) < grid.levels.numel()
    scale = grid.scale.repeat_interleave(grid.group, dim=1)
    dist = (w.unsqueeze(2) - scale.unsqueeze(2) * grid.levels).abs()
    assert torch.equal(codes, dist.argmin(dim=2))


def test_refit_never_raises_the_error_it_minimises() -> None:
    w, h = _problem(11)
    grid = uniform_grid(w, 2, group=20)
    codes = gptq_codes(w, h, grid)
    fitted = refit_levels(w, codes, grid, h)
    assert output_error(w, fitted.decode(codes), h) <= output_error(w, grid.decode(codes), h)
    near = nearest_codes(w, grid)
    plain = refit_levels(w, near, grid)
    assert float((w - plain.decode(near)).square().sum()) <= float(
        (w - grid.decode(near)).square().sum()
    )


def test_bad_inputs_raise() -> None:
    w, h = _problem(0)
    grid = uniform_grid(w, 2, group=8)
    with pytest.raises(ValueError):
        gptq_codes(w, h[:-1, :-1], grid)
    with pytest.raises(ValueError):
        uniform_grid(w, 0, group=8)
    with pytest.raises(ValueError):
        Grid(scale=grid.scale, group=8, levels=torch.tensor([1.0, 0.0], dtype=torch.float64))
