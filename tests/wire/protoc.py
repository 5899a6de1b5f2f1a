"""Compile ``proto/`` with the pinned protoc into a FileDescriptorSet, as a foreign tool would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

from fedsqueeze.wire.generate import PROTO_ROOT, proto_files


def descriptor_set(tmp_path: Path, source_info: bool = False) -> descriptor_pb2.FileDescriptorSet:
    """The descriptors of every ``.proto`` under ``proto/``, compiled independently."""
    out = tmp_path / "transfer.desc"
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--descriptor_set_out={out}",
        "--include_imports",
        *(["--include_source_info"] if source_info else []),
        *(p.as_posix() for p in proto_files()),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    return fds
