"""The files fedsqueeze writes for Flower, read back with Flower's own readers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from flwr.cli.config_utils import load_and_validate
from flwr.cli.flower_config import read_superlink_connection
from flwr.common.config import fuse_dicts, parse_config_args

from fedsqueeze.deploy.federation import (
    CONNECTION_NAME,
    LinkConnection,
    flower_env,
    flower_tool,
    toml_value,
    write_app,
    write_flower_config,
    write_run_config,
)
from fedsqueeze.errors import ConfigError
from fedsqueeze.runconfig import RunSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_the_connection_is_what_flwr_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    write_flower_config(tmp_path, LinkConnection("127.0.0.1:18000"))
    plain = read_superlink_connection()  # the default connection
    assert plain.name == CONNECTION_NAME
    assert plain.address == "127.0.0.1:18000"
    assert plain.insecure is True

    ca = tmp_path / "ca.pem"
    write_flower_config(tmp_path, LinkConnection("link.example.org:8000", ca))
    secure = read_superlink_connection(CONNECTION_NAME)
    assert secure.address == "link.example.org:8000"
    assert secure.root_certificates == str(ca)
    assert secure.insecure is False


def test_the_app_is_valid_and_imports_the_installed_apps(tmp_path: Path) -> None:
    defaults = RunSettings().to_run_config()
    app = write_app(tmp_path / "app", defaults)
    assert [p.name for p in app.iterdir()] == ["pyproject.toml"]  # no code shipped
    # check_module=True: coordinator.app and edge.app resolve from the installed package
    config, _ = load_and_validate(app / "pyproject.toml", check_module=True)
    components = config["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "coordinator.app:app", "clientapp": "edge.app:app"}
    assert config["tool"]["flwr"]["app"]["config"] == defaults


def test_every_setting_can_be_overridden_through_the_run_config_file(tmp_path: Path) -> None:
    defaults = RunSettings().to_run_config()
    app = write_app(tmp_path / "app", defaults)
    config, _ = load_and_validate(app / "pyproject.toml", check_module=False)
    settings = RunSettings(
        num_rounds=7,
        state_dir=str(tmp_path / 'odd "state" dir ü'),
        tls_cert="C:\\certs\\a b.pem",
        resume=True,
        lr=0.125,
    )
    path = write_run_config(tmp_path / "run-config.toml", settings.to_run_config())
    overrides = parse_config_args([str(path)])  # what `flwr run --run-config FILE` does
    fused = fuse_dicts(config["tool"]["flwr"]["app"]["config"], overrides)  # checks keys
    assert RunSettings.from_run_config(fused) == settings


@pytest.mark.parametrize(
    "value", ["plain", 'quote " and \\ backslash', "tab\tnewline\n", "ünïcode ✓", "", "'"]
)
def test_strings_survive_toml(value: str) -> None:
    assert tomllib.loads(f"x = {toml_value(value)}")["x"] == value


@pytest.mark.parametrize("value", [True, False, 0, -3, 2**40, 0.5, 1.0, 1e-12, float("inf")])
def test_numbers_and_booleans_survive_toml(value: bool | int | float) -> None:
    loaded = tomllib.loads(f"x = {toml_value(value)}")["x"]
    assert loaded == value and type(loaded) is type(value)


def test_toml_value_refuses_other_types() -> None:
    with pytest.raises(TypeError):
        toml_value([1, 2])  # type: ignore[arg-type]


def test_flower_env_is_private_and_offline(tmp_path: Path) -> None:
    env = flower_env(tmp_path / "home", {"OMP_NUM_THREADS": "1"}, base={"PATH": "/usr/bin"})
    assert env["FLWR_HOME"] == str(tmp_path / "home")
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["OMP_NUM_THREADS"] == "1"
    first = env["PATH"].split(os.pathsep)[0]
    assert first == str(Path(sys.executable).parent)  # Flower starts helpers by name
    assert env["PATH"].endswith("/usr/bin")


def test_flower_tools_come_from_this_python() -> None:
    for name in ("flwr", "flower-superlink", "flower-supernode"):
        assert Path(flower_tool(name)).name == name
    with pytest.raises(ConfigError, match="not found"):
        flower_tool("flower-nonexistent-tool")
