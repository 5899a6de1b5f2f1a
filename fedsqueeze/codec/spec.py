"""What the codec does to a model: :class:`CodecSpec` and its parts, all frozen.

A spec is chosen once (from a preset name, a TOML table or CLI flags) and passed down.
Its compact byte form (:meth:`CodecSpec.to_bytes`) travels in every encoded model's
header, so a decoder can report how the model was made; decoding itself never needs it,
since every tensor record describes its own stages.
"""

from __future__ import annotations

import fnmatch
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum

from fedsqueeze.codec.bytesio import ByteReader, write_varint
from fedsqueeze.errors import ConfigError, FormatError, TruncatedError


class PruneMethod(Enum):
    """How magnitude pruning chooses what to drop."""

    NONE = 0
    #: per tensor, smallest ``|w|`` first (``torch.nn.utils.prune.l1_unstructured``; of
    #: values tied at the cut, the lowest indices first).
    L1_UNSTRUCTURED = 1
    #: across all target tensors together (``global_unstructured`` with ``L1Unstructured``;
    #: ties: the first in state order).
    L1_GLOBAL = 2
    #: whole output channels (dim 0) by their L2 norm (``ln_structured(n=2, dim=0)``).
    LN_STRUCTURED = 3
    #: every ``|w|`` at or below :attr:`PruneSpec.threshold`, per tensor.
    THRESHOLD = 4


class QuantScheme(Enum):
    """How quantized values map back to floats."""

    #: ``w ≈ scale · (q − zero_point)``, integer zero point.
    AFFINE = 1
    #: ``w ≈ scale · (q − 2^(b−1))``, zero point fixed at the middle.
    SYMMETRIC = 2
    #: symmetric with ``scale = 2^−p``: dequantization is a shift (fixed point).
    POW2 = 3
    #: k-means weight sharing: ``w ≈ codebook[q]``, ``2^b`` centroids per tensor.
    KMEANS = 4
    #: QLoRA's 4-bit NormalFloat: ``w ≈ absmax · NF4[q]``, a fixed 16-entry codebook of
    #: normal quantiles in ``[−1, 1]`` with an exact 0; 4 bits only (format version 3).
    NF4 = 5


class Granularity(Enum):
    """Whether quantization parameters are per tensor, per output channel (dim 0) or per
    block of :attr:`QuantSpec.block_size` consecutive kept values (format version 3)."""

    PER_TENSOR = 1
    PER_CHANNEL = 2
    PER_BLOCK = 3


class ScaleFormat(Enum):
    """How block-wise scales are stored (per-tensor and per-channel ones are float32).

    DQ8 is double quantization (QLoRA): each scale is an 8-bit code on a logarithmic grid
    of 1/16 octave, ``scale = 2^e · 2^(code/16)``, with one int16 exponent ``e`` per group
    of 256 blocks; every stored scale is rounded *up*, so values stay inside their block's
    range and the error bound uses the stored scale. POW2 blocks store their int8 shifts
    whatever the format.
    """

    FP32 = 1
    FP16 = 2
    BF16 = 3
    DQ8 = 4


class Rounding(Enum):
    """Nearest rounding (error ≤ scale/2) or unbiased stochastic rounding (for updates)."""

    NEAREST = 1
    STOCHASTIC = 2


class Rotation(Enum):
    """What is done to a target tensor before it is quantized (format version 6).

    HADAMARD: a randomized Walsh-Hadamard rotation of each row
    (:mod:`fedsqueeze.codec.rotation`), undone by the decoder: it spreads outliers, so
    coarse codes lose less. Dense only (not with pruning, top-k or low rank).
    """

    NONE = 0
    HADAMARD = 1


