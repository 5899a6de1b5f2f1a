"""`fedsqueeze codec` user errors, run as the real command (issue 10, items 5-8 and 12).

Every refusal must end with exit status 2 and exactly one line on stderr, no traceback,
no output file left behind, and the input files' bytes and modes untouched.
"""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fedsqueeze.cli import main
from fedsqueeze.codec import CodecSpec, encode_state
from tests.cli.inproc import run_cli
from tests.subproc import ROOT, run_module

TIMEOUT = 120.0


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(8, 4, generator=g), "fc.bias": torch.randn(8, generator=g)}


@dataclass(frozen=True)
class Files:
    """A folder of inputs: a model, another model, a delta and a full encoded model."""

    root: Path

    def path(self, name: str) -> str:
        return str(self.root / name)

    def snapshot(self) -> dict[str, tuple[bytes, int]]:
        """Every file's bytes and mode."""
        return {
            p.name: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
            for p in sorted(self.root.iterdir())
            if p.is_file()
        }


@pytest.fixture
def files(tmp_path: Path) -> Iterator[Files]:
    torch.save(_model(0), tmp_path / "model.pt")
    torch.save(_model(1), tmp_path / "new.pt")
    torch.save({"other.weight": torch.zeros(3, 3)}, tmp_path / "stranger.pt")
    nan = _model(0)
    nan["fc.weight"][1, 2] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    torch.save({"z.weight": torch.ones(2, 2, dtype=torch.complex64)}, tmp_path / "complex.pt")
    full = encode_state(_model(0), CodecSpec())
    (tmp_path / "full.fsq").write_bytes(full.to_bytes())
    (tmp_path / "full.bin").write_bytes(full.to_bytes())  # an encoded model named .bin
    delta = encode_state(_model(1), CodecSpec(), _model(0))
    (tmp_path / "delta.fsq").write_bytes(delta.to_bytes())
    (tmp_path / "old.fsq").write_bytes(b"keep me")  # an existing output
    os.chmod(tmp_path / "model.pt", 0o640)
    yield Files(tmp_path)


def _codec(
    *args: str, env: dict[str, str] | None = None, real: bool = False
) -> subprocess.CompletedProcess[str]:
    if real:
        return run_module("fedsqueeze", "codec", *args, timeout=TIMEOUT, env=env)
    return run_cli("codec", *args, env=env)


def _refused(
    files: Files, *args: str, env: dict[str, str] | None = None, real: bool = False
) -> str:
    """Run the command; check the refusal contract; return the one stderr line."""
    before = files.snapshot()
    proc = _codec(*args, env=env, real=real)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("fedsqueeze codec: error: "), lines[0]
    assert files.snapshot() == before  # nothing written, nothing touched, no temp file
    return lines[0]


# --------------------------------------------------------------- 5: files destroyed
def test_encode_refuses_its_input_as_output(files: Files) -> None:
    line = _refused(files, "encode", files.path("model.pt"), files.path("model.pt"), real=True)
    assert "also an input" in line


def test_encode_refuses_the_input_under_another_spelling_or_a_hard_link(files: Files) -> None:
    other_spelling = str(files.root / ".." / files.root.name / "model.pt")
    assert "also an input" in _refused(files, "encode", files.path("model.pt"), other_spelling)
    os.link(files.root / "model.pt", files.root / "linked.fsq")
    assert "also an input" in _refused(
        files, "encode", files.path("model.pt"), files.path("linked.fsq"), "--force"
    )


def test_encode_refuses_the_base_as_output(files: Files) -> None:
    line = _refused(
        files, "encode", files.path("new.pt"), files.path("model.pt"), "--base",
        files.path("model.pt"), "--force",
    )  # fmt: skip
    assert "also an input" in line


def test_decode_refuses_its_input_as_output(files: Files) -> None:
    line = _refused(files, "decode", files.path("full.bin"), files.path("full.bin"), "--force")
    assert "also an input" in line


@pytest.mark.parametrize("action", ["encode", "decode"])
def test_existing_output_needs_force(files: Files, action: str) -> None:
    source = files.path("model.pt" if action == "encode" else "full.fsq")
    target = files.path("old.fsq" if action == "encode" else "model.pt")
    line = _refused(files, action, source, target)
    assert "exists; pass --force" in line


