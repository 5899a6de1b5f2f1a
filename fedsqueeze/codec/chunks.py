"""Chunked, multi-core execution of element-wise codec kernels on the CPU.

A kernel over a large tensor runs as a list of chunks of about a million values, each
handled by in-place operations on a chunk-sized scratch buffer so temporaries stay in
cache. :func:`run_chunks` hands the chunks to a small pool of worker threads, one per
torch thread (``torch.get_num_threads()``), and waits for them.

Why threads of our own rather than torch's intra-op parallelism: every operation on a
million values is one OpenMP fork/join, and on a shared 2-core machine a busy neighbour
turns each join into a wait for a descheduled thread. Measured on these machines under
load: 2 OpenMP threads made a chunked dequantization 8-40x *slower* than 1; the same
chunks spread over 2 worker threads (each operation then runs single-threaded inside
its worker) were as fast as or faster than 1 thread, with or without load. Chunks are
independent, so nothing orders them.

A call from inside a worker (a kernel calling a kernel) runs its chunks inline, so the
pool never waits on itself; so does everything off the CPU, and single-chunk work.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch

__all__ = [
    "CPU_CHUNK",
    "aligned_bounds",
    "chunk_bounds",
    "np_scratch",
    "run_chunks",
    "scratch",
    "submit",
]

T = TypeVar("T")

#: Values per chunk on the CPU: a few MB of float32 scratch stay in cache.
CPU_CHUNK = 1 << 20

_pools: dict[int, ThreadPoolExecutor] = {}
_lock = threading.Lock()
_local = threading.local()


def _forget_pools() -> None:
    # A forked child inherits the executors but not their threads: work submitted there
    # would wait forever. It starts its own pools instead.
    global _lock
    _pools.clear()
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools)


def chunk_bounds(n: int, chunk: int = CPU_CHUNK) -> list[tuple[int, int]]:
    """``[(start, stop), …]`` covering ``range(n)`` in pieces of at most ``chunk``."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return [(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def aligned_bounds(n: int, per_byte: int, run: int, chunk: int) -> list[tuple[int, int]]:
    """Chunks of about ``chunk`` of ``n`` values packed ``per_byte`` to a byte, each
    starting on a byte and on a run of ``run`` values (the last one may end inside a
    byte, or with a short run). The dense encoder and decoder cut a body alike with it,
    so each decoded chunk is one of the encoder's pieces."""
    unit = run * per_byte // math.gcd(run, per_byte)  # values that fill whole bytes and runs
    step = max(1, chunk // unit) * unit
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def run_chunks(fn: Callable[[int, int], None], bounds: Sequence[tuple[int, int]]) -> None:
    """Call ``fn(start, stop)`` for every pair of ``bounds``, on the worker pool.

    ``fn`` must only write disjoint parts of its outputs per chunk (and use scratch
    buffers of its own, see :func:`scratch`); the first exception raised by a chunk is
    re-raised here once all chunks are done.
    """
    workers = torch.get_num_threads()
    if workers <= 1 or len(bounds) < 2 or getattr(_local, "in_worker", False):
        for start, stop in bounds:
            fn(start, stop)
        return
    pool = _pool(workers)
    futures = [pool.submit(_in_worker, fn, start, stop) for start, stop in bounds]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


def submit(fn: Callable[[], T]) -> Future[T]:
    """Run ``fn`` on a worker thread, beside what the caller does next (inline, already
    done, with one torch thread or when called from a worker)."""
    workers = torch.get_num_threads()
    if workers > 1 and not getattr(_local, "in_worker", False):
        return _pool(workers).submit(_task, fn)
    done: Future[T] = Future()
    try:
        done.set_result(fn())
    except Exception as exc:  # re-raised by result(), as a pooled task's would be
        done.set_exception(exc)
    return done


def _task(fn: Callable[[], T]) -> T:
    _local.in_worker = True
    return fn()


def scratch(slot: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread scratch buffer of at least ``numel`` elements (first ``numel`` returned).

    Reused across calls on the same thread (fresh chunk buffers cost ~15% more CPU in
    the quantization loop). Kernels share slots: a chunk function takes slot ``"a"``
    and, when it needs a second buffer of the same dtype, ``"b"``, and never calls
    another kernel while holding one. So a thread holds at most a few chunk-sized
    buffers (~13 MB with NF4's four), whatever the model's size.
    """
    buffers: dict[tuple[str, torch.dtype], torch.Tensor] | None = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buf = buffers.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, CPU_CHUNK), dtype=dtype)
        buffers[(slot, dtype)] = buf
    return buf[:numel]


def np_scratch(
    slot: str, numel: int, dtype: type[np.generic], minimum: int = CPU_CHUNK
) -> npt.NDArray[Any]:
    """:func:`scratch` for NumPy kernels: a per-thread buffer of ``numel`` elements of
    ``dtype`` (at least ``minimum`` allocated), reused across calls on the same thread;
    the same rules for slots (a slot name and dtype is one buffer)."""
    buffers: dict[tuple[str, Any], npt.NDArray[Any]] | None = getattr(_local, "np_buffers", None)
    if buffers is None:
        buffers = _local.np_buffers = {}
    key = (slot, np.dtype(dtype))
    buf = buffers.get(key)
    if buf is None or buf.size < numel:
        buf = np.empty(max(numel, minimum), dtype=dtype)
        buffers[key] = buf
    return buf[:numel]


def _in_worker(fn: Callable[[int, int], None], start: int, stop: int) -> None:
    _local.in_worker = True
    fn(start, stop)


def _pool(workers: int) -> ThreadPoolExecutor:
    with _lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = ThreadPoolExecutor(workers, "fedsqueeze-codec")
        return pool
