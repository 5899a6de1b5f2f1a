"""Checks made before any Flower process starts, each failing in one line.

A Flower process handed a bad flag fails late and loudly: a SuperNode given a CA file
that is not PEM prints a traceback and then hangs "running"; one without a CA against
a TLS SuperLink retries forever without a hint. These checks find such mistakes first
and raise :class:`~fedsqueeze.errors.ConfigError`, which the command line turns into
one line and exit status 2.
"""

from __future__ import annotations

import enum
import socket
import ssl
from pathlib import Path

from fedsqueeze.errors import ConfigError

__all__ = ["LinkSecurity", "check_link_security", "check_pem_ca", "parse_address", "probe_link"]

_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


def parse_address(value: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) → ``(host, port)``.

    Raises
    ------
    ConfigError
        If it is not ``HOST:PORT`` or the port is not in 1..65535.
    """
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{flag} must be HOST:PORT, got {value!r}")
    number = int(port)
    if not 1 <= number <= 65535:
        raise ConfigError(f"{flag} {value}: the port must be in 1..65535, got {number}")
    return host, number


def check_pem_ca(path: Path, flag: str) -> None:
    """Raise :class:`ConfigError` unless ``path`` holds PEM CA certificates that load.

    ``FileNotFoundError`` for a missing file (the command line words it in one line).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: no such file: {path}")
    if _PEM_CERT not in path.read_bytes():
        raise ConfigError(
            f"{flag} {path} is not a PEM certificate file (no '-----BEGIN CERTIFICATE-----')"
        )
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        raise ConfigError(f"{flag} {path}: not a usable PEM certificate ({exc.reason})") from exc


class LinkSecurity(enum.Enum):
    """What a probe found listening at an address."""

    UNREACHABLE = "unreachable"
    PLAINTEXT = "plaintext"
    TLS = "tls"


def probe_link(host: str, port: int, *, timeout: float = 5.0) -> LinkSecurity:
    """Whether ``host:port`` answers a TLS handshake (nothing is verified here).

    A plaintext HTTP server (the SuperLink with ``--insecure``) answers a ClientHello
    with an HTTP error or closes the connection: the handshake fails.
    """
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return LinkSecurity.UNREACHABLE
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with context.wrap_socket(raw, server_hostname=host):
            return LinkSecurity.TLS
    except (ssl.SSLError, ConnectionError, TimeoutError):
        return LinkSecurity.PLAINTEXT
    finally:
        raw.close()


def check_link_security(
    address: str, host: str, port: int, ca: Path | None, *, timeout: float = 5.0
) -> LinkSecurity:
    """Probe the SuperLink and refuse a mismatch with the edge's ``--flower-ca``.

    An unreachable SuperLink is no error: the coordinator may start after the edge.

    Raises
    ------
    ConfigError
        TLS without ``ca``, plaintext with ``ca``, or a certificate ``ca`` does not
        verify.
    """
    found = probe_link(host, port, timeout=timeout)
    if found is LinkSecurity.TLS and ca is None:
        raise ConfigError(f"the SuperLink at {address} speaks TLS; pass --flower-ca CA.pem")
    if found is LinkSecurity.PLAINTEXT and ca is not None:
        raise ConfigError(
            f"the SuperLink at {address} speaks plaintext (no TLS); drop --flower-ca, or "
            "start the coordinator with --flower-cert/--flower-key/--flower-ca"
        )
    if found is LinkSecurity.TLS and ca is not None:
        _verify(address, host, port, ca, timeout)
    return found


def _verify(address: str, host: str, port: int, ca: Path, timeout: float) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return
    except ssl.SSLCertVerificationError as exc:
        raise ConfigError(
            f"the SuperLink at {address} presents a certificate --flower-ca {ca} does not "
            f"accept: {exc.verify_message}"
        ) from exc
    except (OSError, ssl.SSLError):
        return  # gone between the two probes: the SuperNode will retry
