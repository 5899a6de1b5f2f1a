"""The simulated clock: transfer, round trips, compute; the slowest client; deadlines."""

from __future__ import annotations

import pytest

from fedsqueeze.transport.shaping import LinkProfile
from simulations.clock import ClientTraffic, client_seconds, round_time

SLOW = LinkProfile.from_mbit(0.08, 0.008, 500)  # 10 kB/s down, 1 kB/s up
FAST = LinkProfile.from_mbit(8.0, 8.0, 10)


def _traffic(pid: int, down: int, up: int, compute: float = 0.5) -> ClientTraffic:
    return ClientTraffic(pid, down, up, round_trips=5, compute_s=compute)


def test_client_time_adds_transfers_round_trips_and_compute() -> None:
    seconds = client_seconds(SLOW, _traffic(0, 20_000, 3_000, compute=1.5))
    assert seconds == pytest.approx(2.0 + 3.0 + 5 * 0.5 + 1.5)


def test_round_lasts_as_long_as_the_slowest_client() -> None:
    t = round_time([(SLOW, _traffic(0, 20_000, 3_000)), (FAST, _traffic(1, 20_000, 3_000))])
    assert t.seconds == pytest.approx(t.client_seconds[0]) and t.dropped == ()
    assert t.client_seconds[1] < t.client_seconds[0]


def test_deadline_drops_stragglers_and_the_round_lasts_the_deadline() -> None:
    clients = [(SLOW, _traffic(0, 20_000, 3_000)), (FAST, _traffic(1, 20_000, 3_000))]
    t = round_time(clients, deadline_s=2.0)
    assert t.dropped == (0,) and t.seconds == 2.0
    kept = round_time(clients[1:], deadline_s=2.0)
    assert kept.dropped == () and kept.seconds < 2.0


def test_empty_round_and_bad_values() -> None:
    assert round_time([]).seconds == 0.0
    with pytest.raises(ValueError):
        round_time([], deadline_s=0.0)
    with pytest.raises(ValueError):
        ClientTraffic(0, -1, 0, 0, 0.0)
