"""The one error tree of fedsqueeze.

Caller mistakes (a bad argument to a function) are plain ``ValueError`` / ``TypeError``.
Everything that comes from data, peers or configuration is a ``FedsqueezeError``::

    FedsqueezeError
    ├── CodecError                  bytes that do not decode, or a spec that cannot encode
    │   ├── FormatError             truncated, corrupted or malformed input
    │   │   └── TruncatedError      input that ends early (a stream's prefix)
    │   ├── UnsupportedVersionError a format version this build does not read
    │   ├── BaseMismatchError       a delta applied to the wrong base model, or a base
    │   │                           that shares no tensor with the model
    │   ├── LimitExceededError      a header claims more than the configured maximum
    │   ├── NonFiniteError          a tensor with NaN/Inf (or values beyond what the spec's
    │   │                           number format holds) refused by the encoder; also a
    │   │                           ValueError
    │   └── UnsupportedTensorError  a tensor dtype or layout the codec cannot encode
    │                               (complex, sparse); also a TypeError
    ├── IntegrityError              a digest or checksum does not match (DATA_LOSS)
    │   └── HeldPartError           a manifest's held part the edge cannot supply, or a
    │                               reassembly that fails the decoded digest (refetch)
    ├── ConfigError                 a configuration file or flag that cannot be used
    ├── RunFailedError              a run whose rounds aggregated nothing, too often
    └── TransportError              the data plane failed
        ├── NotFoundError           unknown model, manifest or update (NOT_FOUND)
        ├── AuthError               missing or wrong credentials (UNAUTHENTICATED)
        ├── PermissionDeniedError   valid credentials, wrong edge (PERMISSION_DENIED)
        ├── PreconditionError       request does not fit the server state (FAILED_PRECONDITION)
        ├── ResourceExhaustedError  too large, or over a budget (RESOURCE_EXHAUSTED)
        ├── InvalidRequestError     a malformed request (INVALID_ARGUMENT)
        └── UnavailableError        the peer could not be reached after retries (UNAVAILABLE)
            └── DeadlineExceededError  the operation ran past its deadline (DEADLINE_EXCEEDED)

Lower-library errors (zstandard, protobuf, grpc) are translated at the boundary with
``raise Ours(...) from exc``.

Warnings about input that is probably a mistake but may be intended (a spec reused
across models whose ``targets`` match nothing here) are :class:`CodecWarning`, issued with
:func:`warnings.warn`.
"""

from __future__ import annotations


class FedsqueezeError(Exception):
    """Base class of every error fedsqueeze raises on purpose."""


class CodecError(FedsqueezeError):
    """Encoded bytes that cannot be decoded, or a state that cannot be encoded."""


class FormatError(CodecError):
    """Truncated, corrupted or otherwise malformed encoded data."""


class TruncatedError(FormatError):
    """Encoded data that ends early: a prefix of a stream, or a cut file."""


class UnsupportedVersionError(CodecError):
    """Encoded data of a format version this build cannot read."""


class BaseMismatchError(CodecError):
    """A delta was decoded against a base model other than the one it was made from."""


class LimitExceededError(CodecError):
    """Encoded data claims sizes beyond the configured decoding limits."""


class NonFiniteError(CodecError, ValueError):
    """A tensor holds NaN or ±Inf (or values its spec's number format cannot hold), and
    the encoder was told to refuse such tensors.

    Attributes
    ----------
    tensor
        The name of the tensor.
    reason
        What is wrong with it, without advice (callers add the option that allows it).
    """

    def __init__(self, tensor: str, reason: str, advice: str = "") -> None:
        super().__init__(f"{reason}; not encoded{f' ({advice})' if advice else ''}")
        self.tensor = tensor
        self.reason = reason
        self.advice = advice

    def __reduce__(self) -> tuple[type[NonFiniteError], tuple[str, str, str]]:
        # picklable (Ray and multiprocessing carry exceptions between processes)
        return (type(self), (self.tensor, self.reason, self.advice))


class UnsupportedTensorError(CodecError, TypeError):
    """A tensor of a dtype or layout the codec does not encode (complex, sparse, ...)."""


class CodecWarning(UserWarning):
    """Input the codec accepts but that is probably not what was meant."""


class IntegrityError(FedsqueezeError):
    """A digest or checksum did not match the data it describes."""


class HeldPartError(IntegrityError):
    """A manifest names a held part the edge's cache lacks, or the model reassembled
    from the stream and the cached parts does not match its decoded digest; the client
    fetches again without naming held versions."""


class ConfigError(FedsqueezeError):
    """A configuration value, file or flag that cannot be used."""


class RunFailedError(FedsqueezeError):
    """More rounds of a run aggregated nothing (every edge failed, was rejected or was
    dropped) than its ``max-failed-rounds`` allows."""


class TransportError(FedsqueezeError):
    """The data plane failed."""


class NotFoundError(TransportError):
    """The named model, manifest or update does not exist."""


class AuthError(TransportError):
    """Credentials are missing or wrong."""


class PermissionDeniedError(TransportError):
    """Credentials are valid but do not allow this request."""


class PreconditionError(TransportError):
    """The request does not fit the server's current state."""


class ResourceExhaustedError(TransportError):
    """The request is too large or over its budget."""


class InvalidRequestError(TransportError):
    """The request is malformed."""


class UnavailableError(TransportError):
    """The peer could not be reached, even after retries."""


class DeadlineExceededError(UnavailableError):
    """The operation ran past its deadline."""


def first_line(exc: BaseException) -> str:
    """The first line of what ``exc`` says, or its type's name when it says nothing: a
    lower library's error quoted inside a one-line message of ours."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