class EntropyCoder(Enum):
    """The entropy stage's coder.

    ZSTD: zstandard at the spec's level, per record, where it shrinks it.
    ANS: adaptive rANS of the quantization codes (:mod:`fedsqueeze.codec.ans`, format
    version 8) where it beats zstandard on the record, which then codes everything else
    at the spec's level. For kilobyte payloads of 4-bit codes (low-rank factors), whose
    values have a skewed distribution and no repeats; a record of more than
    :data:`fedsqueeze.codec.ans.MAX_CODES` codes keeps zstandard. With ``levels``, each
    refinement plane is also ANS-coded with the value's coarser code bits as context
    where that is smaller (:mod:`fedsqueeze.codec.plane_ans`, format version 9).
    """

    ZSTD = 0
    ANS = 1


class FloatFormat(Enum):
    """How values that are not quantized are stored."""

    FP32 = 1
    FP16 = 2
    BF16 = 3


QUANT_BITS = (2, 3, 4, 8)
#: Smallest and largest block of a block-wise quantizer (values per scale).
MIN_BLOCK, MAX_BLOCK = 32, 4096
DEFAULT_TARGETS = ("*weight",)
#: Largest factorization rank a spec may ask for (and a decoder accepts).
MAX_RANK = 1024
#: Most refinement levels a progressive spec may have (every level adds at least a bit).
MAX_LEVELS = 8
#: Most earlier support levels (``grow``) a progressive pruned spec may have.
MAX_GROW = 6


@dataclass(frozen=True)
class PruneSpec:
    """Magnitude pruning of the target tensors.

    Parameters
    ----------
    method
        Which criterion; :attr:`PruneMethod.NONE` keeps every value.
    sparsity
        Fraction of values (or channels) dropped, in ``[0, 1)``; ``round(sparsity · n)``
        are dropped, as PyTorch's pruning functions do.
    threshold
        For :attr:`PruneMethod.THRESHOLD`: values with ``|w| <= threshold`` are dropped.
    """

    method: PruneMethod = PruneMethod.NONE
    sparsity: float = 0.0
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0 or math.isnan(self.sparsity):
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if not self.threshold >= 0.0 or math.isinf(self.threshold):
            raise ValueError(f"threshold must be finite and >= 0, got {self.threshold}")
        # Canonical form: fields the method does not use are zero, so equal specs
        # compare, hash and serialize alike.
        if self.method is not PruneMethod.THRESHOLD:
            object.__setattr__(self, "threshold", 0.0)
        if self.method in (PruneMethod.NONE, PruneMethod.THRESHOLD):
            object.__setattr__(self, "sparsity", 0.0)

    @property
    def active(self) -> bool:
        """Whether this spec drops anything at all."""
        if self.method is PruneMethod.NONE:
            return False
        if self.method is PruneMethod.THRESHOLD:
            return True
        return self.sparsity > 0.0


