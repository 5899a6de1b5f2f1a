"""Vector kernels for the selection's two passes: sixteen values compared at once and
the kept ones (:data:`compress16`, the second pass) or the band's magnitudes
(:data:`scan16`, the first, which also counts them and keeps the maxima) stored side by
side (LLVM's ``masked.compressstore``), where numba's scalar loop takes a branch per
value.

Only :func:`fedsqueeze.codec.jit._compile` imports this module (numba and llvmlite are
imported then). :func:`install` swaps the scalar helpers
``_compress16`` and ``_scan16`` of :mod:`fedsqueeze.codec.jit_select` for these before any
kernel calling them is compiled, and only on a CPU with AVX-512 (``vcompressps`` and
``vpcompressq``). Elsewhere LLVM would expand the store lane by lane, which is no
faster than the scalar helper, so that stays. Both give the same indices and values
(``tests/codec/test_jit.py`` compares them with the NumPy path).

numba's cache of ``select_pass`` does not notice an edit of this module (checked: it
kept the old machine code): after changing :data:`compress16` or :data:`scan16`, delete
``fedsqueeze/codec/__pycache__/jit_select*.nb*``.

Measured on 25M standard normal float32 values, 10% kept, two threads, on these
machines: the second pass took 21 ms with the scalar helper and 9 ms with this one.
"""

from __future__ import annotations

from typing import Any

from llvmlite import binding, ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["available", "compress16", "install", "scan16"]

_LANES = 16


def available() -> bool:
    """Whether this CPU stores a vector compressed in one instruction (AVX-512F)."""
    try:
        return bool(binding.get_host_cpu_features().get("avx512f", False))
    except RuntimeError:  # pragma: no cover - llvmlite cannot read the features
        return False


def install(space: dict[str, Any]) -> bool:
    """Put :data:`compress16` in ``space`` (``jit_select``'s globals) in place of the
    scalar helper when :func:`available`; returns whether it did."""
    if not available():
        return False
    space["_compress16"] = compress16
    space["_scan16"] = scan16
    space["VECTOR"] = True
    return True


def _declare(builder: ir.IRBuilder, name: str, ret: ir.Type, args: list[ir.Type]) -> Any:
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)  # type: ignore[no-untyped-call]


def _c_arrays(*typed: tuple[Any, Any]) -> bool:
    """Whether each ``(array type, dtype)`` is a 1-D C-order array of that dtype."""
    return all(
        isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == d
        for a, d in typed
    )


def _load16(builder: ir.IRBuilder, data: Any, k: Any, vf: ir.VectorType) -> tuple[Any, Any]:
    """Sixteen floats from ``data[k:]`` and their magnitudes."""
    src = builder.bitcast(builder.gep(data, [k]), vf.as_pointer())
    lanes = builder.load(src, align=4)
    return lanes, builder.call(_declare(builder, "llvm.fabs.v16f32", vf, [vf]), [lanes])


def _splat(builder: ir.IRBuilder, value: Any, vector: ir.VectorType) -> Any:
    first = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.IntType(32)(0))
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), _LANES), [0] * _LANES)
    return builder.shuffle_vector(first, ir.Constant(vector, ir.Undefined), zeros)


@intrinsic
def compress16(
    typingctx: Any,
    xs: Any,
    k: Any,
    cut: Any,
    strict: Any,
    values: Any,
    indices: Any,
    o: Any,
    base: Any,
) -> Any:
    """``_compress16`` (:mod:`fedsqueeze.codec.jit_select`) in one vector step:
    ``xs[k:k+16]`` (float32, C order) whose magnitudes pass ``cut`` (``>`` if
    ``strict`` else ``>=``; NaN never) go to ``values[o:]`` and their indices plus
    ``base`` to ``indices[o:]``, in order; returns ``o`` plus how many. The caller
    guarantees ``k + 16 <= len(xs)`` and ``o + 16 <= len(values), len(indices)``."""
    f32, i64 = types.float32, types.int64
    if not _c_arrays((xs, f32), (values, f32), (indices, i64)):
        return None  # a typing failure: numba reports it, nothing is computed wrongly
    scalars = (k, o, base)
    if not all(isinstance(a, types.Integer) for a in scalars) or not isinstance(cut, types.Float):
        return None
    if not isinstance(strict, (types.Boolean, types.Integer)):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Any) -> Any:
        x_t, k_t, cut_t, strict_t, v_t, i_t, o_t, base_t = signature.args
        xa, ka, cuta, stricta, va, ia, oa, basea = args
        i64, f32 = types.int64, types.float32
        ka = context.cast(builder, ka, k_t, i64)
        oa = context.cast(builder, oa, o_t, i64)
        basea = context.cast(builder, basea, base_t, i64)
        cuta = context.cast(builder, cuta, cut_t, f32)
        stricta = context.cast(builder, stricta, strict_t, types.boolean)
        fl, it, flag = ir.FloatType(), ir.IntType(64), ir.IntType(1)
        vf = ir.VectorType(fl, _LANES)
        vi = ir.VectorType(it, _LANES)
        vmask = ir.VectorType(flag, _LANES)
        data = cgutils.create_struct_proxy(x_t)(context, builder, value=xa).data  # type: ignore[no-untyped-call]
        out_v = cgutils.create_struct_proxy(v_t)(context, builder, value=va).data  # type: ignore[no-untyped-call]
        out_i = cgutils.create_struct_proxy(i_t)(context, builder, value=ia).data  # type: ignore[no-untyped-call]
        lanes, mags = _load16(builder, data, ka, vf)
        cuts = _splat(builder, cuta, vf)
        above = builder.fcmp_ordered(">", mags, cuts)
        at_least = builder.fcmp_ordered(">=", mags, cuts)
        strict_bit = stricta if stricta.type == flag else builder.trunc(stricta, flag)
        mask = builder.select(strict_bit, above, at_least)
        void = ir.VoidType()
        store_f = _declare(
            builder, "llvm.masked.compressstore.v16f32", void, [vf, fl.as_pointer(), vmask]
        )
        store_i = _declare(
            builder, "llvm.masked.compressstore.v16i64", void, [vi, it.as_pointer(), vmask]
        )
        builder.call(store_f, [lanes, builder.gep(out_v, [oa]), mask])
        first = _splat(builder, builder.add(basea, ka), vi)
        where = builder.add(first, ir.Constant(vi, list(range(_LANES))))
        builder.call(store_i, [where, builder.gep(out_i, [oa]), mask])
        bits = builder.bitcast(mask, ir.IntType(_LANES))
        count = builder.call(
            _declare(builder, "llvm.ctpop.i16", ir.IntType(16), [ir.IntType(16)]), [bits]
        )
        return builder.add(oa, builder.zext(count, it))

    return types.int64(xs, k, cut, strict, values, indices, o, base), codegen


