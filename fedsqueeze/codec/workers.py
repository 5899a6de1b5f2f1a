"""Work on every core: one thread pool for the process, an ordered parallel map, and the
map that :func:`~fedsqueeze.codec.model.encode_state` and
:func:`~fedsqueeze.codec.model.decode_state` run their tensors through.

Why tensors in parallel: a large tensor is split into chunks that run on every core
(:mod:`fedsqueeze.codec.chunks`, the grouped coder's chunks), but a model is mostly
tensors of one chunk or less (all-MiniLM-L6-v2: 100 of its 103 tensors), and those ran
one after the other on the calling thread, so a model was coded on about one core
(measured on MiniLM, lossless: 268 ms of wall time for 309 ms of CPU). Their coding is
zstd, NumPy and compiled kernels, which release the GIL.

Why a map of our own rather than ``ThreadPoolExecutor.map``: the caller drains the
queue too and cancels the helpers that never started (no call waits on a pool that
other calls have filled, so nested and concurrent calls are safe), items are taken in
order and none is started after one has
failed, and the error raised is the first failing item's in order: what a plain loop
raises, whatever the threads' timing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar, cast

__all__ = [
    "ALONE_ABOVE",
    "map_alone_or_parallel",
    "ordered_pipeline",
    "parallel_map",
    "workers",
]

T = TypeVar("T")
R = TypeVar("R")

#: Tensors of more values than this run on their own, one at a time, on the calling
#: thread: their chunks (2^20 values each, in both chunked coders) use every core.
ALONE_ABOVE = 1 << 20

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_count = 1


def _forget_pool() -> None:
    # A forked child inherits the executor but not its threads: work submitted there
    # would wait forever. It starts its own pool instead.
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def workers() -> tuple[ThreadPoolExecutor, int]:
    """One pool for the process (one thread per core) and its size. The size is read
    once, with the pool (``os.cpu_count`` reads ``/sys``: 10 µs, once per tensor)."""
    global _pool, _count
    with _pool_lock:
        if _pool is None:
            _count = max(1, os.cpu_count() or 1)
            _pool = ThreadPoolExecutor(max_workers=_count, thread_name_prefix="fsq-group")
        return _pool, _count


def parallel_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(item) for item in items]`` on all cores, the calling thread included.

    Workers take the next item from a shared queue, so uneven items balance out. Once an
    item has failed no later one is started; the exception raised is that of the first
    failing item in order (every item before it has run), as a loop would raise.
    """
    results, failed = _ordered(fn, items)
    if failed is not None:
        raise failed[1]
    return cast("list[R]", results)


def _ordered(
    fn: Callable[[T], R], items: Sequence[T]
) -> tuple[list[R | None], tuple[int, BaseException] | None]:
    """The results of :func:`parallel_map`, and the first failing item's index and
    exception (``None`` when none failed) instead of raising it."""
    pool, count = workers()
    results: list[R | None] = [None] * len(items)
    helpers = min(count, len(items)) - 1
    if helpers <= 0:
        for i, item in enumerate(items):
            try:
                results[i] = fn(item)
            except BaseException as error:
                return results, (i, error)
        return results, None
    errors: dict[int, BaseException] = {}
    order = iter(range(len(items)))
    lock = threading.Lock()

    def drain() -> None:
        while True:
            with lock:
                i = None if errors else next(order, None)
            if i is None:
                return
            try:
                results[i] = fn(items[i])
            except BaseException as error:
                with lock:
                    errors[i] = error

    futures = [pool.submit(drain) for _ in range(helpers)]
    try:
        drain()
    finally:
        # Every item has been taken once the caller's drain returns: a helper that has
        # not started yet would find none, so it is cancelled rather than waited for (a
        # call nested in a pool thread, with every pool thread in such a call, would
        # otherwise wait forever for helpers queued behind them); a started one is
        # waited for, so no worker outlives the call.
        for f in futures:
            if not f.cancel():
                f.exception()
    if errors:
        first = min(errors)
        return results, (first, errors[first])
    return results, None


