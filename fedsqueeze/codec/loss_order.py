"""Ordering a progressive stream's refinements by a measured loss (data-aware order).

:mod:`fedsqueeze.codec.level_order` orders refinements by the squared error they remove
(relative to each tensor's energy): data-free, but squared error does not track a
classifier's accuracy step by step. On the digits CNN a refinement of the large conv2
weights (its second bit) lowers squared error and *costs* three points of test
accuracy until its third bit arrives; a stream ordered by squared error then loses
accuracy while bytes arrive.

:func:`reorder_by_loss` re-sequences the refinements of an encoded progressive model by
a loss the encoder measures on data it holds (the coordinator's validation images, from
the training split: never the test split), greedily: at each step it decodes every
candidate, each tensor's next available record (with ``lookahead=2`` also followed by
one more of the same tensor, so that a record that hurts alone and helps with its
successor can win), and sends the candidate that lowers the loss most per byte; when
none lowers it, the one that raises it least. On the digits CNN judging two records
at a time gave the same curves as one, two to three times slower, so one is the
default. The bytes of every record stay as they are, only the
order (and the step numbers of grown tensors' records) changes, so the result is a
valid stream of the same format and size, with the same final decode.

What a candidate may be: a tensor's records form a chain (levels of a plain progressive
tensor in plane order) or, for a tensor with support levels
(:mod:`fedsqueeze.codec.support_levels`), a partial order (a group's planes in order,
group ``j`` after group ``j−1`` opened). Base-level records are untouched (every
decodable full-model prefix needs them all); a deferred row tier's base level
(:mod:`fedsqueeze.codec.row_tiers`, version 13) is kept with them, right after the
others: this order re-sequences refinements only.

Cost: one tensor decoded and one loss evaluation per candidate, about
``steps × tensors`` (times the planes a record may be followed by, with lookahead); for
the digits CNN (4 tensors, 30 refinements) a few hundred evaluations of a loss over
1,437 images, 10-20 s on one core. Meant for small models and benchmarks; the
data-free order remains the default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

import torch

from fedsqueeze.codec.container import TensorRecord
from fedsqueeze.codec.model import EncodedModel, decode_state
from fedsqueeze.codec.row_tiers import join_state, split_state
from fedsqueeze.codec.tensor_decode import ProgressiveTensor, TensorDecoder

__all__ = ["reorder_by_loss"]

State = Mapping[str, torch.Tensor]
_Key = tuple[int, int]  # (group, plane) of a refinement


def reorder_by_loss(
    encoded: EncodedModel,
    loss: Callable[[dict[str, torch.Tensor]], float],
    base: State | None = None,
    *,
    lookahead: int = 1,
) -> EncodedModel:
    """The same model with its refinements in the order ``loss`` prefers (see the module).

    Parameters
    ----------
    encoded
        A progressive model (from :func:`~fedsqueeze.codec.model.encode_state`).
    loss
        Lower is better; called with decoded states (name → tensor, the full model).
    base
        The base of a delta.
    lookahead
        Longest run of one tensor's records judged together (1 or 2).

    Raises
    ------
    ValueError
        ``lookahead`` outside 1..2, or a model without refinements.
    """
    if lookahead not in (1, 2):
        raise ValueError(f"lookahead must be 1 or 2, got {lookahead}")
    bases = [r for r in encoded.records if r.level == 0]
    pending: dict[int, list[TensorRecord]] = {}
    for r in encoded.records:
        if r.level > 0 and r.index is not None:
            pending.setdefault(r.index, []).append(r)
    if not pending:
        raise ValueError("the model has no refinements to order")
    held = base if encoded.base_digest is not None else None
    splits = encoded.splits  # row tiers: the records hold the tiers' parts
    state = split_state(decode_state(replace(encoded, records=tuple(bases)), held), splits)
    for split in splits:  # a deferred tier's part is coded less its fill row
        if split.deferred:
            state.update(split.center({p: state[p] for p in split.parts()}))
    decoder = TensorDecoder(split_state(held, splits) if held is not None else None, None)
    names = [decoder.resolve(r)[0] for r in bases]
    sent: dict[int, list[TensorRecord]] = {i: [] for i in pending}

    def judged(parts: dict[str, torch.Tensor]) -> float:
        return loss(join_state(parts, splits) if splits else parts)

    current = judged(state)
    ordered: list[TensorRecord] = []
    while any(pending.values()):
        best: tuple[float, float, list[TensorRecord], int, dict[str, torch.Tensor]] | None = None
        for index, rest in pending.items():
            for run in _runs(sent[index], rest, lookahead):
                tensor = _decode(decoder, bases[index], sent[index] + run)
                trial = dict(state)
                trial[names[index]] = tensor
                value = judged(trial)
                size = sum(len(r.header_bytes()) + len(r.body) for r in run)
                gain = current - value
                # improving runs by gain per byte; otherwise the least harm first
                key = (gain / size, 0.0) if gain > 0 else (float("-inf"), gain)
                if best is None or key > (best[0], best[1]):
                    best = (key[0], key[1], run, index, trial)
        if best is None:  # unreachable: some tensor has a pending record
            break
        _s, _h, run, index, trial = best
        for record in run:
            step = (
                replace(record, level=len(sent[index]) + 1) if record.group is not None else record
            )
            sent[index].append(step)
            ordered.append(step)
            pending[index].remove(record)
        state = trial
        current = judged(state)
    return replace(encoded, records=tuple(bases) + tuple(ordered))


def _key(record: TensorRecord) -> _Key:
    return (0, record.level) if record.group is None else (record.group, record.plane)


def _available(sent: list[TensorRecord], rest: list[TensorRecord]) -> list[TensorRecord]:
    """The pending records of one tensor whose predecessors are sent."""
    planes: dict[int, int] = {0: 0}
    for r in sent:
        g, p = _key(r)
        planes[g] = p
    out = []
    for r in rest:
        g, p = _key(r)
        if r.group is None:
            if p == planes[0] + 1:
                out.append(r)
        elif (p == 0 and g == len(planes)) or (g in planes and p == planes[g] + 1):
            out.append(r)
    return out


def _runs(
    sent: list[TensorRecord], rest: list[TensorRecord], lookahead: int
) -> list[list[TensorRecord]]:
    runs: list[list[TensorRecord]] = []
    for first in _available(sent, rest):
        runs.append([first])
        if lookahead > 1:
            left = [r for r in rest if r is not first]
            for second in _available([*sent, first], left):
                runs.append([first, second])
    return runs


def _decode(
    decoder: TensorDecoder, base_record: TensorRecord, refinements: list[TensorRecord]
) -> torch.Tensor:
    """One tensor from its base-level record and refinements (renumbered as a chain)."""
    value = decoder.decode(base_record)[1]
    if not isinstance(value, ProgressiveTensor):
        return value
    for step, record in enumerate(refinements, start=1):
        value.refine(replace(record, level=step) if record.group is not None else record)
    return value.tensor()
