"""``fedsqueeze demo`` runs end to end (quick schedule, about 10-20 s)."""

from __future__ import annotations

import argparse

import pytest

from fedsqueeze.cli import demo_cmd


@pytest.mark.slow
def test_demo_main_prints_the_tables(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    demo_cmd.add_arguments(parser)
    assert demo_cmd.main(parser.parse_args(["--seed", "1"])) == 0
    out = capsys.readouterr().out
    for text in ("Where the bytes went", "fc1.weight", "smaller", "Total"):
        assert text in out


def test_demo_help_explains_itself() -> None:
    parser = argparse.ArgumentParser(description=demo_cmd.__doc__)
    demo_cmd.add_arguments(parser)
    text = parser.format_help()
    assert "--full" in text and "Deep Compression" in text


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--seed", "-1"], ["--seed", "x"]])
def test_demo_rejects_bad_flags(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    demo_cmd.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
