"""One client operation (a fetch or an upload): deadline, retries, counters, results.

An :class:`Operation` makes the gRPC calls of one operation through multi-callables whose
serializers count every message (:class:`~fedsqueeze.transport.accounting.WireCounter`),
starts each call with the operation's remaining deadline, and backs off between
``UNAVAILABLE`` attempts (:class:`~fedsqueeze.transport.retry.RetryPolicy`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch

from fedsqueeze.codec import EncodedModel
from fedsqueeze.errors import UnavailableError
from fedsqueeze.transport.accounting import WireBytes, WireCounter, serialize_message
from fedsqueeze.transport.errors_map import details_of, error_from_rpc, status_of
from fedsqueeze.transport.retry import Deadline, RetryPolicy
from fedsqueeze.transport.server import SERVICE_NAME
from fedsqueeze.transport.shaping import LinkShaper
from fedsqueeze.wire.types import Manifest, UpdateReceipt

logger = logging.getLogger(__name__)

_R = TypeVar("_R")


@dataclass(frozen=True)
class TransferStats:
    """What one fetch or upload cost.

    Attributes
    ----------
    wire
        Bytes and messages per direction, counted on the wire (all attempts).
    calls
        RPCs started.
    retries
        Attempts repeated after ``UNAVAILABLE``.
    resumed_segments
        Segments already held when a later call of the same fetch started.
    refetched_segments
        Segments that failed verification and were fetched again.
    elapsed_s
        Wall-clock seconds.
    stream_s
        Wall-clock seconds inside ``Fetch`` and ``StreamSegments`` calls (receiving and
        verifying).
    simulated_s
        Seconds on the emulated link (0 without a link shaper).
    """

    wire: WireBytes
    calls: int
    retries: int
    resumed_segments: int
    refetched_segments: int
    elapsed_s: float
    stream_s: float
    simulated_s: float


@dataclass(frozen=True)
class PrefixUsed:
    """What a client decoded of a truncated progressive fetch.

    Attributes
    ----------
    used_bytes
        Stream bytes that went into the model (header and whole records).
    levels
        The highest level (0: base level) each progressive tensor holds, in the order
        of their base-level records.
    digest
        Digest of the decoded model: what the client holds now.
    """

    used_bytes: int
    levels: tuple[int, ...]
    digest: bytes


@dataclass(frozen=True)
class FetchResult:
    """A fetched model.

    Attributes
    ----------
    manifest
        What was fetched.
    encoded
        The verified encoded model.
    state
        The decoded model (``None`` when fetched with ``decode=False``).
    stats
        What it cost.
    prefix
        For a truncated progressive fetch decoded here, what the prefix gave; else
        ``None``.
    """

    manifest: Manifest
    encoded: EncodedModel
    state: dict[str, torch.Tensor] | None
    stats: TransferStats
    prefix: PrefixUsed | None = None

    @property
    def digest(self) -> bytes:
        """Digest of the decoded model: what the client holds now."""
        return self.prefix.digest if self.prefix is not None else self.manifest.decoded_digest


@dataclass(frozen=True)
class PushResult:
    """An acknowledged upload."""

    receipt: UpdateReceipt
    stats: TransferStats


class Operation:
    """Deadline, retries, counters and call factory of one fetch or upload.

    Parameters
    ----------
    channel
        The client's gRPC channel.
    metadata
        Call metadata (credentials).
    retry
        Deadline and retry policy.
    link
        Link shaper of the connection, if any.
    rng
        Source of backoff jitter.
    """

    def __init__(
        self,
        channel: Any,
        metadata: tuple[tuple[str, str], ...],
        retry: RetryPolicy,
        link: LinkShaper | None,
        rng: random.Random,
    ) -> None:
        self.channel = channel
        self.metadata = metadata
        self.retry = retry
        self.link = link
        self.rng = rng
        self.deadline = Deadline(retry.deadline_s)
        self.counter = WireCounter(link.on_message if link is not None else None)
        self.started = time.perf_counter()
        self.link_start = link.clock.elapsed_s if link is not None else 0.0
        self.calls = self.retries = self.resumed = 0
        self.stream_s = 0.0
        self.failures_in_a_row = 0

    def callable(self, kind: str, method: str, parse: Callable[[bytes], Any]) -> Any:
        """A multi-callable (``kind``: ``unary_unary``, ...) whose messages are counted."""
        factory = getattr(self.channel, kind)
        return factory(
            f"/{SERVICE_NAME}/{method}",
            request_serializer=self.counter.serializer(serialize_message),
            response_deserializer=self.counter.deserializer(parse),
            _registered_method=True,
        )

    def begin_call(self) -> dict[str, Any]:
        """Count a call; its keyword arguments (deadline, metadata)."""
        self.calls += 1
        if self.link is not None:
            self.link.on_call()
        return {"timeout": self.deadline.remaining(), "metadata": self.metadata}

    def unavailable(self, exc: grpc.RpcError, what: str, progressed: bool) -> None:
        """Back off before retrying, or raise when out of attempts."""
        self.failures_in_a_row = 0 if progressed else self.failures_in_a_row + 1
        if self.failures_in_a_row >= self.retry.max_attempts:
            raise UnavailableError(
                f"{what}: server unavailable after {self.failures_in_a_row} attempts"
            ) from exc
        self.retries += 1
        wait = self.retry.backoff_s(max(self.failures_in_a_row, 1), self.rng)
        logger.info("%s: server unavailable (%s), retrying in %.3f s", what, details_of(exc), wait)
        self.deadline.sleep(wait)

    def with_retry(self, what: str, attempt: Callable[[dict[str, Any]], _R]) -> _R:
        """Run ``attempt(call_kwargs)``, retrying on ``UNAVAILABLE``; errors mapped."""
        while True:
            try:
                return attempt(self.begin_call())
            except grpc.RpcError as exc:
                if status_of(exc) is not grpc.StatusCode.UNAVAILABLE:
                    raise error_from_rpc(exc, what) from exc
                self.unavailable(exc, what, progressed=False)

    def stats(self, refetched: int) -> TransferStats:
        """What the operation has cost so far."""
        link = self.link
        return TransferStats(
            wire=self.counter.snapshot(),
            calls=self.calls,
            retries=self.retries,
            resumed_segments=self.resumed,
            refetched_segments=refetched,
            elapsed_s=time.perf_counter() - self.started,
            stream_s=self.stream_s,
            simulated_s=(link.clock.elapsed_s - self.link_start) if link is not None else 0.0,
        )
