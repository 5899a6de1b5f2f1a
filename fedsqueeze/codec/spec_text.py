"""The text form of a :class:`CodecSpec`, as typed on a command line or in a TOML file.

Grammar: a preset name, key=value pairs, or a preset followed by overrides, separated by
commas::

    int4
    prune=global:0.95,quant=3:kmeans,entropy=19
    prune95-kmeans3,entropy=22

Keys: ``prune`` (``none``, ``l1:S``, ``global:S``, ``channel:S``, ``threshold:T``),
``topk`` (fraction kept), ``rank`` (low-rank factorization of matrices, ``none`` or
the rank), ``quant`` (``none`` or ``BITS[:SCHEME][:GRANULARITY][:SCALES][:ROUNDING]``
with schemes ``affine symmetric pow2 kmeans nf4``, granularities ``tensor channel
blockB`` (``B`` kept values per block, 32..4096), block scales ``fp16`` (the default)
``bf16 fp32 dq`` (8-bit double-quantized), roundings ``nearest stochastic``, and
``hadamard`` (a randomized Hadamard rotation before quantization, dense specs only,
:mod:`fedsqueeze.codec.rotation`: ``quant=8:channel:hadamard``); the words
after ``BITS`` may come in any order, and ``nf4`` without a granularity means QLoRA's
``block64``: ``quant=8:block64``, ``quant=4:nf4:block64:dq``, ``quant=4:symmetric:block32:bf16``),
``float`` (``fp32 fp16 bf16``), ``entropy`` (zstd
level, 0 = off; ``ans`` or ``ans:LEVEL``: adaptive rANS of the quantization codes where
it beats zstd, which codes the rest at LEVEL, default 19; format version 8; with
``levels`` also the refinement planes, given the coarser bits: version 9),
``targets`` (glob patterns joined by ``|``), ``min-ndim``, ``levels``
(progressive transmission: bits added per level joined by ``+``, e.g. ``2+2+4`` with
``quant=8``, or ``none``), ``freeze`` (frozen tensors, which travel once and never in
a delta: glob patterns joined by ``|``, e.g. ``freeze=frozen.*``, or ``none``),
``grow`` (progressive sparsity: the sparsities of the earlier support levels of a
pruned progressive spec joined by ``+``, e.g. ``prune=global:0.9,levels=1+1+2,
grow=0.96+0.93``, or ``none``).

Each key may appear once (after a preset, to override it): ``quant=8,quant=4`` is
refused rather than silently taking the last. Range errors name the key as typed
(``entropy must be in 0..22``), never a field of :class:`CodecSpec`.
"""

from __future__ import annotations

from dataclasses import replace

from fedsqueeze.codec.spec import (
    PRESETS,
    CodecSpec,
    EntropyCoder,
    FloatFormat,
    Granularity,
    PruneMethod,
    PruneSpec,
    QuantScheme,
    QuantSpec,
    Rotation,
    Rounding,
    ScaleFormat,
    check_freeze_patterns,
)
from fedsqueeze.errors import ConfigError

#: zstandard's level beside ``entropy=ans`` when none is given (what ANS does not code).
_ANS_LEVEL = 19

_PRUNE_NAMES = {
    "l1": PruneMethod.L1_UNSTRUCTURED,
    "global": PruneMethod.L1_GLOBAL,
    "channel": PruneMethod.LN_STRUCTURED,
    "threshold": PruneMethod.THRESHOLD,
}
_SCHEMES = {s.name.lower(): s for s in QuantScheme}
_GRANULARITIES = {"tensor": Granularity.PER_TENSOR, "channel": Granularity.PER_CHANNEL}
_ROUNDINGS = {r.name.lower(): r for r in Rounding}
_SCALES = {"fp32": ScaleFormat.FP32, "fp16": ScaleFormat.FP16, "bf16": ScaleFormat.BF16}
_SCALES["dq"] = ScaleFormat.DQ8
#: QLoRA's block size, what ``nf4`` means without a granularity.
NF4_DEFAULT_BLOCK = 64
_FLOATS = {f.name.lower(): f for f in FloatFormat}


