"""The committed generated code is exactly what the pinned generator makes from proto/."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from fedsqueeze.wire import generate

pytestmark = pytest.mark.timeout(120)

WIRE = Path(generate.__file__).parent


def test_committed_code_matches_a_fresh_generation(tmp_path: Path) -> None:
    written = generate.generate(out_dir=tmp_path)
    names = sorted(p.name for p in written)
    assert names == [
        "control_pb2.py",
        "control_pb2.pyi",
        "control_pb2_grpc.py",
        "control_pb2_grpc.pyi",
        "transfer_pb2.py",
        "transfer_pb2.pyi",
        "transfer_pb2_grpc.py",
        "transfer_pb2_grpc.pyi",
    ]
    for path in written:
        committed = WIRE / path.name
        assert committed.exists(), f"{path.name} is not committed: run `make protos`"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{path.name} differs from a fresh generation: run `make protos`"
        )


def test_generated_modules_import_from_the_package():
    pb = importlib.import_module("fedsqueeze.wire.transfer_pb2")
    pb_grpc = importlib.import_module("fedsqueeze.wire.transfer_pb2_grpc")
    assert pb.DESCRIPTOR.name == "fedsqueeze/v1/transfer.proto"
    assert pb.DESCRIPTOR.package == "fedsqueeze.v1"
    assert pb.Manifest.__module__ == "fedsqueeze.wire.transfer_pb2"
    assert pb_grpc.fedsqueeze_dot_v1_dot_transfer__pb2 is pb
    service = pb.DESCRIPTOR.services_by_name["ModelTransfer"]
    assert service.full_name == "fedsqueeze.v1.ModelTransfer"
    assert [m.name for m in service.methods] == [
        "Fetch",
        "GetManifest",
        "StreamSegments",
        "PushUpdate",
    ]
    for path in WIRE.glob("*_pb2*"):
        text = path.read_text()
        assert "from fedsqueeze.v1" not in text and "import fedsqueeze.v1" not in text


def test_rewrite_refuses_unknown_module_references():
    with pytest.raises(RuntimeError, match="unrewritten"):
        generate._rewrite("import fedsqueeze.v1.other_pb2\n", "transfer")


def test_main_writes_files(tmp_path: Path) -> None:
    assert generate.main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "transfer_pb2.py").exists()
