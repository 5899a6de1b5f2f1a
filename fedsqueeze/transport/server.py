"""The ``fedsqueeze.v1.ModelTransfer`` gRPC server.

::

    source = InMemoryModelSource()
    source.publish(model.state_dict())
    tokens, handed_out = TokenTable.generate(["edge-0", "edge-1"])
    with TransferServer(source, UpdateStore(), tokens, tls=ServerTls(cert, key)) as server:
        ...  # clients dial f"127.0.0.1:{server.port}"

TLS is required unless ``plaintext=True`` is passed, which is refused for anything but a
loopback address. Message-size limits are set explicitly on both sides:
:data:`SEGMENT_BYTES` payloads in messages of at most :data:`MAX_MESSAGE_BYTES`.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc

from fedsqueeze.transport.accounting import WireBytes, WireCounter, serialize_message
from fedsqueeze.transport.auth import TokenTable
from fedsqueeze.transport.cache import CacheStats, EncodeCache
from fedsqueeze.transport.faults import FaultInjector
from fedsqueeze.transport.service import ServiceLimits, TransferService
from fedsqueeze.transport.source import ModelSource
from fedsqueeze.transport.spool import SpoolDir, SpoolPolicy
from fedsqueeze.transport.tls import ServerTls, check_plaintext_host
from fedsqueeze.transport.updates import UpdateSink
from fedsqueeze.wire import transfer_pb2 as pb

logger = logging.getLogger(__name__)

#: Segment payload size, in bytes (the loopback sweet spot measured for gRPC).
SEGMENT_BYTES = 1 << 20
#: Largest message either side sends or accepts, in bytes: a segment plus headroom.
MAX_MESSAGE_BYTES = 4 << 20
#: Full name of the service.
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["ModelTransfer"].full_name


def message_size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """The channel/server options that set both message-size limits."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def _already_serialized(message: bytes) -> bytes:
    return message


@dataclass(frozen=True)
class ServerConfig:
    """How the server listens and what it keeps.

    Parameters
    ----------
    host, port
        Address to bind; port 0 picks a free port (read it from
        :attr:`TransferServer.port`).
    max_workers
        Threads serving calls; each streaming call holds one while it runs.
    segment_bytes
        Segment payload size, in bytes.
    max_message_bytes
        Message-size limit in both directions, in bytes.
    max_update_bytes
        Largest upload accepted, in bytes.
    cache_entries, cache_bytes
        Bounds of the encoded-model cache (``cache_bytes``: in memory).
    cache_spool_bytes
        Most bytes of spooled encodings kept on disk.
    verify_updates
        Decode uploads in full before storing them.
    spool
        When and where a large model is prepared on disk instead of in memory
        (:mod:`fedsqueeze.transport.spool`; ``None``: always in memory). The server
        keeps its spool files in a folder of its own there, deleted when it stops.
    """

    host: str = "127.0.0.1"
    port: int = 0
    max_workers: int = 32
    segment_bytes: int = SEGMENT_BYTES
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_update_bytes: int = 512 << 20
    cache_entries: int = 16
    cache_bytes: int = 1 << 30
    cache_spool_bytes: int = 32 << 30
    verify_updates: bool = True
    spool: SpoolPolicy | None = field(default_factory=SpoolPolicy)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        if self.max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        if not 64 <= self.segment_bytes <= self.max_message_bytes - 64 * 1024:
            raise ValueError("segment_bytes must leave at least 64 KiB of message headroom")


@dataclass(frozen=True)
class ServerStats:
    """What the server has done so far."""

    cache: CacheStats
    wire: WireBytes