def parse_spec(text: str) -> CodecSpec:
    """Parse the text form; raises :class:`ConfigError` with the offending part."""
    spec = CodecSpec()
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ConfigError("empty codec spec")
    if "=" not in parts[0]:
        name = parts.pop(0)
        if name not in PRESETS:
            raise ConfigError(f"unknown codec preset {name!r}; presets: {', '.join(PRESETS)}")
        spec = PRESETS[name]
    seen: set[str] = set()
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value in codec spec, got {part!r}")
        if key.strip() in seen:
            raise ConfigError(f"codec spec gives {key.strip()!r} twice; give each key once")
        seen.add(key.strip())
        try:
            spec = _apply(spec, key.strip(), value.strip())
        except ValueError as exc:
            raise ConfigError(f"codec spec {part!r}: {exc}") from None
    return spec


def _apply(spec: CodecSpec, key: str, value: str) -> CodecSpec:
    if key == "prune":
        return replace(spec, prune=_prune(value))
    if key == "topk":
        return replace(spec, topk=None if value == "none" else float(value))
    if key == "rank":
        return replace(spec, rank=None if value == "none" else int(value))
    if key == "quant":
        return replace(spec, quant=_quant(value))
    if key == "float":
        if value not in _FLOATS:
            raise ValueError(f"float must be one of {', '.join(_FLOATS)}")
        return replace(spec, float_format=_FLOATS[value])
    if key == "entropy":
        coder = EntropyCoder.ZSTD
        if value == "ans" or value.startswith("ans:"):
            coder = EntropyCoder.ANS
            value = value[4:] or str(_ANS_LEVEL)
        try:
            level = int(value)
        except ValueError:
            raise ValueError(
                f"entropy must be a zstd level in 0..22 (0 = off), ans or ans:LEVEL, got {value!r}"
            ) from None
        if not 0 <= level <= 22:
            raise ValueError(f"entropy must be a zstd level in 0..22 (0 = off), got {level}")
        return replace(spec, entropy_level=level, entropy_coder=coder)
    if key == "targets":
        return replace(spec, targets=tuple(p for p in value.split("|") if p))
    if key == "min-ndim":
        ndim = int(value)
        if not 0 <= ndim <= 8:
            raise ValueError(f"min-ndim must be in 0..8, got {ndim}")
        return replace(spec, min_ndim=ndim)
    if key == "levels":
        return replace(spec, levels=_levels(value))
    if key == "freeze":
        return replace(spec, freeze=parse_freeze(value))
    if key == "grow":
        return replace(spec, grow=_grow(value))
    raise ValueError(
        f"unknown key {key!r}; keys: prune, topk, rank, quant, float, entropy, targets, "
        "min-ndim, levels, freeze, grow"
    )


def _grow(value: str) -> tuple[float, ...]:
    if value == "none":
        return ()
    try:
        return tuple(float(s) for s in value.split("+"))
    except ValueError:
        raise ValueError(
            f"grow must be sparsities joined by '+', e.g. 0.96+0.93, got {value!r}"
        ) from None


def parse_freeze(value: str) -> tuple[str, ...]:
    """Frozen patterns from their text form (``a.*|b.*``, or ``none`` / empty for none).

    Raises
    ------
    ValueError
        A pattern that cannot be meant (see :func:`~fedsqueeze.codec.spec.check_freeze_patterns`),
        in one line.
    """
    value = value.strip()
    if value in ("", "none"):
        return ()
    patterns = tuple(p.strip() for p in value.split("|"))
    check_freeze_patterns(patterns)
    return patterns


def with_freeze(text: str, patterns: tuple[str, ...]) -> str:
    """The spec ``text`` with ``patterns`` added to its frozen ones, in canonical form.

    ``text`` itself when there is nothing to add, so specs without frozen parts travel as
    they were written.
    """
    spec = parse_spec(text)
    merged = tuple(sorted({*spec.freeze, *patterns}))
    if merged == spec.freeze:
        return text
    try:
        return format_spec(replace(spec, freeze=merged))
    except ValueError as exc:
        raise ConfigError(f"freeze {'|'.join(patterns)!r}: {exc}") from None


def _levels(value: str) -> tuple[int, ...] | None:
    if value == "none":
        return None
    try:
        return tuple(int(b) for b in value.split("+"))
    except ValueError:
        raise ValueError(f"levels must be bits joined by '+', e.g. 2+2+4, got {value!r}") from None