@dataclass(frozen=True)
class QuantSpec:
    """Quantization of the target tensors' (kept) values.

    Parameters
    ----------
    bits
        2, 3, 4 or 8; sub-byte codes are bit-packed. NF4 is 4 bits.
    scheme, granularity, rounding
        See the enums.
    block_size
        :attr:`Granularity.PER_BLOCK` only (and then required): values per block,
        ``32..4096``. Block ``j`` holds the kept values ``j·B .. (j+1)·B − 1`` in the
        tensor's flat (row-major) order; the last block may be shorter.
    scale_format
        :attr:`Granularity.PER_BLOCK` only: how the block scales are stored; ``None``
        picks FP16 for blocks and FP32 (the only choice) otherwise.
    rotation
        What the values go through before quantization (:class:`Rotation`).
    """

    bits: int = 8
    scheme: QuantScheme = QuantScheme.AFFINE
    granularity: Granularity = Granularity.PER_TENSOR
    rounding: Rounding = Rounding.NEAREST
    block_size: int | None = None
    scale_format: ScaleFormat | None = None
    rotation: Rotation = Rotation.NONE

    def __post_init__(self) -> None:
        if not isinstance(self.rotation, Rotation):
            raise ValueError(f"unknown rotation {self.rotation!r}")
        if self.bits not in QUANT_BITS:
            raise ValueError(f"bits must be one of {QUANT_BITS}, got {self.bits}")
        if self.scheme is QuantScheme.KMEANS and self.granularity is not Granularity.PER_TENSOR:
            raise ValueError("k-means weight sharing uses one codebook per tensor (per-tensor)")
        if self.scheme is QuantScheme.NF4 and self.bits != 4:
            raise ValueError(f"nf4 is a 4-bit codebook, got {self.bits} bits")
        blocked = self.granularity is Granularity.PER_BLOCK
        if blocked:
            size = self.block_size
            if isinstance(size, bool) or not isinstance(size, int):
                raise ValueError(f"block-wise quantization needs a block size, got {size!r}")
            if not MIN_BLOCK <= size <= MAX_BLOCK:
                raise ValueError(f"block size must be in {MIN_BLOCK}..{MAX_BLOCK}, got {size}")
        elif self.block_size is not None:
            raise ValueError("a block size needs block-wise granularity")
        fmt = self.scale_format
        if fmt is None:
            object.__setattr__(self, "scale_format", self.scales)
        elif not isinstance(fmt, ScaleFormat):
            raise ValueError(f"unknown scale format {fmt!r}")
        elif not blocked and fmt is not ScaleFormat.FP32:
            raise ValueError("fp16, bf16 and dq scales are for block-wise quantization")

    @property
    def scales(self) -> ScaleFormat:
        """The scale format, as :attr:`scale_format` (set by the constructor) says."""
        if self.scale_format is not None:
            return self.scale_format
        return ScaleFormat.FP16 if self.granularity is Granularity.PER_BLOCK else ScaleFormat.FP32


