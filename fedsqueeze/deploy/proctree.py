"""The tree of processes as Linux ``/proc`` shows it.

Each process's parent and state come from ``/proc/PID/stat``. Elsewhere (no ``/proc``)
only the processes one names are known, through ``kill(pid, 0)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcStat:
    """One process: its id, its parent's id and its state letter (``Z`` for a zombie)."""

    pid: int
    ppid: int
    state: str

    @property
    def live(self) -> bool:
        """Whether it runs: not a zombie (``Z``) nor dead (``X``)."""
        return self.state not in ("Z", "X")


def read_stat(pid: int) -> ProcStat | None:
    """``pid``'s entry, or ``None`` if it is gone (or there is no ``/proc``)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and ')': split after the last ')'.
    rest = raw.rsplit(")", 1)[-1].split()
    if len(rest) < 2:
        return None
    return ProcStat(pid, int(rest[1]), rest[0])


def all_stats() -> list[ProcStat]:
    """Every process visible in ``/proc`` (empty without ``/proc``)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    stats = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat is not None:
                stats.append(stat)
    return stats


def is_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    stat = read_stat(pid)
    if stat is None:
        if Path("/proc").is_dir():
            return False
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return stat.live


def live_tree(roots: set[int]) -> set[int]:
    """The live processes among ``roots`` and below them."""
    stats = all_stats()
    if not stats:  # no /proc: only the roots are known
        return {pid for pid in roots if is_alive(pid)}
    children: dict[int, list[int]] = {}
    live = set()
    for stat in stats:
        children.setdefault(stat.ppid, []).append(stat.pid)
        if stat.live:
            live.add(stat.pid)
    found: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, ()))
    return found & live


def command_name(pid: int) -> str:
    """``"1234 (python flower-superlink)"``, for log messages."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return str(pid)
    parts = [p.decode(errors="replace") for p in raw.split(b"\0") if p]
    words = [Path(p).name for p in parts[:2]]
    return f"{pid} ({' '.join(words)})" if words else str(pid)


def children(pid: int) -> set[int]:
    """The ids of ``pid``'s children, zombies included (Linux ``/proc``; empty elsewhere)."""
    return {s.pid for s in all_stats() if s.ppid == pid}


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Linux ``/proc``; empty elsewhere)."""
    return live_tree({pid}) - {pid}


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) ``pid`` has used, or ``None`` if it is gone.

    Its own time only: children it waited for are not counted (``cutime``).
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    rest = raw.rsplit(")", 1)[-1].split()
    if len(rest) < 13:
        return None
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
