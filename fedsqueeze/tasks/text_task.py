"""The ``minilm-text`` task: all-MiniLM-L6-v2 fine-tuned on the standard library's docstrings.

The model is :class:`~fedsqueeze.tasks.text_model.MiniLMClassifier` (frozen pretrained encoder,
LoRA adapters and a head trained), the data :mod:`fedsqueeze.tasks.stdlib_corpus` tokenized to
``int64 [N, max_length]`` token ids. Needs the ``text`` extra (``pip install
'fedsqueeze[text]'``); nothing of it is imported before a model or data set is built.

Options go after an ``@`` in the task name, comma-separated, e.g.
``minilm-text@lora-rank=8,max-length=32,train-examples=48``:

=================  ========  ============================================================
key                default   meaning
=================  ========  ============================================================
``lora-rank``      4         rank of the adapters (0: none)
``lora-alpha``     8         LoRA scale numerator (the update is ``alpha/rank · B A x``)
``lora-targets``   qkvo      which attention projections get adapters: letters of
                             ``q`` (query), ``k`` (key), ``v`` (value), ``o`` (output)
``freeze-lora-a``  0         1: every adapter's ``A`` stays at its seeded start and only
                             ``B`` trains (FFA-LoRA): half the adapter bytes, and
                             averaging ``B`` averages ``B A`` exactly
``unfreeze-top``   0         top layers trained in full instead (no adapters there)
``max-length``     64        tokens per example, 8 to 64 (longer texts are truncated)
``train-examples`` 0         keep only this many training examples (0: all 2,062)
``test-examples``  0         keep only this many test examples (0: all 526)
=================  ========  ============================================================

A subset is the first examples of a fixed order (by the SHA-256 of the text), so it is the
same on every machine. Tokenization runs once per process and option set (cached), not per
round. Training and evaluation are :func:`fedsqueeze.tasks.training.train` / ``evaluate``
(Adam or SGD on the parameters with ``requires_grad``, i.e. the ``trainable.*`` ones).

The task names ``frozen.*`` (and ``seeded.*``, the fixed ``A`` of ``freeze-lora-a``) as its
frozen tensors (:attr:`~fedsqueeze.tasks.base.Task.frozen`): a run freezes them by default
(run config ``freeze = "auto"``), so the pretrained encoder travels at most once and only
the adapters and the head go down and up each round.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, fields

import torch
from torch import nn

from fedsqueeze.errors import ConfigError
from fedsqueeze.tasks.base import Task, TaskData
from fedsqueeze.tasks.models import build_seeded
from fedsqueeze.tasks.stdlib_corpus import FAMILIES, Docstring, extract_corpus
from fedsqueeze.tasks.training import evaluate, train

__all__ = ["MINILM_TEXT", "TextTaskOptions", "load_text_data", "make_text_task", "parse_text_task"]

MINILM_TEXT = "minilm-text"
MAX_LENGTH_LIMIT = 64
_LETTERS = {"q": "query", "k": "key", "v": "value", "o": "output"}


@dataclass(frozen=True)
class TextTaskOptions:
    """The options of ``minilm-text`` (see the module docstring; names with ``_``)."""

    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_targets: str = "qkvo"
    freeze_lora_a: int = 0
    unfreeze_top: int = 0
    max_length: int = 64
    train_examples: int = 0
    test_examples: int = 0

    def __post_init__(self) -> None:
        if self.lora_rank < 0 or self.lora_alpha <= 0:
            raise ConfigError("lora-rank must be >= 0 and lora-alpha > 0")
        if not self.lora_targets or set(self.lora_targets) - set(_LETTERS):
            raise ConfigError(f"lora-targets must be letters of 'qkvo', got {self.lora_targets!r}")
        if self.freeze_lora_a not in (0, 1):
            raise ConfigError(f"freeze-lora-a must be 0 or 1, got {self.freeze_lora_a}")
        if not 0 <= self.unfreeze_top <= 6:
            raise ConfigError(f"unfreeze-top must be in 0..6, got {self.unfreeze_top}")
        if not 8 <= self.max_length <= MAX_LENGTH_LIMIT:
            raise ConfigError(f"max-length must be in 8..{MAX_LENGTH_LIMIT}, got {self.max_length}")
        if self.train_examples < 0 or self.test_examples < 0:
            raise ConfigError("train-examples and test-examples must be >= 0")

    def name(self) -> str:
        """The task name that gives these options (the defaults are left out)."""
        default = TextTaskOptions()
        parts = [
            f"{f.name.replace('_', '-')}={getattr(self, f.name)}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        ]
        return MINILM_TEXT + ("@" + ",".join(parts) if parts else "")


def parse_text_task(name: str) -> TextTaskOptions | None:
    """The options named by ``minilm-text[@key=value,...]``; ``None`` for another task.

    Raises
    ------
    ConfigError
        If an option is unknown or its value invalid.
    """
    base, sep, rest = name.partition("@")
    if base != MINILM_TEXT:
        return None
    known = {f.name.replace("_", "-"): f for f in fields(TextTaskOptions)}
    kwargs: dict[str, object] = {}
    for item in rest.split(",") if sep else []:
        key, eq, text = item.partition("=")
        f = known.get(key.strip())
        if f is None or not eq:
            raise ConfigError(
                f"task {name!r}: expected key=value with a key of {', '.join(known)}, got {item!r}"
            )
        try:
            kind = str(f.type)
            kwargs[f.name] = (
                int(text) if kind == "int" else float(text) if kind == "float" else text.strip()
            )
        except ValueError:
            raise ConfigError(f"task {name!r}: {key} = {text!r} is not a {f.type}") from None
    return TextTaskOptions(**kwargs)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=8)
def make_text_task(options: TextTaskOptions) -> Task:
    """The :class:`Task` for ``options`` (one object per option set)."""
    return Task(
        name=options.name(),
        build_model=functools.partial(_build_model, options),
        load_data=functools.partial(load_text_data, options),
        train=train,
        evaluate=evaluate,
        frozen=("frozen.*", "seeded.*") if options.freeze_lora_a else ("frozen.*",),
    )


def _build_model(options: TextTaskOptions, seed: int) -> nn.Module:
    from fedsqueeze.tasks.text_model import MiniLMClassifier, load_pretrained_encoder

    targets = tuple(_LETTERS[c] for c in dict.fromkeys(options.lora_targets))

    def factory() -> nn.Module:
        return MiniLMClassifier(
            load_pretrained_encoder(),
            len(FAMILIES),
            lora_rank=options.lora_rank,
            lora_alpha=options.lora_alpha,
            unfreeze_top=options.unfreeze_top,
            lora_targets=targets,
            freeze_lora_a=bool(options.freeze_lora_a),
        )

    return build_seeded(factory, seed)


@functools.lru_cache(maxsize=4)
def load_text_data(options: TextTaskOptions) -> TaskData:
    """Tokenize the corpus for ``options`` (cached per process: treat it as read-only).

    Returns
    -------
    TaskData
        ``x_train`` ``int64 [N_train, max_length]`` and ``x_test`` ``int64 [N_test,
        max_length]`` token ids (0-padded), ``y_*`` ``int64`` labels in ``[0, 10)``,
        ``groups_train`` ``int64 [N_train]``: the source module of each training example
        (for natural partitions), ``num_classes`` 10.
    """
    corpus = extract_corpus()
    train_docs = _subset([d for d in corpus if not d.test], options.train_examples)
    test_docs = _subset([d for d in corpus if d.test], options.test_examples)
    modules = sorted({d.module for d in train_docs})
    module_id = {m: i for i, m in enumerate(modules)}
    return TaskData(
        x_train=_tokenize(train_docs, options.max_length),
        y_train=torch.tensor([d.label for d in train_docs], dtype=torch.int64),
        x_test=_tokenize(test_docs, options.max_length),
        y_test=torch.tensor([d.label for d in test_docs], dtype=torch.int64),
        num_classes=len(FAMILIES),
        groups_train=torch.tensor([module_id[d.module] for d in train_docs], dtype=torch.int64),
    )


def _subset(docs: list[Docstring], limit: int) -> list[Docstring]:
    """The first ``limit`` documents by the hash of their text, in corpus order (0: all)."""
    if limit == 0 or limit >= len(docs):
        return docs
    ranked = sorted(range(len(docs)), key=lambda i: hashlib.sha256(docs[i].text.encode()).digest())
    keep = sorted(ranked[:limit])
    return [docs[i] for i in keep]


def _tokenize(docs: list[Docstring], max_length: int) -> torch.Tensor:
    from fedsqueeze.tasks.text_model import load_tokenizer

    encoded = load_tokenizer()(
        [d.text for d in docs],
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    ids: torch.Tensor = encoded["input_ids"].to(torch.int64)
    return ids
