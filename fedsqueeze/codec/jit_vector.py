"""Vector kernels for the selection's two passes: sixteen values compared at once and
the kept ones (:data:`compress16`, the second pass) or the band's magnitudes
(:data:`band16`, the first) stored side by side (LLVM's ``masked.compressstore``),
where numba's scalar loop takes a branch per value.

Only :func:`fedsqueeze.codec.jit._compile` imports this module (numba and llvmlite are
imported then). :func:`install` swaps the scalar helpers
:func:`fedsqueeze.codec.jit_select._compress16` and ``_band16`` for these before any
kernel calling them is compiled, and only on a CPU with AVX-512 (``vcompressps`` and
``vpcompressq``). Elsewhere LLVM would expand the store lane by lane, which is no
faster than the scalar helper, so that stays. Both give the same indices and values
(``tests/codec/test_jit.py`` compares them with the NumPy path).

numba's cache of ``select_pass`` does not notice an edit of this module (checked: it
kept the old machine code): after changing :data:`compress16` or :data:`band16`, delete
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

__all__ = ["available", "band16", "compress16", "install"]

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
    space["_band16"] = band16
    space["VECTOR"] = True
    return True


def _declare(builder: ir.IRBuilder, name: str, ret: ir.Type, args: list[ir.Type]) -> Any:
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)  # type: ignore[no-untyped-call]


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
    arrays = ((xs, f32), (values, f32), (indices, i64))
    if not all(
        isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == d
        for a, d in arrays
    ):
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
        src = builder.bitcast(builder.gep(data, [ka]), vf.as_pointer())
        lanes = builder.load(src, align=4)
        mags = builder.call(_declare(builder, "llvm.fabs.v16f32", vf, [vf]), [lanes])
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
def band16(typingctx: Any, xs: Any, k: Any, lo: Any, hi: Any, band: Any, used: Any) -> Any:
    """``_band16`` (:mod:`fedsqueeze.codec.jit_select`) in one vector step: the
    magnitudes of ``xs[k:k+16]`` (float32, C order) in ``[lo, hi]`` (NaN never) go to
    ``band[used:]``, in order; returns ``used`` plus how many. The caller guarantees
    ``k + 16 <= len(xs)`` and ``used + 16 <= len(band)``."""
    f32 = types.float32
    if not all(
        isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == f32
        for a in (xs, band)
    ):
        return None  # a typing failure: numba reports it, nothing is computed wrongly
    if not all(isinstance(a, types.Integer) for a in (k, used)):
        return None
    if not all(isinstance(a, types.Float) for a in (lo, hi)):
        return None

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Any) -> Any:
        x_t, k_t, lo_t, hi_t, b_t, u_t = signature.args
        xa, ka, loa, hia, ba, ua = args
        i64 = types.int64
        ka = context.cast(builder, ka, k_t, i64)
        ua = context.cast(builder, ua, u_t, i64)
        loa = context.cast(builder, loa, lo_t, f32)
        hia = context.cast(builder, hia, hi_t, f32)
        fl, it = ir.FloatType(), ir.IntType(64)
        vf = ir.VectorType(fl, _LANES)
        vmask = ir.VectorType(ir.IntType(1), _LANES)
        data = cgutils.create_struct_proxy(x_t)(context, builder, value=xa).data  # type: ignore[no-untyped-call]
        out = cgutils.create_struct_proxy(b_t)(context, builder, value=ba).data  # type: ignore[no-untyped-call]
        src = builder.bitcast(builder.gep(data, [ka]), vf.as_pointer())
        lanes = builder.load(src, align=4)
        mags = builder.call(_declare(builder, "llvm.fabs.v16f32", vf, [vf]), [lanes])
        at_least = builder.fcmp_ordered(">=", mags, _splat(builder, loa, vf))
        at_most = builder.fcmp_ordered("<=", mags, _splat(builder, hia, vf))
        mask = builder.and_(at_least, at_most)
        store = _declare(
            builder, "llvm.masked.compressstore.v16f32", ir.VoidType(), [vf, fl.as_pointer(), vmask]
        )
        builder.call(store, [mags, builder.gep(out, [ua]), mask])
        bits = builder.bitcast(mask, ir.IntType(_LANES))
        count = builder.call(
            _declare(builder, "llvm.ctpop.i16", ir.IntType(16), [ir.IntType(16)]), [bits]
        )
        return builder.add(ua, builder.zext(count, it))

    return types.int64(xs, k, lo, hi, band, used), codegen
