"""The prefix curve of a sweep: how good each arm's final global model is from its first
B bytes, when it is sent as a progressive stream.

Each arm's final global model is encoded in full (no base) with :data:`CURVE_SPEC`
(8 bits per value, per-channel, in levels of 2+2+4 bits), and the model decoded from the
first B bytes of the stream (:func:`~fedsqueeze.codec.decode_prefix`) is evaluated on the
task's test split, for B log-spaced from the smallest decodable prefix (every tensor's
base level) to the whole stream. ``prefix_curve.csv`` holds the points and
``prefix_curve.png`` plots them (accuracy against bytes, log x).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedsqueeze.codec import decode_prefix, encode_state, smallest_prefix
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.tasks import get_task

__all__ = ["CURVE_SPEC", "PrefixPoint", "prefix_curve", "write_prefix_curve"]

#: The progressive spec the curve is measured with.
CURVE_SPEC = "quant=8:affine:channel,levels=2+2+4,targets=*,min-ndim=1"
CSV_NAME = "prefix_curve.csv"
PNG_NAME = "prefix_curve.png"


@dataclass(frozen=True)
class PrefixPoint:
    """One point: the first ``nbytes`` of the stream (``fraction`` of the fp32 model)."""

    arm: str
    nbytes: int
    fraction: float
    accuracy: float


def prefix_curve(
    arm: str, task_name: str, seed: int, state: Mapping[str, torch.Tensor], points: int = 12
) -> list[PrefixPoint]:
    """The curve of one final model (``points`` prefix sizes, log-spaced)."""
    task = get_task(task_name)
    data = task.load_data()
    encoded = encode_state(dict(state), parse_spec(CURVE_SPEC))
    stream = encoded.to_bytes()[:-4]
    fp32 = sum(t.numel() * 4 for t in state.values() if t.is_floating_point())
    lo, hi = smallest_prefix(encoded), len(stream)
    sizes = sorted({int(b + 0.5) for b in np.geomspace(lo, hi, points)} | {hi})
    out = []
    for nbytes in sizes:
        decoded = decode_prefix(stream[:nbytes])
        model = task.build_model(seed)
        model.load_state_dict(decoded.state)
        result = task.evaluate(model, data.x_test, data.y_test)
        out.append(PrefixPoint(arm, nbytes, nbytes / fp32, result.accuracy))
    return out


def write_prefix_curve(out: Path, curve: Sequence[PrefixPoint], title: str, plot: bool) -> None:
    """Write ``prefix_curve.csv`` (and ``prefix_curve.png`` when ``plot``) into ``out``."""
    with (out / CSV_NAME).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["arm", "bytes", "fraction_of_fp32", "accuracy"])
        for p in curve:
            writer.writerow([p.arm, p.nbytes, f"{p.fraction:.6g}", f"{p.accuracy:.6g}"])
    if not plot:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.5), dpi=120)
    for arm in dict.fromkeys(p.arm for p in curve):
        pts = [p for p in curve if p.arm == arm]
        ax.plot([p.nbytes for p in pts], [p.accuracy for p in pts], marker="o", label=arm)
    ax.set_xscale("log")
    ax.set_xlabel(f"first bytes of the progressive stream ({CURVE_SPEC.split(',t')[0]}), log")
    ax.set_ylabel("test accuracy of the final model")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(out / PNG_NAME)
    plt.close(fig)
