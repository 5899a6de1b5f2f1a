"""The data plane: gRPC server and client of ``fedsqueeze.v1.ModelTransfer``.

Server side: :class:`TransferServer` over a :class:`ModelSource` (models to send) and an
:class:`UpdateSink` (verified uploads), with per-edge tokens (:class:`TokenTable`) and TLS
(:class:`ServerTls`). Client side: :class:`TransferClient` (``fetch`` and ``push_update``)
with :class:`RetryPolicy`, resumable :class:`FetchState`, and link emulation
(:class:`LinkProfile`, :class:`LinkShaper`, :class:`LinkClock`).
"""

from fedsqueeze.transport.accounting import GRPC_PREFIX_BYTES, Direction, WireBytes, WireCounter
from fedsqueeze.transport.auth import TokenTable, new_token
from fedsqueeze.transport.cache import CacheStats, EncodeCache
from fedsqueeze.transport.client import FetchResult, PushResult, TransferClient, TransferStats
from fedsqueeze.transport.faults import FaultInjector
from fedsqueeze.transport.fetch import FetchState
from fedsqueeze.transport.retry import RetryPolicy
from fedsqueeze.transport.server import (
    MAX_MESSAGE_BYTES,
    SEGMENT_BYTES,
    ServerConfig,
    ServerStats,
    TransferServer,
)
from fedsqueeze.transport.shaping import (
    LinkClock,
    LinkDirection,
    LinkProfile,
    LinkShaper,
    ShapingMode,
    TokenBucket,
)
from fedsqueeze.transport.source import InMemoryModelSource, ModelSource
from fedsqueeze.transport.spool import SpoolPolicy
from fedsqueeze.transport.tls import ClientTls, ServerTls
from fedsqueeze.transport.updates import (
    AddResult,
    ReceivedUpdate,
    UpdateRecord,
    UpdateSink,
    UpdateStore,
)
from fedsqueeze.wire.digests import SegmentDigest

__all__ = [
    "GRPC_PREFIX_BYTES",
    "MAX_MESSAGE_BYTES",
    "SEGMENT_BYTES",
    "AddResult",
    "CacheStats",
    "ClientTls",
    "Direction",
    "EncodeCache",
    "FaultInjector",
    "FetchResult",
    "FetchState",
    "InMemoryModelSource",
    "LinkClock",
    "LinkDirection",
    "LinkProfile",
    "LinkShaper",
    "ModelSource",
    "PushResult",
    "ReceivedUpdate",
    "RetryPolicy",
    "SegmentDigest",
    "ServerConfig",
    "ServerStats",
    "ServerTls",
    "ShapingMode",
    "SpoolPolicy",
    "TokenBucket",
    "TokenTable",
    "TransferClient",
    "TransferServer",
    "TransferStats",
    "UpdateRecord",
    "UpdateSink",
    "UpdateStore",
    "WireBytes",
    "WireCounter",
    "new_token",
]
