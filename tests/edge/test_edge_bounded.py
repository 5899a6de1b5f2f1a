"""The edge fetches large models in bounded memory (``GrpcConnector`` with a spool policy).

A real transfer server on loopback (plaintext, port 0) serves a model of a few MB with
the spool threshold lowered to 1 MiB, so the bounded path runs on small inputs: the
payload is kept in a file-backed mapping and decoded part by part into a mapped file.
It must give what the in-memory path gives (digests, tensors, bytes on the wire), fail
with the same typed errors, leave the model the edge held unchanged and leave no file
behind. The memory test runs the edge's fetch of a model of a few hundred MB in a
subprocess whose anonymous memory is polled (:mod:`fedsqueeze.bench.memprobe`).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from edge.dataplane import Fetched, GrpcConnector
from fedsqueeze.codec import state_digest
from fedsqueeze.control import RoundInstruction
from fedsqueeze.errors import IntegrityError, UnavailableError
from fedsqueeze.transport import (
    FaultInjector,
    InMemoryModelSource,
    ServerConfig,
    TokenTable,
    TransferServer,
)
from fedsqueeze.transport.fetch import FetchState
from fedsqueeze.transport.spool import SpoolPolicy
from fedsqueeze.transport.updates import UpdateStore
from tests.polling import until

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
EDGE = "7"
NEVER = SpoolPolicy(threshold_bytes=1 << 62)  # the in-memory path


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(512, 1024, generator=g),  # 2 MiB
        "b.weight": torch.randn(256, 1024, generator=g),
        "b.bias": torch.randn(256, generator=g),
        "steps": torch.tensor(3, dtype=torch.int64),
    }


def _next(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A next round's model: ``a.weight`` changed, the rest exactly as before."""
    g = torch.Generator().manual_seed(seed)
    out = dict(state)
    out["a.weight"] = state["a.weight"] + 0.01 * torch.randn(512, 1024, generator=g)
    return out


class _Server:
    def __init__(self, source: InMemoryModelSource, spool: Path, faults: FaultInjector | None):
        self.tokens, handed = TokenTable.generate([EDGE])
        self.token = handed[EDGE]
        config = ServerConfig(
            segment_bytes=256 * 1024, spool=SpoolPolicy(threshold_bytes=MIB, directory=spool)
        )
        self.server = TransferServer(
            source, UpdateStore(), self.tokens, config=config, plaintext=True, faults=faults
        )
        self.server.start()

    def instruction(self, target: str, spec: str, budget: int = 0) -> RoundInstruction:
        return RoundInstruction(
            server_round=1,
            address=self.server.address,
            target=target,
            down_spec=spec,
            up_spec="lossless",
            task="",
            init_seed=-1,
            init_digest="",
            token=self.token,
            tls=False,
            down_budget=budget,
        )


@pytest.fixture
def faults() -> FaultInjector:
    return FaultInjector()


@pytest.fixture
def serve(tmp_path: Path, faults: FaultInjector) -> Iterator[tuple[InMemoryModelSource, _Server]]:
    source = InMemoryModelSource(keep=4)
    (tmp_path / "srv").mkdir()
    server = _Server(source, tmp_path / "srv", faults)
    try:
        yield source, server
    finally:
        server.server.stop(grace=0)


def _bounded(folder: Path) -> GrpcConnector:
    folder.mkdir(exist_ok=True)
    return GrpcConnector(spool=SpoolPolicy(threshold_bytes=MIB, directory=folder))


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "spec",
    ["int8", "lossless", "quant=4:nf4:block64", "quant=8:channel,levels=2+2+4", "int8,freeze=b.*"],
)
def test_bounded_fetches_equal_the_in_memory_path(serve, tmp_path, spec):
    source, server = serve
    first = source.publish(_model(0))
    second = source.publish(_next(_model(0), 1))
    bounded, memory = _bounded(tmp_path / "edge"), GrpcConnector(spool=NEVER)
    got: dict[str, list[Fetched]] = {"bounded": [], "memory": []}
    for name, plane in (("bounded", bounded), ("memory", memory)):
        held, digest = None, None
        for target in (first, second):
            fetched = plane.fetch(server.instruction(target, spec), EDGE, digest, held)
            got[name].append(fetched)
            held, digest = fetched.state, fetched.digest
    for b, m in zip(got["bounded"], got["memory"], strict=True):
        assert b.spooled and not m.spooled
        assert b.digest == m.digest and _equal(b.state, m.state)
        assert (b.bytes_down, b.bytes_up) == (m.bytes_down, m.bytes_up)
        assert state_digest(b.state).hex() == b.digest
    assert _files(tmp_path / "edge") == []  # mapped files are unlinked at once


