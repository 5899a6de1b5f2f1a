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

import logging
import os
import types
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

__all__ = [
    "COMPILE_ENV",
    "compile_enabled",
    "dividing_kernel",
    "division_setting",
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


#: inductor's setting that rounds float32 division as eager does, by torch version.
_DIVISION_SETTINGS = (
    "eager_numerics.division_rounding",
    "emulate_division_rounding",
    "emulate_divison_rounding",  # sic, torch 2.9-2.10
)
_division_setting: str | bool | None = False  # False: not looked up yet


def division_setting() -> str | None:
    """The name of inductor's exact-division setting in this torch, ``None`` if none."""
    global _division_setting
    if _division_setting is False:
        try:
            from torch._inductor import config

            names = set(config.get_config_copy())
        except Exception:  # no inductor here: nothing compiles anyway
            names = set()
        _division_setting = next((n for n in _DIVISION_SETTINGS if n in names), None)
    return cast("str | None", _division_setting)


def _bound(fn: Callable[..., Any], constants: dict[int, Any], arity: int) -> Callable[..., Any]:
    """``fn`` of its tensor arguments alone, the others fixed (compiled as constants).

    Each form gets a code object of its own, named after the kernel and its constants:
    dynamo keeps its compiled entries, its recompile limit (8) and its "automatic
    dynamic" memory per code object, so forms sharing one would count against one limit
    (the ninth ran eager on the first H200 run) and a constant that differs from the
    last form's would turn symbolic (``1 << bits`` then fails to trace).
    """

    def bound(*tensors: Any) -> Any:
        it = iter(tensors)
        return fn(*[constants[i] if i in constants else next(it) for i in range(arity)])

    label = "_".join([fn.__name__, *(f"{v}" for v in constants.values())])
    label = "".join(c if c.isalnum() else "_" for c in label)
    code = bound.__code__.replace(co_name=label)  # (co_qualname, 3.11+, is not dynamo's key)
    own = types.FunctionType(code, bound.__globals__, label, None, bound.__closure__)
    return own


def _wrap(fn: _F, *, divides: bool) -> _F:
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
