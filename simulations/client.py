"""The simulated clients: the edge ClientApp's code, for every arm of a sweep.

A sweep runs its arms one after the other in one simulation (Ray starts once). Each
training message says which arm it belongs to (:data:`~simulations.grid.ARM_KEY`):

* a fedsqueeze arm's message carries an instruction: it goes through the edge's
  fedsqueeze mod (:func:`edge.mod.make_mod`) in front of the edge's plain training code
  (:func:`edge.app.train_on_partition`), with the held model and residual kept in the
  node's ``Context.state`` under the arm's name;
* a plain Flower arm's message carries the model: it goes straight to the training code,
  no fedsqueeze code at all.

Every reply carries the client's partition id in the :data:`~simulations.grid.ARM_KEY`
record (the grid checks it against Flower's registration order and removes it before
counting bytes). Clients also answer a ``query`` with their partition id, which the grid
sends only where Flower's registration order cannot be read.

Given the clients' links, a fedsqueeze client puts its link on each data-plane connection
(:func:`sim_link_shaper`): accounting only, unless the config's ``realtime`` is on, when
the fetch and the push really wait for the link's round trips and bandwidth. Plain Flower
arms never touch the data plane, so ``realtime`` does not slow them.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from coordinator.frozen import FrozenParts
from edge.app import train_on_partition
from edge.cache import EdgeMemory
from edge.dataplane import GrpcConnector
from edge.mod import make_mod
from fedsqueeze.control import CONTROL_KEY
from fedsqueeze.runconfig import RunSettings
from fedsqueeze.tasks import get_task
from fedsqueeze.transport.shaping import LinkProfile, LinkShaper, ShapingMode
from simulations.grid import ARM_KEY, PARTITION_KEY

__all__ = ["ArmCache", "make_sim_client_app", "sim_connector", "sim_link_shaper"]

_PREFIX = "fedsqueeze-sim/"


class ArmCache:
    """An :class:`edge.cache.EdgeCache` in ``Context.state``, one namespace per arm.

    Arms run one after the other, so loading one arm's memory drops the others'.
    """

    def __init__(self, state: RecordDict, arm: str) -> None:
        self._state = state
        self._ns = f"{_PREFIX}{arm}/"
        for key in [k for k in state if k.startswith(_PREFIX) and not k.startswith(self._ns)]:
            del state[key]

    def load(self) -> EdgeMemory:
        """The arm's held model and residual (empty on first contact)."""
        meta = self._state.config_records.get(self._ns + "meta")
        held = self._state.array_records.get(self._ns + "held")
        residual = self._state.array_records.get(self._ns + "residual")
        digest = str(meta["held"]) if meta is not None and "held" in meta else None
        return EdgeMemory(
            held_digest=digest if held is not None else None,
            held=held.to_torch_state_dict() if held is not None else None,
            residual=residual.to_torch_state_dict() if residual is not None else None,
        )

    def save(self, memory: EdgeMemory) -> None:
        """Keep the held model (with its digest) and the residual."""
        if memory.held is not None and memory.held_digest is not None:
            self._state[self._ns + "held"] = ArrayRecord(memory.held)
            self._state[self._ns + "meta"] = ConfigRecord({"held": memory.held_digest})
        if memory.residual is not None:
            self._state[self._ns + "residual"] = ArrayRecord(memory.residual)


