"""Broken streams resume with only the missing segments; bad segments are fetched again."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from fedsqueeze.codec import CodecSpec, state_digest
from fedsqueeze.errors import IntegrityError, UnavailableError
from fedsqueeze.transport import FaultInjector, FetchState, RetryPolicy, ServerConfig
from fedsqueeze.transport.faults import StreamAction
from tests.polling import until
from tests.transport.conftest import make_state

pytestmark = pytest.mark.timeout(60)

SMALL_SEGMENTS = ServerConfig(segment_bytes=128 * 1024)


def test_cut_stream_resumes_with_only_missing_segments(source, store, start_server, connect):
    digest = source.publish(make_state(0, scale=2))
    undisturbed = start_server(source, store, config=SMALL_SEGMENTS)
    reference = connect(undisturbed).fetch(spec=CodecSpec(), decode=False)
    undisturbed.stop(grace=0)
    full = reference.stats.wire.received
    one_segment = max(s.byte_length for s in reference.manifest.segments) + 200
    faults = FaultInjector()
    faults.cut_streams_after(3, times=2)
    server = start_server(source, store, config=SMALL_SEGMENTS, faults=faults)
    result = connect(server).fetch(spec=CodecSpec())
    assert faults.cuts == 2
    assert result.state is not None and state_digest(result.state).hex() == digest
    assert result.stats.retries == 2
    assert result.stats.resumed_segments == 3 + 6
    assert result.stats.wire.received <= full + one_segment


def test_resume_across_calls_with_a_fetch_state(source, store, start_server, connect):
    digest = source.publish(make_state(0, scale=2))
    faults = FaultInjector()
    faults.cut_streams_after(4)
    server = start_server(source, store, config=SMALL_SEGMENTS, faults=faults)
    impatient = RetryPolicy(max_attempts=1, initial_backoff_s=0.01, max_backoff_s=0.01)
    client = connect(server, retry=impatient)
    held = FetchState()

    def after_four(held_bytes: int, total: int) -> None:
        if len(held.held_ids()) == 4:  # from now on, streams are cut before any segment
            faults.cut_streams_after(0, times=100)

    with pytest.raises(UnavailableError):
        client.fetch(spec=CodecSpec(), state=held, progress=after_four)
    assert len(held.held_ids()) == 4
    faults.cut_streams_after(0, times=0)
    result = client.fetch(spec=CodecSpec(), state=held)
    assert result.stats.resumed_segments == 0  # held before this call's first stream
    assert result.stats.wire.messages_received == 1 + len(result.manifest.segments) - 4
    assert result.state is not None and state_digest(result.state).hex() == digest


def test_corrupted_segment_is_fetched_again(source, store, start_server, connect):
    digest = source.publish(make_state(0, scale=2))
    faults = FaultInjector()
    faults.corrupt_segment(2, times=2)
    server = start_server(source, store, config=SMALL_SEGMENTS, faults=faults)
    result = connect(server).fetch(spec=CodecSpec())
    assert faults.corruptions == 2
    assert result.stats.refetched_segments == 2
    assert result.state is not None and state_digest(result.state).hex() == digest


def test_always_corrupted_segment_fails_with_integrity_error(source, store, start_server, connect):
    source.publish(make_state(0, scale=2))
    faults = FaultInjector()
    faults.corrupt_segment(1, times=1000)
    server = start_server(source, store, config=SMALL_SEGMENTS, faults=faults)
    with pytest.raises(IntegrityError, match="segment 1"):
        connect(server).fetch(spec=CodecSpec())
    assert faults.corruptions == RetryPolicy().max_segment_refetches + 1


@pytest.mark.timeout(60)
def test_server_restart_in_the_middle_of_a_fetch(source, store, start_server, connect):
    digest = source.publish(make_state(0, scale=2))
    faults = FaultInjector()
    faults.pause_streams_after(3)
    first = start_server(source, store, config=SMALL_SEGMENTS, faults=faults)
    port = first.port
    client = connect(first)
    outcome: dict[str, Any] = {}
    state = FetchState()

    def fetch() -> None:
        try:
            outcome["result"] = client.fetch(spec=CodecSpec(), state=state)
        except Exception as exc:  # reported below
            outcome["error"] = exc

    thread = threading.Thread(target=fetch)
    thread.start()
    assert faults.paused.wait(10)
    # Stop once the client holds the three segments sent (on a busy machine gRPC may not
    # have delivered them when the stream pauses).
    until(lambda: len(state.held_ids()) >= 3, what="the client holding the segments sent")
    first.stop(grace=0)  # the stream is cut; the cache goes with the process
    second = start_server(source, store, config=ServerConfig(port=port, segment_bytes=128 * 1024))
    thread.join(30)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert state_digest(result.state).hex() == digest
    assert result.stats.resumed_segments >= 3
    assert second.stats().cache.encodes == 1


def test_parallel_verifiers_keep_every_guarantee(source, store, start_server, connect, monkeypatch):
    from fedsqueeze.transport import client as client_module

    monkeypatch.setattr(client_module, "VERIFIERS", 3)  # as on a machine with 5+ cores
    digest = source.publish(make_state(0, scale=2))
    faults = FaultInjector()
    faults.corrupt_segment(2, times=1)
    faults.cut_streams_after(5, times=1)
    server = start_server(source, store, config=SMALL_SEGMENTS, faults=faults)
    seen: list[int] = []
    result = connect(server).fetch(spec=CodecSpec(), progress=lambda held, _: seen.append(held))
    assert (faults.corruptions, faults.cuts, result.stats.refetched_segments) == (1, 1, 1)
    assert seen == sorted(seen) and seen[-1] == result.manifest.encoded_bytes
    assert result.state is not None and state_digest(result.state).hex() == digest


def test_a_stream_held_while_its_server_stops_ends_there() -> None:
    """However late gRPC's cancellation reaches a held stream, it sends nothing more."""
    faults = FaultInjector()
    faults.pause_streams_after(3)
    actions: list[StreamAction] = []
    held = threading.Thread(target=lambda: actions.append(faults.before_segment(3)))
    held.start()
    assert faults.paused.wait(10)
    faults.release_for_stop()
    held.join(10)
    assert actions == [StreamAction.CUT]
    assert faults.before_segment(4) is StreamAction.CONTINUE  # only the held one is cut
