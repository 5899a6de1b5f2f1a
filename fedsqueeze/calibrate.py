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
    "HELD_OUT_LINES",
    "TIER_COSTS",
    "check_model_dir",
    "evenly",
    "held_out_tier_costs",
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
    prior: Sequence[str] = (),
    tier_costs: bool = False,
) -> dict[str, Tensor]:
    """Input moments of every Linear and row weights of the input embeddings of the
    Hugging Face model in ``model_dir`` (config, weights and tokenizer files; loaded
    offline by ``transformers``, the ``text`` extra), over ``lines`` in batches of
    ``batch``, each line cut to ``max_length`` tokens. Moments are float32 ``[cols,
    cols]``; row weights float64 ``[rows]``, the rows never read sharing the Good-Turing
    unseen mass (:func:`~fedsqueeze.codec.row_tiers.smoothed_counts`), evenly or, with
    ``prior`` lines (generic text of the model's kind), in proportion to how often the
    tokenizer reads each row in them (a back-off; no forward pass). ``progress(done,
    total)`` is called after each batch. ``tier_costs``: the input embeddings' deferred-
    tier costs too, measured on the lines held out from themselves
    (:func:`held_out_tier_costs`: the weights from the even lines, the output on up to
    :data:`HELD_OUT_LINES` odd ones; four more passes over those), as the entry
    ``NAME#tier_costs`` (float64 ``[unread, fill]``).

    Raises
    ------
    ConfigError
        Without ``transformers``, a directory ``transformers`` cannot load a model and
        tokenizer from, no lines, or a batch or length below 1; with ``tier_costs``,
        fewer than 4 lines or held-out lines the changes do not move.
    """
    if batch < 1 or max_length < 1:
        raise ConfigError(f"batch and max_length must be at least 1, got {batch} and {max_length}")
    if not lines:
        raise ConfigError("no text to calibrate on")
    if tier_costs and len(lines) < 4:
        raise ConfigError(f"tier costs need at least 4 lines of text, got {len(lines)}")
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
        for done, features, mask in _batches(tokenizer, lines, batch, max_length):
            yield partial(model, **features), mask
            if progress is not None:  # the batch's statistics are in
                progress(done, len(lines))

    try:
        total = _summed(model, passes(), statistics, only)
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise ConfigError(
            f"running the model in {model_dir} on the text failed: {first_line(exc)}"
        ) from None
    backoff = _token_counts(tokenizer, prior, max_length, embeddings) if prior else None
    result = {
        name: smoothed_counts(value, backoff) if value.ndim == 1 else value.to(torch.float32)
        for name, value in total.items()
    }
    if tier_costs:
        tables = [name for name, value in result.items() if value.ndim == 1]
        if len(tables) != 1 or not isinstance(embeddings, torch.nn.Embedding):
            raise ConfigError(
                "tier costs need the model's input embeddings to be one torch.nn.Embedding"
            )
        (table,) = tables
        fit = _token_counts(tokenizer, lines[0::2], max_length, embeddings)
        held = evenly(lines[1::2], HELD_OUT_LINES)

        def embed(texts: Sequence[str]) -> Tensor:
            return _pooled(model, tokenizer, texts, batch, max_length)

        try:
            costs = held_out_tier_costs(
                embed, embeddings.weight, smoothed_counts(fit, backoff), fit > 0, held
            )
        except ValueError as exc:
            raise ConfigError(f"tier costs: {exc}") from None
        result[table + TIER_COSTS] = torch.tensor(costs, dtype=torch.float64)
    return result


#: The suffix of a calibration entry holding a table's deferred-tier costs.
TIER_COSTS = "#tier_costs"
#: Most held-out lines the tier costs are measured on.
HELD_OUT_LINES = 512
#: A mean cosine lost below this is float rounding (float32 outputs): the output did not move.
_UNMOVED = 1e-6


