"""Tensors on every core (fedsqueeze.codec.workers): the ordered map keeps the items'
order and raises what a plain loop would raise (the first failing item's error, never a
later one's, whatever the threads' timing); large items run alone on the calling
thread; nested maps finish; and encode_state / decode_state give the same bytes and
tensors as a loop over the tensors, for every kind of spec, full models and deltas."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from fedsqueeze.codec import model as model_module
from fedsqueeze.codec import workers
from fedsqueeze.codec.model import EncodedModel, decode_state, encode_state
from fedsqueeze.codec.spec_text import parse_spec
from fedsqueeze.errors import FormatError
from tests.codec.conftest import make_state


class Boom(Exception):
    pass


def test_parallel_map_keeps_order_over_many_items() -> None:
    items = list(range(257))
    assert workers.parallel_map(lambda i: i * i, items) == [i * i for i in items]
    assert workers.parallel_map(lambda i: i, []) == []
    assert workers.parallel_map(lambda i: -i, [5]) == [-5]


@pytest.mark.parametrize("repeat", range(5))
def test_parallel_map_raises_the_first_failure_in_order(repeat: int) -> None:
    ran: list[int] = []
    lock = threading.Lock()
    gate = threading.Event()

    def fn(i: int) -> int:
        with lock:
            ran.append(i)
        if i == 9:  # fails at once, while item 3 is still running
            raise Boom(f"item {i}")
        if i == 3:
            gate.wait(0.2)
            raise Boom(f"item {i}")
        return i

    with pytest.raises(Boom, match="item 3"):
        workers.parallel_map(fn, list(range(40)))
    # Every item before the failed one ran; none was started long after the failure.
    assert set(range(4)) <= set(ran)
    assert len(ran) < 40


def test_map_alone_or_parallel_runs_large_items_on_the_calling_thread() -> None:
    caller = threading.get_ident()
    where: dict[int, int] = {}

    def fn(i: int) -> int:
        where[i] = threading.get_ident()
        return 10 * i

    items = list(range(30))
    out = workers.map_alone_or_parallel(fn, items, lambda i: i % 7 == 0)
    assert out == [10 * i for i in items]
    assert all(where[i] == caller for i in items if i % 7 == 0)


@pytest.mark.parametrize(
    ("fails", "alone", "raised", "not_run"),
    [
        ({2, 5}, {2}, 2, set()),  # a large item fails first
        ({1, 4}, {4}, 1, {4}),  # a small one fails first: the later large one never runs
        ({6}, {0, 3}, 6, set()),  # every large item before it ran
    ],
)
def test_map_alone_or_parallel_raises_what_a_loop_would(
    fails: set[int], alone: set[int], raised: int, not_run: set[int]
) -> None:
    ran: set[int] = set()

    def fn(i: int) -> int:
        ran.add(i)
        if i in fails:
            raise Boom(f"item {i}")
        return i

    with pytest.raises(Boom, match=f"item {raised}"):
        workers.map_alone_or_parallel(fn, list(range(8)), lambda i: i in alone)
    assert not ran & not_run
    assert {i for i in alone if i < raised} <= ran


def test_nested_maps_finish() -> None:
    def inner(i: int) -> list[int]:
        return workers.parallel_map(lambda j: i * j, list(range(5)))

    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(workers.parallel_map(inner, range(9))))
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "nested maps deadlocked"
    assert out == [[[i * j for j in range(5)] for i in range(9)]]


_CONCURRENT_NESTED = """
import contextlib, threading, time
from fedsqueeze.codec import workers

_, size = workers.workers()
barrier = threading.Barrier(size)

def inner(j):
    time.sleep(0.001)
    return j

def outer(i):
    if threading.current_thread().name.startswith("fsq-group"):
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=2)  # every pool thread here before any nests
    return sum(workers.parallel_map(inner, list(range(6)))) + i

