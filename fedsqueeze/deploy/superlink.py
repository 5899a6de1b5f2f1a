"""Starting a Flower SuperLink: the coordinator side of the Deployment Engine.

Measured with flwr 1.42 here: one ``flower-superlink`` process serves the Fleet API
(SuperNodes connect to it), the Control API (``flwr run``, ``flwr ls``) and the Runtime
API (its own ServerApp processes) over **one HTTP port**, 8000 by default (``--host`` /
``--port``). It starts a ``flower-superexec`` in a new session, which starts a
``flwr-serverapp`` process per run; with ``--insecure`` everything is plaintext, with
``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile`` all three APIs use TLS.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedsqueeze.deploy.federation import flower_tool
from fedsqueeze.deploy.processes import (
    ManagedProcess,
    Output,
    ProcessSpec,
    Supervisor,
    check_port_free,
    wait_for_port,
)

log = logging.getLogger(__name__)

#: Flower 1.42's SuperLink port (Fleet, Control and Runtime API on one HTTP server).
DEFAULT_SUPERLINK_PORT = 8000


@dataclass(frozen=True)
class FlowerTls:
    """Certificates for Flower's own connections (SuperNodes and ``flwr`` to the SuperLink).

    Attributes
    ----------
    certfile, keyfile
        The SuperLink's PEM certificate (its SANs must name the address edges dial, and
        ``127.0.0.1``, which its own helper processes dial) and private key.
    ca_certfile
        The PEM CA certificate that signed it; edges need a copy.
    """

    certfile: Path
    keyfile: Path
    ca_certfile: Path

    def missing(self) -> list[Path]:
        """The files that do not exist."""
        return [p for p in (self.certfile, self.keyfile, self.ca_certfile) if not p.is_file()]


@dataclass(frozen=True)
class SuperLinkOptions:
    """Where a SuperLink listens and how.

    Attributes
    ----------
    host
        Interface to listen on: ``127.0.0.1`` for one machine, ``0.0.0.0`` (all) or an
        interface address for edges on other machines.
    port
        Its one port (Fleet, Control and Runtime API).
    tls
        ``None`` for plaintext.
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_SUPERLINK_PORT
    tls: FlowerTls | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be in 1..65535, got {self.port}")

    @property
    def local_host(self) -> str:
        """The host to dial from this machine (``0.0.0.0`` and ``::`` are not dialable)."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)

    @property
    def local_address(self) -> str:
        """``host:port`` to dial from this machine (IPv6 hosts in brackets)."""
        host = self.local_host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def superlink_spec(
    options: SuperLinkOptions, env: Mapping[str, str], log_file: Path
) -> ProcessSpec:
    """The ``flower-superlink`` command for ``options``, logging to ``log_file``."""
    argv = [flower_tool("flower-superlink"), "--host", options.host, "--port", str(options.port)]
    if options.tls is None:
        argv.append("--insecure")
    else:
        argv += [
            "--ssl-certfile",
            str(options.tls.certfile),
            "--ssl-keyfile",
            str(options.tls.keyfile),
            "--ssl-ca-certfile",
            str(options.tls.ca_certfile),
        ]
    # Subprocess isolation: the SuperLink starts the ServerApp itself, with this Python.
    argv += ["--isolation", "subprocess", "--disable-runtime-dependency-installation"]
    return ProcessSpec("superlink", tuple(argv), env, Output.FILE, log_file)


def start_superlink(
    supervisor: Supervisor,
    options: SuperLinkOptions,
    env: Mapping[str, str],
    log_file: Path,
    *,
    timeout: float = 60.0,
) -> ManagedProcess:
    """Start a SuperLink and wait until its port accepts connections.

    Raises
    ------
    ProcessError
        If its port is taken, or it exits first (a bad certificate), or it is not up in
        ``timeout``.
    """
    bind = {"": "0.0.0.0"}.get(options.host, options.host)
    check_port_free(bind, options.port, "the SuperLink (is another one running?)")
    process = supervisor.start(superlink_spec(options, env, log_file))
    wait_for_port(options.local_host, options.port, timeout=timeout, process=process)
    log.info("SuperLink listening on %s:%d", options.host, options.port)
    return process