@dataclass(frozen=True)
class CodecSpec:
    """Everything the encoder does to a state dict, in pipeline order.

    ``delta (when a base is given) → prune, top-k or low-rank (+ residual) → quantize →
    pack bits → positions → entropy``.

    Parameters
    ----------
    prune
        Magnitude pruning of target tensors (for models sent down).
    topk
        Fraction of values kept by top-k sparsification of every target tensor, in
        ``(0, 1]``, or ``None`` for none. Meant for updates: what it drops is returned as an
        error-feedback residual by :func:`fedsqueeze.codec.encode_state`.
    quant
        Quantization of the target tensors' values, or ``None`` to keep them as floats.
    float_format
        Storage of float values that are not quantized (non-targets always use it).
    entropy_level
        zstandard level 1..22 applied to each record where it shrinks it; 0 turns it off.
        At levels up to 3 (the default), quantized payloads of 1 MiB or more are coded
        with literal-only parameters instead, in pieces on every core (smaller and faster
        on codes and positions than the level's match search); dense quantized records
        likewise (:mod:`fedsqueeze.codec.literal_frames`).
    entropy_coder
        The entropy coder of quantization codes (:class:`EntropyCoder`): with ``ANS``,
        records whose adaptive rANS coding is smaller than their zstandard frame carry
        that instead (format version 8), and so do refinement planes, context-coded
        (format version 9).
    targets
        Glob patterns of tensor names that the lossy stages apply to, among floating
        tensors with at least ``min_ndim`` dimensions (by default the weights of conv and
        linear layers, not biases or norms).
    min_ndim
        See ``targets``.
    rank
        Low-rank factorization of every target tensor with two or more dimensions, seen
        as a ``shape[0] × rest`` matrix: two factors whose product is its best rank-``rank``
        approximation (truncated SVD), where they are at most half its size; other
        targets (biases, small matrices) are sent dense. ``None`` for none. Like top-k it
        is meant for updates (PowerSGD-style) and returns an error-feedback residual; it
        is not combined with pruning or top-k, nor with per-channel quantization.
    levels
        Progressive (hierarchical) transmission: the bits each level adds to the
        quantization codes of the target tensors, e.g. ``(2, 2, 4)``; they must add up to
        ``quant.bits``. The first level is a usable coarse model, every further level
        refines it (see :mod:`fedsqueeze.codec.progressive`). ``None``: one level.
        Needs ``quant``; not combined with ``rank``.
    grow
        Progressive sparsity: the sparsities of the earlier *support levels* of a
        magnitude-pruned progressive spec, falling towards ``prune.sparsity``, e.g.
        ``(0.96, 0.93)`` with ``prune=global:0.9``: the stream's first level holds the
        4% largest weights, later records add the weights kept at 93% and then at 90%
        sparsity, their positions coded among the ones not yet held
        (:mod:`fedsqueeze.codec.support_levels`). Empty: the positions travel whole with
        the first level. Needs ``levels`` and ``l1`` or ``global`` pruning, not
        block-wise quantization.
    freeze
        Glob patterns of tensor names that are frozen (a pretrained backbone): they
        travel once, in a full model, and never in a delta. :func:`~fedsqueeze.codec.
        encode_state` leaves a frozen tensor the base holds out of a delta altogether
        (not even a ZERO record), whatever its value, and :func:`~fedsqueeze.codec.
        decode_state` takes it unchanged from the base. Empty: nothing frozen.
    """

    prune: PruneSpec = field(default_factory=PruneSpec)
    topk: float | None = None
    quant: QuantSpec | None = None
    float_format: FloatFormat = FloatFormat.FP32
    entropy_level: int = 3
    targets: tuple[str, ...] = DEFAULT_TARGETS
    min_ndim: int = 2
    rank: int | None = None
    levels: tuple[int, ...] | None = None
    freeze: tuple[str, ...] = ()
    grow: tuple[float, ...] = ()
    entropy_coder: EntropyCoder = EntropyCoder.ZSTD

    def __post_init__(self) -> None:
        if self.topk is not None and not 0.0 < self.topk <= 1.0:
            raise ValueError(f"topk must be in (0, 1], got {self.topk}")
        if self.topk is not None and self.prune.active:
            raise ValueError("use either pruning (models) or top-k (updates), not both")
        if self.rank is not None:
            if isinstance(self.rank, bool) or not isinstance(self.rank, int):
                raise ValueError(f"rank must be an integer, got {self.rank!r}")
            if not 1 <= self.rank <= MAX_RANK:
                raise ValueError(f"rank must be in 1..{MAX_RANK}, got {self.rank}")
            if self.topk is not None or self.prune.active:
                raise ValueError("low-rank factorization replaces pruning and top-k: use one")
            if self.quant is not None and self.quant.granularity is not Granularity.PER_TENSOR:
                raise ValueError(
                    "low-rank factors use per-tensor quantization, not per-channel or blocks"
                )
        if self.levels is not None:
            _check_levels(self.levels, self.quant, self.rank)
        rotated = self.quant is not None and self.quant.rotation is not Rotation.NONE
        if rotated and (self.prune.active or self.topk is not None or self.rank is not None):
            raise ValueError(
                "a rotation mixes every value of a row: it is for dense tensors, not "
                "with pruning, top-k or low rank"
            )
        if self.grow:
            _check_grow(self)
        if not 0 <= self.entropy_level <= 22:
            raise ValueError(f"entropy_level must be in 0..22, got {self.entropy_level}")
        if not isinstance(self.entropy_coder, EntropyCoder):
            raise TypeError(f"entropy_coder must be an EntropyCoder, got {self.entropy_coder!r}")
        if not 0 <= self.min_ndim <= 8:
            raise ValueError(f"min_ndim must be in 0..8, got {self.min_ndim}")
        if not self.targets or any(not p or len(p) > 200 for p in self.targets):
            raise ValueError("targets must be non-empty glob patterns of at most 200 chars")
        if len(self.targets) > 32:
            raise ValueError("at most 32 target patterns")
        check_freeze_patterns(self.freeze)
        # Canonical form: the order of patterns means nothing, so equal specs serialize
        # alike (the spec's bytes are part of every encode-cache key).
        object.__setattr__(self, "freeze", tuple(sorted(self.freeze)))

    @property
    def lossless(self) -> bool:
        """True when decoding returns exactly what was encoded."""
        return (
            not self.prune.active
            and self.topk is None
            and self.rank is None
            and self.quant is None
            and self.float_format is FloatFormat.FP32
        )

    @property
    def feedback(self) -> bool:
        """Whether encoding returns an error-feedback residual (top-k and low-rank)."""
        return self.topk is not None or self.rank is not None

    def is_target(self, name: str, ndim: int, is_floating: bool) -> bool:
        """Whether the lossy stages apply to the tensor ``name``."""
        if not is_floating or ndim < self.min_ndim:
            return False
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.targets)

    def is_frozen(self, name: str) -> bool:
        """Whether the tensor ``name`` is frozen (matches a :attr:`freeze` pattern)."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.freeze)

    def with_changes(self, **changes: object) -> CodecSpec:
        """A copy with some fields replaced (validated again)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ bytes
    def to_bytes(self) -> bytes:
        """Compact, canonical byte form (3 bytes for the default spec).

        Layout: flags u8 (prune method in bits 0-2, top-k bit 3, quant bit 4, custom targets
        bit 5, rank bit 6, levels bit 7) · [amount f64] · [topk f64] · [rank varint] ·
        [quant: bits | scheme << 4, granularity | rounding << 2 | (scale format − 1) << 4 |
        Hadamard rotation << 7, block size varint for block-wise] · [levels: count u8 · bits
        u8 each; with bit 7 of the count set, support levels follow: count u8 · amount
        each] · float format and min_ndim u8 (bit 7: an extension follows the targets) ·
        entropy level u8 (bit 7: the ANS coder) · [targets] · [extension: freeze
        patterns, count u8 · length u8 and UTF-8 bytes each]. Amounts are float64 so the
        spec survives the round trip exactly; an amount with at most six decimals (0.95,
        0.025) is a varint of millionths instead, 1 to 3 bytes.

        The flags byte is full, so frozen patterns set the top bit of the float-format
        byte instead: a spec without them has exactly the bytes it always had, and a
        reader from before frozen parts refuses one with them (a ``min_ndim`` over 8),
        rather than decoding a delta that leaves tensors out as if it were whole. The
        ANS coder likewise sets the top bit of the entropy byte (a level over 22 to an
        older reader, which refuses it).
        """
        flags = self.prune.method.value
        flags |= 0x08 if self.topk is not None else 0
        flags |= 0x10 if self.quant is not None else 0
        flags |= 0x20 if self.targets != DEFAULT_TARGETS else 0
        flags |= 0x40 if self.rank is not None else 0
        flags |= 0x80 if self.levels is not None else 0
        out = bytearray([flags])
        if self.prune.method is PruneMethod.THRESHOLD:
            _write_amount(out, self.prune.threshold)
        elif self.prune.method is not PruneMethod.NONE:
            _write_amount(out, self.prune.sparsity)
        if self.topk is not None:
            _write_amount(out, self.topk)
        if self.rank is not None:
            write_varint(out, self.rank)
        if self.quant is not None:
            q = self.quant
            out.append(q.bits | (q.scheme.value << 4))
            out.append(
                q.granularity.value
                | (q.rounding.value << 2)
                | ((q.scales.value - 1) << 4)
                | (q.rotation.value << 7)
            )
            if q.block_size is not None:
                write_varint(out, q.block_size)
        if self.levels is not None:
            # Bit 7 of the level count: support levels follow (a count over MAX_LEVELS,
            # which a reader from before them refuses).
            out.append(len(self.levels) | (_GROWS if self.grow else 0))
            out += bytes(self.levels)
            if self.grow:
                out.append(len(self.grow))
                for amount in self.grow:
                    _write_amount(out, amount)
        out.append(
            self.float_format.value | (self.min_ndim << 2) | (_EXTENSION if self.freeze else 0)
        )
        out.append(self.entropy_level | (_ANS if self.entropy_coder is EntropyCoder.ANS else 0))
        if self.targets != DEFAULT_TARGETS:
            _write_patterns(out, self.targets)
        if self.freeze:
            _write_patterns(out, self.freeze)
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> CodecSpec:
        """Inverse of :meth:`to_bytes`; raises :class:`FormatError` on malformed input."""
        spec, used = cls.parse(data, 0)
        if used != len(data):
            raise FormatError("trailing bytes after codec spec")
        return spec

    @classmethod
    def parse(cls, data: bytes, offset: int) -> tuple[CodecSpec, int]:
        """Parse a spec at ``offset``; returns it and the offset just past it."""
        try:
            return _parse_spec(data, offset)
        except (struct.error, IndexError) as exc:
            raise TruncatedError("truncated codec spec") from exc
        except UnicodeDecodeError as exc:
            raise FormatError("malformed codec spec: a target pattern is not UTF-8") from exc
        except ValueError as exc:  # enum values or spec validation
            raise FormatError(f"invalid codec spec: {exc}") from exc


