"""Reading and writing model state files: PyTorch ``state_dict`` files and safetensors.

The format is chosen by extension (``.safetensors``; anything else is a PyTorch file
loaded with ``weights_only=True``, so a file can never run code on load).
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from fedsqueeze.errors import ConfigError


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict of tensors from ``path``.

    Raises
    ------
    ConfigError
        If the file is not a readable state dict of tensors.
    FileNotFoundError
        If it does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file: report them alike
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{path}: not a readable PyTorch state_dict ({first})") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ConfigError(f"{path}: expected a mapping of names to tensors (a state_dict)")
    return dict(obj)


def save_state(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write ``state`` atomically (temp file, fsync, rename), by extension."""
    path = Path(path)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save as st_save

        write_atomic(path, st_save(cpu))
        return
    buf = io.BytesIO()
    torch.save(cpu, buf)
    write_atomic(path, buf.getvalue())


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes to ``path`` atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    tmp_fd, tmp_name = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.")
    try:
        with os.fdopen(tmp_fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
