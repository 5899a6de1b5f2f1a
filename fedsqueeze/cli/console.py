"""The console every subcommand prints through."""

from __future__ import annotations

from rich.console import Console

#: Width used when output goes to a file or pipe, so tables are not squeezed to 80.
PIPE_WIDTH = 200


def make_console() -> Console:
    """A rich console: the terminal's width on a TTY, :data:`PIPE_WIDTH` otherwise."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=PIPE_WIDTH)
    return console
