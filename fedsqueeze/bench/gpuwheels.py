"""`make gpu-wheels`: the wheels `make gpu-check` installs on a lent GPU machine, which has
no network.

The machine's image holds torch (with CUDA), numpy, grpcio, protobuf and much else, but
not Flower, Ray, zstandard, blake3, isal or fedsqueeze itself. This downloads, for
CPython 3.12 on manylinux x86-64 and at the versions installed here (the ones the tests
pass with), every package of fedsqueeze's requirements (and ``blake3``) that the image
lacks, following their requirements too, plus ``protobuf`` and ``grpcio`` even though the
image has them (the generated wire code checks their versions at import) and ``typer``,
``click`` and ``rich`` (Flower pins them), and builds fedsqueeze's own wheel. Ray's wheel
(70 MiB, over what one call of the device tool may carry) is repacked without its Java
jars and the dashboard's web front end, which a local simulation never loads, and with
its three large binaries stripped of their symbol tables; every wheel over 1 MiB is
recompressed with LZMA (pip reads it as it reads DEFLATE). Together: 52.9 MiB instead of
90 (ray 2.55.1: 26 MiB instead of 71).

``make gpu-check`` then installs them with ``pip install --no-index --no-deps --target``
(nothing from the network, the image's torch untouched) and puts that folder first on
``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

__all__ = ["IMAGE_PACKAGES", "closure", "main", "repack"]

#: Python packages of the GPU machine's image (/work/.library/device/KINDS.md, as read
#: 2026-11-17), normalized names.
IMAGE_PACKAGES = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio
    attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama
    contourpy coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x
    cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax
    fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
    jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader
    lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
    markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
    multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
    numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
    nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
    nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
    nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
    packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
    propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
    pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
    pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests
    rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
    sentencepiece sentence-transformers setuptools shellingham simplejson six
    sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
    tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
    torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
    triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug
    wheel wrapt xarray xxhash yarl zipp""".split()  # noqa: SIM905 - the list as KINDS.md gives it
)
#: Carried although the image has them: the generated wire code checks the versions of
#: protobuf and grpcio at import; Flower pins typer, click and rich below versions the
#: image may be past (their APIs change), so the ones the tests pass with come along.
FORCED = frozenset({"protobuf", "grpcio", "typer", "click", "rich"})
#: Never carried: the image's CUDA build must stay; ``uv`` is a 17 MiB command-line tool
#: Flower lists but runs only to build apps (``flwr build``), never in a simulation.
NEVER = frozenset({"torch", "triton", "uv"})
#: What a Ray wheel loses (a local simulation loads neither).
RAY_STRIP = ("ray/jars/", "ray/dashboard/client/build/")
_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
_PLATFORMS = ["manylinux2014_x86_64", "manylinux1_x86_64"] + [
    f"manylinux_2_{n}_x86_64" for n in range(17, 40)
]


def _name(text: str) -> str:
    return text.lower().replace("_", "-").replace(".", "-")


def closure(roots: Iterable[str]) -> dict[str, str]:
    """Name → installed version of every package ``roots`` need that the image lacks.

    Raises
    ------
    LookupError
        A needed package is not installed here (its version is unknown).
    """
    from packaging.requirements import Requirement

    out: dict[str, str] = {}
    todo = list(roots)
    while todo:
        req = Requirement(todo.pop())
        extras = sorted(req.extras) or [""]
        if req.marker is not None and not any(
            req.marker.evaluate({**_ENV, "extra": e}) for e in extras
        ):
            continue
        name = _name(req.name)
        if name in NEVER or (name in IMAGE_PACKAGES and name not in FORCED):
            continue
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise LookupError(f"{name} is needed but not installed here") from None
        if name in out and not req.extras:
            continue
        out[name] = version
        for sub in metadata.requires(name) or []:
            sub_req = Requirement(sub)
            if sub_req.marker is None or any(
                sub_req.marker.evaluate({**_ENV, "extra": e}) for e in [*req.extras, ""]
            ):
                sub_req.marker = None
                todo.append(str(sub_req))
    return out


