"""Encoding a model one tensor at a time: bounded memory, tensors on all cores.

:func:`~fedsqueeze.codec.model.encode_state` returns every record of the model at once,
so its caller holds the whole encoded model, and global pruning concatenates the whole
model. :func:`encode_stream` makes the same records but hands each body to a
:class:`RecordStore` (a spool file, say) the moment it is made and keeps only the record
headers; the caller then writes the model from the store (:class:`EncodedPlan`). The
state may be a lazy mapping (memory-mapped tensors): each tensor is read when encoded.

Tensors are encoded by a pool of threads (torch and zstd release the GIL), at most
``inflight_bytes`` of input at a time, and the records are stored in state order, so the
bytes are those of the serial path and of ``encode_state(...).to_bytes()`` (stochastic
rounding with a seed included: each tensor draws from a generator of its own, seeded by
the seed and its name). Global magnitude pruning takes another road to the same bytes:
it finds its cut-off by radix selection (:mod:`fedsqueeze.codec.global_cut`), without
the model's magnitudes in one piece, and drops the same values, ties at the cut-off
included.

Peak memory beyond the input is the record headers, the in-flight tensors' working
memory and, for a progressive spec, nothing more: its levels are stored as they come
and only ordered at the end.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from fedsqueeze.codec.container import ContainerHeader, TensorRecord
from fedsqueeze.codec.finite import NonFinite
from fedsqueeze.codec.global_cut import GlobalCut, find_global_cut
from fedsqueeze.codec.level_order import LevelOrder
from fedsqueeze.codec.model import (
    EncodedModel,
    _unencodable,
    prepare_encode,
    progressive_order,
)
from fedsqueeze.codec.nested_gptq import Calibration
from fedsqueeze.codec.spec import CodecSpec, PruneMethod
from fedsqueeze.codec.tensor_encode import ScoredLevel
from fedsqueeze.errors import NonFiniteError

__all__ = ["EncodedPlan", "RecordStore", "StoredRecord", "encode_stream", "plan_parts"]

State = Mapping[str, torch.Tensor]


class RecordStore(Protocol):
    """Where :func:`encode_stream` puts record bodies as they are made."""

    def put(self, body: bytes | memoryview) -> int:
        """Keep ``body``; return a token that names it for the caller."""
        ...


@dataclass(frozen=True)
class StoredRecord:
    """A record whose body is in a :class:`RecordStore`.

    Attributes
    ----------
    record
        The record with an empty body.
    body_length
        Bytes of its body.
    token
        What :meth:`RecordStore.put` returned for the body.
    """

    record: TensorRecord
    body_length: int
    token: int

    def header_bytes(self) -> bytes:
        """The record's bytes before its body."""
        return self.record.header_bytes(self.body_length)


@dataclass(frozen=True)
class EncodedPlan:
    """An encoded model whose bodies are in a store: write ``header`` and then, for each
    record, its :meth:`StoredRecord.header_bytes` and body; the checksum follows.

    Attributes
    ----------
    header
        The model header (version chosen from the records, as ``EncodedModel`` does).
    records
        In stream order.
    raw_bytes
        Bytes of the tensors encoded (the input).
    """

    header: ContainerHeader
    records: tuple[StoredRecord, ...]
    raw_bytes: int

    @property
    def nbytes(self) -> int:
        """Bytes of the encoded model, checksum included."""
        size = len(self.header.to_bytes()) + 4
        return size + sum(len(r.header_bytes()) + r.body_length for r in self.records)


@dataclass(frozen=True)
class _Done:
    """One tensor's encoding: its record(s) with scores when progressive, residual."""

    levels: list[ScoredLevel]
    residual: torch.Tensor | None


