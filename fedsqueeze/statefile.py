"""Reading and writing model state files: PyTorch ``state_dict`` files and safetensors.

Reading: ``.safetensors`` files with safetensors; anything else is a PyTorch file loaded
with ``weights_only=True``, so a file can never run code on load (an encoded ``.fsq``
model is recognised by its magic and named as such).

Writing (:func:`save_state`) picks the format by extension, and refuses any other
extension (:func:`state_format`) rather than write a pickle to ``x.txt``. Every write is
atomic (:func:`write_atomic`: temp file, fsync, rename) and creates files the way
``open()`` does: a new file gets ``0666 & ~umask``, an existing one keeps its mode.
"""

from __future__ import annotations

import contextlib
import enum
import io
import os
import re
import secrets
import stat
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fedsqueeze.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: `fedsqueeze codec --help` stays fast
    import torch

#: The first bytes of an encoded model (see :mod:`fedsqueeze.codec.container`).
ENCODED_MAGIC = b"FSQ"


class StateFormat(enum.Enum):
    """The file formats :func:`save_state` writes."""

    TORCH = "PyTorch state_dict (pickle, read with weights_only=True)"
    SAFETENSORS = "safetensors"


#: Extension → format written by :func:`save_state`.
STATE_EXTENSIONS: Mapping[str, StateFormat] = {
    ".pt": StateFormat.TORCH,
    ".pth": StateFormat.TORCH,
    ".bin": StateFormat.TORCH,
    ".safetensors": StateFormat.SAFETENSORS,
}


def state_format(path: str | Path) -> StateFormat:
    """The format :func:`save_state` writes to ``path``, chosen by its extension.

    Raises
    ------
    ConfigError
        An extension other than ``.pt``, ``.pth``, ``.bin`` or ``.safetensors``.
    """
    suffix = Path(path).suffix.lower()
    fmt = STATE_EXTENSIONS.get(suffix)
    if fmt is None:
        raise ConfigError(
            f"{path}: cannot tell the format from the extension {suffix or '(none)'!r}; "
            f"use .pt, .pth or .bin (PyTorch) or .safetensors"
        )
    return fmt


def load_state(path: str | Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Load a state dict of tensors from ``path``.

    With ``mmap``, a zip-format PyTorch file's tensors are views on the mapped file (read
    when used); an older-format file is loaded whole. Safetensors files are always read.

    Raises
    ------
    ConfigError
        If the file is not a readable state dict of tensors.
    FileNotFoundError
        If it does not exist.
    """
    import torch

    path = Path(path)
    check_readable(path)
    encoded = encoded_model_error(path)
    if encoded is not None:
        raise ConfigError(encoded)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        with warnings.catch_warnings():
            # torch warns about a pickle protocol before refusing what it holds: the
            # refusal below says all there is to say
            warnings.simplefilter("ignore", UserWarning)
            obj = _torch_load(path, mmap)
    except Exception as exc:  # torch raises many types for a bad file: report them alike
        raise ConfigError(f"{path}: {_load_failure(exc)}") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ConfigError(f"{path}: expected a mapping of names to tensors (a state_dict)")
    return dict(obj)


def _torch_load(path: Path, mmap: bool) -> object:
    import torch

    if mmap:
        import zipfile

        if zipfile.is_zipfile(path):  # only the zip format maps
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def encoded_model_error(path: Path) -> str | None:
    """The one-line refusal for an encoded ``.fsq`` model given as a model file, or
    ``None`` when ``path`` is not one."""
    if not _is_encoded(path):
        return None
    return (
        f"{path}: this is a fedsqueeze encoded model, not a state_dict; "
        f"decode it first (fedsqueeze codec decode)"
    )


def check_readable(path: Path) -> None:
    """Raise the same one-line errors for every input file: missing, or a directory."""
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a file")


def _is_encoded(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(len(ENCODED_MAGIC)) == ENCODED_MAGIC
    except OSError:
        return False  # torch.load reports it below


def _load_failure(exc: Exception) -> str:
    """One line for why ``torch.load(weights_only=True)`` failed, without its advice to
    retry with ``weights_only=False`` (which would run whatever the file holds)."""
    text = str(exc)
    if text.startswith("Weights only load failed"):
        # torch's message: advice, then the detail, then a pointer to its documentation
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)[1:]]
        details = [p for p in paragraphs if p and not p.startswith("Check the documentation")]
        detail = details[0] if details else "unsupported content"
        return (
            f"refused: not a plain state_dict of tensors; it holds other objects, "
            f"which are never loaded ({detail})"
        )
    first = (text.strip().splitlines() or [type(exc).__name__])[0]
    return f"not a readable PyTorch state_dict ({first})"


def save_state(
    state: Mapping[str, torch.Tensor], path: str | Path, *, overwrite: bool = True
) -> None:
    """Write ``state`` atomically (see :func:`write_atomic`) in the format of its extension.

    Raises
    ------
    ConfigError
        An extension :func:`state_format` does not know.
    FileExistsError
        ``path`` exists and ``overwrite`` is false.
    """
    import torch

    path = Path(path)
    fmt = state_format(path)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if fmt is StateFormat.SAFETENSORS:
        from safetensors.torch import save as st_save

        write_atomic(path, st_save(cpu), overwrite=overwrite)
        return
    buf = io.BytesIO()
    torch.save(cpu, buf)
    write_atomic(path, buf.getvalue(), overwrite=overwrite)


def write_atomic(path: str | Path, data: bytes, *, overwrite: bool = True) -> None:
    """Write bytes to ``path`` atomically: temp file in the same folder, fsync, rename.

    A new file gets the mode ``open()`` would give it (``0666 & ~umask``); an existing
    file keeps its mode. Errors name ``path``, never the hidden temporary file.

    Parameters
    ----------
    overwrite
        When false, an existing ``path`` is left alone (the check and the rename are one
        atomic step where the file system has hard links).

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is false.
    OSError
        The file could not be written; ``filename`` is ``path``.
    """
    with atomic_path(path, overwrite=overwrite) as tmp:
        try:
            with tmp.open("r+b") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise _named(exc, Path(path)) from exc


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """A hidden temporary file beside ``path`` to write (created empty, with the mode
    ``path`` will have), moved to ``path`` when the block ends without an error and
    removed otherwise. The writer fsyncs what it writes.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is false (checked when the file is placed).
    OSError
        The file could not be created or placed; ``filename`` is ``path``.
    """
    path = Path(path)
    if str(path) in ("", "."):
        raise ValueError("empty output path")
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        existing: int | None = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        raise _named(exc, path) from exc
    try:
        # 0o666 through os.open: the kernel applies the umask, as for any new file
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise _named(exc, path) from exc
    try:
        try:
            if existing is not None:
                os.fchmod(fd, existing)
        finally:
            os.close(fd)
        yield tmp
        if overwrite:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _named(exc, path) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _place_new(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists (a hard link fails if it does)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (FAT, some network shares): check, then rename
        if path.exists():
            raise FileExistsError(17, "File exists", str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def _named(exc: OSError, path: Path) -> OSError:
    """The same kind of error, naming ``path`` (the one the caller gave)."""
    if exc.errno is None:
        return exc
    return type(exc)(exc.errno, exc.strerror, str(path))