def _prune(value: str) -> PruneSpec:
    if value == "none":
        return PruneSpec()
    method, _, amount = value.partition(":")
    if method not in _PRUNE_NAMES or not amount:
        raise ValueError(f"prune must be none or one of {', '.join(_PRUNE_NAMES)} with :AMOUNT")
    if method == "threshold":
        return PruneSpec(PruneMethod.THRESHOLD, threshold=float(amount))
    return PruneSpec(_PRUNE_NAMES[method], sparsity=float(amount))


def _quant(value: str) -> QuantSpec | None:
    if value == "none":
        return None
    bits, *rest = value.split(":")
    scheme: QuantScheme | None = None
    granularity: Granularity | None = None
    rounding: Rounding | None = None
    scales: ScaleFormat | None = None
    block: int | None = None
    rotation: Rotation | None = None
    for word in rest:
        if word == "hadamard" and rotation is None:
            rotation = Rotation.HADAMARD
        elif word in _SCHEMES and scheme is None:
            scheme = _SCHEMES[word]
        elif word in _GRANULARITIES and granularity is None:
            granularity = _GRANULARITIES[word]
        elif word.startswith("block") and granularity is None:
            granularity, block = Granularity.PER_BLOCK, _block_size(word)
        elif word in _SCALES and scales is None:
            scales = _SCALES[word]
        elif word in _ROUNDINGS and rounding is None:
            rounding = _ROUNDINGS[word]
        elif word in {*_SCHEMES, *_GRANULARITIES, *_SCALES, *_ROUNDINGS, "hadamard"} or (
            word.startswith("block")
        ):
            raise ValueError(f"quantization option {word!r} conflicts with an earlier one")
        else:
            raise ValueError(f"unknown quantization option {word!r}")
    if scheme is QuantScheme.NF4 and granularity is None:
        granularity, block = Granularity.PER_BLOCK, NF4_DEFAULT_BLOCK
    if scales is not None and granularity is not Granularity.PER_BLOCK:
        raise ValueError("scale formats (fp16, bf16, fp32, dq) need blocks, e.g. block64")
    return QuantSpec(
        int(bits),
        scheme or QuantScheme.AFFINE,
        granularity or Granularity.PER_TENSOR,
        rounding or Rounding.NEAREST,
        block,
        scales,
        rotation or Rotation.NONE,
    )


def _block_size(word: str) -> int:
    digits = word.removeprefix("block")
    if not digits.isdigit():
        raise ValueError(f"block size must be blockB with B a number, e.g. block64, got {word!r}")
    return int(digits)


def format_spec(spec: CodecSpec) -> str:
    """The canonical text form (``parse_spec(format_spec(s)) == s``)."""
    parts = []
    p = spec.prune
    if p.method is PruneMethod.THRESHOLD:
        parts.append(f"prune=threshold:{p.threshold!r}")
    elif p.method is not PruneMethod.NONE:
        name = next(k for k, v in _PRUNE_NAMES.items() if v is p.method)
        parts.append(f"prune={name}:{p.sparsity!r}")
    if spec.topk is not None:
        parts.append(f"topk={spec.topk!r}")
    if spec.rank is not None:
        parts.append(f"rank={spec.rank}")
    if spec.quant is not None:
        q = spec.quant
        gran = {Granularity.PER_TENSOR: "tensor", Granularity.PER_CHANNEL: "channel"}.get(
            q.granularity, f"block{q.block_size}"
        )
        if q.granularity is Granularity.PER_BLOCK:
            gran += ":" + next(k for k, v in _SCALES.items() if v is q.scales)
        rotated = ":hadamard" if q.rotation is Rotation.HADAMARD else ""
        parts.append(
            f"quant={q.bits}:{q.scheme.name.lower()}:{gran}:{q.rounding.name.lower()}{rotated}"
        )
    if spec.levels is not None:
        parts.append(f"levels={'+'.join(map(str, spec.levels))}")
    parts.append(f"float={spec.float_format.name.lower()}")
    ans = "ans:" if spec.entropy_coder is EntropyCoder.ANS else ""
    parts.append(f"entropy={ans}{spec.entropy_level}")
    parts.append(f"targets={'|'.join(spec.targets)}")
    parts.append(f"min-ndim={spec.min_ndim}")
    if spec.freeze:
        parts.append(f"freeze={'|'.join(spec.freeze)}")
    if spec.grow:
        parts.append(f"grow={'+'.join(map(repr, spec.grow))}")
    return ",".join(parts)
