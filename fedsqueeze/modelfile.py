"""Model files encoded and decoded one tensor at a time, memory-mapped (bounded memory).

* :func:`open_model` maps a ``.safetensors`` file (or a zip-format PyTorch file) and
  gives its tensors as a mapping of views on the file: nothing is read until used;
* :func:`encode_file` encodes such a model with
  :func:`~fedsqueeze.codec.stream_encode.encode_stream`: each record body goes to a spool
  file beside the output as it is made, then the output is written from the spool (the
  model header, whose format version depends on every record, comes first);
* :func:`decode_file` maps an encoded model, lays out the output as a safetensors file
  of the right size, maps it and decodes into it
  (:func:`~fedsqueeze.codec.stream_decode.decode_stream_into`). A PyTorch output is
  decoded into memory (torch.save needs every tensor at once): the output, held once.

Memory beyond the mapped input and output: the record headers, a few MiB of copy
buffers and what one tensor (or a few, encoding on all cores) takes to encode or
decode. Writes are atomic (:func:`fedsqueeze.statefile.atomic_path`).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedsqueeze.errors import BaseMismatchError, ConfigError, FormatError
from fedsqueeze.statefile import StateFormat, atomic_path, check_readable, state_format

if TYPE_CHECKING:
    import torch

    from fedsqueeze.codec import CodecSpec, NonFinite
    from fedsqueeze.codec.nested_gptq import Calibration
    from fedsqueeze.codec.stream_decode import StreamLayout, TensorSlot

__all__ = [
    "DecodedFile",
    "EncodedFile",
    "decode_file",
    "encode_file",
    "map_model",
    "open_model",
    "return_freed_memory",
    "write_decoded",
]

_COPY = 8 << 20  # bytes copied from the spool at a time

_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


@dataclass(frozen=True)
class EncodedFile:
    """What :func:`encode_file` wrote: ``raw_bytes`` of tensors into ``nbytes``."""

    raw_bytes: int
    nbytes: int
    tensors: int


@dataclass(frozen=True)
class DecodedFile:
    """What :func:`decode_file` wrote: ``tensors`` tensors, ``nbytes`` of them."""

    tensors: int
    nbytes: int
    format: StateFormat


@contextlib.contextmanager
def open_model(path: str | Path) -> Iterator[Mapping[str, torch.Tensor]]:
    """The tensors of a model file as views on the mapped file (read lazily).

    ``.safetensors`` files are mapped with safetensors; other files are PyTorch files
    loaded with ``weights_only=True`` and ``mmap=True`` (the zip format; an older file is
    loaded whole).

    Raises
    ------
    ConfigError
        A file that is not a readable model (truncated, corrupt, an encoded model).
    FileNotFoundError, IsADirectoryError
        No such file.
    """
    path = Path(path)
    check_readable(path)
    if path.suffix != ".safetensors":
        from fedsqueeze.statefile import load_state

        yield load_state(path, mmap=True)
        return
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        with handle as f:
            names = list(f.offset_keys())  # the file order, as load_state gives it
            state = {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        from fedsqueeze.statefile import encoded_model_error

        raise ConfigError(
            encoded_model_error(path) or f"{path}: not a readable safetensors file ({exc})"
        ) from exc
    yield state


def map_model(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file as read-only views on a private mapping of
    it, kept as long as the tensors are (unlike :func:`open_model`, no context to stay in).

    Pages are read from the file when used and count as file pages, not anonymous
    memory; a write to a tensor copies its page (the file never changes).

    Raises
    ------
    ConfigError
        Not a readable safetensors file (bad header, offsets outside the file, a dtype
        this build does not read).
    FileNotFoundError, IsADirectoryError
        No such file.
    """
    import torch

    path = Path(path)
    check_readable(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: map_model reads .safetensors files")
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            head_len = int.from_bytes(fh.read(8), "little")
            if size < 8 or head_len > min(size - 8, 100 << 20):
                raise ValueError(f"a header of {head_len} bytes in a {size}-byte file")
            meta = json.loads(fh.read(head_len))
        if not isinstance(meta, dict):
            raise ValueError("the header is not a JSON object")
        start = 8 + head_len
        whole = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
        state: dict[str, torch.Tensor] = {}
        for name, entry in sorted(
            ((n, e) for n, e in meta.items() if n != "__metadata__"),
            key=lambda item: item[1]["data_offsets"][0],
        ):
            dtype = getattr(torch, _ST_DTYPES[entry["dtype"]])
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
            nbytes = torch.empty((), dtype=dtype).element_size()
            for d in shape:
                nbytes *= d
            if not 0 <= begin <= end <= size - start or end - begin != nbytes:
                raise ValueError(f"tensor {name!r}: offsets {begin}-{end} do not fit")
            if begin % torch.empty((), dtype=dtype).element_size():
                raise ValueError(f"tensor {name!r} is not aligned to its element size")
            state[name] = whole[start + begin : start + end].view(dtype).reshape(shape)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise ConfigError(f"{path}: not a readable safetensors file ({exc})") from exc
    return state


def encode_file(
    source: str | Path,
    output: str | Path,
    spec: CodecSpec,
    *,
    base: str | Path | None = None,
    seed: int | None = None,
    nonfinite: NonFinite | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    calibration: Calibration | None = None,
) -> EncodedFile:
    """Encode the model file ``source`` into ``output``, one tensor at a time.

    Parameters
    ----------
    source, base
        Model files (see :func:`open_model`); ``base`` makes a delta.
    spec, seed, nonfinite
        As for :func:`~fedsqueeze.codec.model.encode_state`.
    workers
        Threads encoding tensors (default: every core).
    overwrite
        Replace an existing ``output``.
    calibration
        Input moments for calibrated codes of a ``levels`` spec (as for
        :func:`~fedsqueeze.codec.model.encode_state`); each names a matrix of the model
        whose column count is its size.

    Raises
    ------
    The errors of :func:`open_model` and :func:`~fedsqueeze.codec.model.encode_state`;
    ``FileExistsError`` for an existing ``output`` without ``overwrite``;
    ``ConfigError`` for calibration that names no matrix of the model or does not fit it.
    """
    from fedsqueeze.codec import NonFinite
    from fedsqueeze.codec.stream_encode import encode_stream

    output = Path(output)
    return_freed_memory()
    with contextlib.ExitStack() as stack:
        state = stack.enter_context(open_model(source))
        base_state = stack.enter_context(open_model(base)) if base is not None else None
        if calibration is not None:
            _check_calibration(calibration, state)
        spool = stack.enter_context(_Spool(output.parent))
        plan = encode_stream(
            state,
            spec,
            spool,
            base_state,
            seed=seed,
            nonfinite=nonfinite or NonFinite.REFUSE,
            workers=workers,
            calibration=calibration,
        )
        with atomic_path(output, overwrite=overwrite) as tmp, tmp.open("wb") as fh:
            crc = _write(fh, plan.header.to_bytes(), 0)
            for stored in plan.records:
                crc = _write(fh, stored.header_bytes(), crc)
                for piece in spool.read(stored.token, stored.body_length):
                    crc = _write(fh, piece, crc)
            fh.write((crc & 0xFFFFFFFF).to_bytes(4, "little"))
            fh.flush()
            os.fsync(fh.fileno())
        return EncodedFile(plan.raw_bytes, plan.nbytes, len(state))


def _check_calibration(calibration: Calibration, state: Mapping[str, torch.Tensor]) -> None:
    """Each input-moment matrix names a matrix of ``state`` with as many columns, each
    row-weight vector a table of ``state`` with as many rows."""
    for name, w in calibration.rows.items():
        t = state.get(name)
        if t is None:
            raise ConfigError(f"the calibration names {name!r}, which the model does not have")
        if t.dim() < 2 or t.shape[0] != w.numel():
            raise ConfigError(
                f"the calibration has {w.numel()} row weights for {name!r}, but {name!r} "
                f"has shape {tuple(t.shape)} (a table's row weights are one per row)"
            )
    for name, h in calibration.hessians.items():
        t = state.get(name)
        if t is None:
            raise ConfigError(f"the calibration names {name!r}, which the model does not have")
        if t.dim() != 2 or t.shape[1] != h.shape[0]:
            raise ConfigError(
                f"the calibration of {name!r} is {h.shape[0]}×{h.shape[1]}, but "
                f"{name!r} has shape {tuple(t.shape)} (a matrix's input moments are "
                "columns × columns)"
            )


def decode_file(
    source: str | Path,
    output: str | Path,
    *,
    base: str | Path | None = None,
    overwrite: bool = False,
) -> DecodedFile:
    """Decode the encoded model file ``source`` into the model file ``output``.

    ``output``'s extension picks the format (``.safetensors``, or ``.pt``/``.pth``/
    ``.bin`` for PyTorch). The encoded file is mapped and checked (checksum) before
    anything is written.

    Raises
    ------
    ConfigError
        An output extension that is not a model format.
    fedsqueeze.errors.CodecError
        A corrupt or truncated encoded file, or the wrong base.
    """
    from fedsqueeze.codec.digest import state_digest
    from fedsqueeze.codec.stream_decode import scan_stream

    source, output = Path(source), Path(output)
    state_format(output)  # an output that is not a model file fails before any work
    check_readable(source)
    return_freed_memory()
    with contextlib.ExitStack() as stack:
        view = stack.enter_context(_mapped_encoded(source))
        base_state = stack.enter_context(open_model(base)) if base is not None else None
        stream = view[:-4]
        layout = scan_stream(stream, base_state)
        if base_state is not None and layout.header.base_digest is None:
            raise ConfigError(
                f"{source} is a full model, not a delta: it has no base, drop --base {base}"
            )
        digest = None
        expected = layout.header.base_digest
        if expected is not None and base_state is not None:
            digest = state_digest(base_state)
            if digest != expected:
                raise BaseMismatchError(
                    f"delta made against {expected.hex()[:16]}…, base given is {digest.hex()[:16]}…"
                )
        return write_decoded(
            stream, layout, output, base=base_state, base_digest=digest, overwrite=overwrite
        )


def write_decoded(
    stream: memoryview,
    layout: StreamLayout,
    output: str | Path,
    *,
    base: Mapping[str, torch.Tensor] | None = None,
    base_digest: bytes | None = None,
    overwrite: bool = False,
    check: Callable[[Mapping[str, torch.Tensor]], None] | None = None,
) -> DecodedFile:
    """Decode ``stream`` (scanned as ``layout``) into the model file ``output``.

    A safetensors output is laid out, mapped and decoded into part by part; a PyTorch
    one is decoded in memory. ``base`` and its ``base_digest`` (already checked against
    the stream's) for a delta. ``check`` sees the decoded tensors before the file is
    moved into place: raising there leaves no output.

    Raises
    ------
    ConfigError
        An output extension that is not a model format.
    fedsqueeze.errors.CodecError
        The stream does not decode.
    """
    from fedsqueeze.codec.stream_decode import decode_stream_into

    output = Path(output)
    fmt = state_format(output)
    slots = layout.tensors + layout.kept_from_base

    def fill(target: dict[str, torch.Tensor]) -> None:
        if base is not None and base_digest is not None:
            for slot in slots:
                if slot.name in base and _fits(base[slot.name], slot):
                    target[slot.name].copy_(base[slot.name])
            # index-coded records name the base's sorted tensors: give them all
            view_of = {**base, **target}
            decode_stream_into(stream, layout, view_of, base_digest=base_digest)
        else:
            decode_stream_into(stream, layout, target)
        if check is not None:
            check(target)

    if fmt is StateFormat.SAFETENSORS:
        with atomic_path(output, overwrite=overwrite) as tmp:
            _write_safetensors(tmp, slots, fill)
    else:
        # A PyTorch file is written from tensors in memory (the output, held once):
        # torch.save cannot write tensors that share one mapped storage.
        import torch

        target = {s.name: torch.empty(s.shape, dtype=s.dtype) for s in slots}
        fill(target)
        with atomic_path(output, overwrite=overwrite) as tmp:
            torch.save(target, tmp)
    return DecodedFile(len(slots), sum(s.nbytes for s in slots), fmt)


# ----------------------------------------------------------------------- helpers
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Make glibc's malloc give blocks of ``threshold`` bytes and more back to the system
    when freed (process-wide; a no-op elsewhere). Returns whether it applied.

    glibc raises its mmap threshold to the size of each mapped block freed (up to 32 MiB),
    after which tensors of a few MiB come from heaps that keep their pages once freed:
    coding a model tensor by tensor then holds the largest tensors' working memory
    several times over (measured: 17 MB against 6 MB beyond the input for int8 on a
    105 MB model, 206 MB against 61 MB for progressive levels). A fixed threshold keeps
    every large block mapped, so freeing it returns its pages.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, threshold) == 1)
    return ok and bool(mallopt(_M_TRIM_THRESHOLD, 2 * threshold) == 1)


