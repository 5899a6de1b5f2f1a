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

A child with a setup to leave out (a server loading the model it will serve) creates a
``phase_file`` when the setup is done and takes its baseline then: the parent keeps the
peak seen until then apart (:attr:`Measured.setup_peak`) and starts the peak again.
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
    setup_peak
        With a ``phase_file``: the largest anonymous memory seen before it appeared
        (``peak_anon`` is then the largest after).
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
    setup_peak: int = 0

    @property
    def extra(self) -> int:
        """Peak anonymous memory beyond the child's baseline, bytes."""
        return max(0, self.peak_anon - int(self.report.get("baseline_anon", 0)))


def anon_bytes(pid: int | str = "self") -> int:
    """Anonymous resident memory of ``pid`` now (``resident − shared`` pages)."""
    with open(f"/proc/{pid}/statm", "rb") as fh:
        fields = fh.read().split()
    return (int(fields[1]) - int(fields[2])) * _PAGE


def settled_baseline() -> int:
    """In a measured child: use torch's allocator once, compile the codec's kernels
    (:func:`fedsqueeze.codec.jit.warm`) and hand freed memory back to the system, so
    none of it counts in what follows; returns :func:`anon_bytes` then."""
    import torch

    from fedsqueeze.codec import jit
    from fedsqueeze.modelfile import return_freed_memory

    torch.empty(1).clone()
    jit.warm()  # the compiled kernels' code and compiler memory: part of the baseline
    return_freed_memory()
    return anon_bytes()


def status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``RssFile``...), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def run_measured(
    argv: list[str],
    *,
    interval: float = 0.002,
    timeout: float = 3600,
    phase_file: str | os.PathLike[str] | None = None,
) -> Measured:
    """Run ``python argv...`` and poll its anonymous memory until it exits (the peak
    restarts when ``phase_file`` appears: see the module's text)."""
    # files, not pipes: a child that writes much never blocks on a full pipe
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        proc = subprocess.Popen([sys.executable, *argv], stdout=out_file, stderr=err_file)
        setup, peak = _poll(proc, interval, timeout, phase_file)
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    report: dict[str, Any] = {}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if lines:
        report = json.loads(lines[-1])
    return Measured(proc.returncode, report, peak, err, setup)


def _poll(
    proc: subprocess.Popen[Any],
    interval: float,
    timeout: float,
    phase_file: str | os.PathLike[str] | None,
) -> tuple[int, int]:
    """The largest anonymous memory of ``proc`` seen before ``phase_file`` appeared (0
    without one) and after, until it exits (killed after ``timeout`` seconds)."""
    peak = setup = 0
    waiting = phase_file is not None
    started = time.monotonic()
    try:
        while proc.poll() is None:
            if waiting and phase_file is not None and os.path.exists(phase_file):
                waiting, setup, peak = False, peak, 0
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
    return setup, peak
