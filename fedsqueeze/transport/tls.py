"""TLS settings of the data plane: server certificate, optional mutual TLS.

Plaintext is only for loopback experiments and must be asked for explicitly
(``plaintext=True`` on the server and the client); :func:`check_plaintext_host` refuses
it for any address other than loopback.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc

_LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})


@dataclass(frozen=True)
class ServerTls:
    """The server's TLS identity, and the CA of client certificates for mutual TLS.

    Parameters
    ----------
    cert_chain
        PEM certificate chain of the server.
    private_key
        PEM private key of the server.
    client_ca
        PEM CA certificates that client certificates must chain to; when given, clients
        without a valid certificate are refused at the TLS handshake (mutual TLS).
    """

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    @classmethod
    def from_files(
        cls, cert_chain: Path, private_key: Path, client_ca: Path | None = None
    ) -> ServerTls:
        """Read the PEM files."""
        return cls(
            cert_chain.read_bytes(),
            private_key.read_bytes(),
            client_ca.read_bytes() if client_ca is not None else None,
        )

    def credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials for these settings."""
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


@dataclass(frozen=True)
class ClientTls:
    """What a client trusts and, for mutual TLS, how it proves itself.

    Parameters
    ----------
    root_ca
        PEM CA certificates the server's certificate must chain to (``None``: the
        system's roots).
    cert_chain, private_key
        PEM client certificate and key for mutual TLS, or both ``None``.
    server_name
        Name to verify the server certificate against when it differs from the host
        dialled (``grpc.ssl_target_name_override``).
    """

    root_ca: bytes | None = None
    cert_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_chain is None) != (self.private_key is None):
            raise ValueError("give both cert_chain and private_key for mutual TLS, or neither")

    @classmethod
    def from_files(
        cls,
        root_ca: Path | None = None,
        cert_chain: Path | None = None,
        private_key: Path | None = None,
        server_name: str | None = None,
    ) -> ClientTls:
        """Read the PEM files."""
        return cls(
            root_ca.read_bytes() if root_ca is not None else None,
            cert_chain.read_bytes() if cert_chain is not None else None,
            private_key.read_bytes() if private_key is not None else None,
            server_name,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials for these settings."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_ca,
            private_key=self.private_key,
            certificate_chain=self.cert_chain,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        """Extra channel options (the target name override, when set)."""
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP literal, brackets allowed) is a loopback address."""
    bare = host.strip("[]")
    if bare.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


def split_host_port(target: str) -> tuple[str, int]:
    """``("127.0.0.1", 5000)`` from ``"127.0.0.1:5000"`` (``"[::1]:5000"`` for IPv6)."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {target!r}")
    return host, int(port)


def check_plaintext_host(host: str) -> None:
    """Raise ``ValueError`` unless plaintext on ``host`` stays on this machine."""
    if not is_loopback(host):
        raise ValueError(
            f"plaintext is only allowed on loopback addresses, not {host!r}: configure TLS"
        )
