"""Content-addressed parts end to end: tensors the edge holds exactly do not travel."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedsqueeze.codec import CodecSpec, preset, state_digest
from fedsqueeze.errors import HeldPartError, InvalidRequestError
from fedsqueeze.transport import FetchResult, InMemoryModelSource
from fedsqueeze.transport.parts import (
    HeldVersions,
    part_digest,
    reassemble,
    resolve_held_parts,
)
from fedsqueeze.wire import transfer_pb2 as pb
from fedsqueeze.wire.convert import (
    fetch_request_to_proto,
    manifest_from_proto,
    manifest_to_proto,
)
from fedsqueeze.wire.types import Manifest, ManifestRequest, PartRef, SegmentInfo
from tests.transport.conftest import make_state, perturb

pytestmark = pytest.mark.timeout(60)


def _student(teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A small model that shares the teacher's largest tensor under another name."""
    g = torch.Generator().manual_seed(9)
    return {
        "embed.weight": teacher["fc.weight"].clone(),
        "head.weight": torch.randn(10, 64, generator=g),
    }


def _publish_teacher_and_student(
    source: InMemoryModelSource,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Publish a teacher (global track) and its :func:`_student` (student track)."""
    teacher = make_state(0)
    source.publish(teacher)
    student = _student(teacher)
    source.publish(student, track="student")
    return teacher, student


def _held(*states: dict[str, torch.Tensor]) -> HeldVersions:
    return HeldVersions.of({state_digest(s): s for s in states})


def _exact(result: FetchResult, expected: dict[str, torch.Tensor]) -> None:
    assert result.state is not None
    assert state_digest(result.state) == state_digest(expected)
    for name, tensor in expected.items():
        assert torch.equal(result.state[name], tensor)


def test_a_part_of_another_track_is_not_sent(source, store, start_server, connect):
    teacher, student = _publish_teacher_and_student(source)
    client = connect(start_server(source, store))
    plain = client.fetch("student", spec=CodecSpec())
    parts = client.fetch("student", spec=CodecSpec(), held=_held(teacher))
    assert [ref.tensor_name for ref in parts.manifest.held_parts] == ["embed.weight"]
    _exact(parts, student)
    # The shared embedding is 1 MiB raw (random floats: lossless coding keeps most of it);
    # with it held, the student's stream keeps only the head.
    shared = student["embed.weight"].numel() * student["embed.weight"].element_size()
    assert plain.stats.wire.received > 0.75 * shared
    assert parts.stats.wire.received < 4 << 10
    assert parts.stats.calls == 1


def test_an_unchanged_layer_is_not_sent_from_an_older_base(source, store, start_server, connect):
    v0 = make_state(0)
    v1 = perturb(v0, seed=1)
    v2 = perturb(v1, seed=2)
    v2["fc.weight"] = v1["fc.weight"]  # the layer did not move since v1
    for v in (v0, v1, v2):
        source.publish(v)
    client = connect(start_server(source, store))
    plain = client.fetch(spec=CodecSpec(), base=v0)
    parts = client.fetch(spec=CodecSpec(), base=v0, held=_held(v0, v1))
    assert parts.manifest.base_digest == state_digest(v0)
    assert [ref.tensor_name for ref in parts.manifest.held_parts] == ["fc.weight"]
    _exact(parts, v2)
    saved = plain.stats.wire.received - parts.stats.wire.received
    # its float32 XOR delta: lossless coding keeps most of its 4 bytes per value
    assert saved > v2["fc.weight"].numel() * 2


def test_a_replaced_version_comes_back_without_bytes(source, store, start_server, connect):
    v1 = make_state(0)
    v2 = perturb(v1, seed=1)
    source.publish(v1)
    source.publish(v2)
    source.publish(v1)  # rolled back
    client = connect(start_server(source, store))
    parts = client.fetch(spec=CodecSpec(), base=v2, held=_held(v1, v2))
    names = {ref.tensor_name for ref in parts.manifest.held_parts}
    assert names == {"conv.weight", "fc.weight", "fc.bias"}  # conv.bias: 128 B, sent
    _exact(parts, v1)
    assert parts.stats.wire.received < 2 << 10


def test_lossy_spec_keeps_held_parts_exact(source, store, start_server, connect):
    teacher, student = _publish_teacher_and_student(source)
    client = connect(start_server(source, store))
    result = client.fetch("student", spec=preset("int8"), held=_held(teacher))
    assert result.state is not None
    assert torch.equal(result.state["embed.weight"], teacher["fc.weight"])
    assert not torch.equal(result.state["head.weight"], student["head.weight"])
    assert state_digest(result.state) == result.manifest.decoded_digest


def test_a_poisoned_cached_part_is_caught_and_refetched(source, store, start_server, connect):
    teacher, student = _publish_teacher_and_student(source)
    client = connect(start_server(source, store))
    honest = _held(teacher)
    wrong = teacher["fc.weight"].clone()
    wrong[0, 0] += 1.0
    poisoned = HeldVersions(
        honest.digests, {**honest.parts, part_digest(teacher["fc.weight"]): wrong}
    )
    result = client.fetch("student", spec=CodecSpec(), held=poisoned)
    _exact(result, student)  # never the wrong model
    assert result.manifest.held_parts == ()
    assert result.stats.calls == 2
    shared = student["embed.weight"].numel() * student["embed.weight"].element_size()
    assert result.stats.wire.received > 0.75 * shared  # the shared tensor came after all


def test_an_evicted_part_on_the_edge_means_a_refetch(source, store, start_server, connect):
    teacher, student = _publish_teacher_and_student(source)
    client = connect(start_server(source, store))
    evicted = HeldVersions((state_digest(teacher),), {})
    result = client.fetch("student", spec=CodecSpec(), held=evicted)
    _exact(result, student)
    assert result.stats.calls == 2


def test_a_version_the_server_no_longer_holds_degrades_to_sending(store, start_server, connect):
    teacher = make_state(0)
    restarted = InMemoryModelSource(keep=3)  # a server that never saw the teacher
    student = _student(teacher)
    restarted.publish(student, track="student")
    client = connect(start_server(restarted, store))
    result = client.fetch("student", spec=CodecSpec(), held=_held(teacher))
    assert result.manifest.held_parts == ()
    _exact(result, student)
    assert result.stats.calls == 1


def test_nothing_changes_without_held_digests(source, store, start_server, connect):
    teacher = make_state(0)
    source.publish(teacher)
    # Shares a tensor with the base under another name: still sent when not asked.
    student = {**perturb(teacher, seed=3), "copy.weight": teacher["fc.weight"].clone()}
    source.publish(student, track="student")
    client = connect(start_server(source, store))
    request = ManifestRequest("student", state_digest(teacher), CodecSpec())
    assert (
        pb.FetchRequest.FromString(fetch_request_to_proto(request).SerializeToString()).held_digests
        == []
    )
    a = client.fetch("student", spec=CodecSpec(), base=teacher)
    b = client.fetch("student", spec=CodecSpec(), base=teacher, held=HeldVersions.of({}))
    assert a.manifest == b.manifest
    assert a.manifest.held_parts == ()
    assert a.stats.wire == b.stats.wire
    # The same edge naming one more version: the copy need not travel.
    other = perturb(teacher, seed=4)
    source.publish(other, track="other")
    c = client.fetch("student", spec=CodecSpec(), base=teacher, held=_held(teacher, other))
    assert [ref.tensor_name for ref in c.manifest.held_parts] == ["copy.weight"]
    _exact(c, student)


# ----------------------------------------------------------------- hostile manifests
def _manifest(**kwargs: Any) -> Manifest:
    info = SegmentInfo(0, kwargs.pop("names", ()), 0, 0, 10, b"\x01" * 32)
    return Manifest(b"k" * 16, b"\x02" * 32, None, CodecSpec(), 10, b"\x02" * 32, (info,), **kwargs)


def test_held_parts_naming_a_tensor_twice_are_refused():
    ref = PartRef("a", b"\x03" * 32)
    with pytest.raises(ValueError, match="twice"):
        _manifest(held_parts=(ref, PartRef("a", b"\x04" * 32)))


def test_held_parts_naming_a_streamed_tensor_are_refused():
    with pytest.raises(ValueError, match="also carries"):
        _manifest(names=("a",), held_parts=(PartRef("a", b"\x03" * 32),))
    with pytest.raises(HeldPartError, match="both in the stream and held"):
        reassemble({"a": torch.zeros(2)}, {"a": torch.ones(2)})


def test_held_parts_the_request_did_not_ask_for_are_refused():
    request = ManifestRequest("global", None, CodecSpec())
    manifest = _manifest(held_parts=(PartRef("a", b"\x03" * 32),))
    asked = ManifestRequest("global", None, CodecSpec(), held_digests=(b"\x05" * 32,))
    msg = manifest_to_proto(manifest, asked)
    with pytest.raises(InvalidRequestError, match="named no held versions"):
        manifest_from_proto(msg, request)
    assert manifest_from_proto(msg, asked) == manifest


def test_a_held_part_the_edge_lacks_raises_a_clear_error():
    lacking = PartRef("fc.weight", b"\x03" * 32)
    manifest = _manifest(held_parts=(lacking,))
    held = _held({"x": torch.zeros(3)})
    with pytest.raises(HeldPartError, match=r"'fc\.weight'.*does not hold"):
        resolve_held_parts(manifest, held)
    with pytest.raises(HeldPartError, match="holds none"):
        resolve_held_parts(manifest, None)


def test_held_digests_are_canonical_and_bounded():
    a, b = b"\x01" * 32, b"\x02" * 32
    with pytest.raises(ValueError, match="sorted"):
        ManifestRequest("global", None, CodecSpec(), held_digests=(b, a))
    with pytest.raises(ValueError, match="repeats the base"):
        ManifestRequest("global", a, CodecSpec(), held_digests=(a,))
    with pytest.raises(ValueError, match="at most"):
        digests = tuple(bytes([i]) * 32 for i in range(17))
        ManifestRequest("global", None, CodecSpec(), held_digests=digests)
