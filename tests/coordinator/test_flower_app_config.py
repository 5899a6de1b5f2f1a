"""The Flower App's run config in pyproject.toml against RunSettings and the docs.

``flwr run . --run-config 'KEY=VALUE'`` accepts only keys declared in
``[tool.flwr.app.config]``; Flower refuses any other with "Invalid run configuration".
So every RunSettings field must be declared there (with its default, so that
``flwr run .`` and ``RunSettings()`` agree), and every key the docs tell a user to set
must be one of them.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import fields

import pytest

from fedsqueeze.runconfig import RunSettings
from tests.subproc import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _declared() -> dict[str, object]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(pyproject["tool"]["flwr"]["app"]["config"])


def _documented() -> list[tuple[str, str, str]]:
    """``(file, key, value)`` of every run-config key the docs set.

    In ``flwr run ... --run-config '...'`` and ``fedsqueeze coordinator ... --set K=V``
    command lines (``--set`` of the coordinator reaches the same keys).
    """
    found = []
    for path in DOCS:
        for line in path.read_text().splitlines():
            pairs: list[str] = []
            for quoted in re.findall(r"--run-config\s+'([^']*)'", line):
                pairs += shlex.split(quoted, posix=False)
            if "fedsqueeze coordinator" in line:
                pairs += re.findall(r"--set\s+(\S+=\S+)", line)
            for pair in pairs:
                key, _, value = pair.partition("=")
                if key != "KEY":  # the placeholder in `--set KEY=VALUE`
                    found.append((path.name, key, value))
    return found


def test_every_run_setting_is_declared_with_its_default() -> None:
    declared = _declared()
    defaults = RunSettings().to_run_config()
    assert sorted(declared) == sorted(defaults)
    for key, value in defaults.items():
        assert declared[key] == value and type(declared[key]) is type(value), key
    assert RunSettings.from_run_config(declared) == RunSettings()
    assert len(defaults) == len(fields(RunSettings))


def test_the_docs_name_keys_a_run_accepts() -> None:
    documented = _documented()
    keys = {key for _, key, _ in documented}
    # What README advises for a second run, and what issue 10 saw refused.
    assert {"resume", "state-dir", "num-rounds"} <= keys
    declared = _declared()
    for name, key, _ in documented:
        assert key in declared, f"{name} sets run-config key {key!r}, not declared"


@pytest.mark.parametrize(("name", "key", "value"), _documented())
def test_documented_values_are_valid(name: str, key: str, value: str) -> None:
    try:  # flwr run reads TOML values; fedsqueeze coordinator --set plain text
        parsed: object = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    RunSettings.from_run_config({key: parsed})