_MICRO = 1_000_000
#: Bit 7 of the level count: support levels (``grow``) follow the levels.
_GROWS = 0x80
#: Bit 7 of the float-format byte: frozen patterns follow the targets.
_EXTENSION = 0x80
#: Bit 7 of the entropy byte: the ANS coder (:class:`EntropyCoder`).
_ANS = 0x80
#: Most patterns in ``targets`` or ``freeze``, and most characters in one.
MAX_PATTERNS, MAX_PATTERN_CHARS = 32, 200


def check_freeze_patterns(patterns: tuple[str, ...]) -> None:
    """Refuse frozen patterns that cannot be meant, with a one-line ``ValueError``."""
    if not isinstance(patterns, tuple) or any(not isinstance(p, str) for p in patterns):
        raise ValueError(f"freeze must be a tuple of glob patterns, got {patterns!r}")
    if len(patterns) > MAX_PATTERNS:
        raise ValueError(f"at most {MAX_PATTERNS} freeze patterns, got {len(patterns)}")
    for pattern in patterns:
        if not pattern or len(pattern.encode()) > MAX_PATTERN_CHARS:
            raise ValueError(
                f"freeze patterns must have 1 to {MAX_PATTERN_CHARS} characters, "
                f"got {pattern[:40]!r}"
            )
        if not pattern.isprintable() or any(c in pattern for c in ",=| "):
            raise ValueError(
                f"freeze pattern {pattern[:40]!r} holds a space, a control character or one "
                "of , = |"
            )
        if pattern.count("[") != pattern.count("]"):
            # fnmatch would match an unclosed '[' literally: almost surely a typo.
            raise ValueError(f"freeze pattern {pattern!r} has an unbalanced [ ]")
        if pattern.strip("*") == "":
            raise ValueError(
                f"freeze pattern {pattern!r} freezes every tensor: nothing would train"
            )
    if len(set(patterns)) != len(patterns):
        raise ValueError("a freeze pattern is given twice")


