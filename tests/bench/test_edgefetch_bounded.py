"""``fedsqueeze bench bigmodel --dataplane --via-edge``: its flags (the measurement itself
runs in tests/edge/test_edge_bounded.py, at 40M parameters)."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_via_edge_goes_with_dataplane(tmp_path: Path) -> None:
    from fedsqueeze.cli import main

    args = ["bench", "bigmodel", "--via-edge", "--params", "200K", "--specs", "int8"]
    with pytest.raises(SystemExit, match="--via-edge goes with --dataplane"):
        main([*args, "--dir", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_via_edge_is_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    from fedsqueeze.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "bigmodel", "--help"])
    assert "--via-edge" in capsys.readouterr().out
