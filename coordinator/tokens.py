"""Per-edge bearer tokens derived from one coordinator secret.

Flower assigns node ids when nodes connect, so a fixed token table cannot be written in
advance. Instead each edge's token is ``HMAC-SHA256(secret, edge id)``, truncated to
128 bits: the coordinator checks any edge's token without a table, and hands each edge
its own token inside that edge's control message (Flower's channel to that node alone).
A token for one edge does not open another's: the id is part of what the MAC covers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable

from fedsqueeze.errors import AuthError
from fedsqueeze.transport.auth import AUTHORIZATION_KEY, EDGE_ID_KEY, TokenTable

_BEARER = "Bearer "
#: Bytes of the MAC kept as the token.
_TAG_BYTES = 16


class DerivedTokens(TokenTable):
    """A :class:`TokenTable` whose tokens are MACs of the edge id under a secret."""

    def __init__(self, secret: bytes | None = None) -> None:
        super().__init__({})
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        if len(self._secret) < 16:
            raise ValueError("the token secret must have at least 16 bytes")

    def token_for(self, edge_id: str) -> str:
        """The token of ``edge_id``."""
        mac = hmac.new(self._secret, edge_id.encode(), hashlib.sha256).digest()
        # HMAC-SHA256 truncated to 128 bits (RFC 2104 §5 allows it): 22 characters in
        # every round's instruction instead of 43, and still 2^128 guesses per edge.
        return base64.urlsafe_b64encode(mac[:_TAG_BYTES]).rstrip(b"=").decode()

    def __contains__(self, edge_id: object) -> bool:
        return isinstance(edge_id, str) and bool(edge_id)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """The edge id the call's metadata proves, or :class:`AuthError`."""
        edge_id: str | None = None
        presented: str | None = None
        for key, value in metadata:
            if not isinstance(value, str):
                continue
            if key == EDGE_ID_KEY:
                edge_id = value
            elif key == AUTHORIZATION_KEY and value.startswith(_BEARER):
                presented = value[len(_BEARER) :]
        if not edge_id or presented is None:
            raise AuthError("missing credentials: send a bearer token and an edge id")
        if not hmac.compare_digest(self.token_for(edge_id).encode(), presented.encode()):
            raise AuthError("wrong credentials for this edge")
        return edge_id
