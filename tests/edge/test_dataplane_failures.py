"""A failed fetch names its cause, so the coordinator's log says why an edge failed.

The message of the exception the edge's mod raises is what Flower puts in the error
reply (``reason``) and what the coordinator's strategy logs for that node.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.dataplane import GrpcConnector, failure_cause
from fedsqueeze.control import RoundInstruction
from fedsqueeze.errors import TransportError, UnavailableError
from tests.transport.certs import make_pki


def _instruction(port: int, *, tls: bool) -> RoundInstruction:
    return RoundInstruction(
        server_round=1,
        address=f"127.0.0.1:{port}",
        target="ab" * 32,
        down_spec="lossless",
        up_spec="lossless",
        task="digits-mlp",
        init_seed=-1,
        init_digest="",
        token="t",
        tls=tls,
    )


@contextlib.contextmanager
def _tls_listener(cert: Path, key: Path) -> Iterator[int]:
    """A TLS server whose certificate the edge's default trust store does not know."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    context.set_alpn_protocols(["h2"])
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with contextlib.suppress(OSError, ssl.SSLError), conn:
                conn.settimeout(5)
                with context.wrap_socket(conn, server_side=True) as secure:
                    secure.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


@pytest.mark.timeout(120)
def test_an_unverifiable_certificate_is_named_with_a_hint(tmp_path: Path) -> None:
    pki = make_pki()
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(pki.server.cert)
    key.write_bytes(pki.server.key)
    with _tls_listener(cert, key) as port, pytest.raises(UnavailableError) as caught:
        GrpcConnector().fetch(_instruction(port, tls=True), "1", None, None)
    message = str(caught.value)
    assert "\n" not in message
    assert f"fetching the model from the data plane at 127.0.0.1:{port} (TLS) failed" in message
    assert "CERTIFICATE_VERIFY_FAILED" in message.upper()
    assert "--data-plane-ca" in message


@pytest.mark.timeout(120)
def test_a_refused_connection_is_named() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(TransportError) as caught:
        GrpcConnector().fetch(_instruction(port, tls=False), "1", None, None)
    message = str(caught.value)
    assert "(plaintext) failed" in message
    assert "cause:" in message and "refused" in message.lower(), message


def test_the_cause_is_the_deepest_status_message() -> None:
    class Rpc(Exception):
        def details(self) -> str:
            return "failed to connect to all addresses; last error: Connection refused"

    try:
        try:
            raise Rpc()
        except Rpc as rpc:
            raise UnavailableError("Fetch: server unavailable after 6 attempts") from rpc
    except UnavailableError as exc:
        assert failure_cause(exc).endswith("Connection refused")
    assert failure_cause(ValueError("x")) == ""
