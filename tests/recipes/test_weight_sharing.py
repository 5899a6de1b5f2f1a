"""Weight sharing and centroid fine-tuning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedsqueeze.codec.pruning import magnitude_mask
from fedsqueeze.recipes import SharedTensor, finetune_centroids, share_weights, shared_state


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _shared(
    model: nn.Module, bits: int = 2
) -> tuple[dict[str, torch.Tensor], dict[str, SharedTensor]]:
    state = model.state_dict()
    masks = {n: magnitude_mask(state[n], 0.5) for n in ("0.weight", "2.weight")}
    return masks, share_weights(state, masks, bits)


def test_share_weights_keeps_the_mask_and_uses_nearest_centroids() -> None:
    model = _model()
    masks, shared = _shared(model)
    for name, st in shared.items():
        dense = st.dense()
        assert torch.equal(dense != 0, masks[name])
        assert torch.unique(dense[dense != 0]).numel() <= 4
        original = model.state_dict()[name]
        # every kept weight went to its nearest centroid
        kept = original.reshape(-1)[st.positions]
        nearest = (kept[:, None] - st.codebook[None, :]).abs().min(dim=1).values
        assert torch.allclose((kept - st.codebook[st.codes]).abs(), nearest)


def test_centroid_gradient_is_the_sum_of_assigned_weight_gradients() -> None:
    model = _model()
    _, shared = _shared(model)
    st = shared["2.weight"]
    book = st.codebook.clone().requires_grad_(True)
    dense = st.dense(book)
    dense.retain_grad()
    x = torch.randn(5, 16)
    torch.autograd.backward((x @ dense.T).square().sum())
    assert book.grad is not None and dense.grad is not None
    expected = torch.zeros_like(book).index_add_(0, st.codes, dense.grad.reshape(-1)[st.positions])
    assert torch.allclose(book.grad, expected)


def test_finetune_centroids_trains_codebooks_and_writes_the_model() -> None:
    model = _model()
    _, shared = _shared(model)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2))
    epochs: list[int] = []
    out = finetune_centroids(
        model, shared, x, y, epochs=3, lr=1e-2, batch_size=16, seed=0,
        on_epoch=lambda: epochs.append(1),
    )  # fmt: skip
    assert len(epochs) == 3
    state = shared_state(model, out)
    for name, st in out.items():
        assert torch.equal(st.positions, shared[name].positions)
        assert torch.equal(st.codes, shared[name].codes)
        assert not torch.equal(st.codebook, shared[name].codebook)
        assert torch.equal(st.codebook, st.codebook.half().float())  # fp16-representable
        assert bool((st.codebook != 0).all())
        assert torch.equal(model.state_dict()[name], st.dense())
        assert torch.equal(state[name], st.dense())


def test_zero_epochs_only_rounds() -> None:
    model = _model()
    _, shared = _shared(model)
    bias = model.state_dict()["0.bias"].clone()
    out = finetune_centroids(
        model, shared, torch.zeros(1, 8), torch.zeros(1, dtype=torch.long),
        epochs=0, lr=1e-3, batch_size=1, seed=0,
    )  # fmt: skip
    for name, st in out.items():
        assert torch.equal(st.codebook, shared[name].codebook.half().float())
    assert torch.equal(model.state_dict()["0.bias"], bias)


def test_bad_arguments() -> None:
    model = _model()
    masks, shared = _shared(model)
    with pytest.raises(ValueError):
        finetune_centroids(
            model, shared, torch.zeros(1, 8), torch.zeros(1, dtype=torch.long),
            epochs=1, lr=0.0, batch_size=1, seed=0,
        )  # fmt: skip
    with pytest.raises(ValueError):
        share_weights(model.state_dict(), {"0.weight": masks["2.weight"]}, 2)
