"""Deep Compression's "trained quantization": k-means weight sharing with centroid fine-tuning.

Every pruned weight tensor keeps its sparsity pattern; its kept values are replaced by the
nearest of ``2^bits`` shared values (a per-tensor codebook fitted by 1-D k-means), and the
codebook is then trained: the model's forward pass uses ``codebook[codes]`` scattered into
the kept positions, so back-propagation gives every centroid the **sum** of the gradients of
the weights assigned to it (Han et al., 2016, eq. 3), and the optimizer steps the centroids.
Assignments stay fixed while the centroids move.

The codebooks finally round to float16, which is how the codec stores them, so the model
that leaves :func:`finetune_centroids` is exactly what the codec can represent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fedsqueeze.codec.kmeans import assign, kmeans_codebook

__all__ = ["SharedTensor", "finetune_centroids", "share_weights", "shared_state"]

logger = logging.getLogger(__name__)

# The smallest positive float16 (a subnormal): a centroid that rounds to 0 is nudged here,
# so a shared weight is never mistaken for a pruned one.
_FP16_TINY = 2.0**-24


@dataclass(frozen=True, eq=False)
class SharedTensor:
    """One weight tensor in weight-shared form (``eq=False``: it holds tensors).

    Attributes
    ----------
    shape : tuple[int, ...]
        The weight's shape.
    positions : Tensor
        ``int64 [k]``: flat indices of the kept (unpruned) weights, ascending.
    codes : Tensor
        ``int64 [k]``: index into ``codebook`` of every kept weight.
    codebook : Tensor
        ``float32 [2^bits]``: the shared values (not necessarily sorted after training).
    """

    shape: tuple[int, ...]
    positions: Tensor
    codes: Tensor
    codebook: Tensor

    def dense(self, codebook: Tensor | None = None) -> Tensor:
        """The weight tensor: ``codebook[codes]`` at ``positions``, zero elsewhere.

        Parameters
        ----------
        codebook : Tensor or None, optional
            ``float32 [2^bits]`` to use instead of :attr:`codebook` (e.g. a trainable
            parameter: the result is differentiable with respect to it).

        Returns
        -------
        Tensor
            ``float32`` of :attr:`shape`.
        """
        book = self.codebook if codebook is None else codebook
        numel = 1
        for d in self.shape:
            numel *= d
        flat = torch.zeros(numel, dtype=book.dtype, device=book.device)
        return flat.scatter(0, self.positions, book[self.codes]).view(self.shape)


def share_weights(
    state: Mapping[str, Tensor], masks: Mapping[str, Tensor], bits: int
) -> dict[str, SharedTensor]:
    """Fit a ``2^bits`` codebook to the kept values of every masked tensor.

    Parameters
    ----------
    state : Mapping[str, Tensor]
        The model's weights by name (only the names in ``masks`` are used). Not modified.
    masks : Mapping[str, Tensor]
        ``bool`` keep-masks, each of its weight's shape.
    bits : int
        Code width, 1..8.

    Returns
    -------
    dict[str, SharedTensor]
        One entry per mask, in the masks' order; codebooks from
        :func:`fedsqueeze.codec.kmeans.kmeans_codebook` (linear initialisation, as in the
        paper) and nearest-centroid codes.
    """
    out: dict[str, SharedTensor] = {}
    for name, mask in masks.items():
        weight = state[name].detach().to(torch.float32)
        if mask.shape != weight.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask for {name!r} must be bool of shape {tuple(weight.shape)}")
        positions = torch.nonzero(mask.reshape(-1)).view(-1)
        kept = weight.reshape(-1)[positions]
        codebook = kmeans_codebook(kept, bits)
        codes = assign(kept, codebook).to(torch.int64)
        out[name] = SharedTensor(tuple(weight.shape), positions, codes, codebook)
    return out


def shared_state(model: nn.Module, shared: Mapping[str, SharedTensor]) -> dict[str, Tensor]:
    """The model's ``state_dict`` with the shared tensors written in dense form.

    Returns
    -------
    dict[str, Tensor]
        Detached copies; the model is not modified.
    """
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    for name, st in shared.items():
        state[name] = st.dense().to(state[name].dtype)
    return state


def finetune_centroids(
    model: nn.Module,
    shared: Mapping[str, SharedTensor],
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    train_others: bool = True,
    on_epoch: Callable[[], None] | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> dict[str, SharedTensor]:
    """Train the codebooks (and optionally the other parameters) with fixed assignments.

    Parameters
    ----------
    model : nn.Module
        The classifier; its non-shared parameters (biases) are updated in place when
        ``train_others`` is true, and its shared weights are set to the final dense form.
    shared : Mapping[str, SharedTensor]
        From :func:`share_weights`; not modified.
    x : Tensor
        ``float32 [N, ...]`` training inputs.
    y : Tensor
        ``int64 [N]`` labels, or whatever ``loss_fn`` takes as targets (``[N, ...]``, e.g. a
        teacher's logits).
    epochs : int
        Passes over the data, ``>= 0`` (0 only rounds the codebooks to float16).
    lr : float
        Adam's learning rate, ``> 0``.
    batch_size : int
        Examples per step, ``>= 1``.
    seed : int
        Seeds the shuffling.
    train_others : bool, optional
        Whether the parameters that are not shared (biases) train too.
    on_epoch : Callable[[], None] or None, optional
        Called after every epoch (for progress bars).
    loss_fn : Callable[[Tensor, Tensor], Tensor] or None, optional
        ``loss_fn(logits, y[batch])`` → scalar; cross-entropy when ``None`` (a distillation
        loss against a teacher's logits trains a student this way).

    Returns
    -------
    dict[str, SharedTensor]
        The same positions and codes with trained codebooks, rounded to float16-representable
        values (never exactly zero).
    """
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise ValueError(
            f"need epochs >= 0, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}"
        )
    started = time.perf_counter()
    books = {name: nn.Parameter(st.codebook.clone()) for name, st in shared.items()}
    others = {
        name: p for name, p in model.named_parameters() if name not in shared and p.requires_grad
    }
    trainable = list(books.values()) + (list(others.values()) if train_others else [])
    opt = torch.optim.Adam(trainable, lr=lr)
    shuffler = torch.Generator().manual_seed(seed)
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    n = int(x.shape[0])
    loss_value = float("nan")
    try:
        for _ in range(epochs):
            order = torch.randperm(n, generator=shuffler)
            for start in range(0, n, batch_size):
                batch = order[start : start + batch_size]
                params: dict[str, Tensor] = dict(others)
                params.update({name: st.dense(books[name]) for name, st in shared.items()})
                logits = functional_call(model, params, (x[batch],))
                loss = (loss_fn or F.cross_entropy)(logits, y[batch])
                opt.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                opt.step()
                loss_value = float(loss.detach())
            if on_epoch is not None:
                on_epoch()
    finally:
        for module, training in modes:
            module.training = training
    out = {
        name: replace(st, codebook=_fp16_codebook(books[name].detach()))
        for name, st in shared.items()
    }
    with torch.no_grad():
        current = dict(model.named_parameters())
        for name, st in out.items():
            current[name].copy_(st.dense())
    logger.info(
        "centroid fine-tuning: %d epochs, last loss %.4f, %.1f s",
        epochs,
        loss_value,
        time.perf_counter() - started,
    )
    return out


def _fp16_codebook(codebook: Tensor) -> Tensor:
    """Round to float16-representable float32, nudging exact zeros off zero."""
    rounded = codebook.to(torch.float16).to(torch.float32)
    zero = rounded == 0
    if bool(zero.any()):
        sign = torch.where(codebook < 0, -1.0, 1.0)
        rounded = torch.where(zero, sign * _FP16_TINY, rounded)
    return rounded