def test_a_truncated_progressive_fetch_decodes_its_prefix(serve, tmp_path):
    source, server = serve
    target = source.publish(_model(0))
    bounded = _bounded(tmp_path / "edge")
    instruction = server.instruction(target, "quant=8:channel,levels=2+2+4", budget=400_000)
    fetched = bounded.fetch(instruction, EDGE, None, None)
    reference = GrpcConnector(spool=NEVER).fetch(instruction, EDGE, None, None)
    assert fetched.decoded_levels and fetched.decoded_levels == reference.decoded_levels
    assert fetched.digest == reference.digest and _equal(fetched.state, reference.state)


def test_held_parts_are_shared_not_sent_again(serve, tmp_path):
    source, server = serve
    first = source.publish(_model(0))
    second = source.publish(_next(_model(0), 1))
    plane = _bounded(tmp_path / "edge")
    one = plane.fetch(server.instruction(first, "lossless"), EDGE, None, None)
    two = plane.fetch(server.instruction(second, "lossless"), EDGE, None, None)
    assert two.spooled and two.digest == second
    # b.weight was held: it is the tensor the first fetch decoded, not a copy.
    assert two.state["b.weight"].data_ptr() == one.state["b.weight"].data_ptr()
    assert two.bytes_down < one.bytes_down * 0.8


