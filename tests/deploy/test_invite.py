"""The edge command a coordinator prints names every CA an edge needs."""

from __future__ import annotations

from pathlib import Path

from fedsqueeze.deploy.invite import CA_PLACEHOLDER, edge_command
from tests.transport.certs import make_pki


def test_plaintext_needs_no_ca() -> None:
    assert edge_command("127.0.0.1:8000", flower_ca=None, data_plane_cert=None) == (
        "fedsqueeze edge --superlink 127.0.0.1:8000 --partition-id I --num-partitions N"
    )


def test_tls_on_both_planes_names_both_cas(tmp_path: Path) -> None:
    pki, other = make_pki(), make_pki("another CA")
    ca, cert, other_ca = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "other.pem"
    ca.write_bytes(pki.ca)
    cert.write_bytes(pki.server.cert)
    other_ca.write_bytes(other.ca)
    # One CA for both planes (as docs/deployment.md advises): its path, twice.
    same = edge_command("h:8000", flower_ca=ca, data_plane_cert=cert)
    assert same.endswith(f"--flower-ca {ca} --data-plane-ca {ca}")
    # The data plane's CA is not one the coordinator knows: a placeholder, never omitted.
    unknown = edge_command("h:8000", flower_ca=other_ca, data_plane_cert=cert)
    assert unknown.endswith(f"--flower-ca {other_ca} --data-plane-ca {CA_PLACEHOLDER}")
    only_data_plane = edge_command("h:8000", flower_ca=None, data_plane_cert=cert)
    assert "--flower-ca" not in only_data_plane and "--data-plane-ca" in only_data_plane
    # A self-signed data-plane certificate is its own CA.
    assert edge_command("h:8000", flower_ca=None, data_plane_cert=ca).endswith(
        f"--data-plane-ca {ca}"
    )