def encode_stream(
    state: State,
    spec: CodecSpec,
    store: RecordStore,
    base: State | None = None,
    *,
    residual: State | None = None,
    seed: int | None = None,
    base_digest: bytes | None = None,
    nonfinite: NonFinite = NonFinite.REFUSE,
    workers: int | None = None,
    inflight_bytes: int | None = None,
    keep_residual: Callable[[str, torch.Tensor], None] | None = None,
    order: LevelOrder = LevelOrder.RELATIVE,
    weights: Mapping[str, float] | None = None,
    calibration: Calibration | None = None,
) -> EncodedPlan:
    """Encode ``state`` tensor by tensor, its bodies into ``store``.

    Parameters
    ----------
    state, spec, base, residual, seed, base_digest, nonfinite, order, weights, calibration
        As for :func:`~fedsqueeze.codec.model.encode_state` (``state`` and ``base`` may
        be lazy mappings of memory-mapped tensors).
    store
        Receives every body, in stream order for a non-progressive spec.
    workers
        Threads encoding tensors (default: the CPU count; 1 encodes in the caller).
    inflight_bytes
        Input bytes being encoded at once (default: a 25th of the model; always at least
        one tensor), which bounds the working memory.
    keep_residual
        Called with each tensor's new error-feedback residual (top-k and low-rank specs
        with feedback); without it the residuals are dropped. A table in row tiers
        (:mod:`fedsqueeze.codec.row_tiers`) gives one per tier, named as its part
        (``name#tier{k}``; :func:`~fedsqueeze.codec.model.encode_state` joins them).

    Raises
    ------
    The errors of :func:`~fedsqueeze.codec.model.encode_state`; ``ValueError`` for
    ``workers`` or ``inflight_bytes`` below 1.
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if inflight_bytes is not None and inflight_bytes < 1:
        raise ValueError(f"inflight_bytes must be at least 1, got {inflight_bytes}")
    state, encoder, base_digest, plan = prepare_encode(
        state, spec, base, residual, seed, base_digest, nonfinite, order, weights, calibration
    )
    names = list(state)
    sizes = {name: _nbytes(state[name]) for name in names}
    cut: GlobalCut | None = None
    grow_cuts: list[GlobalCut] = []
    carried: frozenset[str] = frozenset()
    if spec.prune.method is PruneMethod.L1_GLOBAL:
        carried = _unencodable(state, encoder, nonfinite)
        work = [n for n in names if n not in carried and encoder.is_lossy(n, state[n])]
        if work:

            def lossy(n: str) -> torch.Tensor:
                return encoder.lossy_input(n, state[n].detach())

            cut = find_global_cut(work, lossy, spec.prune.sparsity)
            if spec.levels is not None:
                grow_cuts = [find_global_cut(work, lossy, s) for s in spec.grow]

    def encode_one(name: str) -> _Done:
        t = state[name].detach()
        done = encoder.encode_checked(name, t) if cut is None else None
        if name in carried or isinstance(done, str):
            if isinstance(done, str) and nonfinite is NonFinite.REFUSE:
                raise NonFiniteError(name, done)
            record, res = encoder.carry(name, t)
            return _Done([ScoredLevel(record, 0.0)], res)
        if done is not None:
            record, res = done
        else:
            mask = None
            grow_masks = None
            if cut is not None and encoder.is_lossy(name, t):
                x = encoder.lossy_input(name, t)
                mask = cut.mask(name, x)
                grow_masks = [c.mask(name, x) for c in grow_cuts] or None
            record, res = encoder.encode(name, t, mask, grow_masks)
        levels = encoder.levels.pop(name, None)
        if levels is None:
            return _Done([ScoredLevel(record, 0.0)], res)
        return _Done(levels, res)

    serial = workers == 1
    budget = inflight_bytes or max(1, sum(sizes.values()) // 25)
    stubs: list[StoredRecord] = []
    levels: dict[str, list[ScoredLevel]] = {}
    by_id: dict[int, StoredRecord] = {}

    def keep(name: str, done: _Done) -> None:
        kept: list[ScoredLevel] = []
        for scored in done.levels:
            record, body = scored.record, scored.record.body
            stored = StoredRecord(replace(record, body=b""), len(body), store.put(body))
            by_id[id(stored.record)] = stored
            # the size is taken before the body leaves: the order weighs gain per byte
            kept.append(replace(scored, record=stored.record, nbytes=scored.size))
        stubs.append(by_id[id(kept[0].record)])
        if len(kept) > 1 or kept[0].record.levels:
            levels[name] = kept
        if done.residual is not None and spec.feedback and keep_residual is not None:
            keep_residual(name, done.residual)

    if serial:
        for name in names:
            keep(name, encode_one(name))
    else:
        _run_pool(names, sizes, encode_one, keep, workers, budget)
    records = [s.record for s in stubs]
    result = tuple(stubs)
    if levels:
        weighed, order_weights = plan.weigh(levels, weights)
        ordered = progressive_order(records, weighed, order, order_weights, plan.deferred)
        result = tuple(_in_order(ordered, weighed, by_id))
    header = EncodedModel(
        spec,
        base_digest if base is not None else None,
        tuple(r.record for r in result),
        splits=plan.splits,
    ).header
    return EncodedPlan(header, result, sum(sizes.values()))


def _in_order(
    ordered: list[TensorRecord],
    levels: Mapping[str, list[ScoredLevel]],
    by_id: Mapping[int, StoredRecord],
) -> list[StoredRecord]:
    """The stored records for ``ordered`` (whose refinements are re-indexed copies;
    an index numbers the base-level records in stream order)."""
    name_of = {id(lvs[0].record): name for name, lvs in levels.items()}
    at: dict[int, str] = {}
    bases = 0
    out = []
    for record in ordered:
        if record.level == 0:
            if id(record) in name_of:
                at[bases] = name_of[id(record)]
            bases += 1
            out.append(by_id[id(record)])
            continue
        lvs = levels[at[record.index if record.index is not None else -1]]
        original = next(lv.record for lv in lvs if lv.record.level == record.level)
        out.append(replace(by_id[id(original)], record=record))
    return out


def _run_pool(
    names: list[str],
    sizes: Mapping[str, int],
    encode_one: Callable[[str], _Done],
    keep: Callable[[str, _Done], None],
    workers: int,
    budget: int,
) -> None:
    """Encode on ``workers`` threads, at most ``budget`` input bytes at once (always one
    tensor), handing results to ``keep`` in ``names`` order."""
    pending: deque[tuple[str, Future[_Done]]] = deque()
    inflight = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fsq-encode") as pool:
        try:
            for name in names:
                while pending and (inflight + sizes[name] > budget or len(pending) >= 2 * workers):
                    done_name, future = pending.popleft()
                    inflight -= sizes[done_name]
                    keep(done_name, future.result())
                pending.append((name, pool.submit(encode_one, name)))
                inflight += sizes[name]
            while pending:
                done_name, future = pending.popleft()
                keep(done_name, future.result())
        finally:
            for _name, future in pending:
                future.cancel()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_parts(
    plan: EncodedPlan, body: Callable[[StoredRecord], bytes | memoryview]
) -> Iterator[bytes | memoryview]:
    """The stream's pieces in order (without the checksum): the header, then each
    record's header and its body as ``body`` reads it back from the store."""
    yield plan.header.to_bytes()
    for stored in plan.records:
        yield stored.header_bytes()
        yield body(stored)
