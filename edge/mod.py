"""The fedsqueeze Flower mod: compression for any ClientApp, no change to its training code.

In front of a ClientApp whose ``train`` reads and returns an ``ArrayRecord`` under
``"arrays"`` (the usual Flower way), the mod

1. reads the coordinator's :class:`~fedsqueeze.control.RoundInstruction` (no model inside);
2. fetches the model from the data plane as a delta against the model this edge holds
   (or rebuilds the initial model from the task and a shared seed: no download at all),
   verifies and decodes it, and puts it into the message as ``"arrays"``;
3. calls the app; takes the trained ``"arrays"`` from its reply;
4. encodes the update (delta against what it started from, low-rank factors or top-k
   with an error-feedback residual kept across rounds, quantization), lowering a
   low-rank spec's rank until it fits the instruction's byte limit
   (:func:`fit_update`), and pushes it with PushUpdate;
5. replies with a :class:`~fedsqueeze.control.TrainReceipt` and the app's metrics.

When the run allows small payloads inline (``inline-bytes``), the download may come in
the instruction itself (``payload``: used when it is a delta from the version this edge
holds and decodes to ``payload_digest``; otherwise the edge fetches as usual) and an
update that fits the instruction's ``inline_limit`` goes back in the receipt instead of
a push.

Messages without an instruction pass through untouched, so the mod is harmless in a
plain Flower run.

An update with NaN or Inf (training diverged) is not sent: encoding raises
:class:`~fedsqueeze.errors.NonFiniteError` naming the tensor, the ClientApp replies with
that error and the coordinator counts the edge as failed for the round. ``make_mod(
nonfinite=NonFinite.CARRY)`` sends such tensors losslessly instead (the coordinator's
update checks then reject the update).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from edge.cache import ContextCache, DirectoryCache, EdgeCache, EdgeMemory
from edge.dataplane import DataPlaneConnector, Fetched, GrpcConnector, Pushed
from edge.part_store import DEFAULT_PART_CACHE_BYTES
from fedsqueeze.codec import (
    CodecSpec,
    EncodedModel,
    NonFinite,
    decode_state,
    encode_state,
    state_digest,
)
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.control import (
    CONTROL_KEY,
    RECEIPT_KEY,
    TRACK_CONFIG_KEY,
    ModelTrack,
    RoundInstruction,
    TrainReceipt,
)
from fedsqueeze.errors import CodecError

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
ModelFactory = Callable[[str, int], State]


def _task_model(task: str, seed: int) -> State:
    from fedsqueeze.tasks import get_task  # deferred: pulls in scikit-learn

    return dict(get_task(task).build_model(seed).state_dict())


def _task_student(task: str, seed: int) -> State:
    from fedsqueeze.tasks import get_task  # deferred: pulls in scikit-learn

    build = get_task(task).build_student
    if build is None:
        raise ValueError(f"task {task!r} has no student architecture")
    return dict(build(seed).state_dict())


#: Node-config key naming a local directory for the edge's held model and residual.
CACHE_DIR_KEY = "fedsqueeze-cache-dir"
#: Node-config key bounding the part store under that directory, in bytes.
PART_CACHE_BYTES_KEY = "fedsqueeze-part-cache-bytes"


def default_cache(context: Context) -> EdgeCache:
    """A directory when the node config names one (deployed edges), else ``Context.state``.

    The directory also holds the edge's part store, bounded by the node config's
    ``fedsqueeze-part-cache-bytes`` (default :data:`edge.part_store.DEFAULT_PART_CACHE_BYTES`).
    """
    directory = context.node_config.get(CACHE_DIR_KEY)
    if isinstance(directory, str) and directory:
        bound = context.node_config.get(PART_CACHE_BYTES_KEY, DEFAULT_PART_CACHE_BYTES)
        if not isinstance(bound, int) or isinstance(bound, bool) or bound < 1:
            raise ValueError(f"{PART_CACHE_BYTES_KEY} must be an integer >= 1, got {bound!r}")
        return DirectoryCache(directory, part_bytes=bound)
    return ContextCache(context.state)


def make_mod(
    *,
    cache: Callable[[Context], EdgeCache] = default_cache,
    connector: DataPlaneConnector | None = None,
    initial_model: ModelFactory | None = _task_model,
    initial_student: ModelFactory | None = _task_student,
    nonfinite: NonFinite = NonFinite.REFUSE,
) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """Build a fedsqueeze mod.

    Parameters
    ----------
    cache
        Where the held model and residual live: by default a directory when the node
        config sets ``fedsqueeze-cache-dir`` (deployed edges), else ``Context.state``.
    connector
        How to reach the data plane (gRPC by default).
    initial_model
        ``(task, seed) -> state`` that rebuilds the initial model locally, or ``None``
        to always download it.
    initial_student
        The same for the student track (the task's student architecture).
    nonfinite
        What to do with an update tensor holding NaN/Inf (see :func:`fit_update`).
    """
    plane = connector or GrpcConnector()

    def fedsqueeze(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if CONTROL_KEY not in msg.content.config_records:
            return call_next(msg, context)
        instruction = RoundInstruction.from_record(msg.content.config_records[CONTROL_KEY])
        store = cache(context)
        memory = store.load()
        held, held_digest = memory.held, memory.held_digest
        student = instruction.track is ModelTrack.STUDENT
        rebuild = initial_student if student else initial_model
        if held is None and rebuild is not None and instruction.init_digest:
            candidate = rebuild(instruction.task, instruction.init_seed)
            if state_digest(candidate).hex() == instruction.init_digest:
                held, held_digest = candidate, instruction.init_digest
            else:
                log.warning("rebuilt initial model does not match; downloading instead")
        edge_id = str(msg.metadata.dst_node_id)
        fetch_start = time.perf_counter()
        # A deployed edge's part store persists beside its held model; in simulation the
        # connector keeps one in memory.
        parts = store.part_store() if isinstance(store, DirectoryCache) else None
        fetched = _inline_download(instruction, held_digest, held)
        if fetched is None:
            fetched = plane.fetch(instruction, edge_id, held_digest, held, parts=parts)
        # An emulated link's real waits are not local work (the simulated clock counts the
        # link from the bytes and round trips).
        fetch_seconds = max(0.0, time.perf_counter() - fetch_start - fetched.link_wait_s)
        content = RecordDict({k: v for k, v in msg.content.items() if k != CONTROL_KEY})
        content["arrays"] = ArrayRecord(fetched.state)
        if student:
            # The training code builds the student's architecture for these arrays.
            config = ConfigRecord(dict(content.config_records.get("config", ConfigRecord())))
            config[TRACK_CONFIG_KEY] = ModelTrack.STUDENT.value
            content["config"] = config
        msg.content = content
        residual = memory.residual
        if residual is not None and not _same_shapes(residual, fetched.state):
            residual = None  # made for the other track's architecture
        store.save(EdgeMemory(fetched.digest, fetched.state, residual))
        reply = call_next(msg, context)
        if reply.has_error() or "arrays" not in reply.content.array_records:
            return reply  # evaluate replies, or errors: nothing to upload
        trained = reply.content.array_records["arrays"].to_torch_state_dict()
        encoded = fit_update(
            trained,
            parse_spec(instruction.up_spec),
            fetched.state,
            residual=residual,
            seed=_rounding_seed(edge_id, instruction.server_round, fetched.digest),
            base_digest=bytes.fromhex(fetched.digest),
            budget=instruction.up_budget,
            nonfinite=nonfinite,
        )
        # Inline, the receipt names the base (held): a version 8 delta leaves it out.
        # Serialized only when inline payloads are on (a large update is not encoded twice).
        compact = encoded.to_bytes(omit_base=True) if instruction.inline_limit else b""
        push_start = time.perf_counter()
        if instruction.inline_limit and len(compact) <= instruction.inline_limit:
            update_id, inline = "", compact  # travels in the receipt
            pushed = Pushed(0, 0)
        else:
            payload = encoded.to_bytes()
            update_id, inline = _update_id(edge_id, instruction.server_round, payload), b""
            pushed = plane.push(instruction, edge_id, update_id, fetched.digest, encoded)
        push_seconds = max(0.0, time.perf_counter() - push_start - pushed.link_wait_s)
        store.save(EdgeMemory(fetched.digest, fetched.state, encoded.residual))
        app_metrics = reply.content.metric_records.get("metrics", MetricRecord())
        receipt = TrainReceipt(
            update_id=update_id,
            held=fetched.digest,
            num_examples=int(_number(app_metrics.get("num-examples", 0))),
            loss=_number(app_metrics.get("train-loss", app_metrics.get("loss", math.nan))),
            bytes_down=fetched.bytes_down + pushed.bytes_down,
            bytes_up=fetched.bytes_up + pushed.bytes_up,
            train_seconds=_number(app_metrics.get("compute-seconds", 0.0)),
            fetch_seconds=fetch_seconds,
            push_seconds=push_seconds,
            decoded_bytes=fetched.decoded_bytes,
            decoded_levels=fetched.decoded_levels,
            update=inline,
        )
        ids, metrics = receipt.to_records(app_metrics)
        # The receipt carries examples, loss and seconds: the app's other metrics, if any.
        reply.content = RecordDict({RECEIPT_KEY: ids, **({"metrics": metrics} if metrics else {})})
        log.info(
            "edge %s round %d: %d bytes down, %d up, update %s",
            edge_id,
            instruction.server_round,
            receipt.bytes_down,
            receipt.bytes_up,
            update_id or f"inline ({len(inline)} B)",
        )
        return reply

    return fedsqueeze


def _inline_download(
    instruction: RoundInstruction, held_digest: str | None, held: State | None
) -> Fetched | None:
    """The instruction's inline download decoded and verified, or ``None`` (none, or
    not usable: the caller fetches from the data plane instead).

    It is used only as a delta from exactly the version this edge holds (or as a whole
    model), and only when what it decodes to has the instruction's ``payload_digest``.
    """
    if not instruction.payload:
        return None
    try:
        # A delta may leave its base to the instruction, which is made for what this
        # edge holds; if it holds another version, what it decodes fails the digest check.
        implied = bytes.fromhex(held_digest) if held_digest is not None else None
        encoded = EncodedModel.from_bytes(instruction.payload, base_digest=implied)
    except CodecError as exc:
        log.warning("inline download unreadable (%s): fetching it instead", exc)
        return None
    base = encoded.base_digest
    if base is not None and (held is None or held_digest is None or base.hex() != held_digest):
        log.info("inline download is a delta from another version: fetching instead")
        return None
    try:
        state = decode_state(encoded, held if base is not None else None, base_digest=base)
    except CodecError as exc:
        log.warning("inline download undecodable (%s): fetching it instead", exc)
        return None
    digest = state_digest(state).hex()
    if digest != instruction.payload_digest:
        log.warning("inline download decodes to another model: fetching it instead")
        return None
    return Fetched(state, digest, 0, 0)


def fit_update(
    trained: State,
    spec: CodecSpec,
    base: State,
    *,
    residual: State | None,
    seed: int,
    base_digest: bytes,
    budget: int = 0,
    nonfinite: NonFinite = NonFinite.REFUSE,
) -> EncodedModel:
    """Encode the update; lower a low-rank spec's rank until it fits ``budget`` bytes.

    The coordinator picks a low-rank upload by its expected size; an update that comes out
    larger (its factors compress worse than expected) is re-encoded at the highest rank
    that fits, from the start (the residual stays right: it is what *this* encoding left
    out). Rank 1 always fits: the coordinator checked its bound. Other specs are sized by
    a bound, so they fit as they are; one that does not is sent anyway and logged.

    Parameters
    ----------
    budget
        The most encoded bytes of the update (the instruction's ``up_budget``); 0: no limit.
    nonfinite
        :attr:`NonFinite.REFUSE` (default) raises for a tensor with NaN/Inf or values the
        spec cannot hold; :attr:`NonFinite.CARRY` sends it losslessly.

    Raises
    ------
    fedsqueeze.errors.NonFiniteError
        Under ``REFUSE``, naming the first such tensor.
    """

    def encode(rank: int | None) -> EncodedModel:
        return encode_state(
            trained,
            spec.with_changes(rank=rank),
            base,
            residual=residual,
            seed=seed,
            base_digest=base_digest,
            nonfinite=nonfinite,
        )

    encoded = encode(spec.rank)
    if budget and encoded.nbytes > budget and spec.rank is not None and spec.rank > 1:
        encoded = _highest_rank_that_fits(encode, spec.rank, encoded, budget)
    if budget and encoded.nbytes > budget:
        log.warning("update of %d bytes is over its budget of %d", encoded.nbytes, budget)
    return encoded


def _highest_rank_that_fits(
    encode: Callable[[int], EncodedModel], too_big: int, encoded: EncodedModel, budget: int
) -> EncodedModel:
    """Below rank ``too_big`` (whose encoding ``encoded`` is over ``budget``), the encoding
    at the highest rank that fits, or at rank 1.

    Bytes grow about linearly with the rank: guess from the last size, then step up while
    the next rank still fits.
    """
    while True:
        rank = max(1, min(too_big - 1, math.floor(too_big * budget / encoded.nbytes)))
        encoded = encode(rank)
        if encoded.nbytes <= budget or rank == 1:
            break
        too_big = rank
    while rank + 1 < too_big:
        bigger = encode(rank + 1)
        if bigger.nbytes > budget:
            break
        encoded, rank = bigger, rank + 1
    return encoded


def _same_shapes(a: State, b: State) -> bool:
    return a.keys() <= b.keys() and all(a[k].shape == b[k].shape for k in a)


def _rounding_seed(edge_id: str, server_round: int, base_digest: str) -> int:
    """Seed of the update's stochastic rounding: fixed by edge, round and base.

    A rerun of the same experiment rounds the same way (reproducible runs), while
    different edges and rounds draw independent noise, which unbiasedness needs.
    """
    material = f"{edge_id}/{server_round}/{base_digest}".encode()
    return int.from_bytes(hashlib.sha256(material).digest()[:4], "big") >> 1


def _update_id(edge_id: str, server_round: int, payload: bytes) -> str:
    """An id that names this edge's update by content: a retry of the same bytes is the
    same id, and two edges never share one (the edge id is hashed in, not spelled out:
    it travels twice per round, in the push and in the receipt).
    """
    digest = hashlib.sha256(edge_id.encode() + b"\0" + payload).hexdigest()
    return f"{server_round}-{digest[:16]}"


def _number(value: object) -> float:
    """A metric that must be a single number."""
    if isinstance(value, (int, float)):
        return float(value)
    raise ValueError(f"expected a number in the app's metrics, got {value!r}")


fedsqueeze_mod = make_mod()
"""The default mod: ``Context.state`` cache, gRPC data plane, initial model from the task."""

__all__ = ["fedsqueeze_mod", "fit_update", "make_mod"]