def _write_patterns(out: bytearray, patterns: tuple[str, ...]) -> None:
    out.append(len(patterns))
    for pattern in patterns:
        raw = pattern.encode()
        out += struct.pack("<B", len(raw)) + raw


def _read_patterns(data: bytes, pos: int) -> tuple[tuple[str, ...], int]:
    count = data[pos]
    pos += 1
    patterns = []
    for _ in range(count):
        length = data[pos]
        raw = data[pos + 1 : pos + 1 + length]
        if len(raw) != length:
            raise IndexError("pattern truncated")
        patterns.append(raw.decode())
        pos += 1 + length
    return tuple(patterns), pos


_EXACT_F64 = 0xFF  # marker byte: a float64 follows


def _write_amount(out: bytearray, value: float) -> None:
    micros = round(value * _MICRO)
    if micros < (1 << 21) and micros / _MICRO == value:
        # varint of millionths; its first byte is never 0xFF (continuation bytes < 0x100
        # but the marker is reserved: values needing it fall back to float64)
        raw = bytearray()
        while micros >= 0x80:
            raw.append((micros & 0x7F) | 0x80)
            micros >>= 7
        raw.append(micros)
        if raw[0] != _EXACT_F64:
            out += raw
            return
    out.append(_EXACT_F64)
    out += struct.pack("<d", value)


