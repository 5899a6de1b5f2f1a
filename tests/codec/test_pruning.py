"""Pruning masks: exact counts and agreement with ``torch.nn.utils.prune``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

from fedsqueeze.codec import pruning
from fedsqueeze.codec.pruning import (
    channel_mask,
    count_to_prune,
    global_magnitude_masks,
    magnitude_mask,
    threshold_mask,
)

SPARSITIES = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.5001, 0.9, 0.95, 0.999, 1.0])
SHAPES = st.sampled_from([(1,), (7,), (10, 3), (16, 4, 3, 3), (33, 65), (4, 1, 5)])


def holder(t: torch.Tensor) -> nn.Module:
    module = nn.Module()
    module.w = nn.Parameter(t.clone())
    return module


def reference_l1(t: torch.Tensor, sparsity: float) -> torch.Tensor:
    m = holder(t)
    prune.l1_unstructured(m, "w", amount=sparsity)  # type: ignore[no-untyped-call]
    return m.get_buffer("w_mask").bool()


def random_tensor(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_count_to_prune_is_pytorch_rounding() -> None:
    assert count_to_prune(10, 0.25) == 2  # round half to even, like PyTorch
    assert count_to_prune(10, 0.35) == round(0.35 * 10)
    assert count_to_prune(7, 1.0) == 7
    assert count_to_prune(0, 0.5) == 0
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            count_to_prune(10, bad)


@settings(max_examples=80, deadline=None)
@given(SHAPES, SPARSITIES, st.integers(0, 2**31))
def test_magnitude_mask_matches_l1_unstructured(
    shape: tuple[int, ...], sparsity: float, seed: int
) -> None:
    t = random_tensor(shape, seed)
    before = t.clone()
    mask = magnitude_mask(t, sparsity)
    assert mask.dtype == torch.bool and mask.shape == t.shape
    assert int(mask.sum()) == t.numel() - count_to_prune(t.numel(), sparsity)
    assert torch.equal(mask, reference_l1(t, sparsity))
    assert torch.equal(t, before)


@pytest.mark.parametrize("sparsity", [0.0005, 0.3, 0.9, 0.9995])
def test_sampled_selection_is_exact_on_large_tensors(sparsity: float) -> None:
    t = random_tensor((1100, 1000), 3)  # above the sampling threshold
    assert t.numel() > pruning._SAMPLE_ABOVE
    mask = magnitude_mask(t, sparsity)
    assert torch.equal(mask, reference_l1(t, sparsity))


def test_sampled_selection_with_many_ties_keeps_the_exact_count() -> None:
    t = random_tensor((1_200_000,), 4)
    t[::3] = 0.0  # a third of the values tie at zero
    t[1::7] = 0.5
    for sparsity in (0.2, 0.4, 0.6):
        mask = magnitude_mask(t, sparsity)
        assert int(mask.sum()) == t.numel() - count_to_prune(t.numel(), sparsity)
        kept, dropped = t.abs()[mask], t.abs()[~mask]
        assert float(kept.min()) >= float(dropped.max())


def test_sampled_band_miss_falls_back_to_topk() -> None:
    n = 2_000_000
    mags = torch.rand(n, generator=torch.Generator().manual_seed(5)) + 1.0
    assert pruning._drop_smallest_sampled(mags, n // 2) is not None
    # Make the fixed-seed sample unrepresentative: zero exactly the values it draws.
    gen = torch.Generator().manual_seed(pruning._SAMPLE_SEED)
    mags[torch.randint(n, (pruning._SAMPLE_SIZE,), generator=gen)] = 0.0
    assert pruning._drop_smallest_sampled(mags, n // 2) is None
    keep = pruning._drop_smallest(mags, n // 2)
    assert torch.equal(keep, pruning._drop_smallest_exact(mags, n // 2))
    assert int((~keep).sum()) == n // 2


@settings(max_examples=40, deadline=None)
@given(SPARSITIES, st.integers(0, 2**31))
def test_global_masks_match_global_unstructured(sparsity: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "fc.weight": torch.randn(20, 30, generator=g) * 0.1,
        "tiny.weight": torch.randn(3, generator=g) * 5,
    }
    modules = {name: holder(t) for name, t in tensors.items()}
    prune.global_unstructured(
        [(m, "w") for m in modules.values()],
        pruning_method=prune.L1Unstructured,
        amount=sparsity,
    )
    masks = global_magnitude_masks(tensors, sparsity)
    assert list(masks) == list(tensors)
    total = sum(t.numel() for t in tensors.values())
    assert sum(int(m.sum()) for m in masks.values()) == total - count_to_prune(total, sparsity)
    for name, module in modules.items():
        assert torch.equal(masks[name], module.get_buffer("w_mask").bool()), name


def test_global_masks_mixed_dtypes_and_empty() -> None:
    assert global_magnitude_masks({}, 0.5) == {}
    tensors = {"a": torch.randn(10, 10), "b": torch.randn(5, 5).to(torch.float16)}
    masks = global_magnitude_masks(tensors, 0.5)
    assert sum(int(m.sum()) for m in masks.values()) == 125 - 62  # round(62.5) = 62


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([(10, 3), (16, 4, 3, 3), (33, 65), (5, 2, 2)]),
    SPARSITIES,
    st.integers(0, 2**31),
)
def test_channel_mask_matches_ln_structured(
    shape: tuple[int, ...], sparsity: float, seed: int
) -> None:
    t = random_tensor(shape, seed)
    mask = channel_mask(t, sparsity)
    m = holder(t)
    prune.ln_structured(m, "w", amount=sparsity, n=2, dim=0)  # type: ignore[no-untyped-call]
    assert torch.equal(mask, m.get_buffer("w_mask").bool())
    dropped = count_to_prune(shape[0], sparsity)
    per_channel = mask.reshape(shape[0], -1)
    assert bool((per_channel.all(1) | ~per_channel.any(1)).all())  # whole channels
    assert int((~per_channel.any(1)).sum()) == dropped


def test_channel_mask_on_vectors() -> None:
    t = torch.tensor([0.5, -3.0, 0.1, 2.0])
    assert channel_mask(t, 0.5).tolist() == [False, True, False, True]


def test_threshold_mask() -> None:
    t = torch.tensor([[-0.2, 0.1], [0.3, -0.05]])
    assert threshold_mask(t, 0.1).tolist() == [[True, False], [True, False]]
    assert bool(threshold_mask(t, 0.0).all())
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError):
            threshold_mask(t, bad)


def test_caller_mistakes_raise_value_error() -> None:
    with pytest.raises(ValueError):
        magnitude_mask(torch.arange(5), 0.5)
    with pytest.raises(ValueError):
        magnitude_mask(torch.randn(5), 1.2)
    with pytest.raises(ValueError):
        channel_mask(torch.tensor(1.0), 0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_masks_match_cpu() -> None:
    t = random_tensor((1200, 1000), 9)
    for sparsity in (0.1, 0.9):
        mask = magnitude_mask(t.cuda(), sparsity)
        assert mask.device.type == "cuda"
        assert torch.equal(mask.cpu(), magnitude_mask(t, sparsity))
        assert torch.equal(channel_mask(t.cuda(), sparsity).cpu(), channel_mask(t, sparsity))
