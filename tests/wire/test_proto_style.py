"""Every .proto follows the protobuf style guide, and only ever grows compatibly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from tests.wire.protoc import descriptor_set

pytestmark = pytest.mark.timeout(60)

SNAKE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")
PASCAL = re.compile(r"[A-Z][A-Za-z0-9]*")
#: The .proto files of fedsqueeze.v1; each has a field snapshot ``<name>_v1_fields.json``.
PROTO_NAMES = ("transfer", "control")

# Paths into FileDescriptorProto (descriptor.proto field numbers).
MESSAGE, ENUM, SERVICE = 4, 5, 6
FIELD, ONEOF, VALUE, METHOD = 2, 8, 2, 2


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    files = descriptor_set(tmp_path_factory.mktemp("desc"), source_info=True).file
    return {f.name: f for f in files}


@pytest.fixture(params=PROTO_NAMES)
def proto(request, compiled):
    return compiled[f"fedsqueeze/v1/{request.param}.proto"]


def _snapshot_path(proto: descriptor_pb2.FileDescriptorProto) -> Path:
    return Path(__file__).parent / f"{Path(proto.name).stem}_v1_fields.json"


def test_every_proto_file_is_checked(compiled):
    assert sorted(compiled) == sorted(f"fedsqueeze/v1/{n}.proto" for n in PROTO_NAMES)


def _comments(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    return {tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location}


def test_package_is_versioned_and_matches_the_directory(proto):
    assert proto.package == "fedsqueeze.v1"
    assert proto.name.startswith("fedsqueeze/v1/") and proto.name.endswith(".proto")
    assert proto.syntax == "proto3"
    assert list(proto.dependency) == []  # loadable on its own


def test_everything_is_commented(proto):
    comments = _comments(proto)
    missing = []
    for i, message in enumerate(proto.message_type):
        if not comments.get((MESSAGE, i)):
            missing.append(message.name)
        for j, field in enumerate(message.field):
            if not comments.get((MESSAGE, i, FIELD, j)):
                missing.append(f"{message.name}.{field.name}")
        for k, oneof in enumerate(message.oneof_decl):
            if not oneof.name.startswith("_") and not comments.get((MESSAGE, i, ONEOF, k)):
                missing.append(f"{message.name}.{oneof.name}")
    for i, enum in enumerate(proto.enum_type):
        if not comments.get((ENUM, i)):
            missing.append(enum.name)
        for j, value in enumerate(enum.value):
            if not comments.get((ENUM, i, VALUE, j)):
                missing.append(value.name)
    for i, service in enumerate(proto.service):
        if not comments.get((SERVICE, i)):
            missing.append(service.name)
        for j, method in enumerate(service.method):
            if not comments.get((SERVICE, i, METHOD, j)):
                missing.append(f"{service.name}.{method.name}")
    assert missing == []


def test_names_follow_the_style_guide(proto):
    for message in proto.message_type:
        assert PASCAL.fullmatch(message.name)
        for field in message.field:
            assert SNAKE.fullmatch(field.name), field.name
    for enum in proto.enum_type:
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
        assert enum.value[0].number == 0
        assert enum.value[0].name == prefix + "UNSPECIFIED"
        assert all(v.name.startswith(prefix) for v in enum.value)
    for service in proto.service:
        for method in service.method:
            assert method.input_type == f".fedsqueeze.v1.{method.name}Request"
            assert method.output_type == f".fedsqueeze.v1.{method.name}Response"


def test_fields_are_only_added_or_reserved(proto):
    """Every field of the v1 snapshot still exists with its number and type, or is reserved."""
    snapshot = json.loads(_snapshot_path(proto).read_text())
    messages = {m.name: m for m in proto.message_type}
    problems = []
    for message_name, fields in snapshot.items():
        message = messages.get(message_name)
        if message is None:
            problems.append(f"message {message_name} removed (reserve it in a new version)")
            continue
        current = {f.name: f for f in message.field}
        reserved_numbers = {n for r in message.reserved_range for n in range(r.start, r.end)}
        for name, (number, type_) in fields.items():
            field = current.get(name)
            if field is None:
                if number not in reserved_numbers or name not in message.reserved_name:
                    problems.append(f"{message_name}.{name} removed without `reserved`")
            elif (field.number, field.type) != (number, type_):
                problems.append(f"{message_name}.{name} changed number or type")
        numbers = [f.number for f in message.field]
        assert len(numbers) == len(set(numbers))
    assert problems == []


def current_snapshot(
    proto: descriptor_pb2.FileDescriptorProto,
) -> dict[str, dict[str, list[int]]]:
    """The snapshot format (to extend the JSON file after adding fields)."""
    return {m.name: {f.name: [f.number, f.type] for f in m.field} for m in proto.message_type}


def test_snapshot_covers_every_message(proto):
    snapshot = json.loads(_snapshot_path(proto).read_text())
    current = current_snapshot(proto)
    for name, fields in current.items():
        assert name in snapshot, f"add {name} to {_snapshot_path(proto).name}"
        assert set(fields) <= set(snapshot[name]), f"add new fields of {name} to the snapshot"