def _read_amount(data: bytes, pos: int) -> tuple[float, int]:
    if data[pos] == _EXACT_F64:
        (value,) = struct.unpack_from("<d", data, pos + 1)
        return float(value), pos + 9
    micros = 0
    for shift in (0, 7, 14):
        byte = data[pos]
        pos += 1
        micros |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return micros / _MICRO, pos
    raise ValueError("amount varint too long")


def _parse_spec(data: bytes, pos: int) -> tuple[CodecSpec, int]:
    flags = data[pos]
    pos += 1
    method = PruneMethod(flags & 0x07)
    sparsity = threshold = 0.0
    if method is PruneMethod.THRESHOLD:
        threshold, pos = _read_amount(data, pos)
    elif method is not PruneMethod.NONE:
        sparsity, pos = _read_amount(data, pos)
    topk: float | None = None
    if flags & 0x08:
        topk, pos = _read_amount(data, pos)
    rank: int | None = None
    if flags & 0x40:
        reader = ByteReader(data, pos)
        rank = reader.varint("rank", MAX_RANK)
        pos = reader.pos
    quant: QuantSpec | None = None
    if flags & 0x10:
        desc, opts = data[pos], data[pos + 1]
        pos += 2
        if opts & 0x40:
            raise ValueError(f"unknown quantization options 0x{opts:02x}")
        granularity = Granularity(opts & 0x03)
        block_size: int | None = None
        if granularity is Granularity.PER_BLOCK:
            reader = ByteReader(data, pos)
            block_size = reader.varint("block size", MAX_BLOCK)
            pos = reader.pos
        quant = QuantSpec(
            desc & 0x0F,
            QuantScheme(desc >> 4),
            granularity,
            Rounding((opts >> 2) & 0x03),
            block_size,
            ScaleFormat(((opts >> 4) & 0x03) + 1),
            Rotation(opts >> 7),
        )
    levels: tuple[int, ...] | None = None
    grow: list[float] = []
    if flags & 0x80:
        count = data[pos]
        grows = bool(count & _GROWS)
        count &= ~_GROWS
        if count > MAX_LEVELS:
            raise ValueError(f"{count} levels (at most {MAX_LEVELS})")
        levels = tuple(data[pos + 1 : pos + 1 + count])
        if len(levels) != count:
            raise IndexError("levels truncated")
        pos += 1 + count
        if grows:
            grow_count = data[pos]
            pos += 1
            if not 1 <= grow_count <= MAX_GROW:
                raise ValueError(f"{grow_count} support levels (1..{MAX_GROW})")
            for _ in range(grow_count):
                amount, pos = _read_amount(data, pos)
                grow.append(amount)
    fmt_ndim, level = data[pos], data[pos + 1]
    pos += 2
    coder = EntropyCoder.ANS if level & _ANS else EntropyCoder.ZSTD
    level &= ~_ANS
    targets: tuple[str, ...] = DEFAULT_TARGETS
    if flags & 0x20:
        targets, pos = _read_patterns(data, pos)
    freeze: tuple[str, ...] = ()
    if fmt_ndim & _EXTENSION:
        freeze, pos = _read_patterns(data, pos)
        if not freeze:
            raise ValueError("an extension flag without frozen patterns")
    spec = CodecSpec(
        prune=PruneSpec(method, sparsity, threshold),
        topk=topk,
        quant=quant,
        rank=rank,
        levels=levels,
        float_format=FloatFormat(fmt_ndim & 0x03),
        entropy_level=level,
        targets=targets,
        min_ndim=(fmt_ndim & ~_EXTENSION) >> 2,
        freeze=freeze,
        grow=tuple(grow),
        entropy_coder=coder,
    )
    return spec, pos


