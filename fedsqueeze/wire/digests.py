"""How transport segments are digested: SHA-256 (the default) or BLAKE3.

Every segment of a manifest carries a 32-byte digest of its payload, which the client
checks before keeping it. SHA-256 is what every peer understands; BLAKE3 (PyPI
``blake3``, an optional dependency: ``pip install 'fedsqueeze[fast]'``) computes 3 to 4
times as fast on one thread (BENCHMARKS.md), which matters once the data plane streams
at GB/s. A client asks for one
(``FetchRequest.segment_digest``); a server answers with it when it can and with SHA-256
otherwise; the manifest says which was used.
"""

from __future__ import annotations

import enum
import hashlib
import importlib.util
from collections.abc import Callable
from functools import cache
from typing import Any

from fedsqueeze.errors import ConfigError

__all__ = [
    "SegmentDigest",
    "blake3_available",
    "digest_function",
    "preferred_digest",
    "segment_digest",
    "supported_digest",
]

Hasher = Callable[[Any], bytes]


class SegmentDigest(enum.Enum):
    """The algorithm of segment digests."""

    SHA256 = "sha256"
    BLAKE3 = "blake3"


@cache
def blake3_available() -> bool:
    """Whether the ``blake3`` package can be imported."""
    return importlib.util.find_spec("blake3") is not None


def _sha256(data: Any) -> bytes:
    return hashlib.sha256(data).digest()


def _blake3(data: Any) -> bytes:
    from blake3 import blake3  # imported on first use: an optional dependency

    value: bytes = blake3(data).digest()
    return value


def digest_function(algorithm: SegmentDigest) -> Hasher:
    """The function that digests one payload (bytes or a buffer) with ``algorithm``.

    BLAKE3 runs on one thread per payload (segments are about 1 MiB: spreading one over
    threads costs more than it saves; a client verifies segments on several threads).

    Raises
    ------
    ConfigError
        BLAKE3 was asked for and the ``blake3`` package is not installed.
    """
    if algorithm is SegmentDigest.SHA256:
        return _sha256
    if not blake3_available():
        raise ConfigError(
            "BLAKE3 segment digests need the blake3 package: pip install 'fedsqueeze[fast]' "
            "(or pip install blake3), or use SHA-256"
        )
    return _blake3


def segment_digest(algorithm: SegmentDigest, data: Any) -> bytes:
    """The 32-byte digest of ``data`` (bytes or a buffer) with ``algorithm``."""
    return digest_function(algorithm)(data)


def supported_digest(wanted: SegmentDigest) -> SegmentDigest:
    """What a server answers a request for ``wanted`` with: it, or SHA-256 if it cannot."""
    if wanted is SegmentDigest.BLAKE3 and not blake3_available():
        return SegmentDigest.SHA256
    return wanted


def preferred_digest() -> SegmentDigest:
    """What a client asks for by default: BLAKE3 where installed, else SHA-256."""
    return SegmentDigest.BLAKE3 if blake3_available() else SegmentDigest.SHA256