def map_alone_or_parallel(
    fn: Callable[[T], R], items: Sequence[T], alone: Callable[[T], bool]
) -> list[R]:
    """``[fn(item) for item in items]``: the items ``alone`` names one at a time on the
    calling thread (large tensors, whose own chunks use every core), after the others,
    which run with :func:`parallel_map`. Results keep the items' order, and the
    exception raised is the first failing item's in order, as a loop would raise."""
    solo = [alone(item) for item in items]
    together = [i for i, s in enumerate(solo) if not s]
    shared, failed = _ordered(lambda i: fn(items[i]), together)
    failed_at = len(items) if failed is None else together[failed[0]]
    results: list[R | None] = [None] * len(items)
    for i, value in zip(together, shared, strict=True):
        results[i] = value
    for i, s in enumerate(solo):
        if s and i < failed_at:
            results[i] = fn(items[i])  # its failure comes first in order: raised here
    if failed is not None:
        raise failed[1]
    return cast("list[R]", results)


def ordered_pipeline(
    fn: Callable[[int], R], count: int, emit: Callable[[int, R], None], ahead: int
) -> None:
    """``emit(i, fn(i))`` for ``i`` in ``0 .. count − 1``: ``fn`` on all cores (the
    calling thread included), ``emit`` on the calling thread in order, as soon as each
    result's turn comes, while the other cores go on with the next items; at most
    ``ahead`` items (at least 1) are started and not yet emitted, which bounds the
    results held at once (and lets a caller reuse item ``i``'s scratch for item
    ``i + ahead``). Where :func:`parallel_map` over windows of items waits for the
    window's slowest item and then emits on one core while the others idle, this keeps
    every core busy (the lossless coder's chunks: :func:`fedsqueeze.codec.grouping.encode_grouped`).

    Once an item has failed no later one is started, and the exception raised is the
    first failing item's in order, after every item before it has been emitted: what a
    loop would do. The calling thread works too, so the pipeline finishes whatever the
    pool's threads are doing (a call nested in a pool thread included).
    """
    if ahead < 1:
        raise ValueError(f"ahead must be at least 1, got {ahead}")
    pool, cores = workers()
    helpers = min(cores, count, ahead) - 1
    if helpers <= 0:
        for i in range(count):
            emit(i, fn(i))
        return
    cond = threading.Condition()
    results: dict[int, R] = {}
    errors: dict[int, BaseException] = {}
    started = 0  # items taken so far (in order)
    emitted = 0
    stop = False

    def last() -> int:
        """One past the last item that may ever start: the first failed one, or none."""
        return min(errors) if errors else count

    def take() -> int | None:
        """The next item to start, if one may start now (call with ``cond`` held)."""
        nonlocal started
        if stop or started >= min(last(), emitted + ahead):
            return None
        started += 1
        return started - 1

    def finished() -> bool:
        return stop or started >= last()

    def run(i: int) -> None:
        try:
            value = fn(i)
        except BaseException as error:
            with cond:
                errors[i] = error
                cond.notify_all()
            return
        with cond:
            results[i] = value
            cond.notify_all()

    def helper() -> None:
        while True:
            with cond:
                i = take()
                while i is None and not finished():
                    cond.wait()
                    i = take()
            if i is None:
                return
            run(i)

    futures = [pool.submit(helper) for _ in range(helpers)]
    try:
        while emitted < count:
            with cond:
                mine = None  # an item to run here, or None: emitted's turn has come
                while emitted not in results and emitted not in errors:
                    mine = take()
                    if mine is not None:
                        break
                    cond.wait()
                failure = errors.get(emitted)
                value = results.pop(emitted, None) if mine is None else None
            if mine is not None:
                run(mine)
                continue
            if failure is not None:
                raise failure
            emit(emitted, cast(R, value))
            with cond:
                emitted += 1
                cond.notify_all()
    finally:
        with cond:
            stop = True
            cond.notify_all()
        for f in futures:  # see _ordered: a helper not started is cancelled, not waited for
            if not f.cancel():
                f.exception()
