"""Encoding of one tensor into a :class:`~fedsqueeze.codec.container.TensorRecord`.

Three paths, chosen per tensor:

* **lossless** (non-floating tensors, and floats outside the lossy targets when the float
  format is the tensor's own): the raw bits, or the bits XOR the base's bits for a delta;
  both round-trip bit-exactly, and XOR leaves mostly-zero high bytes that zstd shrinks.
  Floats (fp32, fp16, bf16, fp64) are byte-grouped instead (exponent plane apart from
  the mantissa planes, :mod:`fedsqueeze.codec.grouping`) when that is smaller.
* **cast** (floats outside the targets with a narrower float format): values, or their
  difference to the base, stored as fp16/bf16.
* **lossy** (targets): difference to the base (+ residual) → mask → quantize or cast;
  with a ``rank`` spec, matrices whose factors are at most half their size become a
  **low-rank** record instead (two factors, quantized or cast together).

With ``levels`` (progressive transmission) a lossy target becomes a base-level record
and one refinement record per further level (:mod:`fedsqueeze.codec.progressive`); the
encoder keeps the refinements and each level's gain for :func:`encode_state` to order.

On every path a tensor with nothing to send (bit-identical to its base or all zero bits;
for the lossy paths, nothing nonzero left after masking) is a ZERO record, about 2 bytes.

A floating tensor its path cannot encode (NaN, Inf, values beyond the format: see
:mod:`fedsqueeze.codec.finite`) is reported by :meth:`TensorEncoder.problem` before any
stage runs; the caller refuses it or sends it with :meth:`TensorEncoder.carry`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np
import torch

from fedsqueeze.codec import (
    ans,
    dense_encode,
    entropy,
    fused,
    jit,
    jit_select,
    literal_frames,
    plane_ans,
    select_quantize,
)
from fedsqueeze.codec.bitpack import pack_bits, unpack_bits
from fedsqueeze.codec.bits import all_zero_bits, as_bits, xor_bits
from fedsqueeze.codec.blockwise import num_blocks
from fedsqueeze.codec.chunks import CPU_CHUNK, chunk_bounds, run_chunks, scratch
from fedsqueeze.codec.container import (
    FLOAT_KINDS,
    GROUPED_KINDS,
    PositionsHeader,
    QuantHeader,
    TensorRecord,
    ValueKind,
)
from fedsqueeze.codec.digest import tensor_bytes
from fedsqueeze.codec.finite import all_finite, unrepresentable
from fedsqueeze.codec.grouping import (
    GROUPED_DTYPES,
    NonFiniteFound,
    encode_grouped,
    holds_buckets,
    holds_joint,
)
from fedsqueeze.codec.kernels import (
    copy_scatter,
    empty_numpy_backed,
    float32_arrays,
    parallel_copy,
    scatter,
    value_range,
)
from fedsqueeze.codec.lowrank import factor_count, factorize, matrix_shape, worth_factoring
from fedsqueeze.codec.nested_gptq import (
    Calibration,
    calibrated_codes,
    output_gains,
    output_tables,
)
from fedsqueeze.codec.positions import (
    EncodedPositions,
    encode_positions,
    encode_positions_soon,
    mask_to_indices,
)
from fedsqueeze.codec.progressive import (
    CHUNK,
    bucket_table,
    cumulative_bits,
    level_gain,
    level_gains,
    plane,
    reconstruct,
    table_to_bytes,
    top_codes,
)
from fedsqueeze.codec.pruning import (
    channel_mask,
    count_to_prune,
    magnitude_selection,
    prepare_selection,
    prepare_selection_of_sum,
    threshold_mask,
)
from fedsqueeze.codec.quantization import (
    MAX_MAGNITUDE,
    QuantParams,
    Runs,
    choose_qparams,
    dequantize,
    qparams_to_bytes,
    quantize,
)
from fedsqueeze.codec.rotation import rotate, rotation_seed
from fedsqueeze.codec.spec import (
    MAX_LEVELS,
    CodecSpec,
    EntropyCoder,
    FloatFormat,
    Granularity,
    PruneMethod,
    QuantSpec,
    Rotation,
    ScaleFormat,
)
from fedsqueeze.codec.support_levels import Node, chain, free_ranks, group_ids
from fedsqueeze.codec.threshold_select import FirstPass, top_within

_Found = TypeVar("_Found")

#: Shortest rows or blocks whose ranges the check keeps for the encode (two floats a
#: run: at most 1/32 of the tensor's size).
_RUNS_FROM = 64

#: Largest magnitude fp16 block scales can cover (beyond it a tensor is refused or
#: carried, as for an fp16 cast).
FP16_SCALE_LIMIT = 65504.0

_CAST_DTYPES = {
    FloatFormat.FP32: torch.float32,
    FloatFormat.FP16: torch.float16,
    FloatFormat.BF16: torch.bfloat16,
}


@dataclass(frozen=True)
class ScoredLevel:
    """One level of a progressive tensor, the squared error it removes and the energy
    ``‖W‖²`` of the tensor it belongs to (1.0 where that is zero)."""

    record: TensorRecord
    gain: float
    energy: float = 1.0
    nbytes: int | None = None
    """The record's encoded size when its body is kept elsewhere (a streaming encoder
    spools bodies); ``None``: header and body as held."""

    @property
    def size(self) -> int:
        """The record's encoded size in bytes (header and body)."""
        if self.nbytes is not None:
            return self.nbytes
        return len(self.record.header_bytes()) + len(self.record.body)

    @property
    def score(self) -> float:
        """Squared error removed per byte of the record (orders the base levels; the
        refinements' order is :func:`~fedsqueeze.codec.level_order.refinement_order`)."""
        return self.gain / max(1, self.size)


