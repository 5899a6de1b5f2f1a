"""The switch that runs the fused codec's element-wise kernels under ``torch.compile``.

Off unless asked (``FEDSQUEEZE_COMPILE=1`` or :func:`set_compile`); a kernel whose
compilation or compiled call fails runs eager for the rest of the process (one warning
each; :func:`failed_kernels` names them) while the others stay compiled: no compiler,
an unsupported backend, a deprecation turned into an error, an operation one version
cannot trace.

Tensor arguments are compiled with dynamic shapes (one compilation serves every size);
every other argument (a code width, a row width, a clamp bound) is a constant of its own
compiled form, one per distinct set of them. Under ``dynamic=True`` a plain ``int``
argument would be symbolic, and some versions cannot evaluate ``1 << bits`` on a
symbolic ``bits`` (torch 2.11 on CUDA: the failure that left the first GPU check's
"compiled" rows eager).

Triton lowers a float32 ``x / y`` to an approximate division unless inductor is told to
round it as eager does; a kernel marked ``divides=True`` (:func:`dividing_kernel`) is
compiled with that setting, and runs eager on CUDA where this torch has no such
setting: its bytes must equal the CPU reference's.
"""

from __future__ import annotations

import linecache
import logging
import math
import os
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

__all__ = [
    "COMPILE_ENV",
    "compile_enabled",
    "dividing_kernel",
    "division_setting",
    "exact_kernel",
    "failed_kernels",
    "kernel",
    "set_compile",
]

log = logging.getLogger(__name__)

#: Environment variable that turns ``torch.compile`` on for the fused kernels ("1").
COMPILE_ENV = "FEDSQUEEZE_COMPILE"

_F = TypeVar("_F", bound=Callable[..., Any])
_compile_override: bool | None = None
_failed: set[str] = set()  # kernels whose compilation failed: eager from then on
_compiled: dict[tuple[str, tuple[tuple[int, Any], ...]], Callable[..., Any]] = {}


def compile_enabled() -> bool:
    """Whether the element-wise kernels run under ``torch.compile``: :func:`set_compile`'s
    choice, else ``FEDSQUEEZE_COMPILE=1`` (a kernel in :func:`failed_kernels` runs eager
    all the same)."""
    if _compile_override is not None:
        return _compile_override
    return os.environ.get(COMPILE_ENV, "") == "1"


def set_compile(enabled: bool | None) -> None:
    """Turn ``torch.compile`` on or off for this process (``None``: back to the
    environment variable); also forgets earlier failures."""
    global _compile_override
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool or None, got {enabled!r}")
    _compile_override = enabled
    _failed.clear()


def failed_kernels() -> frozenset[str]:
    """The kernels whose compilation failed in this process (they run eager)."""
    return frozenset(_failed)


def kernel(fn: _F) -> _F:
    """``fn``, or its compiled form when :func:`compile_enabled` (eager after a failure)."""
    return _wrap(fn, divides=False)


def dividing_kernel(fn: _F) -> _F:
    """:func:`kernel` for a function that divides floats: compiled with eager's rounding
    of the division, or eager on CUDA where this torch cannot be asked for it."""
    return _wrap(fn, divides=True)


def exact_kernel(fn: _F) -> _F:
    """:func:`dividing_kernel` for a function that also rounds through a narrower float
    (fp16 or bf16 scales): compiled with inductor's emulation of those casts too
    (without it, inductor keeps the wider value: other scales, on the CPU as well), or
    eager where this torch lacks either setting."""
    return _wrap(fn, divides=True, casts=True)


#: inductor's setting that rounds float32 division as eager does, by torch version.
_DIVISION_SETTINGS = (
    "eager_numerics.division_rounding",
    "emulate_division_rounding",
    "emulate_divison_rounding",  # sic, torch 2.9-2.10
)
#: inductor's setting that keeps a downcast's rounding inside a compiled kernel.
_CASTS_SETTING = "emulate_precision_casts"
_settings: frozenset[str] | None = None  # inductor's setting names, read once
_forms = 0  # compiled forms made in this process (each name and file name is unique)


