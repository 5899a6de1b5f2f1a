"""Row tiers: the rows of a lookup table split by how often they are read (format v11).

A progressive stream refines a tensor's values together: every row of a word-embedding
table gets the same bits at every prefix. But a lookup table's rows are not used alike
(all-MiniLM-L6-v2's 256 test sentences read 894 of its 30,522 rows; a row read a
hundred times matters a hundred times more than one read once), and its error on the
model's output is the *row-weighted* squared error: for one-hot inputs the input
moments ``Σ x xᵀ`` that GPTQ weighs a Linear's error by are the diagonal of per-row
counts. With those counts (:attr:`~fedsqueeze.codec.nested_gptq.Calibration.rows`, from
calibration text, or counts the clients add up) the encoder splits the table into
**row tiers** and sends each tier as a progressive tensor of its own:

* **tiers** (:func:`tier_rows`): bands of a factor of 4 in weight below the heaviest
  row (a factor of 4 in error weight is worth one bit of precision, so rows within a
  band deserve about the same bits), at most :data:`MAX_TIERS`, the last band taking
  everything lighter (and rows of weight 0); empty bands are dropped;
* **parts**: tier ``k``'s rows, in row order, form the tensor ``name#tier{k}``
  (:func:`part_name`) with the table's dtype and trailing shape. Every stage sees the
  parts as tensors: each has its own scales, bucket tables, rotation seed and levels,
  and each part's base level is in the smallest prefix, so every row decodes from the
  first decodable prefix on. A part's first level is split into a 1-bit level and the
  rest (``levels=2+…`` becomes ``1+1+…`` for the parts), so the order can leave the
  rows read least at one bit while it refines the others;
* **order**: a part's level gains are its squared errors removed times the tier's mean
  row weight over the table's (so an error spread evenly counts as the table's plain
  squared error), and the part counts with the whole table's energy and sensitivity:
  the rate-distortion order of :mod:`fedsqueeze.codec.level_order` then gives the
  heavy rows their refinements first;
* **deltas**: the base's table is split with the stream's tiers, so each part is a
  difference to the base's rows;
* **planes in context order**: a tier's split first level makes its second plane a
  magnitude bit whose sense flips with the sign (symmetric codes), about one bit per
  value to zstd in value order; version 11 lets a refinement carry its plane sorted,
  stably, by the coarser bits each value holds (the decoder holds them too), and the
  encoder of a tiered stream does so wherever zstd then makes it smaller (MiniLM's
  tiered stream: 1.05× → 1.01× a one-shot encoding);
* the **header** of a version-11 stream lists the splits (:func:`write_splits`): name,
  row count, tier count and each row's tier (a byte per row, zstd-compressed when that
  is smaller); decoders split a delta's base with them and join the decoded parts
  (:func:`join_state`) into the table;
* **deferred tiers** (format v13; opt-in, ``Calibration(defer=True)``, for a full
  model of a dense spec): a base level in every tier makes each prefix pay for every
  row at least once, a bit per value for rows the text hardly reads (the lightest tier
  of all-MiniLM-L6-v2's word embeddings is about 27,000 rows, 1.3 MB at one bit, a
  quarter of 1/16 of the model). So the lightest tier is *deferred*: it codes its rows
  less its *fill row* (the tier's mean row, float32, in the header), its base level is
  ordered with the refinements as its first level (its gain: the squared error it
  removes beyond the fill, so the rate-distortion order decides when those rows are
  worth their bytes), and until it arrives a decoder gives each of its rows the fill
  row. The smallest prefix then lacks that tier, and every prefix still decodes to a
  whole model. (The format lets any trailing tiers but tier 0 be deferred; the encoder
  cuts the lightest band into up to eight deferred tiers, heaviest rows first, so a
  prefix can stop between their base levels; a split of more than :data:`BANDS` tiers
  is format v14, which differs from v13 in that bound alone; see
  :func:`~fedsqueeze.codec.tier_plan.plan_tiers`.) Deltas keep every
  tier (their missing parts are the base's rows already), and so do sparse specs (a
  pruned value must decode to zero, not to the mean). The header's count of
  base-level records counts the others; a deferred base-level record comes after them
  and before its own refinements. What it buys depends on the order's estimate of
  those rows: it values rows by their reads, and rows the weights call unread cost
  more than their weight says (the served text reads some of them), at their mean row
  far more than their squared error says (a row at the mean loses what sets it
  apart). Two factors measured on held-out text correct the estimate
  (``Calibration.tier_costs``; on MiniLM the unread rows cost about 3× per unit of
  weighted squared error what read rows do, and at their mean row about 8× what
  noise in them does); without them deferral costs 1/8 of fp32 dearly, so it is off
  by default (BENCHMARKS.md, "Deferred tiers").

What it buys (BENCHMARKS.md, "Row tiers: bits per row in the stream"; all-MiniLM-L6-v2,
``quant=8:symmetric:block384:dq:hadamard,levels=2+1+1+1+1+2``, weighted order, GPTQ
margin 8, row weights from calibration text none of the test sentences are in): the
embedding cosine at 1/16 of fp32 rises from 0.861 to 0.900, the smallest decodable
prefix falls from 1/20 to 1/24, 1/8 stays at 0.983, the whole stream costs 1.007× a
one-shot encoding. The row probe (:mod:`fedsqueeze.bench.row_probe`) measured the idea
first, by fake quantization.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from fedsqueeze.codec import entropy
from fedsqueeze.codec.bytesio import ByteReader, write_varint
from fedsqueeze.errors import FormatError

__all__ = [
    "BANDS",
    "MAX_TIERS",
    "RowSplit",
    "check_row_weights",
    "deferred_parts",
    "join_state",
    "parse_splits",
    "part_name",
    "smoothed_counts",
    "split_shapes",
    "split_state",
    "tier_rows",
    "write_splits",
]

#: Most tiers one table is split into (format v14's bound: its bands and the lightest
#: band cut into deferred tiers).
MAX_TIERS = 16
#: Most tiers of a split in format versions 11 to 13, and most weight bands.
BANDS = 8
#: The weight ratio between neighbouring tiers: 4 (one bit of precision).
_BAND = 4.0
_ZSTD_LEVEL = 19


def part_name(name: str, tier: int) -> str:
    """The name of tier ``tier``'s part of table ``name`` in the stream."""
    return f"{name}#tier{tier}"