results = []
threads = [
    threading.Thread(target=lambda: results.append(workers.parallel_map(outer, list(range(8)))))
    for _ in range(size + 1)
]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
assert results == [[15 + i for i in range(8)]] * (size + 1), results
print("ok")
"""


def test_concurrent_nested_maps_in_every_pool_thread_finish() -> None:
    """Every pool thread inside a nested map at once (concurrent callers, as the
    coordinator's server threads encoding for several edges): the nested maps' helpers
    queue behind them, so the maps must not wait for helpers that never started. In a
    child process with a timeout: a deadlock would also hang the interpreter's exit."""
    done = subprocess.run(
        [sys.executable, "-c", _CONCURRENT_NESTED], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize("ahead", [1, 2, 3, 7])
@pytest.mark.parametrize("count", [0, 1, 2, 5, 40])
def test_ordered_pipeline_emits_in_order_with_at_most_ahead_in_flight(
    ahead: int, count: int
) -> None:
    """Every item once, emitted on the calling thread in order; never more than
    ``ahead`` items started and not yet emitted (what lets the lossless coder reuse item
    ``i``'s scratch for item ``i + ahead``); uneven items balance out."""
    lock = threading.Lock()
    started: list[int] = []
    emitted: list[tuple[int, int]] = []
    caller = threading.get_ident()

    def fn(i: int) -> int:
        with lock:
            started.append(i)
            assert len(started) - len(emitted) <= ahead, (started, emitted)
        time.sleep(0.002 if i % 3 == 0 else 0.0)
        return i * i

    def emit(i: int, value: int) -> None:
        assert threading.get_ident() == caller
        with lock:
            emitted.append((i, value))

    workers.ordered_pipeline(fn, count, emit, ahead)
    assert emitted == [(i, i * i) for i in range(count)]
    assert sorted(started) == list(range(count))


@pytest.mark.parametrize("repeat", range(5))
def test_ordered_pipeline_raises_the_first_failure_after_the_items_before_it(
    repeat: int,
) -> None:
    """Items 7 and 4 fail (7 first in time): item 4's error is raised, once items 0-3
    are emitted; nothing past the failures' reach is started. An emit that fails stops
    the pipeline too."""
    lock = threading.Lock()
    started: list[int] = []
    emitted: list[int] = []

    def fn(i: int) -> int:
        with lock:
            started.append(i)
        if i == 4:
            time.sleep(0.01)
            raise Boom(f"item {i}")
        if i == 7:
            raise Boom(f"item {i}")
        return i

    with pytest.raises(Boom, match="item 4"):
        workers.ordered_pipeline(fn, 100, lambda i, v: emitted.append(i), 4)
    assert emitted == [0, 1, 2, 3]
    assert max(started) < 4 + 4  # within ``ahead`` (4) of the 4 items emitted

    def bad_emit(i: int, value: int) -> None:
        if i == 2:
            raise Boom("emit 2")

    with pytest.raises(Boom, match="emit 2"):
        workers.ordered_pipeline(lambda i: i, 50, bad_emit, 3)
    with pytest.raises(ValueError, match="at least 1"):
        workers.ordered_pipeline(lambda i: i, 5, lambda i, v: None, 0)


def test_ordered_pipelines_nested_in_pool_threads_finish() -> None:
    """A pipeline inside parallel_map's items (pool threads busy with the outer map):
    the calling thread does the work its helpers cannot, so nothing waits forever."""

    def inner(i: int) -> list[int]:
        got: list[int] = []
        workers.ordered_pipeline(lambda j: i * j, 6, lambda j, v: got.append(v), 2)
        return got

    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(workers.parallel_map(inner, range(9))))
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "nested pipelines deadlocked"
    assert out == [[[i * j for j in range(6)] for i in range(9)]]


def _loop(fn: Callable[[Any], Any], items: Sequence[Any], alone: Callable[[Any], bool]) -> Any:
    return [fn(item) for item in items]


def _model(seed: int) -> dict[str, torch.Tensor]:
    """Many small tensors (they run in parallel) and one above ALONE_ABOVE."""
    g = torch.Generator().manual_seed(seed)
    state = make_state(seed)
    for i in range(12):
        state[f"layer{i}.weight"] = torch.randn(64 + i, 48, generator=g) * 0.05
        state[f"layer{i}.bf16"] = torch.randn(300 + i, generator=g).to(torch.bfloat16)
    state["big"] = torch.randn(workers.ALONE_ABOVE + 17, generator=g)
    return state


SPECS = [
    "lossless",
    "quant=8",
    "quant=8:channel",
    "quant=4:block64",
    "quant=4:nf4:block64",
    "prune=l1:0.9,quant=4",
    "prune=global:0.8,quant=8",
    "quant=2:kmeans",
    "topk=0.1,quant=4",
    "topk10-int4",  # stochastic rounding, seeded: a generator per tensor
    "quant=8:channel:stochastic",
    "quant=3:kmeans:stochastic",
    "rank=4",
    "float=fp16",
]


@pytest.mark.parametrize("text", SPECS)
@pytest.mark.parametrize("delta", [False, True])
def test_encode_and_decode_match_a_loop_over_the_tensors(
    text: str, delta: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = parse_spec(text)
    state = _model(1)
    base = _model(2) if delta else None
    parallel = encode_state(state, spec, base, seed=0)
    blob = parallel.to_bytes()
    decoded = decode_state(EncodedModel.from_bytes(blob), base)
    monkeypatch.setattr(model_module, "map_alone_or_parallel", _loop)
    looped = encode_state(state, spec, base, seed=0)
    assert looped.to_bytes() == blob
    assert looped.records == parallel.records
    again = decode_state(EncodedModel.from_bytes(blob), base)
    assert list(again) == list(decoded) == list(state)
    for name, tensor in again.items():
        assert tensor.dtype == decoded[name].dtype, name
        assert torch.equal(_bits(tensor), _bits(decoded[name])), name
    if spec.feedback:
        assert looped.residual is not None and parallel.residual is not None
        assert looped.residual.keys() == parallel.residual.keys()
        for name, r in looped.residual.items():
            assert torch.equal(r, parallel.residual[name]), name


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous().view(torch.uint8)


def test_decode_raises_the_first_bad_records_error() -> None:
    state = _model(3)
    encoded = encode_state(state, parse_spec("lossless"))
    records = list(encoded.records)
    names = [r.name for r in records]
    first, later = names.index("layer2.weight"), names.index("layer9.weight")
    # Two different faults ("chunk of 2^0 values", "… 2^5 …"): the first one's is raised.
    for i, body in ((first, b"\x00junk"), (later, b"\x05junk")):
        records[i] = type(records[i])(**{**records[i].__dict__, "body": body})
    broken = EncodedModel(encoded.spec, None, tuple(records))
    for _ in range(5):
        with pytest.raises(FormatError) as caught:
            decode_state(broken)
        with pytest.raises(FormatError) as alone:
            decode_state(EncodedModel(encoded.spec, None, (records[first],)))
        assert str(caught.value) == str(alone.value) == "chunk of 2^0 values"


def test_the_same_name_twice_is_refused_before_any_decoding() -> None:
    encoded = encode_state(_model(4), parse_spec("quant=8"))
    twice = EncodedModel(encoded.spec, None, (*encoded.records, encoded.records[0]))
    with pytest.raises(FormatError, match="appears twice"):
        decode_state(twice)


@pytest.mark.parametrize("text", ["topk10-int4", "quant=4:stochastic", "quant=3:kmeans:stochastic"])
def test_a_tensors_stochastic_codes_depend_on_the_seed_and_its_name_alone(text: str) -> None:
    """With a seed, a tensor's stochastic draws come from a generator of its own: the
    same record whichever tensors come before it, another one under another seed."""
    spec = parse_spec(text)
    state = _model(4)
    names = list(state)
    whole = {r.name: r for r in encode_state(state, spec, seed=7).records}
    reordered = dict(reversed(list(state.items())))
    again = {r.name: r for r in encode_state(reordered, spec, seed=7).records}
    alone = encode_state({names[5]: state[names[5]]}, spec, seed=7).records[0]
    assert all(again[n] == whole[n] for n in names)
    assert alone == whole[names[5]]
    other = {r.name: r for r in encode_state(state, spec, seed=8).records}
    assert any(other[n] != whole[n] for n in names if state[n].is_floating_point())
