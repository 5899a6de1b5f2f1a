"""The switch that runs the fused codec's element-wise kernels under ``torch.compile``.

Off unless asked (``FEDSQUEEZE_COMPILE=1`` or :func:`set_compile`); a kernel whose
compilation or compiled call fails runs eager, and so does every kernel after it, for
the rest of the process (with one warning): no compiler, an unsupported backend, a
deprecation turned into an error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

__all__ = ["COMPILE_ENV", "compile_enabled", "kernel", "set_compile"]

log = logging.getLogger(__name__)

#: Environment variable that turns ``torch.compile`` on for the fused kernels ("1").
COMPILE_ENV = "FEDSQUEEZE_COMPILE"

_F = TypeVar("_F", bound=Callable[..., Any])
_compile_override: bool | None = None
_compile_failed = False
_compiled: dict[str, Callable[..., Any]] = {}


def compile_enabled() -> bool:
    """Whether the element-wise kernels run under ``torch.compile``: :func:`set_compile`'s
    choice, else ``FEDSQUEEZE_COMPILE=1``; off for good once a compile failed."""
    if _compile_failed:
        return False
    if _compile_override is not None:
        return _compile_override
    return os.environ.get(COMPILE_ENV, "") == "1"


def set_compile(enabled: bool | None) -> None:
    """Turn ``torch.compile`` on or off for this process (``None``: back to the
    environment variable); also forgets an earlier failure."""
    global _compile_override, _compile_failed
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool or None, got {enabled!r}")
    _compile_override = enabled
    _compile_failed = False


def kernel(fn: _F) -> _F:
    """``fn``, or its compiled form when :func:`compile_enabled` (eager after a failure)."""
    name = fn.__name__

    def call(*args: Any) -> Any:
        global _compile_failed
        if not compile_enabled():
            return fn(*args)
        try:
            compiled = _compiled.get(name)
            if compiled is None:
                compiled = torch.compile(fn, dynamic=True)
                _compiled[name] = compiled
            return compiled(*args)
        except Exception as exc:  # any compiler failure: eager from now on
            _compile_failed = True
            log.warning("torch.compile failed (%s: %s); the codec runs eager", type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip
            return fn(*args)

    return cast(_F, call)
