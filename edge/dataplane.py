"""How the edge reaches the data plane: fetch a model, push an update.

:class:`GrpcConnector` is the real one (a :class:`~fedsqueeze.transport.client.TransferClient`
per call). Bytes are reported per direction as counted on the wire: requests count as
upload traffic, responses as download traffic, whichever operation they belong to.

For experiments, a connector can put an emulated link on each of its connections (a
:class:`~fedsqueeze.transport.shaping.LinkShaper`); the seconds the link really made the
transfer wait are reported, so that a caller timing its local work can leave them out.

A large model (the manifest's raw size at least the connector's
:class:`~fedsqueeze.transport.spool.SpoolPolicy` threshold, 256 MiB by default) is
fetched in bounded memory (:meth:`TransferClient.fetch_bounded
<fedsqueeze.transport.client.TransferClient.fetch_bounded>`): its verified segments go to
a file-backed mapping and it is decoded part by part into a file, returned as tensors
mapped from it; the model the edge held is only read, so a failed fetch leaves it as it
was. Smaller models are fetched and decoded in memory as before (the same bytes on the
wire, the same receipts).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from edge.part_store import PartStore
from fedsqueeze.codec import EncodedModel
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.control import RoundInstruction
from fedsqueeze.errors import ConfigError, FedsqueezeError, TransportError, UnavailableError
from fedsqueeze.transport.client import TransferClient
from fedsqueeze.transport.fetch import FetchState
from fedsqueeze.transport.retry import RetryPolicy
from fedsqueeze.transport.shaping import LinkShaper
from fedsqueeze.transport.spool import SpoolPolicy
from fedsqueeze.transport.tls import ClientTls

State = dict[str, torch.Tensor]

log = logging.getLogger(__name__)

#: Environment variable naming the PEM CA file that signs the data plane's certificate.
CA_ENV = "FEDSQUEEZE_DATA_PLANE_CA"
#: Environment variables of the default connector's spooling and deadline (set by
#: ``fedsqueeze edge --spool-dir / --spool-mb / --fetch-timeout-s`` for its ClientApps).
SPOOL_DIR_ENV = "FEDSQUEEZE_SPOOL_DIR"
SPOOL_MB_ENV = "FEDSQUEEZE_SPOOL_MB"
FETCH_TIMEOUT_ENV = "FEDSQUEEZE_FETCH_TIMEOUT_S"


def _env_number(name: str) -> float | None:
    """A positive number from the environment variable ``name``; ``None`` when unset."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{name} must be a finite number > 0, got {text!r}")
    return value


def spool_from_env() -> SpoolPolicy:
    """The spooling the environment asks for (:data:`SPOOL_DIR_ENV`, :data:`SPOOL_MB_ENV`),
    else ``SpoolPolicy()``.

    Raises
    ------
    ConfigError
        A value that is not a positive number, or a folder that does not exist.
    """
    megabytes = _env_number(SPOOL_MB_ENV)
    folder = os.environ.get(SPOOL_DIR_ENV, "").strip()
    directory = Path(folder).expanduser() if folder else None
    if directory is not None and not directory.is_dir():
        raise ConfigError(f"{SPOOL_DIR_ENV} names no folder: {folder}")
    if megabytes is None:
        return SpoolPolicy(directory=directory)
    return SpoolPolicy(threshold_bytes=max(1, int(megabytes * (1 << 20))), directory=directory)


def retry_from_env() -> RetryPolicy | None:
    """A :class:`RetryPolicy` with the deadline :data:`FETCH_TIMEOUT_ENV` asks for, or
    ``None`` (the client's default) when it is unset."""
    seconds = _env_number(FETCH_TIMEOUT_ENV)
    return None if seconds is None else RetryPolicy(deadline_s=seconds)


#: Makes the emulated link of one data-plane connection.
LinkFactory = Callable[[], LinkShaper]


@dataclass(frozen=True)
class Fetched:
    """A model fetched and verified, and what it cost on the wire.

    ``link_wait_s`` is the time an emulated link really made the fetch wait (0 without
    one, or with one that only simulates). ``decoded_bytes`` and ``decoded_levels`` say
    what a truncated progressive fetch gave (0 and empty: the whole model).
    """

    state: State
    digest: str
    bytes_down: int
    bytes_up: int
    link_wait_s: float = 0.0
    decoded_bytes: int = 0
    decoded_levels: tuple[int, ...] = ()
    spooled: bool = False
    """Whether the model was kept on disk and decoded part by part (``state`` is then
    mapped, read-only, from an unlinked file)."""


