"""Waiting in tests for something another thread or process makes true."""

from __future__ import annotations

import time
from collections.abc import Callable


def until(condition: Callable[[], bool], within: float = 30.0, what: str = "the condition") -> None:
    """Poll ``condition`` every 10 ms; fail the test if it does not hold within ``within``
    seconds (``what`` names it in the failure)."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not hold within {within:g} s"
        time.sleep(0.01)
