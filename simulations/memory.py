"""Peak resident memory of this process and all its descendants (Ray's included).

Ray starts its GCS, raylet and worker processes below the driver, so the process tree
rooted here is the whole simulation. A background thread sums the tree's resident set
from ``/proc`` twice a second and keeps the peak, and the largest single process. On
systems without ``/proc`` both stay ``None``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType

__all__ = ["PeakMemory"]

_PROC = Path("/proc")


def _rss_bytes(pid: int) -> int:
    try:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def tree_rss(root: int) -> tuple[int, int]:
    """``(total, largest)`` resident bytes of ``root`` and its descendants."""
    tree = _children()
    total = largest = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        rss = _rss_bytes(pid)
        total += rss
        largest = max(largest, rss)
        stack.extend(tree.get(pid, []))
    return total, largest


class PeakMemory:
    """Samples the process tree's memory while in a ``with`` block.

    Attributes
    ----------
    peak_total, peak_process
        Bytes, or ``None`` where ``/proc`` is missing.
    """

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak_total: int | None = None
        self.peak_process: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def _sample(self) -> None:
        total, largest = tree_rss(os.getpid())
        self.peak_total = max(self.peak_total or 0, total)
        self.peak_process = max(self.peak_process or 0, largest)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakMemory:
        if _PROC.is_dir():
            self._sample()
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