def _write(fh: object, piece: bytes | memoryview, crc: int) -> int:
    from fedsqueeze.codec.checksum import crc32  # (the codec is imported where used)

    fh.write(piece)  # type: ignore[attr-defined]
    return crc32(piece, crc)


def _fits(t: torch.Tensor, slot: TensorSlot) -> bool:
    return t.dtype == slot.dtype and tuple(t.shape) == slot.shape


class _Spool:
    """Record bodies kept in an unlinked temporary file beside the output."""

    def __init__(self, folder: Path) -> None:
        self._path = folder / f".fsq-spool.{secrets.token_hex(4)}.tmp"
        self._fd = -1
        self._end = 0

    def __enter__(self) -> _Spool:
        try:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        finally:
            self._path.unlink(missing_ok=True)  # gone when closed, even on a crash
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)

    def put(self, body: bytes | memoryview) -> int:
        """Append ``body``; its offset is the token."""
        offset = self._end
        view = memoryview(body)
        while view:
            written = os.pwrite(self._fd, view, self._end)
            self._end += written
            view = view[written:]
        return offset

    def read(self, offset: int, length: int) -> Iterator[bytes]:
        """The body at ``offset``, in pieces of at most 8 MiB."""
        end = offset + length
        while offset < end:
            piece = os.pread(self._fd, min(_COPY, end - offset), offset)
            if not piece:
                raise OSError(5, "the spool file is shorter than what was written to it")
            offset += len(piece)
            yield piece


