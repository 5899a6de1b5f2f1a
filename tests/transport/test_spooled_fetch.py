"""Large models through the data plane on disk: the server's spooled segments, the
client's file-backed buffer and part-by-part decode (threshold lowered to 1 MiB)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedsqueeze.codec import CodecSpec, encode_state, split_segments, state_digest
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.errors import BaseMismatchError, ConfigError, FedsqueezeError, IntegrityError
from fedsqueeze.modelfile import map_model
from fedsqueeze.transport import FaultInjector, FetchState, ServerConfig
from fedsqueeze.transport.spool import (
    SpooledStream,
    SpoolFile,
    SpoolPolicy,
    StreamPiece,
    plan_segments,
)
from tests.transport.conftest import make_state, perturb

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20


def _policy(folder: Path, threshold: int = 256 * 1024) -> SpoolPolicy:
    folder.mkdir(exist_ok=True)
    return SpoolPolicy(threshold_bytes=threshold, directory=folder)


def _config(folder: Path | None, **kwargs: object) -> ServerConfig:
    spool = _policy(folder, MIB) if folder is not None else None
    return ServerConfig(segment_bytes=256 * 1024, spool=spool, **kwargs)  # type: ignore[arg-type]


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("text", ["int8", "lossless", "quant=4:nf4:block64", "prune90-int4"])
def test_spooled_fetch_equals_the_in_memory_path(
    text, source, store, start_server, connect, tmp_path
):
    state = make_state(0, scale=4)  # about 4.4 MB
    source.publish(state)
    spec = parse_spec(text)
    memory = start_server(source, store, config=_config(None))
    reference = connect(memory).fetch(spec=spec)
    spooled_server = start_server(source, store, config=_config(tmp_path / "srv"))
    client = connect(spooled_server)
    out = tmp_path / "model.safetensors"
    result = client.fetch_into(spec=spec, output=out, spool=_policy(tmp_path / "cli", 4096))
    # the same encoding: segments, digests, manifest key (so resumes across paths work)
    assert result.manifest == reference.manifest
    assert spooled_server.stats().cache.spool_bytes > 0
    assert spooled_server.stats().cache.nbytes == 0
    assert result.spooled and result.output == out
    assert reference.state is not None
    assert _equal(map_model(out), reference.state)
    assert _files(tmp_path / "cli") == []  # the client's buffer file was unlinked at once
    assert len(_files(tmp_path / "srv")) == 1
    spooled_server.stop(grace=0)
    assert _files(tmp_path / "srv") == []
    assert list((tmp_path / "srv").iterdir()) == []  # the server's own folder too


def test_spooled_delta_into_existing_tensors(source, store, start_server, connect, tmp_path):
    v1 = make_state(0, scale=4)
    v2 = perturb(v1, seed=1)
    source.publish(v1)
    source.publish(v2)
    spec = parse_spec("int8")
    memory = start_server(source, store, config=_config(None))
    reference = connect(memory).fetch(spec=spec, base=v1)
    server = start_server(source, store, config=_config(tmp_path / "srv"))
    into = {k: v.clone() for k, v in v1.items()}
    result = connect(server).fetch_into(
        spec=spec, into=into, base=into, spool=_policy(tmp_path / "cli")
    )
    assert result.manifest.base_digest == state_digest(v1)
    assert result.manifest == reference.manifest
    assert reference.state is not None and _equal(into, reference.state)
    with pytest.raises(BaseMismatchError):
        connect(server).fetch_into(
            spec=spec, into={"fc.weight": torch.zeros(3)}, spool=_policy(tmp_path / "cli")
        )


def test_spooled_fetch_resumes_after_a_dropped_connection(
    source, store, start_server, connect, tmp_path
):
    state = make_state(0, scale=4)
    digest = source.publish(state)
    faults = FaultInjector()
    faults.cut_streams_after(3, times=2)
    server = start_server(source, store, config=_config(tmp_path / "srv"), faults=faults)
    held = FetchState(spool=_policy(tmp_path / "cli"))
    out = tmp_path / "model.safetensors"
    result = connect(server).fetch_into(
        spec=CodecSpec(), output=out, state=held, spool=_policy(tmp_path / "cli")
    )
    assert faults.cuts == 2
    assert result.stats is not None and result.stats.retries == 2
    assert result.stats.resumed_segments == 3 + 6
    assert result.spooled
    assert state_digest(map_model(out)).hex() == digest


def test_eviction_deletes_the_spool_file(source, store, start_server, connect, tmp_path):
    server = start_server(source, store, config=_config(tmp_path / "srv", cache_entries=1))
    client = connect(server)
    for seed in (0, 1):
        source.publish(make_state(seed, scale=4))
        client.fetch_into(spec=parse_spec("int8"), into=make_state(9, scale=4))
        assert len(_files(tmp_path / "srv")) == 1  # the older entry's file is gone
    assert server.stats().cache.evictions == 1


def test_a_truncated_spool_file_is_a_typed_error_and_is_dropped(
    source, store, start_server, connect, tmp_path
):
    source.publish(make_state(0, scale=4))
    server = start_server(source, store, config=_config(tmp_path / "srv"))
    client = connect(server)
    client.fetch(spec=CodecSpec(), decode=False)
    (spool_file,) = _files(tmp_path / "srv")
    os.truncate(spool_file, 1000)
    with pytest.raises(IntegrityError):
        client.fetch(spec=CodecSpec(), decode=False)
    assert server.stats().cache.entries == 0 and _files(tmp_path / "srv") == []
    assert client.fetch(spec=CodecSpec()).state is not None  # encoded again


def test_a_spool_directory_that_is_not_writable_is_a_config_error(
    source, store, start_server, tmp_path
):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    bad = SpoolPolicy(threshold_bytes=MIB, directory=not_a_folder)
    with pytest.raises(ConfigError, match="not a writable directory"):
        start_server(source, store, config=ServerConfig(spool=bad))
    with pytest.raises(ConfigError, match="not a writable directory"):
        FetchState(spool=bad)
    with pytest.raises(ValueError):
        SpoolPolicy(threshold_bytes=-1)
    with pytest.raises(TypeError):
        SpoolPolicy(directory="/tmp")  # type: ignore[arg-type]


def test_small_models_stay_in_memory(source, store, start_server, connect, tmp_path):
    source.publish(make_state(0))  # 1.2 MB of tensors, about 0.3 MB encoded int8
    server = start_server(
        source,
        store,
        config=ServerConfig(spool=SpoolPolicy(threshold_bytes=64 * MIB, directory=tmp_path)),
    )
    result = connect(server).fetch_into(
        spec=parse_spec("int8"), into=make_state(5), spool=_policy(tmp_path / "cli", 64 * MIB)
    )
    assert not result.spooled
    assert server.stats().cache.spool_bytes == 0 and server.stats().cache.nbytes > 0
    assert _files(tmp_path) == []


def test_published_file_is_served_without_a_copy(source, store, start_server, connect, tmp_path):
    from safetensors.torch import save_file

    from fedsqueeze.bench.memprobe import anon_bytes

    state = {**make_state(3, scale=4), "big.weight": torch.randn(8 << 20)}  # + 32 MiB
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    before = anon_bytes()
    digest = source.publish_file(path)
    assert anon_bytes() - before < 16 * MIB  # mapped, not read into memory
    assert digest == state_digest(state).hex()
    server = start_server(source, store, config=_config(tmp_path / "srv"))
    out = tmp_path / "out.safetensors"
    spec = parse_spec("fp16")
    connect(server).fetch_into(spec=spec, output=out, spool=_policy(tmp_path / "c"))
    reference = connect(server).fetch(spec=spec)
    assert reference.state is not None and _equal(map_model(out), reference.state)


def test_planned_cuts_are_those_of_split_segments():
    state = make_state(0, scale=2)
    for text in ("int8", "lossless", "topk10-int4"):
        encoded = encode_state(state, parse_spec(text))
        lengths = [(None, len(encoded.header.to_bytes()))] + [
            (r.name, len(r.to_bytes())) for r in encoded.records
        ]
        for size in (64, 1000, 128 * 1024, 1 << 20):
            planned = plan_segments(lengths, size)
            actual = split_segments(encoded, size)
            assert [(p.end - p.start, p.tensor_names) for p in planned] == [
                (len(s.payload), s.tensor_names) for s in actual
            ]


def test_spooled_stream_reads_across_pieces(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    file = SpoolFile(tmp_path / "f", fd)
    a = file.put(b"0123456789")
    stream = SpooledStream(
        [
            StreamPiece(b"HEAD", 0, 4),
            StreamPiece(None, a + 2, 5),
            StreamPiece(b"", 0, 0),
            StreamPiece(b"xy", 0, 2),
        ],
        file,
    )
    assert stream.nbytes == 11
    assert stream.read(0, 11) == b"HEAD23456xy"
    assert stream.read(3, 9) == b"D23456"
    assert stream.read(5, 5) == b""
    with pytest.raises(ValueError):
        stream.read(0, 12)
    file.release()
    assert not (tmp_path / "f").exists()


def test_a_failed_preparation_leaves_no_spool_file(source, store, start_server, connect, tmp_path):
    state = make_state(0, scale=4)
    state["fc.weight"][3, 3] = float("nan")  # refused by the encoder, mid-model
    source.publish(state)
    server = start_server(source, store, config=_config(tmp_path / "srv"))
    with pytest.raises(FedsqueezeError, match=r"(?i)non-?finite|nan"):
        connect(server).fetch_into(spec=parse_spec("int8"), into=make_state(0, scale=4))
    assert _files(tmp_path / "srv") == []
    assert server.stats().cache.entries == 0


def test_a_full_disk_is_a_typed_error(tmp_path, monkeypatch):
    import errno

    from fedsqueeze.errors import ResourceExhaustedError

    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    file = SpoolFile(tmp_path / "f", fd)

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(ResourceExhaustedError, match="no room"):
        file.put(b"x" * 10)
    file.release()


def test_an_entry_evicted_mid_stream_finishes_its_stream(
    source, store, start_server, connect, tmp_path
):
    import threading

    first = make_state(0, scale=4)
    source.publish(first)
    faults = FaultInjector()
    faults.pause_streams_after(2)
    config = _config(tmp_path / "srv", cache_entries=1)
    server = start_server(source, store, config=config, faults=faults)
    got: dict[str, object] = {}
    slow = connect(server)
    thread = threading.Thread(target=lambda: got.update(r=slow.fetch(spec=CodecSpec())))
    thread.start()
    assert faults.paused.wait(30)
    source.publish(make_state(1, scale=4))
    connect(server, edge_id="edge-1").fetch(spec=CodecSpec(), decode=False)  # evicts it
    assert server.stats().cache.evictions == 1
    assert len(_files(tmp_path / "srv")) == 1  # the first file is deleted, still open
    faults.release.set()
    thread.join(30)
    result = got["r"]
    assert result.state is not None  # type: ignore[attr-defined]
    assert state_digest(result.state) == state_digest(first)  # type: ignore[attr-defined]
    assert result.stats.retries == 0  # type: ignore[attr-defined]