def evenly(items: Sequence[str], most: int) -> list[str]:
    """Up to ``most`` of ``items``, evenly spaced from the first (the held-out lines of
    :func:`held_out_tier_costs`)."""
    return list(items[:: max(1, len(items) // most)][:most])


def held_out_tier_costs(
    embed: Callable[[Sequence[str]], Tensor],
    table: Tensor,
    weights: Tensor,
    read: Tensor,
    held: Sequence[str],
    seed: int = 0,
) -> tuple[float, float]:
    """The ``(unread, fill)`` costs of a lookup table's deferred tier
    (:attr:`~fedsqueeze.codec.nested_gptq.Calibration.tier_costs`): how much the model's
    output on ``held`` lines moves, per unit of the row-weighted squared error the
    encoder's order predicts, under three changes of ``table`` (changed in place, and
    restored before this returns):

    * noise of 0.3 times each row's norm in the rows ``read`` marks (the reference);
    * noise of 0.6 times each row's distance to their mean in the rows it does not mark:
      ``unread`` is its cost per unit over the reference's;
    * those rows at their mean row: ``fill`` is its cost per unit over that noise's.

    ``embed(lines)`` gives one unit-norm output row per line (e.g. mean-pooled last
    hidden states); ``weights`` are the row weights of the text that ``read`` counts
    (held out from ``held``), the cost is 1 − the mean cosine to the unchanged output.

    Raises
    ------
    ValueError
        No held-out line, no row read or none unread, or held-out outputs that the
        reference or the noise does not move.
    """
    if not held:
        raise ValueError("no held-out lines")
    if not bool(read.any()) or bool(read.all()):
        raise ValueError("the fitting lines read no row, or every row: nothing to compare")
    original = table.detach().clone()
    w = weights.to(torch.float64)
    with torch.no_grad():
        reference = embed(held)

    def cost(rows: Tensor, changed: Tensor) -> float:
        perturbed = original.clone()
        perturbed[rows] = changed.to(original.dtype)
        with torch.no_grad():
            try:
                table.copy_(perturbed)
                got = embed(held)
            finally:
                table.copy_(original)
        lost = 1.0 - float((got * reference).sum(dim=1).mean())
        if lost < _UNMOVED:
            lost = 0.0  # rounding, not a change of the output
        error = (changed.to(torch.float64) - original[rows].to(torch.float64)).square().sum(1)
        return lost / float((w[rows] * error).sum())

    g = torch.Generator().manual_seed(seed)

    values = original.to(torch.float32)

    def noise(rows: Tensor, size: Tensor) -> Tensor:
        n = torch.randn(values[rows].shape, generator=g)
        moved: Tensor = values[rows] + n / n.norm(dim=1, keepdim=True) * size
        return moved

    unread = ~read
    mean = values[unread].mean(dim=0)
    spread = (values[unread] - mean).norm(dim=1, keepdim=True)
    base = cost(read, noise(read, 0.3 * values[read].norm(dim=1, keepdim=True)))
    noisy = cost(unread, noise(unread, 0.6 * spread))
    filled = cost(unread, mean.expand(int(unread.sum()), -1))
    if base <= 0 or noisy <= 0:
        raise ValueError(
            "too little text: the held-out lines' outputs do not move when the rows the "
            "other lines read, or the others, change"
        )
    return noisy / base, filled / noisy


def _pooled(
    model: Any, tokenizer: Any, lines: Sequence[str], batch: int, max_length: int
) -> Tensor:
    """Each line's last hidden state, mean-pooled over its tokens and of unit norm."""
    out: list[Tensor] = []
    for _done, features, mask in _batches(tokenizer, lines, batch, max_length):
        hidden = model(**features)[0].to(torch.float32)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        out.append(torch.nn.functional.normalize(pooled, dim=1))
    return torch.cat(out)


def _batches(
    tokenizer: Any, lines: Sequence[str], batch: int, max_length: int
) -> Iterator[tuple[int, dict[str, Any], Tensor]]:
    """``(lines done, the model's keyword arguments, [batch, seq] mask of real tokens)``
    per ``batch`` lines, each cut to ``max_length`` tokens (padded when ``batch > 1``)."""
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
        yield min(start + batch, len(lines)), dict(features), mask


def _token_counts(
    tokenizer: Any, lines: Sequence[str], max_length: int, embeddings: torch.nn.Module
) -> Tensor:
    """How often the tokenizer's ids of ``lines`` (each cut to ``max_length`` tokens) read
    each row of ``embeddings`` (float64 ``[rows]``).

    Raises
    ------
    ConfigError
        An id beyond the table (a tokenizer that does not match the model).
    """
    rows = int(getattr(embeddings, "num_embeddings", 0))
    counts = torch.zeros(rows, dtype=torch.float64)
    for start in range(0, len(lines), 256):
        ids = tokenizer(list(lines[start : start + 256]), truncation=True, max_length=max_length)
        flat = torch.tensor([i for line in ids["input_ids"] for i in line], dtype=torch.int64)
        if flat.numel() and int(flat.max()) >= rows:
            raise ConfigError(
                f"the tokenizer gives id {int(flat.max())}, beyond the {rows} rows of the "
                "input embeddings"
            )
        counts += torch.bincount(flat, minlength=rows).to(torch.float64)
    return counts


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
