"""Link emulation: simulated seconds without sleeping, and a real token bucket."""

from __future__ import annotations

import time

import pytest

from fedsqueeze.codec import CodecSpec
from fedsqueeze.transport import (
    Direction,
    LinkClock,
    LinkDirection,
    LinkProfile,
    LinkShaper,
    ShapingMode,
    TokenBucket,
    WireCounter,
)
from tests.transport.conftest import FakeTime, make_state

pytestmark = pytest.mark.timeout(60)


def test_link_profile_units():
    link = LinkProfile.from_mbit(down_mbit=8, up_mbit=1, rtt_ms=50)
    assert link == LinkProfile(8e6, 1e6, 0.05)
    assert link.transfer_s(1_000_000, LinkDirection.DOWN) == pytest.approx(1.0)
    assert link.transfer_s(1_000_000, LinkDirection.UP) == pytest.approx(8.0)
    for bad in ((0, 1, 0), (1, -1, 0), (1, 1, -0.1), (float("nan"), 1, 0)):
        with pytest.raises(ValueError):
            LinkProfile(*bad)


def test_link_clock_adds_transfers_and_round_trips():
    clock = LinkClock(LinkProfile(8e6, 8e5, 0.1))
    assert clock.add_bytes(LinkDirection.DOWN, 2_000_000) == pytest.approx(2.0)
    assert clock.add_bytes(LinkDirection.UP, 100_000) == pytest.approx(1.0)
    assert clock.add_round_trips(3) == pytest.approx(0.3)
    assert clock.elapsed_s == pytest.approx(3.3)
    assert clock.round_trips == 3
    assert clock.bytes_moved(LinkDirection.DOWN) == 2_000_000
    with pytest.raises(ValueError):
        clock.add_bytes(LinkDirection.UP, -1)


def test_token_bucket_holds_the_rate():
    fake = FakeTime()
    bucket = TokenBucket(1000.0, 100.0, monotonic=fake.monotonic, sleep=fake.sleep)
    assert bucket.take(100) == 0.0  # the burst
    assert bucket.take(500) == pytest.approx(0.5)
    assert bucket.take(1000) == pytest.approx(1.0)
    fake.now += 10.0  # idle: the bucket refills only up to its burst
    assert bucket.take(100) == 0.0
    assert bucket.take(100) == pytest.approx(0.1)
    assert sum(fake.slept) == pytest.approx(1.6)


def test_simulated_shaper_never_sleeps():
    fake = FakeTime()
    shaper = LinkShaper(
        LinkProfile(8e6, 8e6, 0.2),
        ShapingMode.SIMULATED,
        monotonic=fake.monotonic,
        sleep=fake.sleep,
    )
    counter = WireCounter(shaper.on_message)
    shaper.on_call()
    counter.count(Direction.RECEIVED, 999_995)
    counter.count(Direction.SENT, 95)
    assert shaper.clock.elapsed_s == pytest.approx(0.2 + 1.0 + 0.0001)
    assert fake.slept == []


def test_real_shaper_sleeps_for_bandwidth_and_rtt():
    fake = FakeTime()
    shaper = LinkShaper(
        LinkProfile(8e6, 8e6, 0.2),
        ShapingMode.REAL,
        burst_s=0.01,
        monotonic=fake.monotonic,
        sleep=fake.sleep,
    )
    shaper.on_call()
    shaper.on_message(Direction.RECEIVED, 1_000_000)
    assert sum(fake.slept) == pytest.approx(0.2 + 0.99)


def test_fetch_through_a_simulated_link(source, store, start_server, connect):
    source.publish(make_state(0))
    server = start_server(source, store)
    link = LinkShaper(LinkProfile.from_mbit(down_mbit=10, up_mbit=2, rtt_ms=40))
    started = time.monotonic()
    result = connect(server, link=link).fetch(spec=CodecSpec())
    wire = result.stats.wire
    expected = wire.received * 8 / 10e6 + wire.sent * 8 / 2e6 + 0.04 * result.stats.calls
    assert result.stats.simulated_s == pytest.approx(expected)
    assert result.stats.simulated_s > 0.5  # ~1 MB at 10 Mbit/s
    assert time.monotonic() - started < result.stats.simulated_s


def test_fetch_through_a_real_link_takes_the_time(source, store, start_server, connect):
    source.publish(make_state(0))
    server = start_server(source, store)
    link = LinkShaper(LinkProfile.from_mbit(down_mbit=40, up_mbit=40, rtt_ms=20), ShapingMode.REAL)
    started = time.monotonic()
    result = connect(server, link=link).fetch(spec=CodecSpec())
    took = time.monotonic() - started
    assert took >= 0.9 * (result.stats.wire.received * 8 / 40e6 + 0.02 * 2)