@dataclass(frozen=True)
class RowSplit:
    """One table's rows in tiers: byte ``tiers[r]`` is row ``r``'s tier, every tier
    ``0..count-1`` holding a row; tier 0 holds the most-read rows.

    ``deferred`` (format v13): the last ``deferred`` tiers may send their base level
    after refinements of other tensors; until it arrives each of their rows decodes to
    its tier's fill row, ``fills[j]`` for tier ``count − deferred + j`` (float32
    little-endian bytes: the tier's mean row)."""

    name: str
    tiers: bytes
    count: int
    deferred: int = 0
    fills: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if not 2 <= self.count <= MAX_TIERS:
            raise ValueError(f"a split has 2 to {MAX_TIERS} tiers, not {self.count}")
        held = torch.bincount(self.tier_of().to(torch.int64), minlength=self.count)
        if held.numel() > self.count or bool((held == 0).any()):
            raise ValueError(f"{self.name!r}: a tier beyond {self.count} or an empty one")
        if not 0 <= self.deferred < self.count:
            raise ValueError(
                f"{self.name!r}: {self.deferred} deferred tiers of {self.count} (tier 0 "
                "is never deferred)"
            )
        if len(self.fills) != self.deferred:
            raise ValueError(f"{self.name!r}: {len(self.fills)} fill rows, {self.deferred} tiers")
        sizes = {len(f) for f in self.fills}
        if len(sizes) > 1 or 0 in sizes or any(n % 4 for n in sizes):
            raise ValueError(f"{self.name!r}: fill rows of float32 values, all one length")
        for f in self.fills:
            if not bool(torch.isfinite(torch.frombuffer(bytearray(f), dtype=torch.float32)).all()):
                raise ValueError(f"{self.name!r}: a fill row that is not finite")

    @property
    def first_deferred(self) -> int:
        """The first deferred tier (``count`` when none is)."""
        return self.count - self.deferred

    def deferred_parts(self) -> list[str]:
        """The names of the parts whose base level may come late."""
        return self.parts()[self.first_deferred :]

    def fill_row(self, tier: int, trailing: tuple[int, ...]) -> Tensor:
        """Deferred tier ``tier``'s fill row (float32, shape ``trailing``: a row's).

        Raises
        ------
        FormatError
            ``tier`` is not deferred, or its fill row does not fit rows of ``trailing``.
        """
        if not self.first_deferred <= tier < self.count:
            raise FormatError(f"table {self.name!r} lacks its part {part_name(self.name, tier)!r}")
        row = torch.frombuffer(
            bytearray(self.fills[tier - self.first_deferred]), dtype=torch.float32
        )
        if row.numel() != math.prod(trailing):
            raise FormatError(
                f"table {self.name!r}: a fill row of {row.numel()} values for rows of {trailing}"
            )
        return row.reshape(trailing)

    def center(self, parts: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``parts`` (this table's, as :meth:`split` gives them) with each deferred
        tier's fill row taken off its rows: what the encoder codes for them."""
        out = dict(parts)
        for k in range(self.first_deferred, self.count):
            p = part_name(self.name, k)
            t = out[p]
            fill = self.fill_row(k, tuple(t.shape[1:])).to(t.device)
            out[p] = (t.to(torch.float32) - fill).to(t.dtype)
        return out

    @property
    def rows(self) -> int:
        """Rows of the table."""
        return len(self.tiers)

    def tier_of(self) -> Tensor:
        """Each row's tier (uint8)."""
        return torch.frombuffer(bytearray(self.tiers), dtype=torch.uint8)

    def parts(self) -> list[str]:
        """The parts' names, tier 0 first."""
        return [part_name(self.name, k) for k in range(self.count)]

    @cached_property
    def indices(self) -> tuple[Tensor, ...]:
        """Each tier's row indices (int64, ascending), tier 0 first."""
        tier_of = self.tier_of()
        return tuple(torch.nonzero(tier_of == k).flatten() for k in range(self.count))

    def split(self, table: Tensor) -> dict[str, Tensor]:
        """The parts of ``table`` (rows gathered, so each part is a new tensor)."""
        if table.ndim < 1 or table.shape[0] != self.rows:
            raise ValueError(
                f"{self.name!r} has {self.rows} rows in its split, the tensor {tuple(table.shape)}"
            )
        return {
            p: table.index_select(0, idx.to(table.device))
            for p, idx in zip(self.parts(), self.indices, strict=True)
        }

    def join(self, parts: Mapping[str, Tensor], out: Tensor | None = None) -> Tensor:
        """The table from its parts (decoded: their shapes are checked here), written
        into ``out`` when given (the table's shape and dtype). A deferred tier's rows
        are its part plus its fill row, or the fill row alone where ``parts`` lacks it
        (its base level not held yet).

        Raises
        ------
        FormatError
            A part that does not fit its tier, or a missing part that is not deferred.
        """
        first = parts[part_name(self.name, 0)]
        trailing = tuple(first.shape[1:])
        if out is None:
            out = torch.empty((self.rows, *trailing), dtype=first.dtype, device=first.device)
        for k, (p, idx) in enumerate(zip(self.parts(), self.indices, strict=True)):
            t = parts.get(p)
            if t is None:
                fill = self.fill_row(k, trailing)
                t = fill.to(out.device, out.dtype).expand(idx.numel(), *trailing)
            elif t.dtype != first.dtype or tuple(t.shape) != (idx.numel(), *trailing):
                raise FormatError(
                    f"part {p!r} is {tuple(t.shape)} {t.dtype}; its tier holds "
                    f"{idx.numel()} rows of {trailing} {first.dtype}"
                )
            elif k >= self.first_deferred:
                fill = self.fill_row(k, trailing).to(t.device)
                t = (t.to(torch.float32) + fill).to(t.dtype)
            out.index_copy_(0, idx.to(out.device), t.contiguous())
        return out

    def weight_ratios(self, weights: Tensor) -> list[float]:
        """Each tier's mean row weight over the table's (what its parts' gains are
        multiplied by)."""
        w = weights.to(torch.float64)
        mean = float(w.mean())
        return [float(w[idx].mean()) / mean for idx in self.indices]


def deferred_parts(splits: Iterable[RowSplit]) -> frozenset[str]:
    """The parts of ``splits`` whose base level may come late (deferred tiers)."""
    return frozenset(p for s in splits for p in s.deferred_parts())


def smoothed_counts(counts: Tensor, prior: Tensor | None = None) -> Tensor:
    """Row weights from read counts: the rows never read share the Good-Turing estimate
    of the unseen mass (the count of rows read once, at least 1), so they are refined
    late but not never; float64, the same units as ``counts``.

    They share it evenly, or, with ``prior`` (read counts of other text, such as
    generic text of the model's kind), in proportion to the prior's own smoothed
    counts: a back-off, so a row that other text reads often comes before one nothing
    reads. (On all-MiniLM-L6-v2 the bench's test sentences read 52 rows the clients'
    text never does; 20 of them are read in the generic text, which reads 849 of the
    26,553 rows the clients' text never reads: ``fedsqueeze bench progressive`` with a
    ``+rows=backoff`` curve prints these counts.)

    Raises
    ------
    ValueError
        As :func:`check_row_weights`, for ``counts`` or ``prior``, or a ``prior`` of
        another length.
    """
    w = check_row_weights(counts).clone()
    unseen = w == 0
    if prior is not None and prior.numel() != w.numel():
        raise ValueError(f"prior counts for {prior.numel()} rows, counts for {w.numel()}")
    if bool(unseen.any()):
        mass = max(float((w == 1).sum()), 1.0)
        if prior is None:
            w[unseen] = mass / float(unseen.sum())
        else:
            share = smoothed_counts(prior)[unseen]
            w[unseen] = mass * share / share.sum()
    return w


def tier_rows(weights: Tensor, max_tiers: int = BANDS) -> Tensor | None:
    """Each row's tier by its weight: bands of a factor of 4 below the heaviest row, the
    last band (``max_tiers − 1``) taking everything lighter and rows of weight 0; empty
    bands dropped and the rest renumbered from 0. ``None`` when every row falls in one
    band (nothing to split).

    Raises
    ------
    ValueError
        Weights that are not a 1-D tensor of finite values of at least 0 with one above 0,
        or ``max_tiers`` outside ``2..BANDS``.
    """
    if not 2 <= max_tiers <= BANDS:
        raise ValueError(f"max_tiers must be 2 to {BANDS}, got {max_tiers}")
    w = check_row_weights(weights)
    top = float(w.max())
    last = max_tiers - 1
    band = torch.full(w.shape, last, dtype=torch.int64)
    positive = w > 0
    ratio = w[positive] / top
    band[positive] = torch.clamp(
        torch.floor(-torch.log(ratio) / math.log(_BAND) + 1e-9).to(torch.int64), 0, last
    )
    present = torch.unique(band)
    if present.numel() < 2:
        return None
    renumber = torch.full((max_tiers,), -1, dtype=torch.int64)
    renumber[present] = torch.arange(present.numel())
    return renumber[band].to(torch.uint8)


def check_row_weights(weights: Tensor) -> Tensor:
    """``weights`` as float64 after checking them (``ValueError`` as :func:`tier_rows`)."""
    if not isinstance(weights, Tensor) or weights.ndim != 1 or weights.numel() == 0:
        raise ValueError("row weights must be a non-empty 1-D tensor")
    if not (weights.is_floating_point() or weights.dtype in _INTEGER):
        raise ValueError(f"row weights must be numbers, not {weights.dtype}")
    w = weights.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("row weights must be finite and at least 0")
    if not bool((w > 0).any()):
        raise ValueError("row weights are all 0: no row is read")
    return w


_INTEGER = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def split_state(state: Mapping[str, Tensor], splits: Sequence[RowSplit]) -> dict[str, Tensor]:
    """``state`` with each split table replaced by its parts, in place of it (a table
    ``state`` lacks, or holds with another row count, is left as it is: a delta's base
    may not have it)."""
    return _replace_tables(state, splits, lambda split, t: split.split(t))


def _replace_tables(
    state: Mapping[str, Tensor],
    splits: Sequence[RowSplit],
    parts_of: Callable[[RowSplit, Tensor], dict[str, Tensor]],
) -> dict[str, Tensor]:
    by_name = {s.name: s for s in splits}
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        split = by_name.get(name)
        if split is None or t.ndim < 1 or t.shape[0] != split.rows:
            out[name] = t
            continue
        out.update(parts_of(split, t))
    return out


def join_state(
    state: Mapping[str, Tensor],
    splits: Sequence[RowSplit],
    fallback: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Decoded parts joined into their tables, each where its first part held was; the
    other tensors as they are.

    ``fallback`` (a delta's base, split): where a table has some parts and not others
    (a delta's prefix), the missing ones are the base's rows; a table with no part held
    is left out (its caller keeps the base's). Without ``fallback`` every part must be
    there but a deferred tier's, whose rows are then its fill row (:meth:`RowSplit.join`).

    Raises
    ------
    FormatError
        A table without all its parts and no fallback for them, parts that do not fit
        their tiers, or a table that is there whole as well.
    """
    if not splits:
        return dict(state)
    owner = {p: s for s in splits for p in s.parts()}
    tables = {s.name for s in splits}
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        split = owner.get(name)
        if name in tables:
            raise FormatError(f"table {name!r} is both split and whole")
        if split is None:
            out[name] = t
        elif split.name not in out:
            parts = {p: state[p] for p in split.parts() if p in state}
            for p in split.parts():
                if p not in parts and fallback is not None and p in fallback:
                    parts[p] = fallback[p].to(t.device)
            late = split.deferred_parts() if fallback is None else []
            missing = [p for p in split.parts() if p not in parts and p not in late]
            if missing:
                raise FormatError(f"table {split.name!r} lacks its parts {missing}")
            out[split.name] = split.join(parts)
    if fallback is None:
        absent = sorted(s.name for s in splits if s.name not in out)
        if absent:
            raise FormatError(f"the stream splits {absent} but holds none of their parts")
    return out


def write_splits(
    out: bytearray, splits: Iterable[RowSplit], deferring: bool = False, wide: bool = False
) -> None:
    """Append the header's split list: count, then per split ``name · rows · tiers u8 ·
    length · tier bytes`` (a byte per row; zstd-compressed when ``length < rows``) and,
    ``deferring`` (version 13), ``deferred u8 · [values · float32 × values]`` (one fill
    row per deferred tier, ``values`` written once when ``deferred > 0``). The same bytes
    in version 14 (``wide``), where a split may hold up to :data:`MAX_TIERS` tiers
    instead of :data:`BANDS`.

    Raises
    ------
    ValueError
        A deferred tier without ``deferring``, or more than :data:`BANDS` tiers without
        ``wide``.
    """
    splits = list(splits)
    write_varint(out, len(splits))
    for s in splits:
        name = s.name.encode()
        write_varint(out, len(name))
        out += name
        write_varint(out, s.rows)
        if s.count > BANDS and not wide:
            raise ValueError(f"a split of {s.count} tiers needs format version 14")
        out.append(s.count)
        packed = entropy.compress(s.tiers, _ZSTD_LEVEL)
        body = s.tiers if packed is None else packed
        write_varint(out, len(body))
        out += body
        if not deferring:
            if s.deferred:
                raise ValueError("deferred tiers need format version 13")
            continue
        out.append(s.deferred)
        if s.deferred:
            write_varint(out, len(s.fills[0]) // 4)
            for f in s.fills:
                out += f


def parse_splits(
    reader: ByteReader,
    max_tables: int,
    max_rows: int,
    max_name_bytes: int,
    deferring: bool = False,
    wide: bool = False,
) -> tuple[RowSplit, ...]:
    """Read :func:`write_splits`' bytes (``deferring``: version 13's; ``wide``: version
    14's), treating them as hostile (``FormatError``)."""
    most = MAX_TIERS if wide else BANDS
    count = reader.varint("split count", max_tables)
    splits: list[RowSplit] = []
    names: set[str] = set()
    for _ in range(count):
        length = reader.varint("split name length", max_name_bytes)
        try:
            name = bytes(reader.take(length, "split name")).decode()
        except UnicodeDecodeError as exc:
            raise FormatError("split name is not UTF-8") from exc
        if name in names:
            raise FormatError(f"table {name!r} is split twice")
        names.add(name)
        rows = reader.varint("split rows", max_rows)
        tiers = reader.u8("tier count")
        if not 2 <= tiers <= most or rows < tiers:
            raise FormatError(f"{name!r}: {tiers} tiers over {rows} rows")
        size = reader.varint("tier map length", rows)
        body = reader.take(size, "tier map")
        raw = bytes(body) if size == rows else entropy.decompress(body, rows)
        deferred = 0
        fills: tuple[bytes, ...] = ()
        if deferring:
            deferred = reader.u8("deferred tier count")
            if deferred >= tiers:
                raise FormatError(f"{name!r}: {deferred} deferred tiers of {tiers}")
            if deferred:
                values = reader.varint("fill row length", max_rows)
                if values == 0:
                    raise FormatError(f"{name!r}: an empty fill row")
                fills = tuple(bytes(reader.take(4 * values, "fill row")) for _ in range(deferred))
        try:
            splits.append(RowSplit(name, raw, tiers, deferred, fills))
        except ValueError as exc:
            raise FormatError(f"a tier map: {exc}") from None
    return tuple(splits)


def split_shapes(state: Mapping[str, Tensor], splits: Sequence[RowSplit]) -> dict[str, Tensor]:
    """:func:`split_state` for names, dtypes and shapes only: the parts are tensors on
    the ``meta`` device (nothing is copied; for resolving a delta's index-coded
    records)."""

    def shapes(split: RowSplit, t: Tensor) -> dict[str, Tensor]:
        return {
            p: torch.empty((idx.numel(), *t.shape[1:]), dtype=t.dtype, device="meta")
            for p, idx in zip(split.parts(), split.indices, strict=True)
        }

    return _replace_tables(state, splits, shapes)