@pytest.mark.parametrize("mode", [0o644, 0o604])
def test_force_replaces_and_keeps_the_existing_mode(files: Files, mode: int) -> None:
    os.chmod(files.root / "old.fsq", mode)
    proc = _codec("encode", files.path("model.pt"), files.path("old.fsq"), "--force")
    assert proc.returncode == 0, proc.stderr
    out = files.root / "old.fsq"
    assert out.read_bytes()[:3] == b"FSQ"
    assert stat.S_IMODE(out.stat().st_mode) == mode
    assert [p.name for p in files.root.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_new_outputs_follow_the_umask(files: Files, umask: int) -> None:
    old = os.umask(umask)
    try:
        enc = _codec("encode", files.path("model.pt"), files.path("m.fsq"), real=True)
        dec = _codec("decode", files.path("m.fsq"), files.path("m.safetensors"), real=True)
    finally:
        os.umask(old)
    assert enc.returncode == 0 and dec.returncode == 0, enc.stderr + dec.stderr
    for name in ("m.fsq", "m.safetensors"):
        assert stat.S_IMODE((files.root / name).stat().st_mode) == 0o666 & ~umask


# ---------------------------------------------------- 6: one line, not a traceback
@pytest.mark.parametrize("spec", ["lossless", "prune95-kmeans3"])  # every path: tests/codec
def test_nan_is_refused_naming_the_tensor(files: Files, spec: str) -> None:
    line = _refused(files, "encode", files.path("nan.pt"), files.path("x.fsq"), "--spec", spec)
    assert "'fc.weight'" in line and "NaN" in line and "--allow-nonfinite" in line


def test_allow_nonfinite_carries_nan_exactly(files: Files) -> None:
    proc = _codec(
        "encode", files.path("nan.pt"), files.path("x.fsq"), "--spec", "int8", "--allow-nonfinite"
    )
    assert proc.returncode == 0, proc.stderr
    proc = _codec("decode", files.path("x.fsq"), files.path("x.pt"))
    assert proc.returncode == 0, proc.stderr
    got = torch.load(files.root / "x.pt", weights_only=True)["fc.weight"]
    want = torch.load(files.root / "nan.pt", weights_only=True)["fc.weight"]
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_complex_tensor_is_one_line(files: Files) -> None:
    line = _refused(files, "encode", files.path("complex.pt"), files.path("x.fsq"))
    assert "'z.weight'" in line and "complex" in line


def test_empty_output_path_is_one_line(files: Files) -> None:
    assert "empty" in _refused(files, "encode", files.path("model.pt"), "")


# ----------------------------------------------------------------- 7: clear errors
def test_write_error_names_the_given_path(files: Files) -> None:
    given = files.path("no-such-folder/x.fsq")
    line = _refused(files, "encode", files.path("model.pt"), given)
    assert given in line and ".tmp" not in line and ".x.fsq." not in line


def test_missing_input_is_worded_alike(files: Files) -> None:
    enc = _refused(files, "encode", files.path("missing.pt"), files.path("x.fsq"))
    dec = _refused(files, "decode", files.path("missing.fsq"), files.path("x.pt"))
    ins = _refused(files, "inspect", files.path("missing.fsq"))
    strip = len("fedsqueeze codec: error: ")
    assert enc[strip:].replace("missing.pt", "X") == dec[strip:].replace("missing.fsq", "X")
    assert dec == ins


@pytest.mark.parametrize("where", ["--base", "input"])
def test_encoded_file_given_as_a_model_says_so(files: Files, where: str) -> None:
    if where == "--base":
        args = [
            "encode",
            files.path("new.pt"),
            files.path("x.fsq"),
            "--base",
            files.path("full.fsq"),
        ]
    else:
        args = ["encode", files.path("full.fsq"), files.path("x.fsq")]
    line = _refused(files, *args)
    assert "encoded model" in line and "weights_only" not in line


@pytest.mark.parametrize(
    ("spec", "wanted"),
    [("entropy=99", "entropy must be"), ("min-ndim=9", "min-ndim must be")],
)
def test_spec_range_errors_name_the_key(files: Files, spec: str, wanted: str) -> None:
    line = _refused(files, "encode", files.path("model.pt"), files.path("x.fsq"), "--spec", spec)
    assert wanted in line and "entropy_level" not in line and "min_ndim" not in line


def test_malicious_pickle_is_refused_without_torch_warnings(files: Files) -> None:
    evil = files.root / "evil.pt"
    # protocol 4 makes torch warn before its refusal; unpickled, this would run a command
    evil.write_bytes(pickle.dumps(_RunsACommand(str(files.root / "pwned")), protocol=4))
    line = _refused(
        files,
        "encode",
        str(evil),
        files.path("x.fsq"),
        env={"PYTHONWARNINGS": "default"},
        real=True,
    )
    assert "refused" in line and "weights_only" not in line
    assert not (files.root / "pwned").exists()


class _RunsACommand:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_presets_need_no_arguments() -> None:
    for args in (["presets"], ["encode", "--list-presets"]):
        proc = _codec(*args)
        assert proc.returncode == 0, proc.stderr
        assert "prune95-kmeans3" in proc.stdout


def test_warm_compiles_the_kernels_and_says_so_or_why_not(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedsqueeze.codec import jit

    assert main(["codec", "warm"]) == 0
    out = capsys.readouterr().out
    if jit.ready():
        assert "every codec kernel compiled or loaded from the cache" in out
        assert type(jit.linear_encode).__module__.startswith("numba")  # compiled: a dispatcher
    else:  # pragma: no cover - numba is a dependency
        assert "compiled kernels are off" in out
    monkeypatch.setattr(jit, "ENABLED", False)
    monkeypatch.setattr(jit, "_compiled", None)
    assert main(["codec", "warm"]) == 0
    assert "compiled kernels are off (FEDSQUEEZE_JIT=0" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["x.txt", "x.safetensor"])
def test_decode_refuses_unknown_extensions(files: Files, name: str) -> None:
    line = _refused(files, "decode", files.path("full.fsq"), files.path(name))
    assert ".safetensors" in line and ".pt" in line


@pytest.mark.parametrize("name", ["x.pt", "x.pth", "x.bin", "x.safetensors"])
def test_decode_writes_by_extension(files: Files, name: str) -> None:
    # the happy path needs no subprocess
    assert main(["codec", "decode", files.path("full.fsq"), files.path(name)]) == 0
    head = (files.root / name).read_bytes()[:2]
    assert (head == b"PK") == (not name.endswith(".safetensors"))  # torch.save: a zip


# ---------------------------------------------------- 8: accepted without a word
def test_base_sharing_nothing_is_refused(files: Files) -> None:
    line = _refused(
        files, "encode", files.path("model.pt"), files.path("x.fsq"), "--base",
        files.path("stranger.pt"),
    )  # fmt: skip
    assert "shares no tensor" in line


@pytest.mark.parametrize("action", ["decode", "inspect"])
def test_base_for_a_full_model_is_refused(files: Files, action: str) -> None:
    args = [files.path("full.fsq")] + ([files.path("x.pt")] if action == "decode" else [])
    line = _refused(files, action, *args, "--base", files.path("model.pt"))
    assert "not a delta" in line


def test_duplicate_spec_keys_are_refused(files: Files) -> None:
    line = _refused(
        files, "encode", files.path("model.pt"), files.path("x.fsq"), "--spec", "quant=8,quant=4"
    )
    assert "'quant' twice" in line


def test_targets_matching_nothing_warn_in_one_line(files: Files) -> None:
    proc = _codec(
        "encode",
        files.path("model.pt"),
        files.path("x.fsq"),
        "--spec",
        "int8,targets=conv*|fc*",
        real=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "fedsqueeze codec: warning: codec spec targets pattern 'conv*' matches no tensor "
        "of the model"
    ]
    assert (files.root / "x.fsq").exists()


# ------------------------------------------------------------------- 12: start-up
HEAVY = ("torch", "numpy", "rich", "safetensors", "zstandard", "flwr", "grpc")


@pytest.mark.parametrize(
    "argv", [["codec", "--help"], ["codec", "encode", "--help"], ["codec", "decode", "--help"]]
)
def test_help_imports_nothing_heavy(argv: list[str]) -> None:
    code = (
        "import sys\n"
        "from fedsqueeze.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout.splitlines()[-1]
