"""Mapping between fedsqueeze's errors and gRPC status codes, both ways.

The server reports every :class:`~fedsqueeze.errors.FedsqueezeError` it raises on purpose
with the status code below; anything else is a bug and becomes ``INTERNAL``. The client
turns a failed call's status back into the matching error, raised ``from`` the
``grpc.RpcError``.

================================  ======================
error                             status code
================================  ======================
InvalidRequestError, CodecError   INVALID_ARGUMENT
LimitExceededError                RESOURCE_EXHAUSTED
BaseMismatchError                 FAILED_PRECONDITION
NotFoundError                     NOT_FOUND
PreconditionError                 FAILED_PRECONDITION
AuthError                         UNAUTHENTICATED
PermissionDeniedError             PERMISSION_DENIED
IntegrityError                    DATA_LOSS
ResourceExhaustedError            RESOURCE_EXHAUSTED
UnavailableError                  UNAVAILABLE
================================  ======================

The client maps ``DEADLINE_EXCEEDED`` to :class:`~fedsqueeze.errors.DeadlineExceededError`
(a kind of ``UnavailableError``: the peer did not answer in time) and any other code to a plain
:class:`~fedsqueeze.errors.TransportError`.
"""

from __future__ import annotations

import grpc

from fedsqueeze.errors import (
    AuthError,
    BaseMismatchError,
    CodecError,
    DeadlineExceededError,
    FedsqueezeError,
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

# Most specific first: the first isinstance match wins.
_TO_STATUS: tuple[tuple[type[FedsqueezeError], grpc.StatusCode], ...] = (
    (LimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BaseMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (CodecError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
)

_FROM_STATUS: dict[grpc.StatusCode, type[FedsqueezeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionError,
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.DATA_LOSS: IntegrityError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def status_for(error: FedsqueezeError) -> grpc.StatusCode:
    """The status code the server reports ``error`` with (``INTERNAL`` if unmapped)."""
    for kind, code in _TO_STATUS:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def status_of(exc: grpc.RpcError) -> grpc.StatusCode:
    """The status code of a failed call (``UNKNOWN`` when it carries none)."""
    code = getattr(exc, "code", None)
    if callable(code):
        value = code()
        if isinstance(value, grpc.StatusCode):
            return value
    return grpc.StatusCode.UNKNOWN


def details_of(exc: grpc.RpcError) -> str:
    """The status message of a failed call ("" when it carries none)."""
    details = getattr(exc, "details", None)
    if callable(details):
        value = details()
        if isinstance(value, str):
            return value
    return ""


def error_from_rpc(exc: grpc.RpcError, what: str) -> FedsqueezeError:
    """Our error for a failed call; the caller raises it ``from exc``.

    Parameters
    ----------
    exc
        The failed call.
    what
        What was attempted, for the message (e.g. ``"GetManifest"``).
    """
    code = status_of(exc)
    kind = _FROM_STATUS.get(code, TransportError)
    return kind(f"{what} failed: {code.name}: {details_of(exc)}")