@intrinsic
def scan16(
    typingctx: Any,
    xs: Any,
    bs: Any,
    k: Any,
    lo: Any,
    hi: Any,
    band: Any,
    used: Any,
    tops: Any,
) -> Any:
    """``_scan16`` (:mod:`fedsqueeze.codec.jit_select`) in one vector step over
    ``xs[k:k+16]`` (float32, C order; ``bs``, their memory as int32, is not read): the
    magnitudes in ``[lo, hi]`` (NaN never) go to ``band[used:]``, in order; ``tops``
    (int32, 32 lanes) takes the lane-wise maxima of the values' bit patterns less the
    sign bit, those with the sign bit clear in its first 16 lanes and those with it set
    in the last 16 (0 for the other sign); returns ``used`` plus how many went to the
    band, plus 2^32 times how many magnitudes are ``>= lo``. The caller guarantees
    ``k + 16 <= len(xs)`` and ``used + 16 <= len(band)``. The maxima stay in ``tops``
    from one step to the next (its 128 bytes in the core's first-level cache), where a
    vectorized loop beside the compressed store ran at half the speed."""
    f32, i32 = types.float32, types.int32
    if not _c_arrays((xs, f32), (band, f32), (tops, i32)):
        return None  # a typing failure: numba reports it, nothing is computed wrongly
    if not all(isinstance(a, types.Integer) for a in (k, used)):
        return None
    if not all(isinstance(a, types.Float) for a in (lo, hi)):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Any) -> Any:
        x_t, _, k_t, lo_t, hi_t, b_t, u_t, t_t = signature.args
        xa, _, ka, loa, hia, ba, ua, ta = args
        i64 = types.int64
        ka = context.cast(builder, ka, k_t, i64)
        ua = context.cast(builder, ua, u_t, i64)
        loa = context.cast(builder, loa, lo_t, f32)
        hia = context.cast(builder, hia, hi_t, f32)
        fl, it, word = ir.FloatType(), ir.IntType(64), ir.IntType(32)
        vf = ir.VectorType(fl, _LANES)
        vw = ir.VectorType(word, _LANES)
        vmask = ir.VectorType(ir.IntType(1), _LANES)
        data = cgutils.create_struct_proxy(x_t)(context, builder, value=xa).data  # type: ignore[no-untyped-call]
        out = cgutils.create_struct_proxy(b_t)(context, builder, value=ba).data  # type: ignore[no-untyped-call]
        acc = cgutils.create_struct_proxy(t_t)(context, builder, value=ta).data  # type: ignore[no-untyped-call]
        lanes, mags = _load16(builder, data, ka, vf)
        at_least = builder.fcmp_ordered(">=", mags, _splat(builder, loa, vf))
        at_most = builder.fcmp_ordered("<=", mags, _splat(builder, hia, vf))
        inside = builder.and_(at_least, at_most)
        store = _declare(
            builder, "llvm.masked.compressstore.v16f32", ir.VoidType(), [vf, fl.as_pointer(), vmask]
        )
        builder.call(store, [mags, builder.gep(out, [ua]), inside])
        # the maxima: sign-split magnitudes' bit patterns, lane by lane
        words = builder.bitcast(lanes, vw)
        negative = builder.ashr(words, ir.Constant(vw, [31] * _LANES))
        magnitude = builder.and_(words, ir.Constant(vw, [0x7FFFFFFF] * _LANES))
        parts = (
            builder.and_(magnitude, builder.not_(negative)),
            builder.and_(magnitude, negative),
        )
        for half, part in enumerate(parts):
            slot = builder.bitcast(
                builder.gep(acc, [ir.Constant(it, half * _LANES)]), vw.as_pointer()
            )
            held = builder.load(slot, align=4)
            larger = builder.icmp_signed(">", part, held)
            builder.store(builder.select(larger, part, held), slot, align=4)
        pop = _declare(builder, "llvm.ctpop.i16", ir.IntType(16), [ir.IntType(16)])
        in_band = builder.call(pop, [builder.bitcast(inside, ir.IntType(_LANES))])
        counted = builder.call(pop, [builder.bitcast(at_least, ir.IntType(_LANES))])
        packed = builder.shl(builder.zext(counted, it), ir.Constant(it, 32))
        return builder.add(builder.add(ua, builder.zext(in_band, it)), packed)

    return types.int64(xs, bs, k, lo, hi, band, used, tops), codegen
