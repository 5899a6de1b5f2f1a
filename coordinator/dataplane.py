"""The coordinator's side of the data plane: server, update inbox, tokens, instructions."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from coordinator.source import StoreModelSource
from coordinator.strategy import PulledUpdate
from coordinator.tokens import DerivedTokens
from coordinator.version_store import VersionStore
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.control import ModelTrack, RoundInstruction
from fedsqueeze.errors import NotFoundError
from fedsqueeze.transport.server import ServerConfig, TransferServer
from fedsqueeze.transport.spool import SpoolPolicy
from fedsqueeze.transport.tls import ServerTls
from fedsqueeze.transport.updates import UpdateStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstructionTemplate:
    """What every edge is told, apart from round, target and its token."""

    down_spec: str
    up_spec: str
    task: str = ""
    init_seed: int = -1
    init_digest: str = ""
    down_budget: int = 0
    up_budget: int = 0
    round_offset: int = 0
    inline_limit: int = 0
    """Payloads of at most this many encoded bytes travel inside the Flower messages
    (the download in the instruction, the update in the receipt); 0: never."""


class CoordinatorDataPlane:
    """A running transfer server over a version store, with its update inbox.

    Parameters
    ----------
    store
        Versions to serve.
    host, port
        Where to listen (port 0: any free port).
    advertise
        The ``host`` (or ``host:port``) edges dial, when it differs from where the server
        listens (listening on ``0.0.0.0``, behind NAT or a port forward). Default: ``host``.
    tls_cert, tls_key
        PEM files for TLS; without them the server is plaintext, which is allowed on
        loopback only.
    spool
        When and where a large model's encoding is kept on disk instead of in memory
        (default ``SpoolPolicy()``: models of 256 MiB and more, in the system's temporary
        folder; the server's spool folder is deleted by :meth:`close`).
    """

    def __init__(
        self,
        store: VersionStore,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise: str = "",
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        spool: SpoolPolicy | None = None,
    ) -> None:
        self.store = store
        self.updates = UpdateStore()
        self.tokens = DerivedTokens()
        self.source = StoreModelSource(store)
        tls = ServerTls.from_files(tls_cert, tls_key) if tls_cert and tls_key else None
        self.tls = tls is not None
        self.server = TransferServer(
            self.source,
            self.updates,
            self.tokens,
            config=ServerConfig(host=host, port=port, spool=spool or SpoolPolicy()),
            tls=tls,
            plaintext=tls is None,
        )
        self.server.start()
        if not advertise:
            advertise = host
        self.address = advertise if ":" in advertise else f"{advertise}:{self.server.port}"
        log.info("data plane listening on %s (%s)", self.address, "TLS" if tls else "plaintext")

    def pull(self, update_id: str) -> PulledUpdate | None:
        """Take an accepted update out of the inbox."""
        received = self.updates.pop(update_id)
        if received is None:
            return None
        return PulledUpdate(received.encoded, received.base_digest.hex(), received.edge_id)

    def instruction(
        self, template: InstructionTemplate, server_round: int, node_id: int, target: str
    ) -> RoundInstruction:
        """The control message for one edge.

        The initial model's task, seed and digest go only to an edge not known to hold
        a version: the others fetch a delta from what they hold, and the bytes are saved.
        An edge that lost its cache downloads the full model instead.
        """
        known = self.store.edge_version(str(node_id)) is not None
        return RoundInstruction(
            server_round=server_round + template.round_offset,
            address=self.address,
            target=target,
            down_spec=template.down_spec,
            up_spec=template.up_spec,
            task="" if known else template.task,
            init_seed=-1 if known else template.init_seed,
            init_digest="" if known else template.init_digest,
            down_budget=template.down_budget,
            up_budget=template.up_budget,
            token=self.tokens.token_for(str(node_id)),
            tls=self.tls,
            inline_limit=template.inline_limit,
        )

    def with_payload(self, instruction: RoundInstruction, held: str | None) -> RoundInstruction:
        """``instruction`` with its download inline, when it fits its ``inline_limit``.

        ``held`` is the version the edge is believed to hold (``None``: unknown, so the
        payload would be the whole model: it stays on the data plane). The payload is the
        stream the data plane would serve for the same request (same encoding, same
        rounding seed), and the model it decodes to is kept as the edge's version, as a
        fetch keeps it. Progressive specs and the student track stay on the data plane
        (a truncated prefix is the data plane's job; a student edge's held version is
        the other track's). An edge that holds another version than ``held`` ignores the
        payload and fetches.
        """
        limit = instruction.inline_limit
        if not limit or held is None or instruction.track is not ModelTrack.GLOBAL:
            return instruction
        spec = parse_spec(instruction.down_spec)
        if spec.levels is not None:
            return instruction
        try:
            encoded, decoded = self.source.encode_decoded(instruction.target, held, spec)
        except NotFoundError:
            return instruction  # the base is no longer kept: the edge fetches the model
        # The instruction is made for the version the edge holds: the payload need not
        # name it (a version 8 delta leaves its 32-byte base digest out).
        payload = encoded.to_bytes(omit_base=True)
        budget = instruction.down_budget
        if len(payload) > limit or (budget and len(payload) > budget):
            return instruction
        return replace(instruction, payload=payload, payload_digest=decoded)

    def close(self) -> None:
        """Stop the server (its spool files are deleted)."""
        self.server.stop()
