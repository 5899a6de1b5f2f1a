"""Run ``fedsqueeze ARGS`` inside the test process, shaped like a finished subprocess.

A real ``python -m fedsqueeze`` costs 1.5-3 s here, nearly all of it importing torch; the
refusal tests run dozens of commands, so they call :func:`fedsqueeze.cli.main` directly
and capture what it prints. What only a real process shows (the umask, Python's warning
filters, the logging set-up, the interpreter's own traceback) is still checked through
:func:`tests.subproc.run_module` by a few tests in each file.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from collections.abc import Iterator, Mapping

from fedsqueeze.cli import main


@contextlib.contextmanager
def _environment(env: Mapping[str, str] | None) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_cli(*argv: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``main(argv)`` with stdout and stderr captured; an exception propagates (a test
    that expects one line on stderr then fails with the traceback, as it should)."""
    out, err = io.StringIO(), io.StringIO()
    with _environment(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["fedsqueeze", *argv], code, out.getvalue(), err.getvalue())
