"""Checks before anything starts: the commands exit 2 with one line, start nothing.

The command-line cases run the real ``fedsqueeze`` command in a subprocess (with a
marker in its environment, so any process it started would be found) and check: exit
status 2, one line on stderr, no traceback, no Flower process, no SuperLink log.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedsqueeze.deploy.preflight import (
    LinkSecurity,
    check_link_security,
    check_pem_ca,
    parse_address,
    probe_link,
)
from fedsqueeze.errors import ConfigError
from tests.deploy.procs import MARKER_KEY, marked
from tests.subproc import run_module
from tests.transport.certs import make_pki

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.fixture(scope="module")
def pki_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pki = make_pki()
    other = make_pki("another CA")
    root = tmp_path_factory.mktemp("pki")
    files = {
        "ca": (root / "ca.pem", pki.ca),
        "cert": (root / "server.pem", pki.server.cert),
        "key": (root / "server.key", pki.server.key),
        "other_ca": (root / "other-ca.pem", other.ca),
        "not_pem": (root / "not-pem.pem", b"this is not a certificate\n"),
        "garbled": (
            root / "garbled.pem",
            b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
        ),
    }
    for path, data in files.values():
        path.write_bytes(data)
    return {name: path for name, (path, _) in files.items()}


@contextlib.contextmanager
def _listener(tls: tuple[Path, Path] | None) -> Iterator[int]:
    """A loopback server: TLS with (cert, key), else plaintext HTTP-ish (it answers a
    ClientHello with ``400 Bad Request`` and closes, as uvicorn does)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    context = None
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(tls[0]), str(tls[1]))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            with contextlib.suppress(OSError, ssl.SSLError), conn:
                conn.settimeout(5)
                if context is not None:
                    with context.wrap_socket(conn, server_side=True) as secure:
                        secure.recv(1)
                else:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("value", "expected"),
    [("127.0.0.1:8000", ("127.0.0.1", 8000)), ("[::1]:9", ("::1", 9)), ("h:65535", ("h", 65535))],
)
def test_addresses_are_parsed(value: str, expected: tuple[str, int]) -> None:
    assert parse_address(value, "--superlink") == expected


@pytest.mark.parametrize("value", ["127.0.0.1:99999", "127.0.0.1:0", "nohost", ":80", "h:x"])
def test_bad_addresses_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="--superlink"):
        parse_address(value, "--superlink")


def test_ca_files_must_be_pem_certificates(pki_files: dict[str, Path]) -> None:
    check_pem_ca(pki_files["ca"], "--flower-ca")
    with pytest.raises(ConfigError, match="is not a PEM certificate file"):
        check_pem_ca(pki_files["not_pem"], "--flower-ca")
    with pytest.raises(ConfigError, match="not a usable PEM certificate"):
        check_pem_ca(pki_files["garbled"], "--data-plane-ca")
    with pytest.raises(FileNotFoundError):
        check_pem_ca(pki_files["ca"].with_name("missing.pem"), "--flower-ca")


def test_the_probe_tells_tls_from_plaintext(pki_files: dict[str, Path]) -> None:
    with _listener((pki_files["cert"], pki_files["key"])) as port:
        assert probe_link("127.0.0.1", port) is LinkSecurity.TLS
        address = f"127.0.0.1:{port}"
        with pytest.raises(
            ConfigError, match=f"the SuperLink at {address} speaks TLS; pass --flower-ca"
        ):
            check_link_security(address, "127.0.0.1", port, None)
        assert check_link_security(address, "127.0.0.1", port, pki_files["ca"]) is LinkSecurity.TLS
        with pytest.raises(ConfigError, match="does not accept"):
            check_link_security(address, "127.0.0.1", port, pki_files["other_ca"])
    with _listener(None) as port:
        assert probe_link("127.0.0.1", port) is LinkSecurity.PLAINTEXT
        with pytest.raises(ConfigError, match="speaks plaintext"):
            check_link_security(f"127.0.0.1:{port}", "127.0.0.1", port, pki_files["ca"])
        assert check_link_security("x", "127.0.0.1", port, None) is LinkSecurity.PLAINTEXT
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    # Not up yet: no error, the SuperNode keeps dialling.
    assert check_link_security("x", "127.0.0.1", port, None) is LinkSecurity.UNREACHABLE


# -------------------------------------------------------------------- the commands


def _refused(tmp_path: Path, *args: str, match: str) -> None:
    marker = uuid.uuid4().hex
    done = run_module(
        "fedsqueeze", *args, timeout=60, env={MARKER_KEY: marker, "HOME": str(tmp_path)}
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert match in lines[0], lines[0]
    assert marked(marker) == []
    assert not list(tmp_path.rglob("superlink.log")) and not list(tmp_path.rglob("supernode.log"))


def _edge(port: int | str, *extra: str) -> tuple[str, ...]:
    return (
        "edge",
        *("--superlink", f"127.0.0.1:{port}", "--partition-id", "0", "--num-partitions", "1"),
        *extra,
    )


@linux_only
@pytest.mark.timeout(240)
def test_edge_refusals(tmp_path: Path, pki_files: dict[str, Path]) -> None:
    work = ("--work-dir", str(tmp_path / "work"))
    _refused(tmp_path, *_edge("99999", *work), match="port must be in 1..65535")
    _refused(
        tmp_path,
        *_edge(8000, "--flower-ca", str(pki_files["not_pem"]), *work),
        match="--flower-ca",
    )
    _refused(
        tmp_path,
        *_edge(8000, "--data-plane-ca", str(pki_files["not_pem"]), *work),
        match="--data-plane-ca",
    )
    with _listener((pki_files["cert"], pki_files["key"])) as port:
        _refused(tmp_path, *_edge(port, *work), match="speaks TLS; pass --flower-ca")
    assert not (tmp_path / "work").exists()


@linux_only
@pytest.mark.timeout(240)
def test_coordinator_refusals(tmp_path: Path) -> None:
    a_file = tmp_path / "state-file"
    a_file.write_text("not a directory")
    _refused(tmp_path, "coordinator", "--state-dir", str(a_file), match="is not a directory")
    assert a_file.read_text() == "not a directory"
    state = ("--state-dir", str(tmp_path / "state"))
    _refused(tmp_path, "coordinator", *state, "--superlink", "127.0.0.1:99999", match="1..65535")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _refused(
            tmp_path,
            "coordinator",
            *state,
            *("--data-plane-port", str(port)),
            match=f"cannot use 127.0.0.1:{port} for the data plane",
        )
