"""The SuperNode's output: kept whole in a log file, summarised for the operator.

Flower's SuperNode (and the ClientApps below it) print colourful logs and, when their
SuperLink goes away, long tracebacks. An edge's terminal shows fedsqueeze's own one-line
status instead; everything Flower printed goes, with its ANSI colour codes removed, to
a log file whose path the edge prints. A few lines are worth the operator's eye (a
round that failed on this edge, and why): :func:`headline` picks them.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

from fedsqueeze.deploy.keeper import QUIT_LINE, START_MARK

__all__ = ["ANSI", "NodeLog", "headline"]

#: ANSI escape sequences (colours, cursor movement).
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

# The last line of the traceback of a data-plane failure inside a ClientApp (the
# chained lower-level errors printed above it are left out).
_OUR_ERROR = re.compile(r"^fedsqueeze\.errors\.(\w+): ((?:fetching|pushing) .+ failed: .+)$")


def headline(line: str) -> str | None:
    """The operator's one-line version of a SuperNode log line, or ``None`` to skip it."""
    match = _OUR_ERROR.match(line.strip())
    if match:
        return f"a round failed on this edge: {match.group(2)}"
    return None


class NodeLog:
    """Copies a SuperNode's output into ``path`` (appending, colours stripped).

    Parameters
    ----------
    path
        The log file.
    echo
        Receives :func:`headline`'s pick of lines (the edge prints them).
    """

    def __init__(self, path: Path, echo: Callable[[str], None]) -> None:
        self.path = path
        self.echo = echo
        self._quit = threading.Event()
        path.parent.mkdir(parents=True, exist_ok=True)

    def follow(self, stream: IO[str]) -> threading.Thread:
        """Start copying ``stream`` (until it closes) in a daemon thread."""
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(f"{START_MARK}\n")
        # One event per stream: a late line of the last SuperNode cannot mark this one.
        self._quit = threading.Event()
        thread = threading.Thread(
            target=self._copy, args=(stream, self._quit), name="supernode-log", daemon=True
        )
        thread.start()
        return thread

    def quitting(self) -> bool:
        """Whether the SuperNode followed last has said it quits (:data:`QUIT_LINE`)."""
        return self._quit.is_set()

    def _copy(self, stream: IO[str], quit_seen: threading.Event) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            try:
                for line in stream:
                    plain = ANSI.sub("", line)
                    handle.write(plain)
                    handle.flush()
                    if QUIT_LINE.search(plain):
                        quit_seen.set()
                    picked = headline(plain)
                    if picked is not None:
                        self.echo(picked)
            except (OSError, ValueError):
                return  # the pipe was closed under us: the SuperNode is being stopped