def _check_levels(levels: tuple[int, ...], quant: QuantSpec | None, rank: int | None) -> None:
    if not isinstance(levels, tuple) or any(
        isinstance(b, bool) or not isinstance(b, int) for b in levels
    ):
        raise ValueError(f"levels must be a tuple of bit counts, got {levels!r}")
    if not 2 <= len(levels) <= MAX_LEVELS:
        raise ValueError(f"levels needs 2..{MAX_LEVELS} levels, got {len(levels)}")
    if any(not 1 <= b <= 4 for b in levels):
        raise ValueError(f"each level adds 1..4 bits, got {'+'.join(map(str, levels))}")
    if quant is None:
        raise ValueError("levels refine quantization codes: add quant=BITS (their sum)")
    if sum(levels) != quant.bits:
        raise ValueError(
            f"levels {'+'.join(map(str, levels))} add up to {sum(levels)} bits, "
            f"but quant has {quant.bits}"
        )
    if rank is not None:
        raise ValueError("progressive levels are for models sent down, not low-rank updates")


def _check_grow(spec: CodecSpec) -> None:
    grow = spec.grow
    if not isinstance(grow, tuple) or any(
        isinstance(s, bool) or not isinstance(s, (int, float)) for s in grow
    ):
        raise ValueError(f"grow must be a tuple of sparsities, got {grow!r}")
    if len(grow) > MAX_GROW:
        raise ValueError(f"at most {MAX_GROW} support levels, got {len(grow)}")
    if spec.levels is None:
        raise ValueError("grow (support levels) needs progressive levels")
    if spec.prune.method not in (PruneMethod.L1_GLOBAL, PruneMethod.L1_UNSTRUCTURED):
        raise ValueError("grow (support levels) needs magnitude pruning (l1 or global)")
    if spec.quant is not None and spec.quant.granularity is Granularity.PER_BLOCK:
        raise ValueError("grow (support levels) does not combine with block-wise scales")
    previous = 1.0
    for s in grow:
        if not spec.prune.sparsity < s < previous or math.isnan(s):
            raise ValueError(
                "grow sparsities must fall strictly from below 1 to above the pruning's "
                f"{spec.prune.sparsity}, got {'+'.join(map(repr, grow))}"
            )
        previous = s


# ---------------------------------------------------------------------- presets
PRESETS: Mapping[str, CodecSpec] = {
    "lossless": CodecSpec(),
    "fp16": CodecSpec(float_format=FloatFormat.FP16, targets=("*",), min_ndim=0),
    "int8": CodecSpec(quant=QuantSpec(8), targets=("*",), min_ndim=1),
    "int4": CodecSpec(quant=QuantSpec(4)),
    "prune90-int4": CodecSpec(
        prune=PruneSpec(PruneMethod.L1_UNSTRUCTURED, 0.9), quant=QuantSpec(4)
    ),
    "prune95-kmeans3": CodecSpec(
        prune=PruneSpec(PruneMethod.L1_GLOBAL, 0.95),
        quant=QuantSpec(3, QuantScheme.KMEANS),
    ),
    "topk10-int4": CodecSpec(
        topk=0.1,
        quant=QuantSpec(4, rounding=Rounding.STOCHASTIC),
        targets=("*",),
        min_ndim=1,
    ),
}


def preset(name: str) -> CodecSpec:
    """The named preset spec; raises :class:`ConfigError` for an unknown name."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown codec preset {name!r}; choose one of {', '.join(PRESETS)}"
        ) from None