class TransferServer:
    """Serves models from a :class:`ModelSource` and stores uploads in an :class:`UpdateSink`.

    Parameters
    ----------
    source
        The models to serve.
    updates
        Where verified uploads go.
    tokens
        The edges' bearer tokens.
    config
        Address, limits, cache size.
    tls
        Server certificate (and client CA for mutual TLS).
    plaintext
        Serve without TLS; only allowed on loopback, and only when ``tls`` is None.
    faults
        Faults to inject (tests and experiments).
    """

    def __init__(
        self,
        source: ModelSource,
        updates: UpdateSink,
        tokens: TokenTable,
        *,
        config: ServerConfig | None = None,
        tls: ServerTls | None = None,
        plaintext: bool = False,
        faults: FaultInjector | None = None,
    ) -> None:
        self.config = config or ServerConfig()
        if tls is None and not plaintext:
            raise ValueError("give TLS settings, or plaintext=True for a loopback experiment")
        if tls is not None and plaintext:
            raise ValueError("give either TLS settings or plaintext=True, not both")
        if plaintext:
            check_plaintext_host(self.config.host)
        self._tls = tls
        self.faults = faults
        self.spool: SpoolDir | None = None
        # Only a source that can encode into a store spools (the in-memory one and the
        # coordinator's): a folder it cannot write to fails here, not on the first large
        # fetch.
        if self.config.spool is not None and hasattr(source, "encode_to"):
            self.config.spool.check()
            self.spool = SpoolDir(self.config.spool)
        self.cache = EncodeCache(
            self.config.cache_entries, self.config.cache_bytes, self.config.cache_spool_bytes
        )
        self.wire = WireCounter()
        limits = ServiceLimits(
            segment_bytes=self.config.segment_bytes,
            max_update_bytes=self.config.max_update_bytes,
            verify_updates=self.config.verify_updates,
        )
        self.service = TransferService(
            source, updates, tokens, self.cache, limits, faults, self.spool
        )
        self._server: Any = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` to dial (after :meth:`start`)."""
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def _handlers(self) -> dict[str, Any]:
        count = self.wire
        return {
            "Fetch": grpc.unary_stream_rpc_method_handler(
                self.service.fetch,
                request_deserializer=count.deserializer(pb.FetchRequest.FromString),
                response_serializer=count.serializer(_already_serialized),
            ),
            "GetManifest": grpc.unary_unary_rpc_method_handler(
                self.service.get_manifest,
                request_deserializer=count.deserializer(pb.GetManifestRequest.FromString),
                response_serializer=count.serializer(serialize_message),
            ),
            "StreamSegments": grpc.unary_stream_rpc_method_handler(
                self.service.stream_segments,
                request_deserializer=count.deserializer(pb.StreamSegmentsRequest.FromString),
                response_serializer=count.serializer(_already_serialized),
            ),
            "PushUpdate": grpc.stream_unary_rpc_method_handler(
                self.service.push_update,
                request_deserializer=count.deserializer(pb.PushUpdateRequest.FromString),
                response_serializer=count.serializer(serialize_message),
            ),
        }

    def start(self) -> int:
        """Bind and start serving; returns the port."""
        if self._server is not None:
            raise RuntimeError("the server is already started")
        server = grpc.server(
            ThreadPoolExecutor(
                max_workers=self.config.max_workers, thread_name_prefix="fedsqueeze-transfer"
            ),
            options=message_size_options(self.config.max_message_bytes),
        )
        handlers = self._handlers()
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        server.add_registered_method_handlers(SERVICE_NAME, handlers)
        bind = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        address = f"{bind}:{self.config.port}"
        if self._tls is not None:
            port = int(server.add_secure_port(address, self._tls.credentials()))
        else:
            port = int(server.add_insecure_port(address))
        if port == 0:
            raise OSError(f"could not bind {address}")
        server.start()
        self._server, self._port = server, port
        logger.info(
            "ModelTransfer serving on %s (%s)",
            self.address,
            "TLS" if self._tls is not None else "plaintext",
        )
        return port

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving; calls still running get ``grace`` seconds, then are cancelled."""
        server, self._server = self._server, None
        if server is None:
            return
        stopped = server.stop(grace)
        if self.faults is not None:
            self.faults.release_for_stop()  # after stop(): a held stream ends cut
        stopped.wait()
        self.cache.drop_spooled()  # not served any more: their spool files go
        if self.spool is not None:
            self.spool.close()
        logger.info("ModelTransfer on port %s stopped", self._port)

    def stats(self) -> ServerStats:
        """Cache counters and bytes counted on the wire so far."""
        return ServerStats(self.cache.stats(), self.wire.snapshot())

    def __enter__(self) -> TransferServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
