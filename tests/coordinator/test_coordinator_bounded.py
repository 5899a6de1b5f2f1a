"""The coordinator's data plane spools large models (threshold lowered to 1 MiB here):
its model source encodes with ``encode_to``, keeps the model an edge decodes from a
lossy encoding as a version (written tensor by tensor), serves what the in-memory path
serves, and deletes its spool folder when it stops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.dataplane import CoordinatorDataPlane, InstructionTemplate
from coordinator.version_store import VersionStore
from edge.dataplane import GrpcConnector
from fedsqueeze.codec import CodecSpec, EncodedModel, encode_state, state_digest
from fedsqueeze.transport.spool import SpoolPolicy

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
NEVER = SpoolPolicy(threshold_bytes=1 << 62)


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(512, 1024, generator=g),
        "b.weight": torch.randn(256, 1024, generator=g),
        "b.bias": torch.randn(256, generator=g),
    }


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def _run(root: Path, spool: SpoolPolicy, spec: str) -> tuple[list[str], list[int], Path | None]:
    """Two rounds (full, then a delta from what the edge holds) through a coordinator's
    data plane with ``spool``; the digests the edge holds, its bytes down, and the
    server's spool folder (``None`` when it made none)."""
    store = VersionStore(root / "state", stream_bytes=MIB)
    plane = CoordinatorDataPlane(store, spool=spool)
    template = InstructionTemplate(down_spec=spec, up_spec="lossless")
    edge = GrpcConnector(spool=SpoolPolicy(threshold_bytes=MIB, directory=root))
    held, digest = None, None
    digests, down = [], []
    folder = None
    try:
        model = _model(0)
        for round_ in (1, 2):
            target = store.publish(model)
            instruction = plane.instruction(template, round_, 1, target)
            fetched = edge.fetch(instruction, "1", digest, held)
            held, digest = fetched.state, fetched.digest
            digests.append(digest)
            down.append(fetched.bytes_down)
            # the coordinator keeps what the edge decoded: the next delta's base
            assert store.get(digest) is not None
            assert torch.equal(store.get(digest)["a.weight"], held["a.weight"])  # type: ignore[index]
            model = {k: v + 0.01 for k, v in model.items()}
        server_spool = plane.server.spool
        folder = server_spool.path if server_spool is not None else None
        if folder is not None:
            assert _files(folder)  # the encodings being served
    finally:
        plane.close()
    return digests, down, folder


@pytest.mark.parametrize("spec", ["int8", "lossless", "quant=8:channel,levels=2+2+4"])
def test_spooled_coordinator_serves_what_the_in_memory_one_does(tmp_path, spec):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    spooled, spooled_down, folder = _run(
        tmp_path / "a", SpoolPolicy(threshold_bytes=MIB, directory=tmp_path / "a"), spec
    )
    memory, memory_down, none = _run(tmp_path / "b", NEVER, spec)
    assert folder is not None and none is None
    assert spooled == memory and spooled_down == memory_down
    assert not folder.exists()  # deleted when the data plane closed


def test_large_versions_are_written_tensor_by_tensor_to_the_same_bytes(tmp_path):
    model = _model(3)
    streamed = VersionStore(tmp_path / "s", stream_bytes=MIB)
    whole = VersionStore(tmp_path / "w")
    digest = streamed.publish(model)
    assert whole.publish(model) == digest
    a = (tmp_path / "s" / "versions" / f"{digest}.fsq").read_bytes()
    b = (tmp_path / "w" / "versions" / f"{digest}.fsq").read_bytes()
    assert a == b == encode_state(model, CodecSpec(entropy_level=1)).to_bytes()
    again = VersionStore(tmp_path / "s", stream_bytes=MIB)  # read back from disk
    state = again.get(digest)
    assert state is not None and state_digest(state).hex() == digest
    assert EncodedModel.from_bytes(a).records