def sim_link_shaper(
    profile: LinkProfile,
    realtime: bool,
    *,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> LinkShaper:
    """The link of one simulated client's data-plane connection.

    :attr:`ShapingMode.REAL` (every call waits one RTT, a token bucket holds each
    direction to its bandwidth) when ``realtime``, else :attr:`ShapingMode.SIMULATED`
    (accounting only, no waiting). ``monotonic`` and ``sleep`` are for tests.
    """
    mode = ShapingMode.REAL if realtime else ShapingMode.SIMULATED
    return LinkShaper(profile, mode, monotonic=monotonic, sleep=sleep)


def sim_connector(
    links: Sequence[LinkProfile], realtime: bool, partition: object
) -> GrpcConnector | None:
    """The data-plane connector of the client with partition id ``partition``.

    ``None`` (the mod's default connector, no link) when no links are given; otherwise
    a gRPC connector that puts the partition's link on each connection.
    """
    if not links:
        return None
    if not isinstance(partition, int) or not 0 <= partition < len(links):
        raise ValueError(f"this node's partition id {partition!r} has no link")
    return GrpcConnector(link=partial(sim_link_shaper, links[partition], realtime))


@functools.lru_cache(maxsize=2)
def _frozen_tensors(
    task_name: str, seed: int, patterns: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """The frozen tensors of the task's initial model (what the client holds installed)."""
    parts = FrozenParts(patterns)
    state = get_task(task_name).build_model(seed).state_dict()
    return {name: t for name, t in state.items() if parts.is_frozen(name)}


def train_plain_frozen(
    msg: Message, settings: RunSettings, train_fn: Callable[[Message], Message]
) -> Message:
    """A plain Flower client whose frozen tensors never travel (FlowerTune's way).

    The message carries only the trainable arrays; the client adds its own frozen
    tensors (built from the installed weights and the seed), trains, and replies with
    the trainable arrays alone.
    """
    patterns = settings.frozen(get_task(settings.task).frozen)
    if not patterns:
        return train_fn(msg)
    frozen = _frozen_tensors(settings.task, settings.seed, patterns)
    arrays = msg.content.array_records["arrays"].to_torch_state_dict()
    msg.content["arrays"] = ArrayRecord({**frozen, **arrays})
    reply = train_fn(msg)
    if reply.has_error():
        return reply
    trained = reply.content.array_records["arrays"].to_torch_state_dict()
    reply.content["arrays"] = ArrayRecord(FrozenParts(patterns).trainable(trained))
    return reply


def make_sim_client_app(
    settings: RunSettings,
    threads: int = 1,
    *,
    links: Sequence[LinkProfile] = (),
    realtime: bool = False,
    arm_settings: Mapping[str, RunSettings] | None = None,
) -> ClientApp:
    """The ClientApp of every simulated client.

    Parameters
    ----------
    settings
        Task, partitioning, seed and local training (shared by all arms unless
        ``arm_settings`` names the arm; the codec specs come from each round's
        instruction).
    threads
        torch threads per client (results depend on it).
    links
        Each partition's link (empty: no link on the data plane).
    realtime
        Whether the links really wait (:func:`sim_link_shaper`).
    arm_settings
        Settings per arm name (an arm's own task, its frozen tensors); arms not named
        use ``settings``.
    """
    app = ClientApp()
    profiles = tuple(links)
    per_arm = dict(arm_settings or {})

    def run(msg: Message, context: Context) -> Message:
        tag = msg.content.config_records.get(ARM_KEY)
        arm = str(tag["arm"]) if tag is not None and "arm" in tag else "default"
        msg.content = RecordDict({k: v for k, v in msg.content.items() if k != ARM_KEY})
        arm_run = per_arm.get(arm, settings)

        def train_fn(msg: Message, context: Context) -> Message:
            return train_on_partition(msg, context, arm_run)

        if CONTROL_KEY not in msg.content.config_records:
            # plain Flower: no fedsqueeze code runs
            return train_plain_frozen(msg, arm_run, lambda m: train_fn(m, context))
        connector = sim_connector(profiles, realtime, context.node_config.get("partition-id"))
        mod = make_mod(cache=lambda ctx: ArmCache(ctx.state, arm), connector=connector)
        return mod(msg, context, train_fn)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(threads)
        reply = run(msg, context)
        pid = context.node_config.get("partition-id")
        if not reply.has_error() and isinstance(pid, int):
            reply.content[ARM_KEY] = ConfigRecord({PARTITION_KEY: pid})
        return reply

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid = context.node_config.get("partition-id")
        if not isinstance(pid, int):
            raise ValueError("this node has no partition id (not a simulation?)")
        return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)

    return app
