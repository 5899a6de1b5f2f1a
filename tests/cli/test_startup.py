"""`fedsqueeze COMMAND --help` starts without importing torch, Flower or grpc.

A newcomer types ``--help`` first; it should answer at once. What makes start-up slow is
importing the heavy libraries, so the test checks that (in a fresh interpreter), not a
time, which would depend on the machine's load.
"""

from __future__ import annotations

import pytest

from fedsqueeze.cli import SUBCOMMANDS
from tests.subproc import ROOT, run_module


def _loaded(*argv: str) -> tuple[int, list[str]]:
    proc = run_module("tests.cli.loaded_modules", *argv, timeout=60)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("LOADED:"), proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.returncode, [m for m in last.removeprefix("LOADED:").strip().split(",") if m]


@pytest.mark.parametrize(
    "argv",
    [
        ("--help",),
        ("sweep", "--help"),
        ("simulate", "--help"),
        ("demo", "--help"),
        ("bench", "--help"),
        ("bench", "codec", "--help"),
        ("bench", "transport", "--help"),
        ("distill", "--help"),
        ("bench", "simulate", "--help"),
    ],
)
def test_help_imports_no_heavy_library(argv: tuple[str, ...]) -> None:
    status, loaded = _loaded(*argv)
    assert status == 0
    assert loaded == [], f"fedsqueeze {' '.join(argv)} imported {loaded}"


def test_the_help_names_the_command_make_demo_runs() -> None:
    recipe = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].splitlines()[1]
    command = recipe.split("fedsqueeze", 1)[1].split()[0]
    mentions = [name for name, (_, help_text) in SUBCOMMANDS.items() if "make demo" in help_text]
    assert mentions == [command]