def repack(path: Path, drop: Sequence[str] = (), *, strip_elf: bool = False) -> int:
    """Rewrite the wheel at ``path`` with LZMA compression (pip reads it like DEFLATE, and
    it is a quarter smaller on binaries), without the files under ``drop`` (and their
    RECORD lines), and with ELF binaries of over 1 MiB stripped of their symbol tables
    (``strip --strip-unneeded``, when on PATH; RECORD updated). Returns the bytes saved."""
    before = path.stat().st_size
    tmp = path.with_suffix(".tmp")
    stripper = shutil.which("strip") if strip_elf else None
    changed: dict[str, bytes] = {}
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_LZMA) as dst:
        infos = [i for i in src.infolist() if not i.filename.startswith(tuple(drop))]
        for info in infos:
            if info.filename.endswith(".dist-info/RECORD"):
                continue
            data = src.read(info)
            if stripper and len(data) > 1 << 20 and data[:4] == b"\x7fELF":
                data = _stripped(stripper, data)
                changed[info.filename] = data
            dst.writestr(info, data, compress_type=zipfile.ZIP_LZMA)
        for info in infos:
            if info.filename.endswith(".dist-info/RECORD"):
                dst.writestr(info, _record(src.read(info), drop, changed), zipfile.ZIP_LZMA)
    tmp.replace(path)
    return before - path.stat().st_size


def _stripped(stripper: str, data: bytes) -> bytes:
    with tempfile.TemporaryDirectory(prefix="gpuwheels-") as tmp:
        f = Path(tmp) / "binary"
        f.write_bytes(data)
        subprocess.run([stripper, "--strip-unneeded", str(f)], check=True)
        return f.read_bytes()


def _record(data: bytes, drop: Sequence[str], changed: dict[str, bytes]) -> bytes:
    """RECORD without the dropped files, with the changed ones' hashes and sizes."""
    out = []
    for line in data.decode().splitlines(keepends=True):
        name = line.split(",", 1)[0]
        if name.startswith(tuple(drop)):
            continue
        if name in changed:
            digest = hashlib.sha256(changed[name]).digest()
            b64 = base64.urlsafe_b64encode(digest).decode().rstrip("=")
            line = f"{name},sha256={b64},{len(changed[name])}\n"
        out.append(line)
    return "".join(out).encode()


def _fits_312(filename: str) -> bool:
    """Whether a wheel's tags install on CPython 3.12 (pure, abi3 or cp312)."""
    parts = filename[: -len(".whl")].split("-")
    python, abi = parts[-3], parts[-2]
    return abi in ("none", "abi3") or "cp312" in python.split(".")


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Download and build the wheels; returns 0 (1 on a failure, with a message)."""
    parser = argparse.ArgumentParser(
        prog="python -m fedsqueeze.bench.gpuwheels",
        description="Download the wheels `make gpu-check` needs on a GPU machine without "
        "network (CPython 3.12, manylinux x86-64) and build fedsqueeze's own.",
    )
    parser.add_argument("--out", default=".gpu-wheels", help="folder (default .gpu-wheels)")
    parser.add_argument(
        "--limit-mib", type=float, default=58.0,
        help="fail when the wheels exceed this (the device tool carries 64 MiB with the "
        "working tree; default 58)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    roots = [r for r in metadata.requires("fedsqueeze") or [] if "extra ==" not in r]
    try:
        needed = closure([*roots, "blake3"])
    except LookupError as exc:
        print(f"gpuwheels: {exc}", file=sys.stderr)
        return 1
    print("gpuwheels: " + ", ".join(f"{k}=={v}" for k, v in sorted(needed.items())))
    platforms = [a for p in _PLATFORMS for a in ("--platform", p)]
    common = ["--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
    common += ["--implementation", "cp", *platforms, "-d", str(out), "-q"]
    try:
        for name, version in sorted(needed.items()):
            try:
                _pip("download", *common, f"{name}=={version}")
            except subprocess.CalledProcessError:  # only an sdist: a pure-Python wheel
                _pip("wheel", "--no-deps", "-q", "-w", str(out), f"{name}=={version}")
        root = Path(__file__).resolve().parents[2]
        _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(root))
    except subprocess.CalledProcessError as exc:
        print(f"gpuwheels: pip failed: {exc}", file=sys.stderr)
        return 1
    for wheel in sorted(out.glob("*.whl")):
        if wheel.stat().st_size < 1 << 20:
            continue
        ray = wheel.name.startswith("ray-")
        saved = repack(wheel, RAY_STRIP if ray else (), strip_elf=ray)
        print(f"gpuwheels: {wheel.name} repacked (LZMA{', stripped' if ray else ''}): "
              f"{saved / 2**20:.1f} MiB less")  # fmt: skip
    wheels = sorted(out.glob("*.whl"))
    bad = [w.name for w in wheels if not _fits_312(w.name)]
    if bad:
        print(f"gpuwheels: not for CPython 3.12: {', '.join(bad)}", file=sys.stderr)
        return 1
    total = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"gpuwheels: {len(wheels)} wheels, {total:.1f} MiB in {out}/")
    if total > args.limit_mib:
        print(f"gpuwheels: over {args.limit_mib} MiB: the device tool cannot carry them",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
