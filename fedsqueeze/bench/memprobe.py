"""Peak anonymous memory of a child process: what it holds beyond its mapped files.

A memory-mapped model's pages count in a process's resident set once read (``RssFile``),
and so do a mapped output's, so ``ru_maxrss`` / ``VmHWM`` mix the model in with the
working memory. What the process *allocates* is its anonymous memory (``RssAnon``:
``resident − shared`` in ``/proc/PID/statm``), which Linux keeps no peak of. So the
parent polls it every ``interval`` seconds (2 ms by default) from outside the child (no
GIL shared with the work) and keeps the largest value. An allocation big enough to
matter here (tens of MB) takes longer than that to fill, so the poll sees it; a shorter
spike can be missed, which the child's own ``VmHWM`` (file pages included) bounds from
above.

The child reports its own baseline (``RssAnon`` after its imports, when it starts the
work) on its last stdout line as JSON: ``{"baseline_anon": bytes, ...}``; the extra
memory is ``peak − baseline``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["Measured", "anon_bytes", "run_measured", "status_bytes"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class Measured:
    """A child's run: its exit status, report and memory.

    Attributes
    ----------
    returncode
        The child's exit status.
    report
        The JSON object on its last stdout line (empty if none).
    peak_anon
        Largest anonymous resident memory seen, bytes.
    stderr
        What it wrote to stderr (for error messages).
    """

    returncode: int
    report: dict[str, Any]
    peak_anon: int
    stderr: str

    @property
    def extra(self) -> int:
        """Peak anonymous memory beyond the child's baseline, bytes."""
        return max(0, self.peak_anon - int(self.report.get("baseline_anon", 0)))


def anon_bytes(pid: int | str = "self") -> int:
    """Anonymous resident memory of ``pid`` now (``resident − shared`` pages)."""
    with open(f"/proc/{pid}/statm", "rb") as fh:
        fields = fh.read().split()
    return (int(fields[1]) - int(fields[2])) * _PAGE


def status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``RssFile``...), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def run_measured(argv: list[str], *, interval: float = 0.002, timeout: float = 3600) -> Measured:
    """Run ``python argv...`` and poll its anonymous memory until it exits."""
    # files, not pipes: a child that writes much never blocks on a full pipe
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        proc = subprocess.Popen([sys.executable, *argv], stdout=out_file, stderr=err_file)
        peak = _poll(proc, interval, timeout)
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    report: dict[str, Any] = {}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if lines:
        report = json.loads(lines[-1])
    return Measured(proc.returncode, report, peak, err)


def _poll(proc: subprocess.Popen[Any], interval: float, timeout: float) -> int:
    """The largest anonymous memory of ``proc`` seen until it exits (killed after
    ``timeout`` seconds)."""
    peak = 0
    started = time.monotonic()
    try:
        while proc.poll() is None:
            with contextlib.suppress(OSError, ValueError, IndexError):  # exiting
                peak = max(peak, anon_bytes(proc.pid))
            if time.monotonic() - started > timeout:
                proc.kill()
                break
            time.sleep(interval)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return peak
