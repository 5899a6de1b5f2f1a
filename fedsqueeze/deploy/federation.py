"""Flower's files for one deployment, kept out of the user's home directory.

Flower 1.42 keeps its SuperLink connections ("federations") in
``$FLWR_HOME/config.toml`` and unpacks each run's app under ``$FLWR_HOME/apps``. Every
process fedsqueeze starts gets a private ``FLWR_HOME`` (under the coordinator's state
directory, or an edge's work directory), so ``~/.flwr`` is never read or written.

The Flower app that ``flwr run`` ships is generated too: a ``pyproject.toml`` whose
components are ``coordinator.app:app`` and ``edge.app:app`` and whose run config holds
every :class:`~fedsqueeze.runconfig.RunSettings` key. It contains no Python file, so the
ServerApp and ClientApp processes import fedsqueeze from the installed package: the same
code on every machine, whatever directory the command was started from.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedsqueeze import __version__
from fedsqueeze.errors import ConfigError

#: The name of the SuperLink connection fedsqueeze writes (``flwr run APP fedsqueeze``).
CONNECTION_NAME = "fedsqueeze"
#: The Flower app's name inside the FAB (``fedsqueeze/fedsqueeze-run``).
APP_NAME = "fedsqueeze-run"
SERVER_APP = "coordinator.app:app"
CLIENT_APP = "edge.app:app"

RunConfigValue = str | int | float | bool


@dataclass(frozen=True)
class LinkConnection:
    """How the ``flwr`` command reaches a SuperLink's Control API.

    Attributes
    ----------
    address
        ``host:port`` of the SuperLink.
    root_certificates
        PEM file of the CA that signed the SuperLink's certificate; ``None`` for a
        plaintext (``--insecure``) SuperLink.
    """

    address: str
    root_certificates: Path | None = None


def write_flower_config(home: Path, connection: LinkConnection) -> Path:
    """Write ``home/config.toml`` with one default connection, :data:`CONNECTION_NAME`.

    Returns the file's path.
    """
    lines = [
        "# Written by fedsqueeze: the SuperLink this deployment's `flwr` commands use.",
        "[superlink]",
        f"default = {toml_value(CONNECTION_NAME)}",
        "",
        f"[superlink.{CONNECTION_NAME}]",
        f"address = {toml_value(connection.address)}",
    ]
    if connection.root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {toml_value(str(connection.root_certificates))}")
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    _write(path, "\n".join(lines) + "\n")
    return path


def write_app(
    directory: Path,
    defaults: Mapping[str, RunConfigValue],
    *,
    name: str = APP_NAME,
    server_app: str = SERVER_APP,
    client_app: str = CLIENT_APP,
) -> Path:
    """Write the Flower app ``flwr run`` ships: one ``pyproject.toml``.

    Parameters
    ----------
    directory
        Where to write it (created if missing).
    defaults
        The app's run config (``[tool.flwr.app.config]``). Flower accepts run-config
        overrides only for keys present here, so give every key.
    name, server_app, client_app
        The app's name and its components (``module:attribute``, imported from the
        installed packages); by default fedsqueeze's coordinator and edge.

    Returns
    -------
    Path
        ``directory``.
    """
    lines = [
        "# Written by fedsqueeze: the Flower app behind `fedsqueeze coordinator`.",
        "# It holds no code: both apps are imported from the installed fedsqueeze.",
        "[build-system]",
        'requires = ["setuptools>=68"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        f"name = {toml_value(name)}",
        f"version = {toml_value(_plain_version(__version__))}",
        'description = "fedsqueeze: compressed federated learning on Flower"',
        'license = "Apache-2.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "fedsqueeze"',
        "",
        "[tool.flwr.app.components]",
        f"serverapp = {toml_value(server_app)}",
        f"clientapp = {toml_value(client_app)}",
        "",
        "[tool.flwr.app.config]",
        *(f"{key} = {toml_value(value)}" for key, value in defaults.items()),
    ]
    directory.mkdir(parents=True, exist_ok=True)
    _write(directory / "pyproject.toml", "\n".join(lines) + "\n")
    return directory


def write_run_config(path: Path, values: Mapping[str, RunConfigValue]) -> Path:
    """Write run-config overrides as a flat TOML file (``flwr run --run-config FILE``).

    A file, unlike ``key=value`` arguments, carries any string (quotes, spaces) intact.
    """
    body = "".join(f"{key} = {toml_value(value)}\n" for key, value in values.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, "# Written by fedsqueeze: this run's settings.\n" + body)
    return path


def toml_value(value: RunConfigValue) -> str:
    """``value`` as a TOML literal (strings as basic strings, JSON escapes are TOML's)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    raise TypeError(f"not a run-config value: {value!r}")


def flower_env(
    home: Path, extra: Mapping[str, str] | None = None, *, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a Flower process.

    ``base`` (default: this process's environment) with ``FLWR_HOME=home``, runtime
    dependency installation off (it would ``uv sync`` each app into a fresh environment,
    downloading PyTorch), no update check (no traffic beyond the federation), unbuffered
    Python output, the directory of this Python first on ``PATH`` (Flower starts its
    helpers by name) and ``extra``.
    """
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if path.split(os.pathsep)[0] != bindir:
        env["PATH"] = os.pathsep.join(p for p in (bindir, path) if p)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def flower_tool(name: str) -> str:
    """The path of a Flower executable (``flower-superlink``, ``flwr``), this Python's first.

    Raises
    ------
    ConfigError
        If it is not installed.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"{name} not found: install Flower (pip install 'flwr==1.42.*')")
    return found


def _plain_version(version: str) -> str:
    # Flower wants N.N.N; drop local or pre-release parts ("0.1.0.dev1+g123").
    parts = version.split("+")[0].split(".")
    digits = [p for p in parts[:3] if p.isdigit()]
    return ".".join(digits + ["0"] * (3 - len(digits)))


def _write(path: Path, text: str) -> None:
    # Replace, never truncate in place: a Flower process may be reading the old file.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
