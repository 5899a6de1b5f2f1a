"""``make gpu-wheels``' pieces: what is carried, how Ray's wheel is repacked."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from fedsqueeze.bench import gpuwheels


def test_closure_carries_what_the_image_lacks() -> None:
    needed = gpuwheels.closure(["flwr[simulation]==1.42.*", "zstandard", "blake3"])
    for name in ("flwr", "ray", "zstandard", "blake3", "protobuf", "grpcio", "typer"):
        assert name in needed, name
    for name in ("torch", "numpy", "uv", "requests", "pyyaml"):  # the image's, or never
        assert name not in needed, name
    assert needed["flwr"].startswith("1.42")


def test_an_unknown_package_is_an_error() -> None:
    with pytest.raises(LookupError, match="not installed here"):
        gpuwheels.closure(["surely-not-a-package-gpupath"])


@pytest.mark.parametrize(
    ("name", "fits"),
    [
        ("flwr-1.42.0-py3-none-any.whl", True),
        ("protobuf-6.33.6-cp39-abi3-manylinux2014_x86_64.whl", True),
        ("ray-2.55.1-cp312-cp312-manylinux2014_x86_64.whl", True),
        ("ray-2.55.1-cp311-cp311-manylinux2014_x86_64.whl", False),
        ("x-1-cp311.cp312-cp311-manylinux2014_x86_64.whl", True),
    ],
)
def test_wheels_for_cpython_312(name: str, fits: bool) -> None:
    assert gpuwheels._fits_312(name) is fits


def test_repack_drops_and_recompresses(tmp_path: Path) -> None:
    wheel = tmp_path / "ray-1.0-cp312-cp312-manylinux2014_x86_64.whl"
    files = {
        "ray/__init__.py": b"x = 1\n" * 1000,
        "ray/jars/ray_dist.jar": b"\0" * 5000,
        "ray/dashboard/client/build/main.js": b"js" * 3000,
        "ray/dashboard/agent.py": b"agent = 1\n",
    }
    record = "".join(f"{n},sha256=abc,{len(d)}\n" for n, d in files.items())
    record += "ray-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr("ray-1.0.dist-info/RECORD", record)
    saved = gpuwheels.repack(wheel, gpuwheels.RAY_STRIP, strip_elf=True)
    assert saved > 0
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert names == {"ray/__init__.py", "ray/dashboard/agent.py", "ray-1.0.dist-info/RECORD"}
        assert all(i.compress_type == zipfile.ZIP_LZMA for i in z.infolist())
        assert z.read("ray/__init__.py") == files["ray/__init__.py"]
        kept = z.read("ray-1.0.dist-info/RECORD").decode()
    assert "jars" not in kept and "client/build" not in kept and "ray/__init__.py" in kept
