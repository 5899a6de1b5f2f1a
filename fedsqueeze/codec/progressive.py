"""Progressive (hierarchical) quantization: nested bit planes with bucket-mean tables.

A progressive spec (``levels=2+2+4`` with ``quant=8``) quantizes each target tensor once,
at the full precision ``B = sum(levels)`` bits, and sends its codes level by level: level
``k`` carries the next ``levels[k]`` bits below those already sent (nested bit planes, as
in Any-Precision LLM and MatQuant: the ``c``-bit code is the top ``c`` bits of the
``B``-bit code). After levels ``0..k`` the receiver holds the top ``c_k`` bits of every
code; it reconstructs each coarse bucket at the **mean of the fine codes that fell into
it** (a table of ``2^c_k`` float16 entries per tensor and level, in code units, so one
table serves every channel of a per-channel quantizer), which the last level makes exact.

Why this design (``fedsqueeze bench progressive``, figures in BENCHMARKS.md):
the other known design, residual quantization (P2U: each level quantizes what the
earlier ones left, with its own scales), was measured beside it at ``2+2+4`` bits on the
trained digits CNN and on the all-MiniLM-L6-v2 weights. With per-channel scales nested
planes give less error at every level for the same bytes (MiniLM: relative L2 error
0.44 / 0.117 / 0.0076 at 2.1 / 4.1 / 8.1 bits per value, residual levels 0.60 / 0.21 /
0.014 at 1.9 / 4.0 / 8.1): residual levels pay their own scales and, with nearest
rounding, lose a step to the grid's end points at every level. Nested planes decoded at
the bucket *midpoint* are poor at the coarse levels of a per-tensor quantizer whose
range a few outliers stretch (MiniLM per tensor: error 2.14 after level 1, worse than
sending nothing, because the bucket holding the bulk of the weights is decoded far
from zero); the bucket-mean table fixes that (0.84) for ``2·2^c`` bytes. The one place
residual quantization is ahead is a per-tensor first level of a fraction of a bit per
value (its codes are nearly all the zero point and entropy-code to almost nothing), at
an error of 0.76-0.97 of the signal, too coarse to use: it is not kept.

How the other stages combine with levels:

* **pruning and top-k**: positions are sent once, with level 0; every level carries one
  plane per kept value, in the same order.
* **deltas**: the levels refine the quantized difference to the base; a tensor that has
  no level yet keeps the base's value.
* **per-channel scales**: the scales travel with level 0; the table is in code units.
* **k-means** codebooks nest by index: the codebook is sorted, so the top bits of an
  index name a run of adjacent centroids (a coarser, tree-structured codebook), and the
  coarse table holds each run's count-weighted mean value (in value units).
* **block-wise scales** are channels by another name (the block of each kept value is
  ``position // B``): the scales travel with level 0, the table is in code units
  weighted by ``scale²``.
* **NF4** nests as k-means does (its codebook is sorted, so the top bits name runs of
  adjacent entries), but its values are ``scale · NF4[q]`` with a scale per block or
  channel: the table holds each run's mean in *codebook* units (``[−1, 1]``), weighted
  by ``scale²``, and the receiver multiplies by the value's scale.

Rate-distortion order: :func:`level_gain` is the squared error a level removes
(``‖x − x̂_{k−1}‖² − ‖x − x̂_k‖²``, with ``x̂_{−1}`` = what the receiver holds without the
tensor: zeros, or the base for a delta). Every base level comes first; the refinements
then follow one greedy order over all tensors (:mod:`fedsqueeze.codec.level_order`: the
concave hull of each tensor's levels, runs sorted by falling gain per byte, the gain
divided by the tensor's energy ``‖W‖²`` by default), which keeps each tensor's levels
in order but lets a small sensitive tensor take its last level before a large one
takes its second (format version 5 when levels interleave).

What the issue's targets met (BENCHMARKS.md, "Progressive levels"): a whole stream costs
1.000-1.078× a one-shot encoding (the 1-bit levels' tables weigh on small tensors);
with ``entropy=ans`` the refinement planes are coded given the coarser bits
(:mod:`fedsqueeze.codec.plane_ans`, format version 9), and the digits streams cost
0.93× (levels) and 1.03-1.06× (support levels) a one-shot encoding.
With positions sent once, with the first level, the digits targets at 1/32 and 1/64 of
fp32 took two streams (90% and 94% sparse); *support levels*
(:mod:`fedsqueeze.codec.support_levels`, ``grow=``) let one stream start sparse and add
weights later, and meet both on seeds 0-4. MiniLM at 1/8 reaches cosine 0.977, not 0.99 (0.990 at
1/7.2): a first level of every tensor is needed before anything decodes, 4 bits per
value on average leaves the FFN and value matrices a cosine loss above 0.01 each (each
alone at 4 bits per channel), and zstd already codes the planes at their order-0
entropy (a context coder would save about 1%); 1/16 (2 bits per value) holds no first
level that works (cosine ≤ 0.03).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedsqueeze.codec.blockwise import NF4_CODEBOOK
from fedsqueeze.codec.kernels import Runs
from fedsqueeze.codec.quantization import QuantParams
from fedsqueeze.codec.spec import QuantScheme
from fedsqueeze.errors import FormatError

__all__ = [
    "bucket_table",
    "cumulative_bits",
    "level_gain",
    "level_gains",
    "plane",
    "reconstruct",
    "table_entries",
    "table_from_bytes",
    "table_to_bytes",
    "top_codes",
]


def cumulative_bits(levels: tuple[int, ...], level: int) -> int:
    """Bits of each code held after levels ``0..level``."""
    return sum(levels[: level + 1])


def table_entries(levels: tuple[int, ...], level: int) -> int:
    """Entries of the bucket table sent with ``level`` (0 for the last level)."""
    if level >= len(levels) - 1:
        return 0
    return 1 << cumulative_bits(levels, level)


def top_codes(codes: Tensor, total_bits: int, held_bits: int) -> Tensor:
    """The top ``held_bits`` bits of ``total_bits``-bit codes (int64)."""
    return codes.to(torch.int64) >> (total_bits - held_bits)


def plane(codes: Tensor, levels: tuple[int, ...], level: int) -> Tensor:
    """The bits ``level`` adds to each code, as uint8 codes of ``levels[level]`` bits."""
    total = sum(levels)
    held = cumulative_bits(levels, level)
    mask = (1 << levels[level]) - 1
    if codes.dtype == torch.uint8 and total <= 8:  # in place of int64: a byte per value
        return (codes >> (total - held)).bitwise_and_(mask)
    top = top_codes(codes, total, held)
    return (top & mask).to(torch.uint8)


#: Values per part of the per-value passes below: whole-tensor int64 and float64
#: temporaries (8 bytes a value, several at once) were the peak memory of a large
#: tensor's levels; a part's are a few MiB. A tensor of at most this many values takes
#: the whole-tensor path, as before.
CHUNK = 1 << 18


def _parts(n: int) -> range:
    return range(0, n, CHUNK)


def _channels_part(
    channels_of: Tensor | Runs | None, start: int, stop: int, device: torch.device
) -> Tensor | None:
    """The parameter set of values ``start..stop`` (int64), or ``None`` per tensor."""
    if channels_of is None:
        return None
    if isinstance(channels_of, Runs):
        return torch.div(
            torch.arange(start, stop, device=device), channels_of.length, rounding_mode="floor"
        )
    return channels_of[start:stop]


def bucket_table(
    codes: Tensor, qp: QuantParams, held_bits: int, channels_of: Tensor | Runs | None = None
) -> Tensor:
    """How the receiver reconstructs each of the ``2^held_bits`` coarse buckets.

    Linear schemes: the mean offset of the fine codes inside each bucket, in code units
    (``[0, 2^(B−held) − 1]``), weighted by each value's ``scale²`` for per-channel
    parameters; k-means: the mean decoded value of each bucket. Each is the bucket's
    reconstruction closest (in squared error) to the full-precision decode, so every
    level brings the decode closer to it (the law of total variance; up to the float16
    rounding of the table). Empty buckets get the midpoint (linear) or the mean of the
    bucket's centroids (k-means).
    """
    shift = qp.bits - held_bits
    n = 1 << held_bits
    device = codes.device
    scale64 = None
    if qp.scale.dim() == 1 and channels_of is not None:
        scale64 = qp.scale.to(device=device, dtype=torch.float64)
    if qp.scheme is QuantScheme.NF4:
        values64: Tensor | None = NF4_CODEBOOK.to(device=device, dtype=torch.float64)
    elif qp.codebook is not None:
        values64 = qp.codebook.to(device=device, dtype=torch.float64)
    else:
        values64 = None
    if values64 is not None:
        fallback = values64.reshape(n, -1).mean(dim=1)
    else:
        fallback = torch.full((n,), ((1 << shift) - 1) / 2, dtype=torch.float64, device=device)
    counts = torch.zeros(n, dtype=torch.float64, device=device)
    sums = torch.zeros(n, dtype=torch.float64, device=device)
    flat = codes.reshape(-1)
    # Part by part, in order: index_add_ adds each value in turn, so the sums are the
    # whole tensor's, bit for bit.
    for start in _parts(flat.numel()):
        stop = min(flat.numel(), start + CHUNK)
        codes64 = flat[start:stop].to(torch.int64)
        top = codes64 >> shift
        if scale64 is not None:
            weight = scale64[_channels_part(channels_of, start, stop, device)].square()
        else:
            weight = torch.ones(top.shape, dtype=torch.float64, device=device)
        if values64 is not None:
            fine = values64[codes64]
        else:
            fine = (codes64 - (top << shift)).to(torch.float64)
        counts.index_add_(0, top, weight)
        sums.index_add_(0, top, fine * weight)
    means = torch.where(counts > 0, sums / counts.clamp_min(1e-300), fallback)
    return means.to(torch.float16).to(torch.float32)


def reconstruct(
    top: Tensor,
    qp: QuantParams,
    held_bits: int,
    table: Tensor | None,
    channels_of: Tensor | Runs | None,
) -> Tensor:
    """Float32 values from the top ``held_bits`` bits of each code (``top``: any integer
    dtype, uint8 being enough for codes of up to 8 bits).

    With every bit held, ``table`` is ``None`` and this equals plain dequantization.
    A large tensor is reconstructed part by part (the same values: every step is per
    value), so its int64 indices take a part's memory, not the tensor's.
    """
    flat = top.reshape(-1)
    n = flat.numel()
    if n <= CHUNK:
        whole = None if channels_of is None else _channels_part(channels_of, 0, n, top.device)
        return _reconstruct(flat.to(torch.int64), qp, held_bits, table, whole).reshape(top.shape)
    out = torch.empty(0)
    for start in _parts(n):
        stop = min(n, start + CHUNK)
        part = _reconstruct(
            flat[start:stop].to(torch.int64), qp, held_bits, table,
            _channels_part(channels_of, start, stop, top.device),
        )  # fmt: skip
        if start == 0:
            out = torch.empty(n, dtype=part.dtype, device=top.device)
        out[start:stop] = part
    return out.reshape(top.shape)


def _reconstruct(
    top: Tensor,
    qp: QuantParams,
    held_bits: int,
    table: Tensor | None,
    channels_of: Tensor | None,
) -> Tensor:
    """:func:`reconstruct` of int64 ``top`` in one pass."""
    total = qp.bits
    shift = total - held_bits
    if qp.scheme is QuantScheme.NF4:
        if shift == 0:
            unit = NF4_CODEBOOK.to(top.device)[top]
        elif table is None:
            raise FormatError("a coarse NF4 level needs its bucket table")
        else:
            unit = table.to(top.device)[top]
        if qp.scale.dim() == 1:
            if channels_of is None:
                raise ValueError("per-block parameters need the block of every value")
            return unit * qp.scale.to(top.device)[channels_of]
        return unit * float(qp.scale)
    if qp.codebook is not None:
        if shift == 0:
            return qp.codebook.to(device=top.device, dtype=torch.float32)[top]
        if table is None:
            raise FormatError("a coarse k-means level needs its bucket table")
        return table.to(top.device)[top]
    code = (top << shift).to(torch.float32)
    if shift:
        if table is None:
            raise FormatError("a coarse level needs its bucket table")
        code = code + table.to(top.device)[top]
    if qp.scale.dim() == 1:
        if channels_of is None:
            raise ValueError("per-channel parameters need the channel of every value")
        scale = qp.scale.to(top.device)[channels_of]
        zp = qp.zero_point.to(top.device)[channels_of]
        return (code - zp) * scale
    return (code - float(qp.zero_point)) * float(qp.scale)


def table_to_bytes(table: Tensor) -> bytes:
    """float16, little endian."""
    return table.to(torch.float16).cpu().contiguous().view(torch.uint8).numpy().tobytes()


def table_from_bytes(
    data: bytes | memoryview, entries: int, scheme: QuantScheme, shift: int
) -> Tensor:
    """Inverse of :func:`table_to_bytes`, checking every entry (hostile input).

    Linear schemes' entries are offsets inside a bucket, ``[0, 2^shift − 1]``; k-means
    entries are finite values; NF4 entries lie in ``[−1, 1]``.
    """
    if len(data) != 2 * entries:
        raise FormatError(f"bucket table is {len(data)} bytes, expected {2 * entries}")
    raw = torch.frombuffer(bytearray(data), dtype=torch.float16).to(torch.float32)
    if not bool(torch.isfinite(raw).all()):
        raise FormatError("bucket table holds a non-finite entry")
    if scheme is QuantScheme.NF4:
        if bool((raw.abs() > 1).any()):
            raise FormatError("NF4 bucket table entry outside [-1, 1]")
    elif scheme is not QuantScheme.KMEANS and bool(((raw < 0) | (raw > (1 << shift) - 1)).any()):
        raise FormatError("bucket table offset outside its bucket")
    return raw


def level_gain(x: Tensor, before: Tensor, after: Tensor) -> float:
    """Squared error removed by a level: ``‖x − before‖² − ‖x − after‖²``."""
    x64 = x.to(torch.float64)
    return float((x64 - before).square().sum() - (x64 - after).square().sum())


def level_gains(
    values: Tensor,
    codes: Tensor,
    qp: QuantParams,
    levels: tuple[int, ...],
    tables: list[Tensor | None],
    channels_of: Tensor | Runs | None,
    decoded: Tensor | None = None,
) -> list[float]:
    """:func:`level_gain` of every level of ``codes`` (from nothing held), part by part.

    ``tables[k]`` is level ``k``'s bucket table (``None`` for the last). Equal to the
    whole-tensor :func:`reconstruct` and :func:`level_gain` of each level: a tensor of at
    most :data:`CHUNK` values takes one part (the same sums); a larger one sums its parts'
    squared errors in float64 (a different grouping of the additions, as torch's own
    threads already make one). ``decoded`` (float32, like ``values``), if given, receives
    what the last level decodes to.
    """
    x_flat = values.reshape(-1)
    c_flat = codes.reshape(-1)
    n = x_flat.numel()
    total = qp.bits
    removed: list[Tensor | None] = [None] * len(levels)
    left: list[Tensor | None] = [None] * len(levels)
    for start in _parts(max(n, 1)):
        stop = min(n, start + CHUNK)
        x64 = x_flat[start:stop].to(torch.float64)
        codes64 = c_flat[start:stop].to(torch.int64)
        channels = _channels_part(channels_of, start, stop, codes.device)
        before = torch.zeros_like(x64)
        for level in range(len(levels)):
            held = cumulative_bits(levels, level)
            after32 = _reconstruct(codes64 >> (total - held), qp, held, tables[level], channels)
            after = after32.to(torch.float64)
            a = (x64 - before).square().sum()
            b = (x64 - after).square().sum()
            prev_a, prev_b = removed[level], left[level]
            removed[level] = a if prev_a is None else prev_a + a
            left[level] = b if prev_b is None else prev_b + b
            before = after
            if decoded is not None and level == len(levels) - 1:
                decoded.reshape(-1)[start:stop] = after32
    return [
        float(a - b) for a, b in zip(removed, left, strict=True) if a is not None and b is not None
    ]
