"""Per-edge bearer tokens, carried in call metadata and compared in constant time.

Every call carries two metadata entries::

    authorization:         Bearer <token>
    x-fedsqueeze-edge-id:  <edge id the token was issued to>

The server looks up the token issued to that edge and compares it with
:func:`hmac.compare_digest`: a missing or wrong token is ``UNAUTHENTICATED``. The edge
these credentials prove is the caller for everything the call does (an upload is stored
as that edge's); request bodies do not name an edge, so no call can act in another's
name. Tokens are secrets: they are never logged, and they only travel over TLS outside
loopback experiments.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Iterable, Mapping

from fedsqueeze.errors import AuthError
from fedsqueeze.wire.types import check_id

#: Metadata key of the bearer token (lowercase, as gRPC requires).
AUTHORIZATION_KEY = "authorization"
#: Metadata key of the calling edge's id.
EDGE_ID_KEY = "x-fedsqueeze-edge-id"
_BEARER = "Bearer "
#: Shortest token accepted, in characters (a 32-byte random token is 43).
MIN_TOKEN_CHARS = 16
_MAX_TOKEN_CHARS = 512


def new_token() -> str:
    """A fresh random token (32 random bytes, URL-safe base64).

    Never one that starts with ``-``: pasted into a command line it would read as an
    option.
    """
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


def call_metadata(edge_id: str, token: str) -> tuple[tuple[str, str], ...]:
    """The metadata a client attaches to every call."""
    return ((AUTHORIZATION_KEY, _BEARER + token), (EDGE_ID_KEY, edge_id))


class TokenTable:
    """The tokens issued to edges; read-only after construction, so thread-safe.

    Parameters
    ----------
    tokens
        Edge id → token. Each token must have at least :data:`MIN_TOKEN_CHARS` characters.
    """

    def __init__(self, tokens: Mapping[str, str]) -> None:
        table: dict[str, bytes] = {}
        for edge_id, token in tokens.items():
            check_id(edge_id, "edge id")
            if not MIN_TOKEN_CHARS <= len(token) <= _MAX_TOKEN_CHARS:
                raise ValueError(
                    f"token of edge {edge_id!r} must have {MIN_TOKEN_CHARS}.."
                    f"{_MAX_TOKEN_CHARS} characters"
                )
            table[edge_id] = token.encode()
        self._tokens = table

    @classmethod
    def generate(cls, edge_ids: Iterable[str]) -> tuple[TokenTable, dict[str, str]]:
        """A table with a fresh token per edge, and the tokens to hand out."""
        tokens = {edge_id: new_token() for edge_id in edge_ids}
        return cls(tokens), tokens

    def __contains__(self, edge_id: object) -> bool:
        return edge_id in self._tokens

    def __len__(self) -> int:
        return len(self._tokens)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """The edge id the call's metadata proves, or :class:`AuthError`.

        Parameters
        ----------
        metadata
            The call's invocation metadata (key, value) pairs.
        """
        edge_id: str | None = None
        presented: str | None = None
        for key, value in metadata:
            if not isinstance(value, str):
                continue
            if key == EDGE_ID_KEY:
                edge_id = value
            elif key == AUTHORIZATION_KEY and value.startswith(_BEARER):
                presented = value[len(_BEARER) :]
        if edge_id is None or presented is None:
            raise AuthError("missing credentials: send a bearer token and an edge id")
        expected = self._tokens.get(edge_id)
        # Compare against a same-length dummy for unknown edges, so the time taken does
        # not tell which edge ids exist.
        reference = expected if expected is not None else b"\x00" * 43
        ok = hmac.compare_digest(reference, presented.encode())
        if expected is None or not ok:
            raise AuthError("wrong credentials for this edge")
        return edge_id
