"""The ``fedsqueeze edge`` command a coordinator prints: complete, TLS flags included.

An edge started from an incomplete command fails every round (a TLS data plane it
cannot verify), so the printed command names every CA an edge needs: ``--flower-ca``
when the SuperLink runs TLS, ``--data-plane-ca`` when the data plane does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509

__all__ = ["data_plane_ca", "edge_command"]

#: Stands for a file the coordinator cannot name.
CA_PLACEHOLDER = "DATA-PLANE-CA.pem"


def edge_command(superlink: str, *, flower_ca: Path | None, data_plane_cert: Path | None) -> str:
    """``fedsqueeze edge --superlink ... [--flower-ca F] [--data-plane-ca F]``.

    Parameters
    ----------
    superlink
        The address edges dial.
    flower_ca
        The CA of the SuperLink's certificate, ``None`` for a plaintext SuperLink.
    data_plane_cert
        The data plane's certificate, ``None`` for a plaintext data plane.
    """
    words = [
        "fedsqueeze edge",
        f"--superlink {superlink}",
        "--partition-id I --num-partitions N",
    ]
    if flower_ca is not None:
        words.append(f"--flower-ca {flower_ca}")
    if data_plane_cert is not None:
        words.append(f"--data-plane-ca {data_plane_ca(data_plane_cert, flower_ca)}")
    return " ".join(words)


def data_plane_ca(cert: Path, candidate: Path | None) -> str:
    """The CA file an edge needs for the data plane's certificate ``cert``.

    ``candidate`` (the Flower CA) when it signed ``cert`` (one CA for both planes, as
    docs/deployment.md advises); ``cert`` itself when it is self-signed; else
    :data:`CA_PLACEHOLDER` (the coordinator was not told that CA).
    """
    try:
        from cryptography import x509  # deferred: only a TLS deployment needs it

        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
        if candidate is not None and _signed_by(leaf, candidate):
            return str(candidate)
        if leaf.issuer == leaf.subject and _signed_by(leaf, cert):
            return str(cert)
    except (OSError, ValueError):
        pass
    return CA_PLACEHOLDER


def _signed_by(leaf: x509.Certificate, ca_file: Path) -> bool:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    try:
        ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
        leaf.verify_directly_issued_by(ca)
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    return True
