"""Model files the codec command reads and writes (issue 10, items 5 and 7)."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import pytest
import torch

from fedsqueeze.codec import CodecSpec, encode_state
from fedsqueeze.errors import ConfigError
from fedsqueeze.statefile import (
    StateFormat,
    load_state,
    save_state,
    state_format,
    write_atomic,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_new_files_get_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "x.fsq", b"data")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "x.fsq") == 0o666 & ~umask


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o664])
def test_replaced_files_keep_their_mode(tmp_path: Path, mode: int) -> None:
    target = tmp_path / "x.fsq"
    target.write_bytes(b"old")
    target.chmod(mode)
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and _mode(target) == mode
    assert _leftovers(tmp_path) == []


def test_no_overwrite_leaves_the_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "x.fsq"
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        write_atomic(target, b"new", overwrite=False)
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []
    write_atomic(tmp_path / "y.fsq", b"new", overwrite=False)
    assert (tmp_path / "y.fsq").read_bytes() == b"new" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["missing-folder", "a-file"])
def test_write_errors_name_the_given_path(tmp_path: Path, where: str) -> None:
    (tmp_path / "a-file").write_bytes(b"")
    target = tmp_path / where / "x.fsq"
    with pytest.raises(OSError) as exc:
        write_atomic(target, b"data")
    assert exc.value.filename == str(target)
    assert ".tmp" not in str(exc.value) and ".x.fsq." not in str(exc.value)


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.pt", StateFormat.TORCH),
        ("a.PTH", StateFormat.TORCH),
        ("a.bin", StateFormat.TORCH),
        ("a.safetensors", StateFormat.SAFETENSORS),
    ],
)
def test_state_format_by_extension(name: str, fmt: StateFormat) -> None:
    assert state_format(name) is fmt


@pytest.mark.parametrize("name", ["a.txt", "a.safetensor", "a", "a.fsq"])
def test_unknown_extensions_are_refused_before_writing(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="cannot tell the format"):
        save_state({"w": torch.ones(2)}, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_an_encoded_model_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"  # whatever its name
    path.write_bytes(encode_state({"w": torch.ones(2)}, CodecSpec()).to_bytes())
    with pytest.raises(ConfigError, match="fedsqueeze encoded model") as exc:
        load_state(path)
    assert "weights_only" not in str(exc.value)


class _RunsACommand:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("true",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_malicious_pickle_is_refused_without_a_warning(tmp_path: Path, protocol: int) -> None:
    # pytest turns warnings into errors, so torch's protocol warning would fail here
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_RunsACommand(), protocol=protocol))
    with pytest.raises(ConfigError, match="refused") as exc:
        load_state(path)
    assert "weights_only" not in str(exc.value) and "\n" not in str(exc.value)


def test_missing_and_directory_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_state(tmp_path / "missing.pt")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_state(tmp_path)