class TensorEncoder:
    """Encodes the tensors of one state with one spec, base and residual.

    After :meth:`encode` of a progressive tensor, :attr:`levels` holds all its levels
    (the base level first) with their gains.
    """

    def __init__(
        self,
        spec: CodecSpec,
        base: Mapping[str, torch.Tensor] | None,
        residual: Mapping[str, torch.Tensor] | None,
        seed: int | None,
        calibration: Calibration | None = None,
        origins: Mapping[str, str] | None = None,
    ) -> None:
        self._spec = spec
        self._calibration = calibration
        # a row tier's part -> its table (fedsqueeze.codec.row_tiers): the spec's
        # patterns and the calibration name tables, not parts
        self._origins = dict(origins or {})
        # Refinement planes may travel in context order (format version 11) in a stream
        # that is version 11 anyway: one with row tiers. Elsewhere it would move every
        # progressive stream to version 11 for about 1% (BENCHMARKS.md, "Row tiers").
        self._context_order = bool(self._origins)
        self._base = base or {}
        self._residual = residual or {}
        self._index = {name: i for i, name in enumerate(sorted(self._base))}
        self._seed = seed
        self._generators: dict[tuple[str, torch.device], torch.Generator] = {}
        self.levels: dict[str, list[ScoredLevel]] = {}
        self._rotated = spec.quant is not None and spec.quant.rotation is not Rotation.NONE
        # What problem() read that encode() needs again (one pass fewer; _fits_on_the_way):
        # per name, the tensor (held, so its memory is not reused), its version, and the
        # quantizer's ranges (minima and maxima: per tensor, row or block) or a magnitude
        # selection's first pass.
        self._ranges: dict[str, tuple[torch.Tensor, int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._firsts: dict[str, tuple[torch.Tensor, int, FirstPass]] = {}

    def _plan(self, name: str, levels: tuple[int, ...]) -> tuple[int, ...]:
        """The level plan of tensor ``name``: the spec's, except that a row tier's part
        (:mod:`fedsqueeze.codec.row_tiers`) has its first level split into a 1-bit level
        and the rest (when the plan has room), so that the order can leave the rows read
        least at one bit while it refines the others."""
        if name not in self._origins or levels[0] == 1 or len(levels) >= MAX_LEVELS:
            return levels
        return (1, levels[0] - 1, *levels[1:])

    # ------------------------------------------------------------ classification
    def _base_of(self, name: str, t: torch.Tensor) -> torch.Tensor | None:
        b = self._base.get(name)
        if b is None or b.shape != t.shape or b.dtype != t.dtype:
            return None
        return b.detach().to(t.device)

    def is_lossy(self, name: str, t: torch.Tensor) -> bool:
        """Whether the lossy stages (mask, quantization) apply to this tensor."""
        spec = self._spec
        if not spec.is_target(self._origins.get(name, name), t.ndim, t.is_floating_point()):
            return False
        return (
            spec.prune.active
            or spec.topk is not None
            or spec.rank is not None
            or spec.quant is not None
        )

    def lossy_input(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """What the lossy stages see: ``t − base + residual`` in float32, rotated when the
        spec says so (:mod:`fedsqueeze.codec.rotation`)."""
        b = self._base_of(name, t)
        r = self._residual.get(name)
        if r is not None and self._spec.feedback:
            if r.shape != t.shape:
                raise ValueError(
                    f"residual[{name!r}] has shape {tuple(r.shape)}, not {tuple(t.shape)}"
                )
        else:
            r = None
        x = _summed(t, b, r)
        if x is None:
            x = t.to(torch.float32)
            if b is not None:
                x = x - b.to(torch.float32)
            if r is not None:
                x = x + r.to(device=t.device, dtype=torch.float32)
        if self._rotated:
            x = rotate(x, rotation_seed(name))
        return x

    @property
    def in_parallel(self) -> bool:
        """Whether this model's tensors may be encoded on several threads at once (the
        same records as one after the other): no progressive levels (GPTQ calibration
        included), and not the Python-level ANS coder (it holds the GIL: threads would
        only wait for each other). Stochastic rounding may: with a seed each tensor has a
        generator of its own (:meth:`_generator`); without one the draws are not
        reproducible anyway."""
        spec = self._spec
        return (
            spec.levels is None
            and self._calibration is None
            and spec.entropy_coder is not EntropyCoder.ANS
        )

    def _generator(self, name: str, device: torch.device) -> torch.Generator | None:
        """Tensor ``name``'s stochastic-rounding generator: seeded from the encoder's seed
        and the name (:func:`tensor_seed`), so a tensor's draws do not depend on the
        tensors before it, nor on the thread that encodes it; ``None`` (the global
        generator) without a seed."""
        if self._seed is None:
            return None
        gen = self._generators.get((name, device))
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(tensor_seed(self._seed, name))
            gen = self._generators.setdefault((name, device), gen)
        return gen

    def encode_checked(
        self, name: str, t: torch.Tensor
    ) -> tuple[TensorRecord, torch.Tensor | None] | str:
        """:meth:`encode` (without a global mask) when :meth:`problem` finds nothing, else
        the problem. A tensor sent whole and bit-exactly as fp32 or bf16 values is checked
        by the byte-grouped coder on the way (:func:`~fedsqueeze.codec.grouping.encode_grouped`
        with ``finite``): a check of its own read all-MiniLM-L6-v2's weights once more,
        12.6 of 98.4 ms of its bf16 lossless encode (BENCHMARKS.md, "Lossless float
        coding")."""
        if self._blocks_on_the_way(name, t):
            try:
                return self.encode(name, t, None)
            except dense_encode.OutOfRange:
                return self._why_not(name, t) or f"tensor {name!r} has NaN or Inf values"
        if not self._checked_on_the_way(name, t):
            problem = self.problem(name, t)
            return problem if problem is not None else self.encode(name, t, None)
        try:
            return self._lossless(name, t, finite=True), None
        except NonFiniteFound:
            return self._why_not(name, t) or f"tensor {name!r} has NaN or Inf values"

    def _checked_on_the_way(self, name: str, t: torch.Tensor) -> bool:
        """Whether :meth:`encode` sends ``t`` through :meth:`_lossless` as it is (no
        cast, no base), as fp32 or bf16 values: its finiteness is then checked there."""
        fmt = self._spec.float_format
        return (
            t.dtype in (torch.float32, torch.bfloat16)
            and not self.is_lossy(name, t)
            and (_CAST_DTYPES[fmt] == t.dtype or fmt is FloatFormat.FP32)
            and self._base_of(name, t) is None
        )

    def _blocks_on_the_way(self, name: str, t: torch.Tensor) -> bool:
        """Whether :meth:`encode` sends ``t`` itself (float32, no base, no residual, no
        rotation) to the compiled pass of blocks (or of rows, per channel)
        (:func:`dense_encode.encode_dense_blocks
        <fedsqueeze.codec.dense_encode.encode_dense_blocks>`), which checks every block's
        range as it chooses its parameters: the separate check's read of the tensor
        (7 of ~42 ms of a 100 MB ``quant=4:block64`` encode here) is then not needed."""
        spec, q = self._spec, self._spec.quant
        if (
            q is None
            or q.granularity is Granularity.PER_TENSOR
            or spec.feedback
            or self._rotated
            or not dense_encode.ENABLED
            or t.dtype != torch.float32
            or t.device.type != "cpu"
            or not t.is_contiguous()
            or not self.is_lossy(name, t)
            or not self._dense(t)
            or self._base_of(name, t) is not None
        ):
            return False
        runs = Runs(q.block_size if q.block_size is not None else _row_length(t))
        return dense_encode.fuses_blocks(t.detach().view(-1), q, runs, spec.entropy_level)

    def problem(self, name: str, t: torch.Tensor) -> str | None:
        """Why this tensor's path cannot encode it (NaN, Inf, out of range), else ``None``."""
        if not t.is_floating_point():
            return None
        if self._fits(name, t):
            return None
        return self._why_not(name, t)

    def _fits(self, name: str, t: torch.Tensor) -> bool:
        """Whether the tensor surely encodes: one chunked min/max pass over what its path
        sends (and over the tensor, when that differs), instead of the several full
        passes of :meth:`_why_not`, which only a tensor that fails here goes through
        (it finds the reason)."""
        spec = self._spec
        fmt = _CAST_DTYPES[spec.float_format]
        if self.is_lossy(name, t):
            limit = MAX_MAGNITUDE if spec.quant is not None else _finite_limit(fmt)
            blocked = spec.quant is not None and spec.quant.granularity is Granularity.PER_BLOCK
            if blocked and spec.quant is not None and spec.quant.scales is ScaleFormat.FP16:
                limit = min(limit, FP16_SCALE_LIMIT)
            terms = self._selection_terms(name, t)
            if terms is not None:
                sparsity, b, r = terms
                first = prepare_selection_of_sum(t, b, r, sparsity)
                if first is None:
                    return _sum_within(t, b, r, limit)
                self._firsts[name] = (t, t._version, first)  # its sum's: encode's input
                return first.within(limit)
            sent = self.lossy_input(name, t)
            fits = self._fits_on_the_way(name, t, sent, limit)
            if fits is not None:
                return fits and (sent is t or _within(t, math.inf))
        elif fmt != t.dtype and spec.float_format is not FloatFormat.FP32:
            b = self._base_of(name, t)
            sent = t.to(torch.float32) if b is None else t.to(torch.float32) - b.to(torch.float32)
            limit = _finite_limit(fmt)
        else:
            sent, limit = t, math.inf
        return _within(sent, limit) and (sent is t or _within(t, math.inf))

    def _selection_terms(
        self, name: str, t: torch.Tensor
    ) -> tuple[float, torch.Tensor | None, torch.Tensor | None] | None:
        """For a magnitude selection on the CPU whose input is ``t`` less a base plus a
        carried residual (not rotated): the share it drops, the base and the residual
        (either may be ``None``, not both). The check then makes the selection's first pass over the
        sum chunk by chunk, never whole (:func:`prepare_selection_of_sum`; or, where
        that does not apply, :func:`_sum_within` checks it so): held from here, every
        such tensor's sum would be alive at once (a model's worth of memory), and made
        twice it cost a full allocation and pass more (top-k with error feedback, every
        round after the first)."""
        sparsity = self._selection_sparsity(t)
        if self._rotated or t.device.type != "cpu" or sparsity is None:
            return None
        b = self._base_of(name, t)
        r = self._residual.get(name) if self._spec.feedback else None
        if r is not None and (r.shape != t.shape or r.device.type != "cpu"):
            return None  # lossy_input reports the shape; another device: the usual path
        if b is None and r is None:
            return None
        return sparsity, b, r

    def _fits_on_the_way(
        self, name: str, t: torch.Tensor, sent: torch.Tensor, limit: float
    ) -> bool | None:
        """Whether every value of ``sent`` (what a lossy tensor's path sees) is finite
        with ``|x| <= limit``, read off a pass its encode needs anyway, which is kept for
        :meth:`encode` (it then skips it): the ranges of a dense quantization (per tensor,
        per row, per block) or a magnitude selection's first pass. ``None`` where the
        path has no such pass."""
        q = self._spec.quant
        if not sent.numel():
            return None
        if self._dense(t) and q is not None and q.granularity is Granularity.PER_TENSOR:
            lo, hi = value_range(sent.detach().reshape(-1).contiguous(), None)
        elif (runs := self._dense_runs(t)) is not None:
            lo, hi = value_range(sent.detach().reshape(-1).contiguous(), runs)
        else:
            sparsity = None if fused.active(t.device) else self._selection_sparsity(t)
            first = None if sparsity is None else prepare_selection(sent, sparsity)
            if first is None:
                return None
            self._firsts[name] = (t, t._version, first)
            return first.within(limit)
        self._ranges[name] = (t, t._version, (lo, hi))
        return _in_range(lo.amin(), hi.amax(), limit)

    def _dense(self, t: torch.Tensor) -> bool:
        """Whether a lossy tensor is quantized whole: no mask, levels or low rank."""
        spec = self._spec
        return (
            spec.quant is not None
            and spec.levels is None
            and spec.topk is None
            and not spec.prune.active
            and (spec.rank is None or t.ndim < 2)
        )

    def _dense_runs(self, t: torch.Tensor) -> Runs | None:
        """The runs a dense per-channel (rows) or block-wise (blocks) CPU tensor is
        quantized in, when they are long enough (:data:`_RUNS_FROM` values) for their
        ranges to be worth keeping from the check to the encode; else ``None``."""
        q = self._spec.quant
        if (
            q is None
            or q.granularity is Granularity.PER_TENSOR
            or not self._dense(t)
            or t.device.type != "cpu"
            or fused.active(t.device)  # its kernels find the runs' ranges themselves
        ):
            return None
        length = q.block_size if q.block_size is not None else _row_length(t)
        return Runs(length) if length >= _RUNS_FROM else None

    def _factored(self, t: torch.Tensor) -> bool:
        """Whether a lossy tensor goes as low-rank factors."""
        rank = self._spec.rank
        return rank is not None and t.ndim >= 2 and worth_factoring(*matrix_shape(t.shape), rank)

    def _selection_sparsity(self, t: torch.Tensor) -> float | None:
        """The share a lossy tensor's magnitude selection drops (top-k, or ``l1``
        pruning), or ``None`` where it has none (low rank, a mask, nothing dropped)."""
        return None if self._factored(t) else selection_sparsity(self._spec)

    def _why_not(self, name: str, t: torch.Tensor) -> str | None:
        spec = self._spec
        fmt = _CAST_DTYPES[spec.float_format]
        if self.is_lossy(name, t):
            quantized = spec.quant is not None
            x = self.lossy_input(name, t)
            fp16_scales = (
                spec.quant is not None
                and spec.quant.granularity is Granularity.PER_BLOCK
                and spec.quant.scales is ScaleFormat.FP16
            )
            if fp16_scales and bool((x.abs() > FP16_SCALE_LIMIT).any()):
                return (
                    f"tensor {name!r} has values beyond ±65504, too large for fp16 block "
                    "scales (use bf16 or dq scales)"
                )
            return unrepresentable(name, t, x, quantized=quantized, cast=None if quantized else fmt)
        if fmt != t.dtype and spec.float_format is not FloatFormat.FP32:
            b = self._base_of(name, t)
            x = t.to(torch.float32) if b is None else t.to(torch.float32) - b.to(torch.float32)
            return unrepresentable(name, t, x, quantized=False, cast=fmt)
        return unrepresentable(name, t, t, quantized=False, cast=None)

    def carry(self, name: str, t: torch.Tensor) -> tuple[TensorRecord, torch.Tensor | None]:
        """Encode a tensor bit-exactly, whatever the spec (for values it cannot hold).

        The residual passed in for it (if any) stays unsent and is returned as is.
        """
        self._ranges.pop(name, None)
        r = self._residual.get(name) if self._spec.feedback else None
        if r is not None:
            r = r.detach().to(device=t.device, dtype=torch.float32)
        return self._lossless(name, t), r

    # ------------------------------------------------------------------ encode
    def encode(
        self,
        name: str,
        t: torch.Tensor,
        global_mask: torch.Tensor | None,
        grow_masks: list[torch.Tensor] | None = None,
    ) -> tuple[TensorRecord, torch.Tensor | None]:
        """Encode one tensor; returns the record and its new residual (top-k only).

        ``grow_masks``: with global pruning and ``grow``, the kept masks of the global
        cut at each support level's sparsity."""
        if self.is_lossy(name, t):
            return self._lossy(name, t, global_mask, grow_masks)
        fmt = self._spec.float_format
        if t.is_floating_point() and _CAST_DTYPES[fmt] != t.dtype and fmt is not FloatFormat.FP32:
            return self._cast(name, t), None
        return self._lossless(name, t), None

    def _record(
        self,
        name: str,
        t: torch.Tensor,
        *,
        delta: bool,
        body: bytes | memoryview,
        value_kind: ValueKind = ValueKind.RAW,
        quant: QuantHeader | None = None,
        positions: PositionsHeader | None = None,
        rank: int = 0,
        levels: tuple[int, ...] = (),
        coded: dense_encode.DenseBody | None = None,
    ) -> TensorRecord:
        index = self._index.get(name) if delta else None
        if quant is not None and quant.granularity is Granularity.PER_CHANNEL:
            index = None  # keep per-channel records parseable without the base
        compressed: bytes | memoryview | None
        if coded is not None:  # compressed already (dense_encode)
            compressed = None if coded.raw_length is None else coded.body
        elif quant is None and value_kind in GROUPED_KINDS:
            compressed = None
        elif (
            quant is not None
            and len(body) >= _SPLICED_FROM
            and 0 < self._spec.entropy_level <= 3
            and _literal_pays(body, self._spec.entropy_level)
        ):
            # Codes and positions: literal-only pieces on every core, smaller and faster
            # than the default level's matches (literal_frames.compress_spliced).
            compressed = literal_frames.compress_spliced(body)
            if compressed is None:
                compressed = entropy.compress(body, self._spec.entropy_level)
        else:
            compressed = entropy.compress(body, self._spec.entropy_level)
        if quant is not None and positions is None and not levels:
            ans_body = self._ans(t, body, quant.bits, rank)
            if ans_body is not None and len(ans_body) < len(
                body if compressed is None else compressed
            ):
                return TensorRecord(
                    name, index, t.dtype, tuple(t.shape), delta, 0, quant, value_kind, None,
                    None, ans_body, rank=rank, ans=True,
                )  # fmt: skip
        return TensorRecord(
            name=name,
            index=index,
            dtype=t.dtype,
            shape=tuple(t.shape),
            delta=delta,
            level=0,
            quant=quant,
            value_kind=value_kind,
            positions=positions,
            raw_length=len(body) if compressed is not None else None,
            # zstd reads a view as well as bytes: copy the payload only to store it raw
            # (a grouped body is a read-only view of its own buffer: kept as it is).
            body=compressed
            if compressed is not None
            else coded.body
            if coded is not None
            else body
            if value_kind in GROUPED_KINDS and isinstance(body, memoryview) and body.readonly
            else bytes(body),
            rank=rank,
            levels=levels,
        )

    def _ans(self, t: torch.Tensor, body: bytes | memoryview, bits: int, rank: int) -> bytes | None:
        """The rANS coding of a dense record's packed codes, when the spec asks for it
        and the record is small enough (:data:`fedsqueeze.codec.ans.MAX_CODES`)."""
        if self._spec.entropy_coder is not EntropyCoder.ANS:
            return None
        count = factor_count(*matrix_shape(tuple(t.shape)), rank) if rank else t.numel()
        if not 0 < count <= ans.MAX_CODES:
            return None
        packed = torch.frombuffer(bytearray(body), dtype=torch.uint8)
        return ans.encode_codes(unpack_bits(packed, bits, count).numpy(), bits)

    def _zero(self, name: str, t: torch.Tensor, delta: bool) -> TensorRecord:
        """Nothing kept: the receiver keeps its base tensor (or gets zeros)."""
        index = self._index.get(name) if delta else None
        return TensorRecord(
            name,
            index,
            t.dtype,
            tuple(t.shape),
            delta,
            0,
            None,
            ValueKind.RAW,
            None,
            None,
            b"",
            zero=True,
        )

    def _lossless(self, name: str, t: torch.Tensor, finite: bool = False) -> TensorRecord:
        """The bit-exact record of ``t``. ``finite`` (fp32 or bf16 values, no base):
        raise :class:`~fedsqueeze.codec.grouping.NonFiniteFound` for a NaN or an Inf in
        ``t``, found by the grouped coder on the way where it runs."""
        b = self._base_of(name, t)
        chunked = b is not None and self._xor_while_grouping(t)
        if chunked and b is not None:
            # A large float delta: compared and XORed block by block (never the whole
            # XOR held), then coded as the path below codes it (grouped: it is large).
            if _same_bits(t, b):
                return self._zero(name, t, delta=True)
            grouped = self._grouped(name, t, t, delta=True, base=b)
            if grouped is not None:
                return grouped
            # Grouping gains nothing (close to random bits): the plain record below.
        if b is None:
            # All bits zero (not merely == 0: -0.0 must survive) decodes bit-exactly.
            bits = as_bits(t)
            if all_zero_bits(bits):
                return self._zero(name, t, delta=False)
        else:
            bits = xor_bits(t, b)
            if not chunked and all_zero_bits(bits):
                return self._zero(name, t, delta=True)
        delta = b is not None
        size = t.numel() * t.element_size()
        raw = tensor_bytes(bits if delta else t)
        # Between _SAMPLED_ABOVE and _COMPARE_BELOW samples pick a coding when they
        # differ clearly (a delta's grouping is sampled too); smaller tensors are coded
        # both ways.
        sampled = _SAMPLED_ABOVE < size <= _COMPARE_BELOW
        guess = entropy.estimate(raw, self._spec.entropy_level) if sampled else 0.0
        grouped = None
        if chunked:
            pass  # grouped above: no gain
        elif not sampled or not delta or _grouped_guess(bits, t.dtype) < _PLAIN_MARGIN * guess:
            # A model's own weights are coded grouped outright: grouping is what wins on
            # them, and guessing from a sample first cost a third of a mid-sized
            # tensor's encode (MiniLM's 147K-590K-value matrices). The sizes below
            # still pick plain zstd where it is smaller.
            grouped = self._grouped(name, t, bits, delta, finite=finite)
        # else: plain zstd is clearly smaller (sparse fp32 XOR deltas): planes spared.
        if grouped is not None and (
            size > _COMPARE_BELOW or (sampled and guess >= _PLAIN_MARGIN * len(grouped.body))
        ):
            # Large (plain zstd costs more than grouping saves), or plain zstd clearly
            # bigger: spared.
            return grouped
        plain = self._record(
            name,
            t,
            delta=delta,
            body=bytes(raw),
            value_kind=ValueKind.XOR if delta else ValueKind.RAW,
        )
        if grouped is not None and _record_size(grouped) < _record_size(plain):
            return grouped
        return plain

    def _xor_while_grouping(self, t: torch.Tensor) -> bool:
        """Whether a lossless delta of ``t`` is grouped with its XOR made chunk by chunk:
        a float tensor on the CPU above :data:`_COMPARE_BELOW` (no plain record to
        compare, so the whole XOR is never needed), entropy coding on."""
        return (
            t.device.type == "cpu"
            and t.dtype in GROUPED_DTYPES
            and self._spec.entropy_level > 0
            and t.numel() * t.element_size() > _COMPARE_BELOW
        )

    def _grouped(
        self,
        name: str,
        t: torch.Tensor,
        bits: torch.Tensor,
        delta: bool,
        base: torch.Tensor | None = None,
        finite: bool = False,
    ) -> TensorRecord | None:
        """The byte-grouped record of a float tensor (of ``bits ^ base`` with a base,
        XORed as the planes are split), if it is smaller than its raw bits (``None``:
        not a grouped dtype, entropy coding off, or no gain). ``finite``: see
        :meth:`_lossless` (checked here either way)."""
        raw = t.numel() * t.element_size()
        if t.dtype not in GROUPED_DTYPES or self._spec.entropy_level <= 0 or raw < _MIN_GROUPED:
            if finite and not all_finite(t):
                raise NonFiniteFound
            return None
        # An XOR delta's planes are mostly zero bytes, not exponents: never joint.
        body = encode_grouped(
            bits, t.dtype, base=base, joint=False if delta else None, finite=finite
        )
        if len(body) >= raw:
            return None
        kind = ValueKind.GROUPED_XOR if delta else ValueKind.GROUPED
        record = self._record(name, t, delta=delta, body=body, value_kind=kind)
        if holds_buckets(body, t.dtype, t.numel()):  # format version 10
            record = replace(record, buckets=True)
        if holds_joint(body, t.dtype, t.numel()):  # format version 12
            record = replace(record, joint=True)
        return record

    def _cast(self, name: str, t: torch.Tensor) -> TensorRecord:
        b = self._base_of(name, t)
        x = t.to(torch.float32) if b is None else t.to(torch.float32) - b.to(torch.float32)
        if _all_zero(x):
            return self._zero(name, t, delta=b is not None)
        fmt = self._spec.float_format
        values = x.reshape(-1).to(_CAST_DTYPES[fmt])
        return self._record(
            name,
            t,
            delta=b is not None,
            body=tensor_bytes(values),  # a view: _record copies it only to store it raw
            value_kind=FLOAT_KINDS[fmt],
        )

    def _kept(
        self,
        name: str,
        x: torch.Tensor,
        global_mask: torch.Tensor | None,
        first: FirstPass | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Flat indices of the values kept (int64, increasing), ``None`` for all; and the
        values at them when the selection gathered them (else ``None``). ``first``: the
        selection's first pass over ``x``'s values, made by :meth:`_fits`."""
        spec = self._spec
        on_device = fused.active(x.device)

        def select(t: torch.Tensor, sparsity: float) -> tuple[torch.Tensor, torch.Tensor | None]:
            # On a CUDA device the fused selection (indices only; values gathered later).
            if on_device:
                return fused.magnitude_indices(t, sparsity), None
            return magnitude_selection(t, sparsity, first)

        sparsity = self._selection_sparsity(x)
        if sparsity is not None:
            return select(x, sparsity)
        if spec.topk is not None:
            return None, None  # top-k of everything
        method = spec.prune.method
        mask: torch.Tensor | None = None
        if method is PruneMethod.L1_GLOBAL:
            mask = global_mask
        elif method is PruneMethod.LN_STRUCTURED and spec.prune.sparsity > 0:
            mask = channel_mask(x, spec.prune.sparsity)
        elif method is PruneMethod.THRESHOLD:
            mask = threshold_mask(x, spec.prune.threshold)
        return (None if mask is None else mask_to_indices(mask.reshape(-1))), None

    def _lossy(
        self,
        name: str,
        t: torch.Tensor,
        global_mask: torch.Tensor | None,
        grow_masks: list[torch.Tensor] | None = None,
    ) -> tuple[TensorRecord, torch.Tensor | None]:
        spec = self._spec
        delta = self._base_of(name, t) is not None
        known = _recall(self._ranges, name, t)
        x = self.lossy_input(name, t)
        if spec.rank is not None and self._factored(t):
            return self._lowrank(name, t, x, delta, spec.rank)
        flat = x.reshape(-1)
        first = _recall(self._firsts, name, t)
        selected = self._select_quantized(name, t, flat, first, delta)
        if selected is not None:
            return selected
        indices, gathered = self._kept(name, x, global_mask, first)
        if indices is None:
            values = flat
        else:
            values = _gather(flat, indices) if gathered is None else gathered
        # Magnitude selection keeps exact zeros when fewer than k values are nonzero (an
        # unchanged tensor, a sparse update): they decode to 0 without positions. Channel
        # pruning keeps its whole channels.
        unstructured = spec.prune.method is not PruneMethod.LN_STRUCTURED
        if (
            indices is not None
            and unstructured
            and int(torch.count_nonzero(values)) < values.numel()
        ):
            nonzero = values != 0
            indices, values = indices[nonzero], values[nonzero]
        if _all_zero(values):
            # Nothing nonzero kept: the receiver keeps its base (or gets zeros), ~2 bytes.
            return self._zero(name, t, delta), (x if spec.feedback else None)
        numel = flat.numel()
        channels_of: torch.Tensor | Runs | None = None
        num_channels = t.shape[0] if t.ndim else 1
        if spec.quant is not None and spec.quant.granularity is Granularity.PER_CHANNEL:
            stride = _row_length(t)
            if indices is None:
                channels_of = Runs(stride)  # dense: rows of stride values
            else:
                channels_of = torch.div(indices, stride, rounding_mode="floor")
        elif spec.quant is not None and spec.quant.block_size is not None:
            # Blocks of consecutive *kept* values: runs, like dense channels.
            channels_of = Runs(spec.quant.block_size)
            num_channels = num_blocks(values.numel(), spec.quant.block_size)
        if spec.grow and spec.levels is not None and spec.quant is not None:
            if indices is None:
                indices = torch.arange(numel, device=flat.device)
            if global_mask is None:
                grow_masks = None  # l1: each support level cut from the tensor alone
            groups = group_ids(x, indices, spec.grow, grow_masks)
            record, decoded = self._grown(
                name, t, values, indices, channels_of, num_channels, delta, spec.quant,
                self._plan(name, spec.levels), groups,
            )  # fmt: skip
            return record, _residual(
                flat, indices, values, decoded, t.shape
            ) if spec.feedback else None
        # Position coding runs beside the quantization (they share nothing), or first on
        # every core when there are many positions (encode_positions_soon).
        coded = None if indices is None else encode_positions_soon(indices, numel)
        positions: PositionsHeader | None = None
        pos_payload = b""

        def coded_positions() -> None:
            nonlocal positions, pos_payload
            if coded is not None:
                positions, pos_payload = _positions(coded)

        if spec.levels is not None and spec.quant is not None:
            coded_positions()
            record, last = self._progressive(
                name, t, values, channels_of, num_channels, delta, spec.quant,
                self._plan(name, spec.levels), positions, pos_payload, spec.feedback,
            )  # fmt: skip
            return record, _residual(
                flat, indices, values, last, t.shape
            ) if last is not None else None
        if indices is None and not spec.feedback:
            piped = self._piped(name, t, values, channels_of, num_channels, known, delta)
            if piped is not None:
                return piped, None
        # only error feedback needs what the receiver gets
        payload, quant, value_kind, decoded = self._store(
            values, channels_of, num_channels, t.device, spec.feedback,
            known if indices is None else None, name=name,
        )  # fmt: skip
        coded_positions()
        record = self._record(
            name,
            t,
            delta=delta,
            body=pos_payload + bytes(payload) if pos_payload else payload,
            value_kind=value_kind,
            quant=quant,
            positions=positions,
        )
        if not spec.feedback:
            return record, None
        owned = x.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
        return record, _residual(flat, indices, values, decoded, t.shape, owned)

    def _select_quantized(
        self,
        name: str,
        t: torch.Tensor,
        flat: torch.Tensor,
        first: FirstPass | None,
        delta: bool,
    ) -> tuple[TensorRecord, torch.Tensor | None] | None:
        """A magnitude selection's record with the quantizer (and error feedback's
        residual) in the selection's second pass (:mod:`fedsqueeze.codec.select_quantize`:
        the same bytes as the separate passes); ``None`` where it does not apply."""
        spec = self._spec
        sparsity = self._selection_sparsity(t)
        if (
            sparsity is None
            or spec.levels is not None
            or spec.quant is None
            or not select_quantize.applies(spec.quant)
        ):
            return None
        if first is None:  # not made by the check (a sum: _selection_terms)
            first = prepare_selection(flat, sparsity)
            if first is None or not first.within(MAX_MAGNITUDE):
                return None
        owned = flat.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
        got = select_quantize.select_quantized(
            flat, count_to_prune(flat.numel(), sparsity), first, spec.quant,
            self._generator(name, flat.device), spec.feedback, in_place=owned,
        )  # fmt: skip
        if got is None:
            return None
        coded = encode_positions_soon(got.indices, flat.numel())
        payload = tensor_bytes(pack_bits(got.codes, spec.quant.bits))
        positions, pos_payload = _positions(coded)
        record = self._record(
            name,
            t,
            delta=delta,
            body=pos_payload + bytes(payload),
            value_kind=ValueKind.RAW,
            quant=_quant_header(spec.quant, got.qp, 1, name),
            positions=positions,
        )
        residual = None if got.residual is None else got.residual.reshape(t.shape)
        return record, residual

    def _progressive(
        self,
        name: str,
        t: torch.Tensor,
        values: torch.Tensor,
        channels_of: torch.Tensor | Runs | None,
        num_channels: int,
        delta: bool,
        q: QuantSpec,
        levels: tuple[int, ...],
        positions: PositionsHeader | None,
        pos_payload: bytes,
        need_decoded: bool,
    ) -> tuple[TensorRecord, torch.Tensor | None]:
        """Quantize once at ``q.bits`` and cut the codes into levels.

        Returns the base-level record and, if ``need_decoded``, the values the last
        level decodes to; all the levels, with their gains, go to :attr:`levels`.
        """
        qp = choose_qparams(
            values, q.bits, q.scheme, q.granularity, channels_of, num_channels, q.scales
        )
        codes = quantize(values, qp, q.rounding, channels_of, self._generator(name, t.device))
        # the input moments of a dense Linear with calibration: GPTQ chooses its codes
        calibration = self._calibration if positions is None else None
        hessian = None
        if calibration is not None:
            hessian = calibration.hessians.get(self._origins.get(name, name))
        seed = rotation_seed(name) if self._rotated else None
        if calibration is not None and hessian is not None:
            codes = calibrated_codes(
                tuple(t.shape), values, codes, qp, levels, channels_of, hessian, seed,
                calibration,
            )  # fmt: skip
        quant = _quant_header(q, qp, num_channels, name)
        energy = _energy(t)
        # The tables, then every level's gain in one pass over parts of the tensor
        # (progressive.level_gains): no whole-tensor int64 or float64 temporaries.
        tables = [
            bucket_table(codes, qp, cumulative_bits(levels, level), channels_of)
            if level < len(levels) - 1
            else None
            for level in range(len(levels))
        ]
        decoded = torch.empty_like(values, dtype=torch.float32) if need_decoded else None
        if calibration is not None and hessian is not None:
            # GPTQ chose the codes for the output error: the coarse tables are refitted
            # for it (not at margin 0, which keeps nearest rounding's stream), and the
            # order weighs the levels by it
            if calibration.margin:
                tables = output_tables(
                    tuple(t.shape), values, codes, qp, levels, tables, channels_of, hessian, seed
                )
            gains = output_gains(
                tuple(t.shape), values, codes, qp, levels, tables, channels_of, hessian, seed,
                decoded,
            )  # fmt: skip
        else:
            gains = level_gains(values, codes, qp, levels, tables, channels_of, decoded)
        scored: list[ScoredLevel] = []
        for level, bits in enumerate(levels):
            table = tables[level]
            codes_k = plane(codes, levels, level)
            body = bytes(tensor_bytes(pack_bits(codes_k, bits)))
            table_bytes = b"" if table is None else table_to_bytes(table)
            body += table_bytes
            if level == 0:
                record = self._record(
                    name, t, delta=delta, body=pos_payload + body, quant=quant,
                    positions=positions, levels=levels,
                )  # fmt: skip
            else:
                coarse = top_codes(codes, sum(levels), cumulative_bits(levels, level - 1))
                record = self._refinement(body, table_bytes, codes_k, bits, coarse, level)
            scored.append(ScoredLevel(record, gains[level], energy))
        self.levels[name] = scored
        return scored[0].record, decoded

    def _grown(
        self,
        name: str,
        t: torch.Tensor,
        values: torch.Tensor,
        indices: torch.Tensor,
        channels_of: torch.Tensor | Runs | None,
        num_channels: int,
        delta: bool,
        q: QuantSpec,
        levels: tuple[int, ...],
        groups: torch.Tensor,
    ) -> tuple[TensorRecord, torch.Tensor]:
        """A progressive tensor whose positions arrive in groups (support levels,
        :mod:`fedsqueeze.codec.support_levels`): quantize once at ``q.bits``, then cut
        each group's codes into planes.

        Returns the base-level record (group 0's first plane) and the values the last
        level of every group decodes to; the records go to :attr:`levels` in the
        tensor's chain order.
        """
        if isinstance(channels_of, Runs):
            channels_of = channels_of.index(values.numel(), t.device)
        qp = choose_qparams(
            values, q.bits, q.scheme, q.granularity, channels_of, num_channels, q.scales
        )
        codes = quantize(values, qp, q.rounding, channels_of, self._generator(name, t.device))
        quant = _quant_header(q, qp, num_channels)
        energy = _energy(t)
        numel = t.numel()
        final = torch.zeros_like(values, dtype=torch.float64)
        held = torch.empty(0, dtype=torch.int64, device=indices.device)
        nodes: list[Node] = []
        members = [torch.nonzero(groups == j).reshape(-1) for j in range(int(groups.max()) + 1)]
        for group, sel in enumerate(m for m in members if m.numel()):
            idx = indices[sel]
            enc = encode_positions(free_ranks(idx, held), numel - held.numel())
            pos_payload = bytes(tensor_bytes(enc.payload))
            positions = PositionsHeader(
                int(enc.coding.value), enc.rice_k, enc.count, len(pos_payload)
            )
            g_codes, g_values = codes[sel], values[sel]
            g_channels = None if channels_of is None else channels_of[sel]
            before = torch.zeros_like(g_values, dtype=torch.float64)
            for level, bits in enumerate(levels):
                cum = cumulative_bits(levels, level)
                last = level == len(levels) - 1
                table = None if last else bucket_table(g_codes, qp, cum, g_channels)
                codes_k = plane(g_codes, levels, level)
                body = bytes(tensor_bytes(pack_bits(codes_k, bits)))
                head = b"" if table is None else table_to_bytes(table)
                body += head
                if level == 0:
                    body = pos_payload + body
                    head = pos_payload + head
                if group == 0 and level == 0:
                    record = self._record(
                        name, t, delta=delta, body=body, quant=quant, positions=positions,
                        levels=levels,
                    )  # fmt: skip
                else:
                    # A group's later planes have its own values' coarser bits as context.
                    coarse = top_codes(g_codes, sum(levels), cum - bits) if level else None
                    record = self._refinement(
                        body, head, codes_k, bits, coarse, 1,
                        positions if level == 0 else None, group, level,
                    )  # fmt: skip
                after = reconstruct(top_codes(g_codes, q.bits, cum), qp, cum, table, g_channels).to(
                    torch.float64
                )
                gain = level_gain(g_values, before, after)
                nodes.append(Node(group, level, ScoredLevel(record, gain, energy)))
                before = after
            final[sel] = before
            held = torch.sort(torch.cat((held, idx))).values
        self.levels[name] = chain(nodes)
        return nodes[0].scored.record, final.to(torch.float32)

    def _refinement(
        self,
        body: bytes,
        head: bytes,
        codes: torch.Tensor,
        bits: int,
        held: torch.Tensor | None,
        level: int,
        positions: PositionsHeader | None = None,
        group: int | None = None,
        plane_index: int = 0,
    ) -> TensorRecord:
        """A refinement record: its plain ``body`` (positions, packed plane, table)
        zstd-coded, or with ``entropy=ans`` the plane ``codes`` context-coded after
        ``head`` (positions and table) when that record is smaller
        (:mod:`fedsqueeze.codec.plane_ans`; ``held``: each value's coarser code bits,
        ``None`` for a group's first plane)."""
        compressed = entropy.compress(body, self._spec.entropy_level)
        record = TensorRecord(
            None, 0, None, None, False, level, None, ValueKind.RAW, positions,
            len(body) if compressed is not None else None,
            compressed if compressed is not None else body,
            group=group, plane=plane_index,
        )  # fmt: skip
        if self._context_order and held is not None and positions is None:
            record = self._context_ordered(record, codes, bits, held, head)
        if self._spec.entropy_coder is not EntropyCoder.ANS:
            return record
        coded = plane_ans.encode_plane(codes, bits, held)
        if coded is None:
            return record
        alt = replace(record, raw_length=None, body=head + coded, ans=True, context_order=False)
        return alt if _record_size(alt) < _record_size(record) else record

    def _context_ordered(
        self, record: TensorRecord, codes: torch.Tensor, bits: int, held: torch.Tensor, head: bytes
    ) -> TensorRecord:
        """``record`` with its plane ``codes`` in context order (sorted, stably, by the
        coarser bits ``held``; :class:`~fedsqueeze.codec.container.TensorRecord`'s
        ``context_order``) when zstd makes that smaller, else ``record`` itself. ``head``:
        the table that follows the plane."""
        order = torch.argsort(held.reshape(-1).to(torch.uint8), stable=True)
        ordered = bytes(tensor_bytes(pack_bits(codes.reshape(-1)[order], bits))) + head
        packed = entropy.compress(ordered, self._spec.entropy_level)
        if packed is None or len(packed) >= len(record.body):
            return record
        return replace(record, raw_length=len(ordered), body=packed, context_order=True)

    def _piped(
        self,
        name: str,
        t: torch.Tensor,
        values: torch.Tensor,
        channels_of: torch.Tensor | Runs | None,
        num_channels: int,
        known_range: tuple[torch.Tensor, torch.Tensor] | None,
        delta: bool,
    ) -> TensorRecord | None:
        """The record of a large dense quantized tensor, quantized and zstd-compressed in
        a pipeline (:mod:`fedsqueeze.codec.dense_encode`), or with ``entropy=0``
        quantized and packed by the pipeline's kernels on the worker threads and stored
        as they are (no copy); ``None`` when neither takes it (the stages then run one
        after the other, to the same bytes)."""
        q = self._spec.quant
        if q is None or not dense_encode.ENABLED:
            return None
        level = self._spec.entropy_level
        if -(-values.numel() * q.bits // 8) < dense_encode.PIPELINE_ABOVE:
            return None  # before choosing params: they would be chosen twice
        if isinstance(channels_of, Runs) and dense_encode.fuses_blocks(
            values, q, channels_of, level
        ):  # block-wise params chosen inside the pass (opt-in): the same bytes
            fp16 = q.granularity is Granularity.PER_BLOCK and q.scales is ScaleFormat.FP16
            limit = FP16_SCALE_LIMIT if fp16 else MAX_MAGNITUDE  # as _fits checks it
            qp, coded = dense_encode.encode_dense_blocks(values, q, channels_of, level, limit)
            return self._record(
                name, t, delta=delta, body=coded.packed.numpy().data,
                quant=_quant_header(q, qp, num_channels, name), coded=coded,
            )  # fmt: skip
        qp = choose_qparams(
            values, q.bits, q.scheme, q.granularity, channels_of, num_channels, q.scales,
            known_range=known_range,
        )  # fmt: skip
        if not dense_encode.pipelines(values, qp, q.rounding, channels_of):
            return None
        runs = channels_of if isinstance(channels_of, Runs) else None
        if level <= 0:
            packed = dense_encode.quantize_packed(values, qp, runs)
            coded = dense_encode.DenseBody(packed.numpy().data, None, packed)
        else:
            coded = dense_encode.encode_dense(values, qp, runs, level)
        quant = _quant_header(q, qp, num_channels, name)
        return self._record(
            name, t, delta=delta, body=coded.packed.numpy().data, quant=quant,
            coded=coded,
        )  # fmt: skip

    def _store(
        self,
        values: torch.Tensor,
        channels_of: torch.Tensor | Runs | None,
        num_channels: int,
        device: torch.device,
        need_decoded: bool,
        known_range: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        name: str,
        factors: bool = False,
    ) -> tuple[bytes | memoryview, QuantHeader | None, ValueKind, torch.Tensor]:
        """Quantize ``values`` (or cast them to the spec's float format); per tensor,
        ``known_range`` is their minimum and maximum when already found; ``name`` is the
        tensor's (its stochastic draws' generator, and a rotated spec's seed unless the
        values are its low-rank ``factors``, which are never rotated).

        Returns the payload (a view of the packed codes, not yet copied), its
        quantization header (``None`` when cast), the value kind and what the receiver
        decodes (``values`` itself unless ``need_decoded``).
        """
        spec = self._spec
        if spec.quant is not None:
            q = spec.quant
            hot = fused.encode_values(
                values, q, channels_of, num_channels, known_range, need_decoded
            )
            if hot is not None:  # a GPU tensor: the fused kernels, the same bytes
                qp, packed, decoded = hot
                return (
                    tensor_bytes(packed),
                    _quant_header(q, qp, num_channels, None if factors else name),
                    ValueKind.RAW,
                    decoded,
                )
            qp = choose_qparams(
                values, q.bits, q.scheme, q.granularity, channels_of, num_channels, q.scales,
                known_range=known_range,
            )  # fmt: skip
            codes = quantize(values, qp, q.rounding, channels_of, self._generator(name, device))
            decoded = dequantize(codes, qp, channels_of) if need_decoded else values
            payload = tensor_bytes(pack_bits(codes, q.bits))
            quant = _quant_header(q, qp, num_channels, None if factors else name)
            return payload, quant, ValueKind.RAW, decoded
        stored = values.to(_CAST_DTYPES[spec.float_format])
        decoded = stored.to(torch.float32) if need_decoded else values
        return bytes(tensor_bytes(stored)), None, FLOAT_KINDS[spec.float_format], decoded

    def _lowrank(
        self, name: str, t: torch.Tensor, x: torch.Tensor, delta: bool, rank: int
    ) -> tuple[TensorRecord, torch.Tensor]:
        """Two factors ``A @ B ≈ x``; the residual is ``x`` minus what the receiver gets."""
        if _all_zero(x):
            return self._zero(name, t, delta), x
        m, n = matrix_shape(tuple(t.shape))
        a, b = factorize(x.reshape(m, n), rank)
        values = torch.cat((a.reshape(-1), b.reshape(-1)))
        # Per-tensor quantization only (the spec forbids per-channel with a rank).
        payload, quant, value_kind, decoded = self._store(
            values, None, 1, t.device, True, name=name, factors=True
        )
        split = m * rank
        approx = decoded[:split].reshape(m, rank) @ decoded[split:].reshape(rank, n)
        record = self._record(
            name, t, delta=delta, body=payload, value_kind=value_kind, quant=quant, rank=rank
        )
        return record, x - approx.reshape(t.shape)


def tensor_seed(seed: int, name: str) -> int:
    """The seed of tensor ``name``'s generator under the encoder's ``seed``: 63 bits of
    BLAKE2b over both (stable across processes and platforms, unlike ``hash``)."""
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _positions(coded: Future[EncodedPositions]) -> tuple[PositionsHeader, bytes]:
    """The record's positions header and payload, once ``coded`` is done."""
    enc = coded.result()
    payload = bytes(tensor_bytes(enc.payload))
    return PositionsHeader(int(enc.coding.value), enc.rice_k, enc.count, len(payload)), payload


def _quant_header(
    q: QuantSpec, qp: QuantParams, num_sets: int, name: str | None = None
) -> QuantHeader:
    """The record's quantization header for params ``qp`` of spec ``q`` (``name``: the
    tensor's, for a rotated spec's seed; low-rank factors are never rotated)."""
    params = qparams_to_bytes(qp)
    seed = rotation_seed(name) if q.rotation is not Rotation.NONE and name else None
    if q.block_size is None:
        return QuantHeader(q.bits, q.scheme, q.granularity, params, rotation_seed=seed)
    return QuantHeader(
        q.bits, q.scheme, q.granularity, params, q.block_size, qp.scale_format, num_sets, seed
    )


def selection_sparsity(spec: CodecSpec) -> float | None:
    """The share of a tensor's values that ``spec``'s magnitude selection drops (top-k,
    or ``l1`` pruning), or ``None`` where it has none (a mask, nothing dropped)."""
    if spec.topk is not None:
        return None if spec.topk >= 1.0 else 1.0 - spec.topk
    if spec.prune.method is PruneMethod.L1_UNSTRUCTURED and spec.prune.sparsity > 0:
        return spec.prune.sparsity
    return None


def _energy(t: torch.Tensor) -> float:
    """``‖t‖²`` in float64 (1.0 for a zero tensor); a large tensor part by part."""
    if t.numel() <= CHUNK:
        return float(t.detach().to(torch.float64).square().sum()) or 1.0
    flat = t.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    for start in range(0, flat.numel(), CHUNK):
        total += flat[start : start + CHUNK].to(torch.float64).square().sum()
    return float(total) or 1.0


def _gather(flat: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``flat[indices]``; on the CPU by NumPy into NumPy memory (huge pages for a large
    result; torch's gather into fresh 4 KiB pages cost about twice the time)."""
    if flat.device.type == "cpu" and flat.dtype == torch.float32 and indices.device.type == "cpu":
        return torch.from_numpy(np.take(flat.detach().contiguous().numpy(), indices.numpy()))
    return flat[indices]


def _literal_pays(body: bytes | memoryview, level: int) -> bool:
    """Whether literal-only coding suits a large quantized payload: of a sample of its
    first half and one of its second (positions, then codes, in a sparse record), one
    picks it and neither picks one stream at ``level``
    (:func:`~fedsqueeze.codec.dense_encode.choose_coder`; a sample that nothing shrinks,
    such as Rice-coded positions, is stored raw inside literal blocks as well). Regular
    positions (whole channels kept) and codes with repeats keep one stream at
    ``level``, whose matches win there."""
    view = memoryview(body).cast("B")
    n = len(view)
    size = min(_LITERAL_SAMPLE, n // 4)
    coders = {
        dense_encode.choose_coder(view[at - size // 2 : at - size // 2 + size], level)
        for at in (n // 4, 3 * n // 4)
    }
    return dense_encode.Coder.LITERAL in coders and dense_encode.Coder.STREAM not in coders


def _residual(
    flat: torch.Tensor,
    indices: torch.Tensor | None,
    values: torch.Tensor,
    decoded: torch.Tensor,
    shape: torch.Size,
    owned: bool = False,
) -> torch.Tensor:
    """Error feedback: what the receiver does not get of ``flat`` (``values`` are
    ``flat[indices]``, the values kept). ``owned``: ``flat`` is the encoder's own
    temporary (not the caller's tensor), which becomes the residual in place."""
    if indices is None:
        return (flat - decoded).reshape(shape)
    kept = values - decoded
    cpu = flat.device.type == "cpu" and flat.dtype == kept.dtype and flat.is_contiguous()
    if not owned and cpu:
        # One pass: a copy in chunks on the worker threads, each taking its kept
        # positions' flat[indices] − decoded (as an in-place subtraction gives) in cache.
        return copy_scatter(flat, indices, kept).reshape(shape)
    residual = flat if owned else parallel_copy(flat)
    if cpu:
        scatter(residual, indices.cpu(), kept)
    else:
        residual[indices] = kept
    return residual.reshape(shape)


#: Raw size (bytes) below which floats are never grouped: the planes' table costs more
#: than grouping saves there, and small models keep their version-1 bytes.
_MIN_GROUPED = 4096
#: Raw sizes (bytes) up to which the lossless path also builds the plain record and keeps
#: the smaller one; above it byte grouping is taken whenever it beats the raw bits.
_COMPARE_BELOW = 1 << 20
#: Below that, plain zstd is not tried when a sample of it (entropy.estimate) comes out
#: this much bigger than the grouped body. On MiniLM's tensors the estimate is within 3%
#: of the real size and the two differ by 11% or more either way (plain wins on fp32
#: XOR deltas), so the choice is the same as coding both, at a fraction of the time.
_PLAIN_MARGIN = 1.05
#: Values of the middle sample :func:`_grouped_guess` codes (for deltas: a model's own
#: weights are grouped without a guess).
_GROUPED_SAMPLE = 1 << 14
#: Raw size (bytes) above which the two codings are guessed from samples first (plain
#: zstd always; grouping only for a delta).
_SAMPLED_ABOVE = 1 << 17
#: Quantized payloads (codes, positions, factors) from this size (bytes) are coded as
#: literal-only zstd pieces on every core at the default levels (up to 3); smaller ones
#: keep the spec's level, so small models keep their bytes.
_SPLICED_FROM = 1 << 20
#: Bytes of each sample :func:`_literal_pays` codes both ways.
_LITERAL_SAMPLE = 1 << 18


def _grouped_guess(bits: torch.Tensor, dtype: torch.dtype) -> float:
    """About how many bytes the grouped body of ``bits`` takes (``inf``: not groupable),
    from its middle :data:`_GROUPED_SAMPLE` values."""
    flat = bits.reshape(-1)
    n = flat.numel()
    if dtype not in GROUPED_DTYPES or flat.element_size() != dtype.itemsize:
        return float("inf")
    start = max(0, (n - _GROUPED_SAMPLE) // 2)
    sample = flat[start : start + _GROUPED_SAMPLE]
    return len(encode_grouped(sample, dtype)) * n / max(1, sample.numel())


def _same_bits(t: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether two CPU float tensors of one dtype and shape have the same bits, compared
    :data:`_SAME_STEP` values at a time (no tensor-sized temporary; the usual delta
    differs within the first step)."""
    a = as_bits(t).reshape(-1).numpy()
    b = as_bits(base).reshape(-1).numpy()
    return all(
        np.array_equal(a[s : s + _SAME_STEP], b[s : s + _SAME_STEP])
        for s in range(0, a.shape[0], _SAME_STEP)
    )


#: Values compared at a time by :func:`_same_bits`.
_SAME_STEP = 1 << 16


def _record_size(record: TensorRecord) -> int:
    return len(record.header_bytes()) + len(record.body)


def _all_zero(x: torch.Tensor) -> bool:
    """Whether every element of ``x`` equals 0 (``-0.0`` too; compare bits to tell them apart).

    ``torch.equal`` against an expanded zero stops at the first difference on the CPU,
    so the usual tensor with something to send costs microseconds, not a pass
    (``x.any()`` costs about as much as ``clone()``); a nonzero first element settles
    it before that (``equal`` on bf16 scans everything).
    """
    flat = x.reshape(-1)
    if flat.numel() and bool(flat[0] != 0):
        return False
    return torch.equal(x, torch.zeros((), dtype=x.dtype, device=x.device).expand(x.shape))


def _finite_limit(dtype: torch.dtype) -> float:
    """Largest magnitude that stays finite in ``dtype`` (float32 values are sent as is)."""
    return math.inf if dtype == torch.float32 else float(torch.finfo(dtype).max)


def _in_range(lo: torch.Tensor, hi: torch.Tensor, limit: float) -> bool:
    """Whether a minimum and maximum are finite with ``|x| <= limit`` (NaN fails)."""
    return bool(torch.isfinite(lo) & torch.isfinite(hi) & (lo >= -limit) & (hi <= limit))


def _within(x: torch.Tensor, limit: float) -> bool:
    """Whether every value of ``x`` is finite with ``|x| <= limit`` (NaN fails).

    Compared in float32: a float64 value beyond float32's range fails (a false alarm
    the exact check then clears), one that rounds onto ``limit`` only matters for
    float32 inputs, which are exact.
    """
    flat = x.detach().reshape(-1)
    if flat.numel() == 0:
        return True
    if limit == math.inf:  # finiteness alone: a pass over the bits, exact for float64 too
        return all_finite(flat)
    if flat.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        flat = flat.to(torch.float32)
    lo, hi = value_range(flat.contiguous(), None)
    return _in_range(lo, hi, limit)


def _summed(
    t: torch.Tensor, base: torch.Tensor | None, residual: torch.Tensor | None
) -> torch.Tensor | None:
    """``t − base + residual`` of large float32 CPU tensors by the compiled kernel in
    chunks on the worker threads, into NumPy memory (huge pages: torch's two passes
    into 4 KiB pages cost 34 ms on 25M values); ``None`` where it does not apply
    (nothing to add, other dtypes or devices, small tensors)."""
    if (base is None and residual is None) or not jit.use(t.numel()):
        return None
    arrays = float32_arrays(t, base, residual)
    if arrays is None:
        return None
    tn, bn, rn = arrays
    out = empty_numpy_backed(tn.size, torch.float32)
    on = out.numpy()
    run_chunks(
        lambda a, z: jit_select.sum_into(tn, bn, rn, a, z, on, a),
        chunk_bounds(tn.size, CPU_CHUNK),
    )
    return out.reshape(t.shape)


def _sum_within(
    t: torch.Tensor, base: torch.Tensor | None, residual: torch.Tensor | None, limit: float
) -> bool:
    """Whether ``t`` is finite and ``t − base + residual`` (as
    :meth:`TensorEncoder.lossy_input` computes it, in float32) is finite with every
    ``|x| <= limit``: chunk by chunk on the worker threads, the sum never whole."""
    flat = t.detach().reshape(-1)
    b = None if base is None else base.detach().reshape(-1)
    r = None if residual is None else residual.detach().reshape(-1)
    bounds = chunk_bounds(flat.numel(), CPU_CHUNK)
    ok = [True] * len(bounds)
    arrays = float32_arrays(flat, b, r) if jit.use(flat.numel()) else None
    if arrays is not None:
        tn, bn, rn = arrays
        tops = np.zeros(len(bounds), dtype=np.int64)

        def compiled(start: int, stop: int) -> None:
            tops[start // CPU_CHUNK] = jit_select.sum_top(tn, bn, rn, start, stop)

        run_chunks(compiled, bounds)
        return top_within(int(tops.max(initial=0)), limit)

    def chunk(start: int, stop: int) -> None:
        x = scratch("a", stop - start, torch.float32)
        x.copy_(flat[start:stop])
        fine = bool(torch.isfinite(x).all())
        if b is not None:
            x.sub_(b[start:stop].to(torch.float32))
        if r is not None:
            x.add_(r[start:stop].to(torch.float32))
        lo, hi = torch.aminmax(x)
        ok[start // CPU_CHUNK] = fine and _in_range(lo, hi, limit)

    run_chunks(chunk, bounds)
    return all(ok)


def _recall(
    cache: dict[str, tuple[torch.Tensor, int, _Found]], name: str, t: torch.Tensor
) -> _Found | None:
    """What ``cache`` holds for ``name`` if it was found for this very tensor, unchanged
    since (same memory and layout, same version), else ``None``; forgotten either way."""
    entry = cache.pop(name, None)
    if entry is None:
        return None
    seen, version, found = entry
    same = (
        seen.data_ptr() == t.data_ptr()
        and seen.shape == t.shape
        and seen.stride() == t.stride()
        and seen.dtype == t.dtype
        and seen.device == t.device
        and seen._version == version == t._version
    )
    return found if same else None


def _row_length(t: torch.Tensor) -> int:
    """Values per output channel (row) of a tensor quantized per channel."""
    return max(1, t.numel() // max(1, t.shape[0] if t.ndim else 1))
