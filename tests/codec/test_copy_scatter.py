"""copy_scatter (fedsqueeze.codec.kernels): a copy with values put at increasing
positions, in one pass of chunks; the same result as a copy then an assignment, on the
compiled path and the fallback, and the source left alone."""

from __future__ import annotations

import pytest
import torch

from fedsqueeze.codec import jit
from fedsqueeze.codec.chunks import CPU_CHUNK
from fedsqueeze.codec.kernels import copy_scatter


def _reference(src: torch.Tensor, at: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    out = src.clone()
    out[at] = values
    return out


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("share", [0.0, 0.1, 1.0])
def test_copy_scatter_is_a_copy_then_an_assignment(
    compiled: bool, dtype: torch.dtype, share: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jit, "ENABLED", compiled)
    g = torch.Generator().manual_seed(3)
    n = 3 * CPU_CHUNK + 17  # chunks, and a tail
    assert jit.use(n) == compiled
    src = torch.randn(n, generator=g, dtype=dtype)
    before = src.clone()
    at = torch.nonzero(torch.rand(n, generator=g) < share).view(-1)
    # positions on both sides of every chunk boundary
    edges = torch.tensor([c + d for c in range(0, n, CPU_CHUNK) for d in (-1, 0) if 0 <= c + d < n])
    at = torch.unique(torch.cat([at, edges])) if share > 0 else at
    values = torch.randn(at.numel(), generator=g, dtype=dtype)
    got = copy_scatter(src, at, values)
    assert torch.equal(got, _reference(src, at, values))
    assert torch.equal(src, before) and got.data_ptr() != src.data_ptr()


def test_copy_scatter_refuses_lengths_that_differ() -> None:
    with pytest.raises(ValueError, match="3 indices for 2 values"):
        copy_scatter(torch.zeros(8), torch.tensor([0, 2, 4]), torch.zeros(2))