@contextlib.contextmanager
def _mapped_encoded(path: Path) -> Iterator[memoryview]:
    """The encoded file mapped read-only, its checksum verified."""
    from fedsqueeze.codec.checksum import crc32
    from fedsqueeze.statefile import ENCODED_MAGIC

    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 8:
            raise FormatError(f"{path}: {size} bytes is too short for an encoded model")
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mapped)
    try:
        if bytes(view[:3]) != ENCODED_MAGIC:
            raise FormatError(f"{path}: not a fedsqueeze encoded model (bad magic)")
        stored = int.from_bytes(view[-4:], "little")
        if crc32(view[:-4]) != stored:
            raise FormatError(f"{path}: checksum mismatch: the file is corrupted or truncated")
        yield view
    finally:
        try:
            view.release()
            mapped.close()
        except BufferError:
            pass  # a slice still refers to it: unmapped when the last one goes


def _write_safetensors(
    path: Path, slots: tuple[TensorSlot, ...], fill: Callable[[dict[str, torch.Tensor]], None]
) -> None:
    """Lay out a safetensors file for ``slots`` at ``path``, map it and let ``fill``
    write the tensors into the mapping."""
    import torch

    codes = {getattr(torch, v): k for k, v in _ST_DTYPES.items()}
    # Widest elements first, so that every tensor starts aligned to its element size.
    order = sorted(slots, key=lambda s: -torch.empty((), dtype=s.dtype).element_size())
    meta: dict[str, object] = {}
    offset = 0
    for slot in order:
        meta[slot.name] = {
            "dtype": codes[slot.dtype],
            "shape": list(slot.shape),
            "data_offsets": [offset, offset + slot.nbytes],
        }
        offset += slot.nbytes
    head = json.dumps(meta, separators=(",", ":")).encode()
    head += b" " * (-(len(head) + 8) % 8)
    start = 8 + len(head)
    with open(os.open(path, os.O_RDWR | os.O_CREAT, 0o666), "r+b") as fh:
        fh.write(len(head).to_bytes(8, "little"))
        fh.write(head)
        fh.truncate(start + offset)
        fh.flush()
        if offset:
            whole = torch.from_file(str(path), shared=True, size=start + offset, dtype=torch.uint8)
            target = {}
            for slot in order:
                m = meta[slot.name]
                begin = start + m["data_offsets"][0]  # type: ignore[index]
                raw = whole[begin : begin + slot.nbytes]
                target[slot.name] = raw.view(slot.dtype).reshape(slot.shape)
            fill(target)
            del target, whole, raw
        else:
            fill({slot.name: torch.empty(slot.shape, dtype=slot.dtype) for slot in order})
        os.fsync(fh.fileno())