def _snapshot(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


@pytest.mark.parametrize("threshold", [MIB, 1 << 62], ids=["bounded", "in-memory"])
def test_a_segment_that_keeps_failing_is_the_same_error_and_changes_nothing(
    serve, faults, tmp_path, threshold
):
    source, server = serve
    first = source.publish(_model(0))
    second = source.publish(_next(_model(0), 1))
    folder = tmp_path / "edge"
    folder.mkdir()
    plane = GrpcConnector(spool=SpoolPolicy(threshold_bytes=threshold, directory=folder))
    held = plane.fetch(server.instruction(first, "int8"), EDGE, None, None)
    before = _snapshot(held.state)
    faults.corrupt_segment(1, times=100)
    with pytest.raises(IntegrityError, match="failed verification"):
        plane.fetch(server.instruction(second, "int8"), EDGE, held.digest, held.state)
    assert _equal(held.state, before) and state_digest(held.state).hex() == held.digest
    assert _files(folder) == []


@pytest.mark.parametrize("threshold", [MIB, 1 << 62], ids=["bounded", "in-memory"])
def test_a_model_that_fails_its_digest_is_the_same_error_and_changes_nothing(
    serve, tmp_path, monkeypatch, threshold
):
    import fedsqueeze.transport.prepare as prepare

    source, server = serve
    first = source.publish(_model(0))
    second = source.publish(_next(_model(0), 1))
    folder = tmp_path / "edge"
    folder.mkdir()
    plane = GrpcConnector(spool=SpoolPolicy(threshold_bytes=threshold, directory=folder))
    held = plane.fetch(server.instruction(first, "int8"), EDGE, None, None)
    before = _snapshot(held.state)
    # A broken server: the manifest names another decoded model than the stream's.
    wrong = b"\x01" * 32
    monkeypatch.setattr(prepare, "state_digest", lambda _state: wrong)
    monkeypatch.setattr(prepare, "decoded_digest", lambda *_args: wrong)
    with pytest.raises(IntegrityError, match="does not match the manifest's digest"):
        plane.fetch(server.instruction(second, "int8"), EDGE, held.digest, held.state)
    assert _equal(held.state, before) and state_digest(held.state).hex() == held.digest
    assert _files(folder) == []


def test_a_dropped_stream_resumes_without_resending_held_segments(serve, faults, tmp_path):
    source, server = serve
    target = source.publish(_model(0))
    clean = _bounded(tmp_path / "a").fetch(server.instruction(target, "lossless"), EDGE, None, None)
    faults.cut_streams_after(4, times=2)
    cut = _bounded(tmp_path / "b").fetch(server.instruction(target, "lossless"), EDGE, None, None)
    assert faults.cuts == 2 and cut.spooled and cut.digest == clean.digest
    # Each resume costs a request and framing, never a segment again (256 KiB each).
    assert clean.bytes_down <= cut.bytes_down < clean.bytes_down + 16 * 1024
    assert _equal(cut.state, clean.state)


def test_a_spool_folder_that_cannot_take_files_falls_back_to_memory(serve, tmp_path):
    source, server = serve
    target = source.publish(_model(0))
    missing = SpoolPolicy(threshold_bytes=MIB, directory=tmp_path / "missing")
    fetched = GrpcConnector(spool=missing).fetch(
        server.instruction(target, "lossless"), EDGE, None, None
    )
    assert not fetched.spooled and fetched.digest == target


def test_a_fetch_that_fails_keeps_its_segments_for_the_next_one(tmp_path, faults, monkeypatch):
    """The server goes away mid-fetch and stays away past the client's retries: the next
    fetch of the same target (a restarted server) gets only the segments not held."""
    source = InMemoryModelSource(keep=4)
    target = source.publish(_model(0))
    (tmp_path / "s1").mkdir()
    (tmp_path / "s2").mkdir()
    one = _Server(source, tmp_path / "s1", faults)
    faults.pause_streams_after(4)
    plane = _bounded(tmp_path / "edge")
    states: list[FetchState] = []
    made = plane._new_state

    def recorded() -> FetchState:
        states.append(made())
        return states[-1]

    monkeypatch.setattr(plane, "_new_state", recorded)

    def stop_when_paused() -> None:
        # The server has sent four segments; stop it once the edge holds them (on a busy
        # machine gRPC may not have delivered them when the stream pauses).
        faults.paused.wait(30)
        until(lambda: bool(states) and len(states[0].held_ids()) >= 4, what="4 segments held")
        one.server.stop(grace=0)

    stopper = threading.Thread(target=stop_when_paused, daemon=True)
    stopper.start()
    with pytest.raises(UnavailableError):
        plane.fetch(one.instruction(target, "lossless"), EDGE, None, None)
    stopper.join(timeout=30)
    two = _Server(source, tmp_path / "s2", None)
    try:
        resumed = plane.fetch(two.instruction(target, "lossless"), EDGE, None, None)
        clean = _bounded(tmp_path / "other").fetch(
            two.instruction(target, "lossless"), EDGE, None, None
        )
    finally:
        two.server.stop(grace=0)
    assert resumed.spooled and resumed.digest == clean.digest == target
    assert _equal(resumed.state, clean.state)
    # at least three of the four 256 KiB segments held were not sent again
    assert resumed.bytes_down < clean.bytes_down - 3 * 256 * 1024


@pytest.mark.timeout(300)  # 18 s on the idle machine, 47 s beside a 1B benchmark
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_edge_fetch_of_a_large_model_stays_within_a_tenth_of_it(tmp_path):
    """The edge's own fetch (``GrpcConnector.fetch``) of a 160 MB model from the
    coordinator's data plane, full then as a delta from what it holds, each side in a
    child process: the edge's anonymous memory beyond its baseline stays within 10% of
    the model plus a fixed 16 MiB allowance. The coordinator's (beyond its baseline after
    loading its versions) stays within 10% plus 48 MiB: in memory it would hold the
    encoding and the decoded model it adopts (above 100%); its fixed working memory
    (20-43 MB here, by the machine's load) is most of what it holds at this size; the
    benchmark checks the 10% bound at 246M and 1B parameters (BENCHMARKS.md). Its spool
    folder is gone once it stopped."""
    from fedsqueeze.bench.bigmodel import model_shapes, write_model
    from fedsqueeze.bench.edgefetch import measure_edge

    model = tmp_path / "model.safetensors"
    raw = 4 * write_model(model, model_shapes(40_000_000, 8))
    got = measure_edge(model, "int8", tmp_path / "run", threshold=64 * MIB, timeout=280)
    edge, coordinator = got["edge"], got["coordinator"]
    assert edge["spooled"] == [True, True] and coordinator["spooled"]
    bound = 0.10 * raw + 16 * MIB
    assert edge["extra"] <= bound, f"edge: {edge['extra'] / 1e6:.1f} MB beyond its baseline"
    extra = coordinator["extra"]
    # Unbounded, it would hold the encoding and the decoded model (above 100%); what it
    # holds here is fixed working memory (thread pools, malloc's per-thread arenas),
    # 20 MB on an idle machine and up to 43 MB beside other work.
    allowance = 48 * MIB
    assert extra <= 0.10 * raw + allowance, f"coordinator: {extra / 1e6:.1f} MB beyond its baseline"
    assert coordinator["spool_files_left"] == 0 and not coordinator["spool_dir_left"]
