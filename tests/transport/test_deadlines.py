"""Deadlines, retries with backoff on UNAVAILABLE, and the error mapping."""

from __future__ import annotations

import random
import socket
import time

import grpc
import pytest

from fedsqueeze.codec import CodecSpec
from fedsqueeze.errors import (
    AuthError,
    BaseMismatchError,
    DeadlineExceededError,
    FormatError,
    IntegrityError,
    InvalidRequestError,
    LimitExceededError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    ResourceExhaustedError,
    TransportError,
    UnavailableError,
)
from fedsqueeze.transport import FaultInjector, RetryPolicy, TransferClient
from fedsqueeze.transport.errors_map import error_from_rpc, status_for
from fedsqueeze.transport.retry import Deadline
from tests.transport.conftest import make_state

pytestmark = pytest.mark.timeout(60)


def test_expired_deadline_on_a_stalled_stream(source, store, start_server, connect):
    source.publish(make_state(0, scale=2))
    faults = FaultInjector()
    faults.pause_streams_after(1)
    server = start_server(source, store, faults=faults)
    client = connect(server, retry=RetryPolicy(deadline_s=0.5))
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError, match="DEADLINE_EXCEEDED") as info:
        client.fetch(spec=CodecSpec())
    assert 0.4 < time.monotonic() - started < 5
    assert isinstance(info.value.__cause__, grpc.RpcError)
    faults.release.set()


def test_unreachable_server_is_retried_then_unavailable():
    with socket.socket() as sock:  # a loopback port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.02)
    client = TransferClient(
        f"127.0.0.1:{port}", edge_id="edge-0", token="t" * 20, plaintext=True, retry=policy
    )
    with client, pytest.raises(UnavailableError, match="after 4 attempts") as info:
        client.fetch(spec=CodecSpec())
    assert isinstance(info.value.__cause__, grpc.RpcError)


def test_deadline_bounds_the_retries():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    policy = RetryPolicy(deadline_s=0.3, max_attempts=1000, initial_backoff_s=0.05)
    client = TransferClient(
        f"127.0.0.1:{port}", edge_id="edge-0", token="t" * 20, plaintext=True, retry=policy
    )
    started = time.monotonic()
    with client, pytest.raises(UnavailableError):
        client.fetch(spec=CodecSpec())
    assert time.monotonic() - started < 3


def test_backoff_grows_exponentially_with_jitter():
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0, jitter=0.5)
    rng = random.Random(0)
    for retry, base in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        waits = [policy.backoff_s(retry, rng) for _ in range(50)]
        assert all(base * 0.5 <= w <= base for w in waits)
        assert len(set(waits)) > 1
    assert RetryPolicy(jitter=0.0).backoff_s(2, rng) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        policy.backoff_s(0, rng)


def test_deadline_object():
    deadline = Deadline(0.05)
    assert 0 < deadline.remaining() <= 0.05
    with pytest.raises(UnavailableError):
        deadline.sleep(1.0)
    with pytest.raises(UnavailableError):
        deadline.remaining()


class _FakeRpcError(grpc.RpcError):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "details"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidRequestError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (FormatError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (LimitExceededError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (BaseMismatchError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (NotFoundError("x"), grpc.StatusCode.NOT_FOUND),
        (PreconditionError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (AuthError("x"), grpc.StatusCode.UNAUTHENTICATED),
        (PermissionDeniedError("x"), grpc.StatusCode.PERMISSION_DENIED),
        (IntegrityError("x"), grpc.StatusCode.DATA_LOSS),
        (ResourceExhaustedError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (UnavailableError("x"), grpc.StatusCode.UNAVAILABLE),
        (TransportError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_errors_map_to_status_codes_and_back(error, code):
    assert status_for(error) is code
    back = error_from_rpc(_FakeRpcError(code), "Call")
    if code is not grpc.StatusCode.INTERNAL:
        # Codec errors come back as the transport error of the same status.
        assert status_for(back) is code
    assert "Call failed" in str(back)


def test_unmapped_status_is_a_plain_transport_error():
    back = error_from_rpc(_FakeRpcError(grpc.StatusCode.CANCELLED), "Call")
    assert type(back) is TransportError
    assert isinstance(
        error_from_rpc(_FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED), "C"), UnavailableError
    )
