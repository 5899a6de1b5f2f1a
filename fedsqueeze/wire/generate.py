"""Regenerate the committed protobuf and gRPC code from ``proto/``.

``python -m fedsqueeze.wire.generate`` (``make protos``) runs the pinned ``grpcio-tools``
protoc with the mypy-protobuf plugins on ``proto/fedsqueeze/v1/*.proto``, with ``proto/``
as the import root so the descriptors are registered as ``fedsqueeze/v1/<name>.proto``
(directory = package, as other gRPC implementations see them). protoc names the modules
``fedsqueeze.v1.<name>_pb2``; they are committed flat in ``fedsqueeze/wire/`` instead, so
the few places that spell the module path are rewritten, by exact string replacement, to
``fedsqueeze.wire.<name>_pb2``. A test runs the same generator into a temporary directory
and compares the bytes with the committed files.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

#: ``proto/`` at the repository root (the import root given to protoc).
PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
#: Where the generated modules are committed.
WIRE_DIR = Path(__file__).resolve().parent
#: The proto package's directory below :data:`PROTO_ROOT`.
PACKAGE_DIR = Path("fedsqueeze") / "v1"
#: The grpcio-tools version whose output is committed.
PINNED_GRPCIO_TOOLS = "1.81.1"

_GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
_HEADER = (
    "# fedsqueeze: generated from proto/{source} by `python -m fedsqueeze.wire.generate`;\n"
    "# module path fedsqueeze.v1.* rewritten to fedsqueeze.wire.*. Do not edit.\n"
)
# mypy-protobuf's stubs trip a few of mypy --strict's own checks (unused ignores,
# overlapping overloads); their types are still used by importers.
_STUB_HEADER = "# mypy: ignore-errors\n"


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """The ``.proto`` files of the package, relative to ``proto_root``, sorted."""
    return sorted(p.relative_to(proto_root) for p in (proto_root / PACKAGE_DIR).glob("*.proto"))


def _plugin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found; install mypy-protobuf (the dev extra)")
    return found


def _check_tools() -> None:
    from importlib.metadata import version

    installed = version("grpcio-tools")
    if installed != PINNED_GRPCIO_TOOLS:
        raise RuntimeError(
            f"grpcio-tools {installed} is installed; the committed code comes from "
            f"{PINNED_GRPCIO_TOOLS} (pip install grpcio-tools=={PINNED_GRPCIO_TOOLS})"
        )


def _rewrite(text: str, stem: str) -> str:
    """Point the generated text at ``fedsqueeze.wire`` instead of ``fedsqueeze.v1``."""
    replacements = (
        (f"from fedsqueeze.v1 import {stem}_pb2 ", f"from fedsqueeze.wire import {stem}_pb2 "),
        (f"'fedsqueeze.v1.{stem}_pb2'", f"'fedsqueeze.wire.{stem}_pb2'"),
        (f"fedsqueeze/v1/{stem}_pb2_grpc.py", f"fedsqueeze/wire/{stem}_pb2_grpc.py"),
        (f"fedsqueeze.v1.{stem}_pb2.", f"fedsqueeze.wire.{stem}_pb2."),
    )
    for old, new in replacements:
        text = text.replace(old, new)
    leftover = [
        line
        for line in text.splitlines()
        if "fedsqueeze.v1" in line and ("import" in line or f"{stem}_pb2" in line)
    ]
    if leftover:
        raise RuntimeError(f"unrewritten module path in generated code: {leftover[0]!r}")
    return text


def generate(out_dir: Path = WIRE_DIR, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Generate the ``*_pb2*.py[i]`` files of every proto into ``out_dir``.

    Parameters
    ----------
    out_dir
        Destination directory (the committed ``fedsqueeze/wire/`` by default).
    proto_root
        The import root holding ``fedsqueeze/v1/*.proto``.

    Returns
    -------
    list of Path
        The files written, sorted.
    """
    _check_tools()
    protos = proto_files(proto_root)
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_root / PACKAGE_DIR}")
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={proto_root}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *(p.as_posix() for p in protos),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"protoc failed:\n{result.stderr}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for proto in protos:
            stem = proto.stem
            for suffix in _GENERATED_SUFFIXES:
                source = Path(tmp) / PACKAGE_DIR / f"{stem}{suffix}"
                text = source.read_text(encoding="utf-8")
                target = out_dir / source.name
                header = _HEADER.format(source=proto.as_posix())
                if target.suffix == ".pyi":
                    header += _STUB_HEADER
                target.write_text(header + _rewrite(text, stem), encoding="utf-8")
                written.append(target)
    return sorted(written)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m fedsqueeze.wire.generate",
        description="Regenerate fedsqueeze/wire/*_pb2*.py[i] from proto/fedsqueeze/v1/*.proto.",
    )
    parser.add_argument("--out", type=Path, default=WIRE_DIR, help="output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in generate(args.out):
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
