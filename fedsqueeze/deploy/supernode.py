"""Starting a Flower SuperNode: one edge of the Deployment Engine.

Measured with flwr 1.42 here: ``flower-supernode --superlink HOST:PORT`` dials the
SuperLink's Fleet API (it only dials out, and retries until the SuperLink is up) and
serves a Runtime API on ``127.0.0.1:9094`` by default (``--host`` / ``--port``) for its
own ``flower-superexec``, which starts a ``flwr-clientapp`` process per message. Two
SuperNodes on one machine need two Runtime API ports. ``--node-config`` carries the
edge's partition to the ClientApp (``context.node_config``).
"""

from __future__ import annotations

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

#: Node-config key of the directory where an edge keeps its held model and residual
#: (``CACHE_DIR_KEY`` in edge/mod.py).
CACHE_DIR_KEY = "fedsqueeze-cache-dir"
#: Node-config key bounding the edge's part store, in bytes (``PART_CACHE_BYTES_KEY``).
PART_CACHE_BYTES_KEY = "fedsqueeze-part-cache-bytes"
#: Flower 1.42's default Runtime API port of a SuperNode.
DEFAULT_RUNTIME_PORT = 9094
RUNTIME_HOST = "127.0.0.1"


@dataclass(frozen=True)
class SuperNodeOptions:
    """One edge's SuperNode.

    Attributes
    ----------
    superlink
        ``host:port`` of the SuperLink.
    partition_id, num_partitions
        This edge's share of the task's data: partition ``partition_id`` of
        ``num_partitions``.
    runtime_port
        Local port of the SuperNode's Runtime API (on ``127.0.0.1``).
    root_certificates
        PEM CA certificate of a TLS SuperLink; ``None`` for a plaintext one.
    cache_dir
        Where the edge keeps the model it holds and its error-feedback residual between
        rounds; ``None``: in Flower's per-run context (lost when the SuperNode stops).
    part_cache_bytes
        Bound of the part store under ``cache_dir`` (versions held lately, by content);
        ``None``: the edge's default (512 MiB).
    """

    superlink: str
    partition_id: int
    num_partitions: int
    runtime_port: int = DEFAULT_RUNTIME_PORT
    root_certificates: Path | None = None
    cache_dir: Path | None = None
    part_cache_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {self.num_partitions}")
        if not 0 <= self.partition_id < self.num_partitions:
            raise ValueError(
                f"partition_id must be in 0..{self.num_partitions - 1}, got {self.partition_id}"
            )
        if not 1 <= self.runtime_port <= 65535:
            raise ValueError(f"runtime_port must be in 1..65535, got {self.runtime_port}")
        host, sep, port = self.superlink.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"superlink must be HOST:PORT (port 1..65535), got {self.superlink!r}")
        if self.cache_dir is not None and '"' in str(self.cache_dir):
            raise ValueError(f"cache_dir must not contain '\"': {self.cache_dir}")
        if self.part_cache_bytes is not None and self.part_cache_bytes < 1:
            raise ValueError(f"part_cache_bytes must be >= 1, got {self.part_cache_bytes}")

    @property
    def node_config(self) -> str:
        """The ``--node-config`` value (TOML values separated by spaces)."""
        config = f"partition-id={self.partition_id} num-partitions={self.num_partitions}"
        if self.cache_dir is not None:
            config += f' {CACHE_DIR_KEY}="{self.cache_dir}"'
        if self.part_cache_bytes is not None:
            config += f" {PART_CACHE_BYTES_KEY}={self.part_cache_bytes}"
        return config


def supernode_spec(
    options: SuperNodeOptions,
    env: Mapping[str, str],
    *,
    output: Output = Output.INHERIT,
    log_file: Path | None = None,
) -> ProcessSpec:
    """The ``flower-supernode`` command for ``options``."""
    argv = [flower_tool("flower-supernode"), "--superlink", options.superlink]
    if options.root_certificates is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(options.root_certificates)]
    argv += [
        "--node-config",
        options.node_config,
        "--host",
        RUNTIME_HOST,
        "--port",
        str(options.runtime_port),
        "--isolation",
        "subprocess",
    ]
    name = f"supernode {options.partition_id}/{options.num_partitions}"
    return ProcessSpec(name, tuple(argv), env, output, log_file)


def start_supernode(
    supervisor: Supervisor,
    options: SuperNodeOptions,
    env: Mapping[str, str],
    *,
    output: Output = Output.INHERIT,
    log_file: Path | None = None,
    timeout: float = 60.0,
) -> ManagedProcess:
    """Start a SuperNode and wait until its Runtime API is up.

    It keeps dialling the SuperLink on its own; this returns once it runs, not once it
    is connected.

    Raises
    ------
    ProcessError
        If its port is taken, or it exits first (a bad flag), or it is not up in
        ``timeout``.
    """
    check_port_free(RUNTIME_HOST, options.runtime_port, "the SuperNode's Runtime API")
    process = supervisor.start(supernode_spec(options, env, output=output, log_file=log_file))
    wait_for_port(RUNTIME_HOST, options.runtime_port, timeout=timeout, process=process)
    return process
