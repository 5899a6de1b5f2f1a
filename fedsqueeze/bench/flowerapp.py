"""The Flower app behind ``bench transport``'s Flower part: a model sent through Flower itself.

Flower loads it by name (``fedsqueeze.bench.flowerapp:server_app`` and
``:client_app``) on the Deployment Engine that :mod:`fedsqueeze.bench.flowerpath`
starts. The ServerApp sends each model of ``sizes-mb`` (the random fp32 state
:func:`fedsqueeze.bench.transport.random_state` makes from ``seed``, as the data plane
serves it) as an ``ArrayRecord`` in a ``train`` message to the one SuperNode, waits for
the small reply, and writes ``server-I.json`` into ``out-dir``; the ClientApp writes
``client-I.json``. Times are ``time.time()`` (one machine, one clock), CPU is
``getrusage`` of each app's own process, and the SuperLink's and SuperNode's process
trees (``watch-pids``) are read from ``/proc`` around each message.

A ClientApp process is started per message, after Flower has pulled the whole message:
the moment this module is imported in it is the earliest the model can be used (its
``loaded`` time), the ``train`` function's entry comes after Flower has also loaded the
app.
"""

from __future__ import annotations

import resource
import time

# Before anything else: in a ClientApp process, Flower already holds the whole message.
_LOADED, _LOADED_CPU = time.time(), resource.getrusage(resource.RUSAGE_SELF)

import json  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from fedsqueeze.deploy.proctree import command_name, cpu_seconds, live_tree  # noqa: E402

__all__ = ["client_app", "server_app", "tree_cpu"]

#: Processes that report their own CPU (their ``/proc`` entry is gone when they end).
_SELF_REPORTING = ("flwr-serverapp", "flwr-clientapp")
#: How often the ServerApp asks for the reply (Flower's own loop sleeps 3 s).
_PULL_EVERY_S = 0.1

server_app = ServerApp()
client_app = ClientApp()


def _cpu_s(usage: resource.struct_rusage | None = None) -> float:
    usage = usage or resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _program(pid: int) -> str:
    """``flower-superlink`` for ``1234 (python flower-superlink)``."""
    words = command_name(pid).partition(" (")[2].rstrip(")").split()
    flower = [w for w in words if w.startswith(("flower-", "flwr-"))]
    return flower[0] if flower else (words[-1] if words else "?")


def tree_cpu(roots: Mapping[str, int]) -> dict[str, dict[int, float]]:
    """CPU seconds of every live process below each root, by root name, leaving out the apps.

    Returns ``{root name: {pid: seconds}}`` with pids keyed as ``pid`` of a process
    whose program is not one of the self-reporting apps.
    """
    out: dict[str, dict[int, float]] = {}
    for name, root in roots.items():
        found: dict[int, float] = {}
        for pid in live_tree({root}):
            if _program(pid) in _SELF_REPORTING:
                continue
            seconds = cpu_seconds(pid)
            if seconds is not None:
                found[pid] = seconds
        out[name] = found
    return out


def _cpu_delta(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
) -> dict[str, float]:
    """CPU seconds each tree spent between two :func:`tree_cpu` readings."""
    return {
        name: sum(s - before.get(name, {}).get(pid, 0.0) for pid, s in pids.items())
        for name, pids in after.items()
    }


def _watch_pids(text: str) -> dict[str, int]:
    """``superlink=12,supernode=34`` as a mapping."""
    pairs = (item.partition("=") for item in text.split(",") if item)
    return {name: int(pid) for name, _, pid in pairs}


def _wait_for_node(grid: Grid, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = list(grid.get_node_ids())
        if nodes:
            return int(nodes[0])
        if time.monotonic() > deadline:
            raise RuntimeError(f"no SuperNode connected within {timeout_s:.0f} s")
        time.sleep(0.2)


def _object_bytes(message: Message) -> tuple[int, int]:
    """Flower's objects of ``message``: how many, and their serialized bytes in all."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    objects = get_all_nested_objects(message)
    return len(objects), sum(len(obj.deflate()) for obj in objects.values())


@server_app.main()
def _serve(grid: Grid, context: Context) -> None:
    from fedsqueeze.bench.transport import random_state

    config = context.run_config
    out_dir = Path(str(config["out-dir"]))
    seed = int(config["seed"])
    timeout_s = float(config["timeout-s"])
    watched = _watch_pids(str(config["watch-pids"]))
    node = _wait_for_node(grid, timeout_s)
    sizes = [float(v) for v in str(config["sizes-mb"]).split(",") if v]
    for index, megabytes in enumerate(sizes):
        state = random_state(megabytes, seed)
        daemons_before, cpu_before = tree_cpu(watched), _cpu_s()
        sent = time.time()
        arrays = ArrayRecord(state)  # the conversion to Flower's wire form counts as sending
        del state
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"index": index})})
        message = Message(content, node, "train")
        built = time.time()
        ids = list(grid.push_messages([message]))
        pushed, cpu_pushed = time.time(), _cpu_s()
        replies: list[Message] = []
        while not replies:
            if time.time() - sent > timeout_s:
                raise RuntimeError(f"no reply to message {index} within {timeout_s:.0f} s")
            time.sleep(_PULL_EVERY_S)
            replies = list(grid.pull_messages(ids))
        replied, cpu_replied = time.time(), _cpu_s()
        daemons = _cpu_delta(daemons_before, tree_cpu(watched))
        if replies[0].has_error():
            raise RuntimeError(f"the ClientApp failed: {replies[0].error.reason}")
        objects, object_bytes = _object_bytes(message)
        record: dict[str, Any] = {
            "index": index,
            "megabytes": megabytes,
            "array_bytes": arrays.count_bytes(),
            "objects": objects,
            "object_bytes": object_bytes,
            "sent": sent,
            "built": built,
            "pushed": pushed,
            "replied": replied,
            "serverapp_cpu_s_to_push": cpu_pushed - cpu_before,
            "serverapp_cpu_s": cpu_replied - cpu_before,
            "daemon_cpu_s": daemons,
        }
        del message, arrays, content
        (out_dir / f"server-{index}.json").write_text(json.dumps(record), encoding="utf-8")


@client_app.train()
def _receive(message: Message, context: Context) -> Message:
    called, cpu_called = time.time(), _cpu_s()
    from fedsqueeze.codec.digest import state_digest

    index = int(message.content.config_records["config"]["index"])  # type: ignore[arg-type]
    arrays = message.content.array_records["arrays"]
    state = arrays.to_torch_state_dict()
    as_tensors, cpu_tensors = time.time(), _cpu_s()
    record = {
        "index": index,
        "loaded": _LOADED,
        "called": called,
        "tensors": as_tensors,
        "clientapp_cpu_s_loaded": _cpu_s(_LOADED_CPU),
        "clientapp_cpu_s_called": cpu_called,
        "clientapp_cpu_s_tensors": cpu_tensors,
        "array_bytes": arrays.count_bytes(),
        "model_digest": state_digest(state).hex(),  # after the clock: a check, not a cost
    }
    out_dir = Path(str(context.run_config["out-dir"]))
    (out_dir / f"client-{index}.json").write_text(json.dumps(record), encoding="utf-8")
    reply = RecordDict({"metrics": MetricRecord({"index": index})})
    return Message(reply, reply_to=message)