def _setting_names() -> frozenset[str]:
    """The names of inductor's settings in this torch (empty without inductor), read once."""
    global _settings
    if _settings is None:
        try:
            from torch._inductor import config

            _settings = frozenset(config.get_config_copy())
        except Exception:  # no inductor here: nothing compiles anyway
            _settings = frozenset()
    return _settings


def division_setting() -> str | None:
    """The name of inductor's exact-division setting in this torch, ``None`` if none."""
    return next((n for n in _DIVISION_SETTINGS if n in _setting_names()), None)


def _literal(value: object) -> str:
    """``value`` as Python source that evaluates to exactly it (ints, bools, finite
    floats: ``repr`` round-trips a float); anything else is refused."""
    if isinstance(value, bool | int):
        return repr(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    raise TypeError(f"a compiled kernel's constant must be an int or a finite float: {value!r}")


def _bound(fn: Callable[..., Any], constants: dict[int, Any], arity: int) -> Callable[..., Any]:
    """``fn`` of its tensor arguments alone, the others written into its code as literals.

    The form is generated source (``def form(t0, t2): return fn(t0, 4, t2)``), so each
    constant is a literal of the form's own code object. Two things the first H200 runs
    showed make that necessary under torch 2.11 with ``dynamic=True``: a plain ``int``
    argument, and even an ``int`` read from a closure, is traced as a symbolic size, on
    which ``1 << bits`` fails ("failed to eval lshift(1, s63)": the decode kernels ran
    eager); and forms sharing one code object share dynamo's recompile limit (8: the
    ninth ran eager) and its memory of which values changed. A literal is a constant to
    every version, and each form has its own code object (and name, and file name).

    The source is also put in :mod:`linecache` under the form's file name: a function
    without a source file is one dynamo 2.11 wraps in its shared ``inner`` frame before
    compiling, which put every form back under one code object (the third H200 run hit
    the recompile limit again, on the ninth form). With its source known it is compiled
    as itself, and tracebacks through it show its line.
    """
    params: list[str] = []
    call_args: list[str] = []
    for i in range(arity):
        if i in constants:
            call_args.append(_literal(constants[i]))
        else:
            params.append(f"t{i}")
            call_args.append(f"t{i}")
    global _forms
    _forms += 1
    label = "_".join([fn.__name__, *(f"{v}" for v in constants.values()), str(_forms)])
    label = "".join(c if c.isalnum() else "_" for c in label)
    source = f"def {label}({', '.join(params)}):\n    return fn({', '.join(call_args)})\n"
    namespace: dict[str, Any] = {"fn": fn}
    filename = f"<fedsqueeze kernel {label}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), namespace)
    return cast(Callable[..., Any], namespace[label])


def _wrap(fn: _F, *, divides: bool, casts: bool = False) -> _F:
    name = fn.__name__

    def call(*args: Any) -> Any:
        if name in _failed or not compile_enabled():
            return fn(*args)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        options: dict[str, Any] = {}
        if divides:
            setting = division_setting()
            if setting is not None:
                options[setting] = True
            elif any(t.device.type == "cuda" for t in tensors):
                return fn(*args)  # Triton's approximate division: other bytes
        if casts:
            if _CASTS_SETTING not in _setting_names() or division_setting() is None:
                return fn(*args)  # casts or divisions rounded otherwise: other bytes
            options[_CASTS_SETTING] = True
        constants = {i: a for i, a in enumerate(args) if not isinstance(a, torch.Tensor)}
        key = (name, tuple(sorted(constants.items())))
        try:
            compiled = _compiled.get(key)
            if compiled is None:
                compiled = torch.compile(
                    _bound(fn, constants, len(args)), dynamic=True, options=options or None
                )
                _compiled[key] = compiled
            return compiled(*tensors)
        except Exception as exc:  # any compiler failure: this kernel eager from now on
            _failed.add(name)
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("torch.compile failed on %s (%s); it runs eager", name, why)
            return fn(*args)

    return cast(_F, call)