@dataclass
class _Stream:
    """The last stream an edge fetched: for the same target again, the fetch names the
    segments it holds and gets only what is missing (the manifest alone if nothing is)."""

    target: str
    base_digest: str | None
    base: State | None
    held: FetchState


@dataclass(frozen=True)
class Pushed:
    """An acknowledged update upload and what it cost on the wire (``link_wait_s``: as
    in :class:`Fetched`)."""

    bytes_down: int
    bytes_up: int
    link_wait_s: float = 0.0


class DataPlaneConnector(Protocol):
    """Fetches models and pushes updates for an edge."""

    def fetch(
        self,
        instruction: RoundInstruction,
        edge_id: str,
        held_digest: str | None,
        held: State | None,
        *,
        parts: PartStore | None = None,
    ) -> Fetched:
        """The instruction's target model, as a delta from ``held`` when possible.

        ``parts``: the edge's own (persisted) part store, used instead of the
        connector's in-memory one.
        """
        ...

    def push(
        self,
        instruction: RoundInstruction,
        edge_id: str,
        update_id: str,
        base_digest: str,
        encoded: EncodedModel,
    ) -> Pushed:
        """Upload an encoded update (idempotent by ``update_id``)."""
        ...


class GrpcConnector:
    """The gRPC data plane (TLS when the instruction says so).

    Parameters
    ----------
    root_ca
        PEM CA file of the data plane's certificate (default: ``$FEDSQUEEZE_DATA_PLANE_CA``,
        else the system's roots).
    link
        Makes an emulated link for each connection (one per fetch and per push), for
        experiments; ``None``: none.
    held_versions
        How many versions each edge keeps in memory as content-addressed parts
        (:class:`edge.cache.PartStore`), named in its fetches so that tensors they hold
        exactly do not travel again; 0: none (fetches name only their base, and a
        store passed to :meth:`fetch` is not used either).
    spool
        When and where a large model is kept on disk and decoded part by part (``None``:
        from :data:`SPOOL_DIR_ENV` and :data:`SPOOL_MB_ENV` when set, else
        ``SpoolPolicy()``: models of 256 MiB and more, in the system's temporary folder).
    retry
        Deadlines and retries of each fetch and push (``None``: a deadline of
        :data:`FETCH_TIMEOUT_ENV` seconds when set, else ``RetryPolicy()``, a minute per
        operation; a large model's first fetch waits for the server to encode it,
        minutes for a billion parameters).
    """

    def __init__(
        self,
        root_ca: Path | None = None,
        *,
        link: LinkFactory | None = None,
        held_versions: int = 3,
        spool: SpoolPolicy | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if held_versions < 0:
            raise ValueError("held_versions must be >= 0")
        env = os.environ.get(CA_ENV)
        self.root_ca = root_ca or (Path(env) if env else None)
        self.link = link
        self.held_versions = held_versions
        self.spool = spool if spool is not None else spool_from_env()
        self.retry = retry if retry is not None else retry_from_env()
        self._streams: dict[str, _Stream] = {}
        self._parts: dict[str, PartStore] = {}

    def _client(
        self, instruction: RoundInstruction, edge_id: str, link: LinkShaper | None
    ) -> TransferClient:
        tls = None
        if instruction.tls:
            tls = ClientTls.from_files(self.root_ca) if self.root_ca else ClientTls()
        return TransferClient(
            instruction.address,
            edge_id=edge_id,
            token=instruction.token,
            tls=tls,
            plaintext=not instruction.tls,
            link=link,
            retry=self.retry,
        )

    def fetch(
        self,
        instruction: RoundInstruction,
        edge_id: str,
        held_digest: str | None,
        held: State | None,
        *,
        parts: PartStore | None = None,
    ) -> Fetched:
        link = self.link() if self.link is not None else None
        last = self._streams.get(edge_id)
        if last is not None and last.target == instruction.target:
            # Still the same target: continue its stream, from the base it was made from.
            held_digest, held = last.base_digest, last.base
            state = last.held
        else:
            state = self._new_state()
        if self.held_versions == 0:
            parts = None
        elif parts is None:
            parts = self._part_store(edge_id)
        if parts is not None and held is not None and held_digest:
            parts.add(bytes.fromhex(held_digest), held)
        # Kept before the call: a disconnect that outlasts the retries leaves the
        # verified segments for the next fetch of the same target.
        stream = _Stream(instruction.target, held_digest, held, state)
        try:
            with (
                self._failure_named("fetching the model", instruction),
                self._client(instruction, edge_id, link) as client,
            ):
                result = client.fetch_bounded(
                    instruction.target,
                    spec=parse_spec(instruction.down_spec),
                    base=held,
                    base_digest=bytes.fromhex(held_digest) if held_digest else None,
                    byte_budget=instruction.down_budget or None,
                    state=state,
                    held=parts.held() if parts is not None else None,
                    spool=self.spool,
                )
        except UnavailableError:
            self._streams[edge_id] = stream
            raise
        if parts is not None:
            parts.add(result.digest, result.state)
        self._streams[edge_id] = stream
        wire = result.stats.wire
        waited = link.waited_s if link is not None else 0.0
        prefix = result.prefix
        return Fetched(
            result.state,
            result.digest.hex(),
            wire.received,
            wire.sent,
            waited,
            prefix.used_bytes if prefix is not None else 0,
            prefix.levels if prefix is not None else (),
            result.spooled,
        )

    def _new_state(self) -> FetchState:
        """A fetch state that spools large models; in memory when the spool folder
        cannot take files (small models then fetch as always, large ones unbounded)."""
        try:
            return FetchState(spool=self.spool)
        except ConfigError as exc:
            log.warning("%s: large models will be fetched in memory", exc)
            return FetchState()

    def _part_store(self, edge_id: str) -> PartStore | None:
        if self.held_versions == 0:
            return None
        return self._parts.setdefault(edge_id, PartStore(self.held_versions))

    def push(
        self,
        instruction: RoundInstruction,
        edge_id: str,
        update_id: str,
        base_digest: str,
        encoded: EncodedModel,
    ) -> Pushed:
        link = self.link() if self.link is not None else None
        with (
            self._failure_named("pushing the update", instruction),
            self._client(instruction, edge_id, link) as client,
        ):
            result = client.push_update(
                encoded, update_id=update_id, base_digest=bytes.fromhex(base_digest)
            )
        wire = result.stats.wire
        return Pushed(wire.received, wire.sent, link.waited_s if link is not None else 0.0)

    @contextlib.contextmanager
    def _failure_named(self, what: str, instruction: RoundInstruction) -> Iterator[None]:
        """Re-raise a transport failure with its cause and the address in one line.

        The message travels in the ClientApp's error reply to the coordinator, whose log
        then says *why* (``CERTIFICATE_VERIFY_FAILED``, ``Connection refused``), not only
        that the server was unavailable.
        """
        try:
            yield
        except TransportError as exc:
            raise _same_kind(exc, self._describe(what, instruction, exc)) from exc

    def _describe(self, what: str, instruction: RoundInstruction, exc: Exception) -> str:
        scheme = "TLS" if instruction.tls else "plaintext"
        message = f"{what} from the data plane at {instruction.address} ({scheme}) failed: {exc}"
        cause = failure_cause(exc)
        if cause and cause not in message:
            message += f"; cause: {cause}"
        if instruction.tls and self.root_ca is None and "CERTIFICATE_VERIFY" in message.upper():
            message += " (this edge trusts only the system's CAs: start it with --data-plane-ca)"
        return " ".join(message.split())


def failure_cause(exc: BaseException) -> str:
    """The lowest-level reason in ``exc``'s chain: a gRPC status message, or ``""``."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    found = ""
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        details = getattr(cause, "details", None)
        if callable(details):
            with contextlib.suppress(Exception):
                value = details()
                if isinstance(value, str) and value:
                    found = value
        cause = cause.__cause__ or cause.__context__
    return found


def _same_kind(exc: FedsqueezeError, message: str) -> FedsqueezeError:
    try:
        return type(exc)(message)
    except TypeError:  # a subclass with another constructor
        return TransportError(message)
