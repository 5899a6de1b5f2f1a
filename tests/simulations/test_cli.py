"""The simulate and sweep commands' argument handling (no simulation is started)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fedsqueeze.cli import simulate_cmd, sweep_cmd
from fedsqueeze.errors import ConfigError


def _parse(module: object, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)  # type: ignore[attr-defined]
    return parser.parse_args(argv)


def test_config_names_resolve_to_the_shipped_files(tmp_path: Path) -> None:
    assert simulate_cmd.resolve_config_path("default").name == "default.toml"
    own = tmp_path / "mine.toml"
    own.write_text('name = "mine"\n')
    assert simulate_cmd.resolve_config_path(str(own)) == own
    with pytest.raises(ConfigError, match="default, "):
        simulate_cmd.resolve_config_path("nosuch")
    with pytest.raises(ConfigError, match="no config file"):
        simulate_cmd.resolve_config_path(str(tmp_path / "missing.toml"))


def test_flags_reach_the_config(tmp_path: Path) -> None:
    args = _parse(
        sweep_cmd,
        ["--config", "smoke", "--set", "num-rounds=2", "--out", str(tmp_path), "--seeds", "0,2"],
    )
    config = simulate_cmd.load_from_args(args)
    assert config.num_rounds == 2 and config.out_dir() == tmp_path
    assert sweep_cmd._seeds(args.seeds) == [0, 2]
    for bad in ("x", "1,1", ""):
        with pytest.raises(ConfigError):
            sweep_cmd._seeds(bad)


def test_simulate_needs_a_known_arm() -> None:
    args = _parse(simulate_cmd, ["--config", "smoke", "--arm", "nosuch"])
    with pytest.raises(ConfigError, match="no arm 'nosuch'"):
        simulate_cmd.main(args)


def test_help_texts_explain_the_commands() -> None:
    for module in (simulate_cmd, sweep_cmd):
        assert module.__doc__ and "examples:" in module.__doc__


@pytest.mark.parametrize("module", [simulate_cmd, sweep_cmd])
def test_help_names_ray_address(module: object) -> None:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)  # type: ignore[attr-defined]
    assert "RAY_ADDRESS=host:port" in parser.format_help()
