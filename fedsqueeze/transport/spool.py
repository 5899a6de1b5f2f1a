"""Large models on disk instead of in memory: the data plane's spool files.

A model at or above :attr:`SpoolPolicy.threshold_bytes` is not held in memory by either
end of a fetch:

* the server encodes it with :func:`~fedsqueeze.codec.stream_encode.encode_stream`,
  each record body going to a :class:`SpoolFile` as it is made; the stream is the model
  header and the record heads (small, in memory) between those bodies, a
  :class:`SpooledStream`, and a segment is a range of it, read from the file when sent
  (:mod:`fedsqueeze.transport.prepare_spooled`);
* the client keeps verified segments in a file-backed shared mapping
  (:func:`file_buffer`): its pages are page cache the kernel can write back, not
  anonymous memory, and the stream is decoded from it part by part
  (:mod:`fedsqueeze.transport.fetch_into`).

Smaller models stay in memory, exactly as before. A server keeps its spool files in one
folder of its own (:class:`SpoolDir`), deleted when it stops; an entry's file is deleted
when the cache evicts it (once the streams reading it are done). The client's file is
unlinked as soon as it is made, so nothing is left behind even by a crash.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import mmap
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedsqueeze.errors import ConfigError, IntegrityError, NotFoundError, ResourceExhaustedError

__all__ = [
    "DEFAULT_SPOOL_THRESHOLD",
    "SpoolDir",
    "SpoolFile",
    "SpoolPolicy",
    "SpooledStream",
    "StreamPiece",
    "file_buffer",
    "plan_progressive",
    "plan_segments",
]

#: Models of this many raw bytes and more are spooled (a model below it is held in
#: memory exactly as before; the simulations' models are far below it).
DEFAULT_SPOOL_THRESHOLD = 256 << 20
_READ = 8 << 20  # bytes read from a spool file at a time


@dataclass(frozen=True)
class SpoolPolicy:
    """When and where the data plane keeps a model on disk.

    Parameters
    ----------
    threshold_bytes
        Spool models of at least this many raw tensor bytes (the client reads the
        model's size from the manifest).
    directory
        Where spool files go (``None``: the system's temporary directory).
    """

    threshold_bytes: int = DEFAULT_SPOOL_THRESHOLD
    directory: Path | None = None

    def __post_init__(self) -> None:
        if isinstance(self.threshold_bytes, bool) or not isinstance(self.threshold_bytes, int):
            raise TypeError(f"threshold_bytes must be an int, not {self.threshold_bytes!r}")
        if self.threshold_bytes < 0:
            raise ValueError(f"threshold_bytes must be >= 0, got {self.threshold_bytes}")
        if self.directory is not None and not isinstance(self.directory, Path):
            raise TypeError(f"directory must be a Path, not {type(self.directory).__name__}")

    def applies(self, nbytes: int) -> bool:
        """Whether a model of ``nbytes`` is spooled."""
        return nbytes >= self.threshold_bytes

    @property
    def folder(self) -> Path:
        """The directory spool files go to."""
        return self.directory or Path(tempfile.gettempdir())

    def check(self) -> None:
        """Fail now, not mid-fetch, if the folder cannot take spool files.

        Raises
        ------
        ConfigError
            The folder is missing, not a directory, or not writable.
        """
        try:
            fd, name = tempfile.mkstemp(prefix=".fsq-check-", dir=self.folder)
        except OSError as exc:
            raise ConfigError(
                f"spool directory {self.folder} is not a writable directory ({exc.strerror})"
            ) from exc
        os.close(fd)
        os.unlink(name)


class SpoolDir:
    """A server's own folder of spool files, made on first use inside the policy's
    directory and removed with every file in it by :meth:`close`; thread-safe."""

    def __init__(self, policy: SpoolPolicy) -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self._path: Path | None = None

    @property
    def path(self) -> Path | None:
        """The folder, once made."""
        return self._path

    def new_file(self, suffix: str) -> SpoolFile:
        """A new empty spool file in the folder.

        Raises
        ------
        ConfigError
            The folder cannot be made or written to.
        """
        try:
            with self._lock:
                if self._path is None or not self._path.is_dir():
                    self._path = Path(tempfile.mkdtemp(prefix="fsq-spool-", dir=self.policy.folder))
                fd, name = tempfile.mkstemp(suffix=suffix, dir=self._path)
        except OSError as exc:
            raise ConfigError(
                f"cannot make a spool file in {self.policy.folder} ({exc.strerror})"
            ) from exc
        return SpoolFile(Path(name), fd)

    def close(self) -> None:
        """Delete the folder and every spool file in it (open files stay readable
        until closed: POSIX keeps an unlinked file's data for its open descriptors)."""
        with self._lock:
            path, self._path = self._path, None
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


class SpoolFile:
    """A file that record bodies are appended to and segments read from; thread-safe.

    :meth:`release` deletes it; its descriptor is closed when the last reader holding it
    (:meth:`hold`) is done, so a stream being sent when the cache evicts its entry ends
    normally.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._end = 0
        self._lock = threading.Lock()
        self._readers = 0
        self._released = False

    @property
    def nbytes(self) -> int:
        """Bytes written so far."""
        return self._end

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called."""
        return self._released

    def put(self, body: bytes | memoryview) -> int:
        """Append ``body``; returns its offset (a :class:`RecordStore` token).

        Raises
        ------
        ResourceExhaustedError
            The disk is full.
        OSError
            The file cannot be written otherwise.
        """
        offset = self._end
        view = memoryview(body).cast("B")
        while view:
            try:
                written = os.pwrite(self._fd, view, self._end)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise ResourceExhaustedError(
                        f"no room left for spool file {self.path} ({self._end:,} bytes written)"
                    ) from exc
                raise
            self._end += written
            view = view[written:]
        return offset

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``.

        Raises
        ------
        NotFoundError
            The file was released (its cache entry evicted) and nobody holds it.
        IntegrityError
            The file is shorter than what was written to it (truncated on disk).
        """
        with self._lock:
            if self._fd < 0:
                raise NotFoundError("this encoding was evicted from the cache; Fetch again")
            self._readers += 1
        try:
            parts: list[bytes] = []
            got = 0
            while got < length:
                piece = os.pread(self._fd, min(_READ, length - got), offset + got)
                if not piece:
                    raise IntegrityError(
                        f"spool file {self.path} ends at byte {offset + got}, before the "
                        f"{offset + length} written to it: it was truncated"
                    )
                parts.append(piece)
                got += len(piece)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        finally:
            self._done_reading()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the file open while the block runs, even if released meanwhile.

        Raises
        ------
        NotFoundError
            Already released and closed.
        """
        with self._lock:
            if self._fd < 0:
                raise NotFoundError("this encoding was evicted from the cache; Fetch again")
            self._readers += 1
        try:
            yield
        finally:
            self._done_reading()

    def _done_reading(self) -> None:
        with self._lock:
            self._readers -= 1
            if self._released and self._readers == 0:
                self._close_locked()

    def release(self) -> None:
        """Delete the file now; close it once no reader holds it. Idempotent."""
        with self._lock:
            self._released = True
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            if self._readers == 0:
                self._close_locked()

    def _close_locked(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True)
class StreamPiece:
    """A piece of a spooled stream: bytes in memory (``data``) or ``length`` bytes of
    the spool file at ``file_offset``."""

    data: bytes | None
    file_offset: int
    length: int


class SpooledStream:
    """An encoded stream made of small pieces in memory and bodies in a spool file.

    Parameters
    ----------
    pieces
        The stream's pieces in order.
    file
        The file the body pieces are in.
    """

    def __init__(self, pieces: Sequence[StreamPiece], file: SpoolFile) -> None:
        self.pieces = tuple(pieces)
        self.file = file
        self._starts: list[int] = []
        position = 0
        for piece in self.pieces:
            self._starts.append(position)
            position += piece.length
        self.nbytes = position

    def start_of(self, index: int) -> int:
        """Where piece ``index`` starts in the stream."""
        return self._starts[index]

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the stream.

        Raises
        ------
        ValueError
            A range outside the stream.
        NotFoundError, IntegrityError
            As :meth:`SpoolFile.read`.
        """
        if not 0 <= start <= end <= self.nbytes:
            raise ValueError(f"range [{start}, {end}) outside a stream of {self.nbytes} bytes")
        out: list[bytes] = []
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        position = start
        while position < end:
            piece, first = self.pieces[i], self._starts[i]
            skip = position - first
            take = min(piece.length - skip, end - position)
            if piece.data is not None:
                out.append(piece.data[skip : skip + take])
            else:
                out.append(self.file.read(piece.file_offset + skip, take))
            position += take
            i += 1
        if len(out) == 1:
            return out[0] if isinstance(out[0], bytes) else bytes(out[0])
        return b"".join(out)

    def chunks(self, start: int, end: int, size: int = 1 << 20) -> Iterator[bytes]:
        """Bytes ``[start, end)`` in pieces of at most ``size``."""
        for position in range(start, end, size):
            yield self.read(position, min(end, position + size))


@dataclass(frozen=True)
class PlannedSegment:
    """A segment of a stream: bytes ``[start, end)``, the tensors they hold and (for a
    progressive stream) the highest level of its records."""

    index: int
    start: int
    end: int
    tensor_names: tuple[str, ...]
    level: int = 0


def plan_segments(pieces: Sequence[tuple[str | None, int]], max_bytes: int) -> list[PlannedSegment]:
    """Where :func:`~fedsqueeze.codec.segments.split_segments` cuts a stream of
    base-level records, from the lengths alone: ``pieces`` are the model header
    (``None``) and each record (its tensor's name) with their byte lengths.

    The same cut points as ``split_segments`` on the same stream (so the same segments,
    digests and manifest key as the in-memory path), without the bytes.
    """
    if max_bytes < 64:
        raise ValueError(f"max_bytes must be at least 64, got {max_bytes}")
    segments: list[PlannedSegment] = []
    start = fill = 0
    names: list[str] = []

    def flush() -> None:
        nonlocal start, fill, names
        if fill:
            segments.append(PlannedSegment(len(segments), start, start + fill, tuple(names)))
            start, fill, names = start + fill, 0, []

    for name, length in pieces:
        if fill + length > max_bytes and names:
            flush()  # a large record starts a fresh segment (not after a lone header)
        done = 0
        while done < length:
            take = min(max_bytes - fill, length - done)
            fill += take
            done += take
            if name is not None and (not names or names[-1] != name):
                names.append(name)
            if fill >= max_bytes:
                flush()
    flush()
    return segments


def plan_progressive(
    pieces: Sequence[tuple[str | None, int, int]], target_bytes: int, max_bytes: int
) -> list[PlannedSegment]:
    """Where :func:`~fedsqueeze.codec.segments.split_progressive` cuts a progressive
    stream, from the lengths alone: ``pieces`` are the model header (``None``, level 0)
    and each record (its tensor's name, its level, its byte length).

    The same cut points, names and levels as ``split_progressive`` on the same stream.
    """
    if not 64 <= target_bytes <= max_bytes:
        raise ValueError("target_bytes must be in [64, max_bytes]")
    segments: list[PlannedSegment] = []
    start = fill = level = 0
    names: list[str] = []
    refining = False

    def flush() -> None:
        nonlocal start, fill, names, level
        if fill:
            index = len(segments)
            segments.append(PlannedSegment(index, start, start + fill, tuple(names), level))
            start, fill, names, level = start + fill, 0, [], 0

    for name, piece_level, length in pieces:
        if (piece_level > 0) != refining or (fill + length > max_bytes and names):
            flush()
            refining = piece_level > 0
        if name is not None and (not names or names[-1] != name):
            names.append(name)
        for offset in range(0, length, max_bytes):
            fill += min(max_bytes, length - offset)
            level = max(level, piece_level)
            if fill >= max_bytes:
                flush()
                if name is not None and offset + max_bytes < length:
                    names.append(name)
        if fill >= target_bytes:
            flush()
    flush()
    return segments


def file_buffer(nbytes: int, policy: SpoolPolicy) -> mmap.mmap:
    """A zeroed, writable, file-backed shared mapping of ``nbytes`` in the policy's
    folder; the file is unlinked at once (its space is freed when the mapping closes).

    The disk space is reserved up front where the file system can (``posix_fallocate``):
    a full disk then fails here, not as a bus error when a page is first written.

    Raises
    ------
    ConfigError
        The folder is not writable, or has no room for ``nbytes``.
    """
    try:
        fd, name = tempfile.mkstemp(prefix="fsq-fetch-", suffix=".buf", dir=policy.folder)
    except OSError as exc:
        raise ConfigError(
            f"spool directory {policy.folder} is not a writable directory ({exc.strerror})"
        ) from exc
    try:
        os.unlink(name)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise ConfigError(
                    f"no room for a {nbytes:,}-byte fetch in {policy.folder}"
                ) from exc
            os.ftruncate(fd, nbytes)  # the file system cannot reserve: sparse then
        return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
