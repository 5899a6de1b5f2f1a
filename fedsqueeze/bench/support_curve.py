"""One digits stream for both size targets: support levels ordered by a measured loss.

Part of ``fedsqueeze bench progressive`` (its ``digits`` part). For each seed of
:data:`SEEDS` a dense digits-cnn is trained (:func:`~fedsqueeze.bench.progressive.
trained_digits`), encoded once with :data:`SPEC` (positions in two support levels,
:mod:`fedsqueeze.codec.support_levels`) and its refinements ordered two ways:

* ``relative``: the data-free greedy order of :mod:`fedsqueeze.codec.level_order`;
* ``loss``: :func:`~fedsqueeze.codec.loss_order.reorder_by_loss` with the mean KL
  divergence from the **whole stream's** decoded model to the prefix's, over the
  1,437 images of the *training* split (the coordinator's images; never the test
  split). KL to the stream's own final model needs no labels, and it is the
  functional counterpart of the codec's invariant (the distance to the full decode
  never rises): each byte should bring the prefix's predictions closer to where the
  stream ends.

Each seed's row also weighs the whole streams against one-shot encodings at the same
final precision (:func:`stream_costs`: with and without support levels, zstd and ANS).

Test accuracy is measured after **every record** (the strictest reading of "anywhere
along the curve") and at the log-spaced points of the other digits curves, with the
points at 1/32 and 1/64 of fp32 (the best complete prefix that fits).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from fedsqueeze.codec import EncodedModel, decode_prefix, decode_state, encode_state
from fedsqueeze.codec import smallest_prefix as smallest
from fedsqueeze.codec.loss_order import reorder_by_loss
from fedsqueeze.codec.spec_text import parse_spec

State = Mapping[str, torch.Tensor]
Json = dict[str, Any]

#: The stream: 88%-sparse at the end, 6% of the weights in its first support level;
#: refinement planes ANS-coded given the coarser bits where that is smaller (format v9).
SPEC = "prune=global:0.88,quant=4:symmetric,levels=1+1+2,float=fp16,grow=0.94,entropy=ans"
SEEDS = (0, 1, 2)
#: What a whole stream is weighed against: the same stream without support levels, and
#: one-shot encodings at the same final precision, each with zstd and with ANS.
COST_SPECS = {
    "grow": "prune=global:0.88,quant=4:symmetric,levels=1+1+2,float=fp16,grow=0.94",
    "levels": "prune=global:0.88,quant=4:symmetric,levels=1+1+2,float=fp16",
    "one_shot": "prune=global:0.88,quant=4:symmetric,float=fp16",
}


def stream_costs(state: State) -> Json:
    """Bytes of each of :data:`COST_SPECS` with zstd 19 (``KEY_zstd``) and with
    ``entropy=ans:19`` (``KEY_ans``), and each stream's ratio to the one-shot encoding
    with the same coder and to the smaller one-shot encoding."""
    out: Json = {}
    for key, text in COST_SPECS.items():
        for coder in ("zstd", "ans"):
            suffix = ",entropy=19" if coder == "zstd" else ",entropy=ans:19"
            out[f"{key}_{coder}"] = encode_state(state, parse_spec(text + suffix), seed=0).nbytes
    best = min(out["one_shot_zstd"], out["one_shot_ans"])
    for key in ("grow", "levels"):
        for coder in ("zstd", "ans"):
            out[f"{key}_{coder}_vs_one_shot"] = out[f"{key}_{coder}"] / out[f"one_shot_{coder}"]
            out[f"{key}_{coder}_vs_best_one_shot"] = out[f"{key}_{coder}"] / best
    return out


def digits_kl_to(
    final: State, seed: int
) -> tuple[Callable[[State], float], Callable[[State], float]]:
    """The loss (mean KL from ``final``'s predictions, training split) and the test
    accuracy of digits-cnn states (a model of ``seed``'s architecture)."""
    from fedsqueeze.tasks.registry import get_task

    task = get_task("digits-cnn")
    data = task.load_data()
    model = task.build_model(seed)
    model.eval()
    model.load_state_dict(dict(final))
    with torch.no_grad():
        reference = F.log_softmax(model(data.x_train), dim=1)

    def loss(state: State) -> float:
        model.load_state_dict(dict(state))
        with torch.no_grad():
            out = F.log_softmax(model(data.x_train), dim=1)
        return float(F.kl_div(out, reference, log_target=True, reduction="batchmean"))

    def accuracy(state: State) -> float:
        model.load_state_dict(dict(state))
        return task.evaluate(model, data.x_test, data.y_test).accuracy

    return loss, accuracy


def record_curve(encoded: EncodedModel, accuracy: Callable[[State], float]) -> list[Json]:
    """Test accuracy after every record from the smallest decodable prefix on."""
    stream = encoded.to_bytes()[:-4]
    start = smallest(encoded)
    rows = []
    end = len(encoded.header.to_bytes())
    for record in encoded.records:
        end += len(record.header_bytes()) + len(record.body)
        if end >= start:
            rows.append({"bytes": end, "quality": accuracy(decode_prefix(stream[:end]).state)})
    return rows


def largest_drop(qualities: list[float]) -> float:
    """The largest fall from any point to any later one."""
    return max((q - min(qualities[i:]) for i, q in enumerate(qualities)), default=0.0)


def at(rows: list[Json], size: int) -> float | None:
    """Quality of the longest measured prefix of at most ``size`` bytes."""
    best = None
    for row in rows:
        if row["bytes"] <= size:
            best = row["quality"]
    return best


def run_seed(seed: int, state: State, accuracy_fp32: float, fp32: int) -> Json:
    """Both orders of :data:`SPEC` for one trained model."""
    from fedsqueeze.bench.progressive import _curve_points

    spec = parse_spec(SPEC)
    encoded = encode_state(state, spec, seed=0)
    loss, accuracy = digits_kl_to(decode_state(encoded), seed)
    out: Json = {"seed": seed, "fp32_accuracy": accuracy_fp32, "fp32_bytes": fp32}
    out["costs"] = stream_costs(state)
    for order, model in (("relative", encoded), ("loss", reorder_by_loss(encoded, loss))):
        rows = record_curve(model, accuracy)
        start, total = rows[0]["bytes"], rows[-1]["bytes"]
        points = sorted(set(_curve_points(start, total)) | {fp32 // 32, fp32 // 64})
        sampled = [q for q in (at(rows, p) for p in points if p >= start) if q is not None]
        out[order] = {
            "stream_bytes": model.nbytes,
            "records": rows,
            "at_1_64": at(rows, fp32 // 64),
            "at_1_32": at(rows, fp32 // 32),
            "largest_drop_records": largest_drop([r["quality"] for r in rows]),
            "largest_drop_points": largest_drop(sampled),
        }
    return out


def print_seed(out: Callable[[str], None], row: Json) -> None:
    """One line per order."""
    full = row["fp32_accuracy"]
    for order in ("relative", "loss"):
        r = row[order]

        def fmt(q: float | None) -> str:
            return "  –  " if q is None else f"{q:.2%} ({100 * (q - full):+.2f} pt)"

        first = r["records"][0]
        out(
            f"  seed {row['seed']} (fp32 {full:.2%}), {order:8} order: smallest prefix "
            f"{first['bytes']:,} B {first['quality']:.2%}, whole {r['stream_bytes']:,} B "
            f"{r['records'][-1]['quality']:.2%}; 1/64 {fmt(r['at_1_64'])}, 1/32 "
            f"{fmt(r['at_1_32'])}; largest drop {100 * r['largest_drop_records']:.2f} pt "
            f"over every record, {100 * r['largest_drop_points']:.2f} pt at the log points"
        )
    out("    " + " ".join(f"{x['bytes']}:{100 * x['quality']:.1f}" for x in row["loss"]["records"]))
    c = row["costs"]
    out(
        "    whole streams (zstd · ans): "
        + "; ".join(
            f"{key} {c[f'{key}_zstd']:,} · {c[f'{key}_ans']:,} B"
            + (
                f" ({c[f'{key}_zstd_vs_one_shot']:.3f}× · {c[f'{key}_ans_vs_one_shot']:.3f}× "
                "one-shot)"
                if key != "one_shot"
                else ""
            )
            for key in COST_SPECS
        )
    )
