"""Fixtures of the transport tests: certificates, models, servers that always stop."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from fedsqueeze.transport import (
    ClientTls,
    InMemoryModelSource,
    ModelSource,
    RetryPolicy,
    ServerTls,
    TokenTable,
    TransferClient,
    TransferServer,
    UpdateSink,
    UpdateStore,
)
from tests.transport.certs import Pki, make_pki

EDGES = ("edge-0", "edge-1", "edge-2")
#: Fast retries, so failure tests take milliseconds of backoff.
FAST_RETRY = RetryPolicy(deadline_s=20.0, initial_backoff_s=0.01, max_backoff_s=0.2)


def make_state(seed: int = 0, scale: int = 1) -> dict[str, torch.Tensor]:
    """A small conv net's worth of tensors (about ``scale`` · 1.2 MB in float32)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(32 * scale, 16, 3, 3, generator=g),
        "conv.bias": torch.randn(32 * scale, generator=g),
        "fc.weight": torch.randn(256 * scale, 1024, generator=g),
        "fc.bias": torch.randn(256 * scale, generator=g),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
    }


def perturb(
    state: dict[str, torch.Tensor], seed: int, amount: float = 0.01
) -> dict[str, torch.Tensor]:
    """``state`` plus small noise on its floating tensors (a "next round" model)."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: (v + amount * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
        for k, v in state.items()
    }


@pytest.fixture(scope="session")
def pki() -> Pki:
    return make_pki()


@pytest.fixture(scope="session")
def tokens() -> tuple[TokenTable, dict[str, str]]:
    return TokenTable.generate(EDGES)


@pytest.fixture
def source() -> InMemoryModelSource:
    return InMemoryModelSource(keep=3)


@pytest.fixture
def store() -> UpdateStore:
    return UpdateStore()


@pytest.fixture
def start_server(
    pki: Pki, tokens: tuple[TokenTable, dict[str, str]]
) -> Iterator[Callable[..., TransferServer]]:
    """Start servers (TLS by default); every one is stopped at the end of the test."""
    started: list[TransferServer] = []

    def start(source: ModelSource, store: UpdateSink, **kwargs: Any) -> TransferServer:
        kwargs.setdefault("tokens", tokens[0])
        if not kwargs.get("plaintext"):
            kwargs.setdefault("tls", ServerTls(pki.server.cert, pki.server.key))
        table = kwargs.pop("tokens")
        server = TransferServer(source, store, table, **kwargs)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop(grace=0)


@pytest.fixture
def connect(
    pki: Pki, tokens: tuple[TokenTable, dict[str, str]]
) -> Iterator[Callable[..., TransferClient]]:
    """Open clients to a server (TLS, edge-0's token by default); all closed at the end."""
    opened: list[TransferClient] = []

    def open_client(server: TransferServer, **kwargs: Any) -> TransferClient:
        kwargs.setdefault("edge_id", EDGES[0])
        if "token" not in kwargs:
            kwargs["token"] = tokens[1][kwargs["edge_id"]]
        kwargs.setdefault("retry", FAST_RETRY)
        if not kwargs.get("plaintext"):
            kwargs.setdefault("tls", ClientTls(root_ca=pki.ca))
        client = TransferClient(server.address, **kwargs)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        client.close()


class FakeTime:
    """A clock that only moves when slept on."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
