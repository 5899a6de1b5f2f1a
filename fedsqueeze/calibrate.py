"""Calibration from a model and text: what a calibrated progressive encode is given.

A progressive encode can choose its codes with data (:mod:`fedsqueeze.codec.nested_gptq`):
each Linear's input moments ``H = Σ x xᵀ`` let GPTQ round for a small *output* error at
every prefix, and a lookup table's per-row read counts let the encoder send the rows in
tiers, the most-read refined first (:mod:`fedsqueeze.codec.row_tiers`). Both come from
running the model on text, which is what this module does:

* :func:`input_moments`, :func:`row_counts` and :func:`summed_moments` collect them with
  forward hooks over one pass or many;
* :func:`text_calibration` runs a Hugging Face model directory over lines of text, batch
  by batch, and returns one mapping (weight name → ``[cols, cols]`` moments for every
  Linear, ``[rows]`` weights for the input embeddings), which is the format of the
  ``--calibration`` file of ``fedsqueeze codec encode`` (``fedsqueeze codec calibrate``
  writes it).

The text should be what the model will serve: row weights counted on the users' own
text pay far more than weights counted on generic text (all-MiniLM-L6-v2 at 1/8 of its
fp32 size: embedding cosine 0.993 against 0.985; BENCHMARKS.md, "Row weights from the
clients' own text").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedsqueeze.codec.row_tiers import smoothed_counts
from fedsqueeze.errors import ConfigError, first_line

__all__ = [
    "check_model_dir",
    "input_moments",
    "read_lines",
    "row_counts",
    "summed_moments",
    "text_calibration",
]

Statistic = Callable[[torch.nn.Module, Tensor], Tensor]


def _sum_inputs(
    module: torch.nn.Module,
    run: Callable[[], Any],
    mask: Tensor,
    statistics: Mapping[type[torch.nn.Module], Statistic],
    only: Iterable[torch.nn.Module] | None = None,
) -> dict[str, Tensor]:
    """For every layer of a kind in ``statistics`` (of ``only``'s layers, when given):
    its ``statistic(layer, inputs)`` summed over one forward pass ``run()``, keyed by the
    layer's weight name; the inputs are the first argument, flattened to one row per
    token and cut to the tokens ``mask`` marks 1."""
    sums: dict[str, Tensor] = {}
    keep = mask.reshape(-1).bool()
    chosen = None if only is None else {id(m) for m in only}
    handles = []
    for mod_name, mod in module.named_modules():
        statistic = next((f for kind, f in statistics.items() if isinstance(mod, kind)), None)
        if statistic is None or (chosen is not None and id(mod) not in chosen):
            continue
        key = f"{mod_name}.weight" if mod_name else "weight"

        def hook(
            layer: torch.nn.Module,
            args: tuple[Tensor, ...],
            key: str = key,
            statistic: Statistic = statistic,
        ) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]) if x.is_floating_point() else x.reshape(-1)
            if x.shape[0] == keep.numel():
                x = x[keep]
            sums[key] = sums[key] + statistic(layer, x) if key in sums else statistic(layer, x)

        handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return sums


def _moments(_layer: torch.nn.Module, x: Tensor) -> Tensor:
    x = x.to(torch.float64)
    return x.T @ x


def _counts(layer: torch.nn.Module, ids: Tensor) -> Tensor:
    rows = layer.num_embeddings if isinstance(layer, torch.nn.Embedding) else 0
    return torch.bincount(ids.to(torch.int64), minlength=rows).to(torch.float64)


def input_moments(
    module: torch.nn.Module, run: Callable[[], Any], mask: Tensor
) -> dict[str, Tensor]:
    """``Σ x xᵀ`` (float64) of every Linear's input over the unpadded tokens of one
    forward pass ``run()``; keyed by the Linear's weight name. ``mask``: ``[batch, seq]``
    1 for a real token."""
    return _sum_inputs(module, run, mask, {torch.nn.Linear: _moments})


def summed_moments(
    module: torch.nn.Module, passes: Iterable[tuple[Callable[[], Any], Tensor]]
) -> dict[str, Tensor]:
    """:func:`input_moments` summed over forward passes ``(run, mask)``: the moments of
    text too long for one batch."""
    return _summed(module, passes, {torch.nn.Linear: _moments})


def _summed(
    module: torch.nn.Module,
    passes: Iterable[tuple[Callable[[], Any], Tensor]],
    statistics: Mapping[type[torch.nn.Module], Statistic],
    only: Iterable[torch.nn.Module] | None = None,
) -> dict[str, Tensor]:
    """:func:`_sum_inputs` summed over forward passes ``(run, mask)``."""
    total: dict[str, Tensor] = {}
    for run, mask in passes:
        for name, value in _sum_inputs(module, run, mask, statistics, only).items():
            total[name] = total[name] + value if name in total else value
    return total


def row_counts(module: torch.nn.Module, run: Callable[[], Any], mask: Tensor) -> dict[str, Tensor]:
    """How often one forward pass ``run()`` reads each row of every ``nn.Embedding`` of
    ``module`` (float64 ``[rows]``, over the tokens ``mask`` marks 1), keyed by the
    embedding's weight name: the row weights of :attr:`Calibration.rows
    <fedsqueeze.codec.nested_gptq.Calibration.rows>` (give the unread rows a share first,
    e.g. :func:`fedsqueeze.codec.row_tiers.smoothed_counts`)."""
    return _sum_inputs(module, run, mask, {torch.nn.Embedding: _counts})


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped.

    Raises
    ------
    ConfigError
        A file that is not UTF-8 text or holds no non-blank line.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"{path} holds no text (no non-blank line)")
    return lines


def text_calibration(
    model_dir: Path,
    lines: Sequence[str],
    *,
    batch: int = 32,
    max_length: int = 128,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Tensor]:
    """Input moments of every Linear and row weights of the input embeddings of the
    Hugging Face model in ``model_dir`` (config, weights and tokenizer files; loaded
    offline by ``transformers``, the ``text`` extra), over ``lines`` in batches of
    ``batch``, each line cut to ``max_length`` tokens. Moments are float32 ``[cols,
    cols]``; row weights float64 ``[rows]``, the rows never read sharing the Good-Turing
    unseen mass (:func:`~fedsqueeze.codec.row_tiers.smoothed_counts`). ``progress(done,
    total)`` is called after each batch.

    Raises
    ------
    ConfigError
        Without ``transformers``, a directory ``transformers`` cannot load a model and
        tokenizer from, no lines, or a batch or length below 1.
    """
    if batch < 1 or max_length < 1:
        raise ConfigError(f"batch and max_length must be at least 1, got {batch} and {max_length}")
    if not lines:
        raise ConfigError("no text to calibrate on")
    model, tokenizer = _load(model_dir)
    if getattr(tokenizer, "pad_token", None) is None:
        # Padded tokens are masked out of every statistic, so any token pads; a
        # tokenizer with none at all gets one line a pass.
        eos = getattr(tokenizer, "eos_token", None)
        if eos is not None:
            tokenizer.pad_token = eos
        else:
            batch = 1
    embeddings = model.get_input_embeddings()
    statistics: dict[type[torch.nn.Module], Statistic] = {
        torch.nn.Linear: _moments,
        torch.nn.Embedding: _counts,
    }
    only = [m for m in model.modules() if isinstance(m, torch.nn.Linear) or m is embeddings]

    def passes() -> Iterator[tuple[Callable[[], Any], Tensor]]:
        for start in range(0, len(lines), batch):
            features = tokenizer(
                list(lines[start : start + batch]),
                padding=batch > 1,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            mask = features.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(features["input_ids"])
            yield partial(model, **dict(features)), mask
            if progress is not None:  # the batch's statistics are in
                progress(min(start + batch, len(lines)), len(lines))

    try:
        total = _summed(model, passes(), statistics, only)
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise ConfigError(
            f"running the model in {model_dir} on the text failed: {first_line(exc)}"
        ) from None
    return {
        name: smoothed_counts(value) if value.ndim == 1 else value.to(torch.float32)
        for name, value in total.items()
    }


def check_model_dir(model_dir: Path) -> None:
    """Refuse (``ConfigError``) a model path that is not a folder, before any work."""
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir} is not a directory (give a Hugging Face model folder)")


def _load(model_dir: Path) -> tuple[Any, Any]:
    """``transformers``' model (eager attention, eval mode) and tokenizer in
    ``model_dir``, offline."""
    from fedsqueeze.tasks.text_model import offline_transformers

    try:
        transformers = offline_transformers()
    except ImportError:
        raise ConfigError(
            "calibrating from text needs transformers: pip install 'fedsqueeze[text]'"
        ) from None
    check_model_dir(model_dir)
    try:
        model = transformers.AutoModel.from_pretrained(
            str(model_dir), local_files_only=True, attn_implementation="eager"
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(model_dir), local_files_only=True
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"cannot load a model and tokenizer from {model_dir}: {first_line(exc)}"
        ) from None
    model.eval()
    return model, tokenizer
