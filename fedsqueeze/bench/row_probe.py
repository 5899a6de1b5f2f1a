"""Probe: bits per row of MiniLM's word embeddings by how often the rows are looked up.

The GPTQ probe (:mod:`fedsqueeze.bench.gptq_probe`) found the word embeddings to be what
keeps a 1/16 prefix below 0.95: half of the model's values, a lookup (no input moments
to compensate with), 0.104 of cosine at 1 bit per value and 1.4 MB more for the second
bit. A lookup table's rows are not equally used: a sentence reads a few of its 30,522
rows, and the same few thousand again and again. This probe measures, by fake
quantization as the GPTQ probe does (same rotation, grid, clip search, level re-fit and
byte count), what giving the rows that text uses more bits than the rest buys:

* **row weights** from the calibration sentences
  (:func:`fedsqueeze.bench.sensitivity.calibration_sentences`, disjoint from the test
  sentences): a row's weight is how often the tokenizer produced its token; the rows
  never seen share the calibration's unseen mass (the Good-Turing estimate: the share of
  tokens seen once), evenly;
* **row plans**: the seen rows at ``hi`` bits, the rest at ``lo`` (``hi > lo``), beside
  every row at one width;
* the embedding's error in the allocation is the **row-weighted** squared error
  (scaled so that an error spread evenly counts as the plain squared error does), times
  its Fisher weight as before, so plans and widths compete in one currency.

Two measurements: the word embeddings alone (everything else fp32) at each plan, and the
GPTQ probe's Lagrangian allocation at 1/20, 1/16 and 1/12 of fp32 with the row plans
among the embedding's options (nearest rounding and GPTQ for the Linears, and GPTQ
allocated by the Linears' squared weight error instead of their output error). The codec
has built the idea since (:mod:`fedsqueeze.codec.row_tiers`); this measures what a free
allocation per tensor reaches, beside the stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from fedsqueeze.bench.gptq_probe import Choice, allocate, input_moments, quantize_tensor
from fedsqueeze.codec.row_tiers import smoothed_counts

__all__ = [
    "EMBEDDINGS",
    "ROW_SOURCES",
    "minilm_row_probe",
    "minilm_row_weights",
    "minilm_tier_costs",
    "row_plan_choice",
    "row_weights",
]

#: The lookup table whose rows get their own widths.
EMBEDDINGS = "embeddings.word_embeddings.weight"
#: ``(hi, lo)`` widths of the seen and the other rows.
PLANS = ((2, 1), (3, 1), (4, 1), (5, 1), (3, 2), (4, 2), (5, 2), (6, 2), (5, 3), (6, 3))


def row_weights(token_ids: list[int], rows: int, prior_ids: list[int] | None = None) -> Tensor:
    """Per row: how often ``token_ids`` holds it; the unseen rows share the Good-Turing
    unseen mass (tokens seen once ÷ all tokens) evenly, in the same units, or with
    ``prior_ids`` in proportion to how often those hold them (a back-off:
    :func:`~fedsqueeze.codec.row_tiers.smoothed_counts`)."""
    if not token_ids:
        raise ValueError("no calibration tokens")
    counts = _counts(token_ids, rows)
    return smoothed_counts(counts, _counts(prior_ids, rows) if prior_ids else None)


def _counts(token_ids: list[int], rows: int) -> Tensor:
    counts = torch.bincount(torch.tensor(token_ids), minlength=rows).to(torch.float64)
    if counts.numel() != rows:
        raise ValueError(f"token ids beyond the table's {rows} rows")
    return counts


def _squared_error(decoded: Tensor, value: Tensor) -> float:
    return float((decoded.to(torch.float64) - value.to(torch.float64)).square().sum())


def _weighted_error(value: Tensor, decoded: Tensor, weights: Tensor) -> float:
    per_row = (decoded.to(torch.float64) - value.to(torch.float64)).square().sum(dim=1)
    return float((per_row * weights).sum() * (weights.numel() / weights.sum()))


def row_plan_choice(
    value: Tensor, seen: Tensor, hi: int, lo: int, weights: Tensor, name: str = EMBEDDINGS
) -> Choice:
    """The rows ``seen`` (bool per row) at ``hi`` bits and the rest at ``lo``, each part
    quantized as :func:`~fedsqueeze.bench.gptq_probe.quantize_tensor` does (its bytes:
    codes, scales, levels); the error row-weighted. ``bits`` is ``hi * 100 + lo``."""
    decoded = torch.empty_like(value, dtype=torch.float32)
    nbytes = 0.0
    for rows, bits in ((seen, hi), (~seen, lo)):
        if not rows.any():
            continue
        part = quantize_tensor(name, value[rows], bits, None, False)
        decoded[rows] = part.decoded
        nbytes += part.nbytes
    nbytes += math.ceil(value.shape[0] / 8)  # which rows are which: a bit each
    return Choice(hi * 100 + lo, nbytes, _weighted_error(value, decoded, weights), decoded)


def _plan(bits: int) -> str:
    """A choice's plan in words: ``"3 bits"``, or ``"seen 4, rest 1"`` for a row plan
    (:func:`row_plan_choice`'s ``hi * 100 + lo``)."""
    return f"{bits} bits" if bits < 100 else f"seen {bits // 100}, rest {bits % 100}"


def minilm_row_probe(out: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Both measurements on all-MiniLM-L6-v2 (``None`` without the bench extra)."""
    from fedsqueeze.bench.codec import minilm_sentence_model
    from fedsqueeze.bench.progressive import minilm, stdlib_sentences
    from fedsqueeze.bench.sensitivity import calibration_sentences, minilm_fisher

    test = stdlib_sentences()
    loaded = minilm(test)
    probe_model = minilm_sentence_model()
    calibration = calibration_sentences(limit=1 << 30)  # every one there is, for the rows
    if loaded is None or probe_model is None:
        return None
    first = calibration_sentences()  # the GPTQ probe's 128: its Fisher weights and moments
    fisher = minilm_fisher(first)
    if fisher is None:
        return None
    state, cosine = loaded
    model, inner = probe_model
    value = state[EMBEDDINGS]
    ids = [i for s in calibration for i in model.tokenizer(s)["input_ids"]]
    test_ids = [i for s in test for i in model.tokenizer(s)["input_ids"]]
    weights = row_weights(ids, value.shape[0])
    seen = torch.bincount(torch.tensor(ids), minlength=value.shape[0]) > 0
    covered = sum(bool(seen[i]) for i in test_ids) / len(test_ids)
    report: dict[str, Any] = {
        "calibration_sentences": len(calibration),
        "calibration_tokens": len(ids),
        "rows_seen": int(seen.sum()),
        "test_tokens": len(test_ids),
        "test_rows": len(set(test_ids)),
        "test_tokens_on_seen_rows": covered,
    }
    out(
        f"{len(test)} test sentences, {len(test_ids)} tokens on {len(set(test_ids))} rows; "
        f"{len(calibration)} calibration sentences, {len(ids)} tokens on {int(seen.sum())} "
        f"of {value.shape[0]} rows; {covered:.1%} of the test sentences' tokens fall on them"
    )
    options = [
        Choice(c.bits, c.nbytes, _weighted_error(value, c.decoded, weights), c.decoded)
        for c in (quantize_tensor(EMBEDDINGS, value, k, None, False) for k in range(1, 7))
    ]
    options += [row_plan_choice(value, seen, hi, lo, weights) for hi, lo in PLANS]
    alone = []
    for c in options:
        label = _plan(c.bits)
        cos = cosine({**state, EMBEDDINGS: c.decoded})
        alone.append({"plan": label, "bytes": c.nbytes, "cosine": cos})
        out(f"  word embeddings alone, {label:>16}: {c.nbytes / 1e6:5.2f} MB  cosine {cos:.4f}")
    report["embeddings_alone"] = alone

    features = model.tokenize(first)
    inner.load_state_dict(state)
    moments = input_moments(inner, lambda: model(dict(features)), features["attention_mask"])
    matrices = [k for k, v in state.items() if v.ndim >= 2]
    fixed = sum(4.0 * v.numel() for k, v in state.items() if v.ndim < 2)
    fp32 = sum(4 * v.numel() for v in state.values())
    rows: list[dict[str, Any]] = []

    def linears(gptq: bool) -> dict[str, list[Choice]]:
        return {
            name: [
                quantize_tensor(name, state[name], k, moments.get(name),
                                gptq and moments.get(name) is not None)
                for k in range(1, 7)
            ]
            for name in matrices
            if name != EMBEDDINGS
        }  # fmt: skip

    def methods() -> Iterator[tuple[str, dict[str, list[Choice]]]]:
        yield "rtn", linears(False)
        gptq = linears(True)
        yield "gptq", gptq
        # GPTQ's codes, allocated by the Linears' squared weight error instead of their
        # output error: what the order's metric is worth (BENCHMARKS.md)
        yield (
            "gptq-squared",
            {
                name: [replace(c, error=_squared_error(c.decoded, state[name])) for c in cs]
                for name, cs in gptq.items()
            },
        )

    for method, base in methods():
        for with_rows in (False, True):
            opts = dict(base)
            opts[EMBEDDINGS] = options if with_rows else options[:6]
            for d in (20, 16, 12):
                chosen = allocate(opts, fisher, fp32 / d - fixed)
                if chosen is None:
                    continue
                decoded = {**state, **{k: c.decoded for k, c in chosen.items()}}
                total = fixed + sum(c.nbytes for c in chosen.values())
                cos = cosine(decoded)
                label = _plan(chosen[EMBEDDINGS].bits)
                rows.append(
                    {"method": method, "row_plans": with_rows, "budget": f"1/{d}",
                     "bytes": total, "cosine": cos, "embeddings": label}
                )  # fmt: skip
                out(
                    f"  allocated <= 1/{d} ({fp32 / d / 1e6:.2f} MB), {method}, "
                    f"{'with' if with_rows else 'without'} row plans: {total / 1e6:.2f} MB  "
                    f"cosine {cos:.4f}  (word embeddings: {label})"
                )
    report["allocated"] = rows
    return report


#: Where the bench's row weights come from: text of the same kind from other modules
#: (``calibration``), or other lines of the test sentences' own documents (``domain``:
#: what a federation's clients would count on their own text), the same with the rows
#: it never reads sharing their weight by the calibration text's counts (``backoff``:
#: the clients' counts backed off to generic text the server holds), or the test
#: sentences themselves (``test``: an upper bound on what row weights can buy, never a
#: method).
ROW_SOURCES = ("calibration", "domain", "backoff", "test")


def minilm_row_weights(
    out: Callable[[str], None] = print, source: str = "calibration"
) -> dict[str, Tensor]:
    """:func:`row_weights` of all-MiniLM-L6-v2's word embeddings over ``source``'s text
    (:data:`ROW_SOURCES`: :func:`~fedsqueeze.bench.sensitivity.calibration_text`, every
    docstring line of the calibration modules, or
    :func:`~fedsqueeze.bench.sensitivity.domain_text`, the test modules' other lines,
    both never a test sentence; or ``test``, the test sentences, for the bound), for the
    row tiers of a stream
    (:attr:`~fedsqueeze.codec.nested_gptq.Calibration.rows`).

    Raises
    ------
    ValueError
        An unknown ``source``.
    RuntimeError
        Without the bench extra (the MiniLM weights).
    """
    model, inner, lines = _minilm_and_text(source, "row tiers")
    rows = inner.state_dict()[EMBEDDINGS].shape[0]
    ids = [i for line in lines for i in model.tokenizer(line)["input_ids"]]
    prior = _prior_ids(model, source)
    shared = "by the calibration text's counts" if prior else "evenly"
    out(
        f"\nRow weights of the word embeddings ({source} text): {len(ids)} tokens of "
        f"{len(lines)} lines on {len(set(ids))} of {rows} rows (the rest share the "
        f"Good-Turing unseen mass {shared})"
    )
    if prior:
        from fedsqueeze.bench.progressive import stdlib_sentences

        text, generic = set(ids), set(prior) - set(ids)
        test = {i for line in stdlib_sentences() for i in model.tokenizer(line)["input_ids"]}
        out(
            f"  the calibration text reads {len(generic)} of the {rows - len(text)} rows this "
            f"text never reads; the test sentences read {len(test - text)} of those, "
            f"{len(test & generic)} of them rows the calibration text reads"
        )
    return {EMBEDDINGS: row_weights(ids, rows, prior)}


def _prior_ids(model: Any, source: str) -> list[int] | None:
    """The token ids a ``source``'s unseen rows back off to: the calibration text's for
    ``backoff``, none for the others."""
    if source != "backoff":
        return None
    from fedsqueeze.bench.sensitivity import calibration_text

    return [i for line in calibration_text() for i in model.tokenizer(line)["input_ids"]]


def minilm_tier_costs(
    out: Callable[[str], None] = print, source: str = "calibration", sentences: int = 512
) -> tuple[float, float]:
    """The ``(unread, fill)`` costs of all-MiniLM-L6-v2's word embeddings for a deferred
    tier (:attr:`~fedsqueeze.codec.nested_gptq.Calibration.tier_costs`), measured on
    ``source``'s text held out from itself: row weights (:func:`row_weights`) from its
    even lines, the embedding cosine on up to ``sentences`` of its odd lines (30 to 200
    characters), under :func:`~fedsqueeze.calibrate.held_out_tier_costs`' three changes
    of the table (``fedsqueeze codec calibrate --tier-costs`` does the same for any
    Hugging Face model).

    Raises
    ------
    ValueError
        An unknown ``source``, or held-out lines no perturbation moves.
    RuntimeError
        Without the bench extra (the MiniLM weights).
    """
    from fedsqueeze.calibrate import evenly, held_out_tier_costs

    model, inner, lines = _minilm_and_text(source, "tier costs")
    held = evenly([line for line in lines[1::2] if 30 <= len(line) <= 200], sentences)
    ids = [i for line in lines[0::2] for i in model.tokenizer(line)["input_ids"]]
    weight = inner.state_dict()[EMBEDDINGS]  # shares the parameter's storage
    w = row_weights(ids, weight.shape[0], _prior_ids(model, source))
    read = _counts(ids, weight.shape[0]) > 0

    def embed(texts: Sequence[str]) -> Tensor:
        got: Tensor = model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True)
        return got

    try:
        costs = held_out_tier_costs(embed, weight, w, read, held)
    except ValueError as exc:
        raise ValueError(f"{source} text: {exc}") from None
    out(
        f"\nDeferred-tier costs ({source} text, even lines' reads, {len(held)} odd lines): "
        f"unread rows {costs[0]:.2f}x a read row's cost per unit, at their mean row "
        f"{costs[1]:.2f}x their noise's"
    )
    return costs


def _minilm_and_text(source: str, why: str) -> tuple[Any, torch.nn.Module, list[str]]:
    """all-MiniLM-L6-v2 (``why``: what needs it) and the lines of ``source``'s text
    (:data:`ROW_SOURCES`).

    Raises
    ------
    ValueError
        An unknown ``source``.
    RuntimeError
        Without the bench extra.
    """
    from fedsqueeze.bench.codec import require_minilm
    from fedsqueeze.bench.progressive import stdlib_sentences
    from fedsqueeze.bench.sensitivity import calibration_text, domain_text

    if source not in ROW_SOURCES:
        names = ", ".join(ROW_SOURCES)
        raise ValueError(f"unknown row-weight source {source!r}; choose from {names}")
    model, inner = require_minilm(why)
    texts = {
        "calibration": calibration_text,
        "domain": domain_text,
        "backoff": domain_text,
        "test": stdlib_sentences,
    }
    return model, inner, texts[source]()
