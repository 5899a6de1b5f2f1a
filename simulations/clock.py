"""The simulated clock: how long a round would take on the clients' links.

A client's round costs, one after the other (as :class:`~fedsqueeze.transport.shaping.LinkClock`
models a link: no overlap between directions, no TCP slow start)::

    bytes down / downlink bandwidth + round trips × RTT + local compute + bytes up / uplink

where the bytes are those counted on the wire (data plane and Flower's control messages)
and compute is the local time the client measured. A round lasts as long as its slowest
sampled client, unless a deadline is set: then clients that would finish after it are
dropped as stragglers (their updates are not aggregated, their bytes still count) and the
round lasts exactly the deadline. Nothing sleeps: the clock only adds numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedsqueeze.transport.shaping import LinkClock, LinkDirection, LinkProfile

__all__ = [
    "CONTROL_ROUND_TRIPS",
    "DATA_PLANE_ROUND_TRIPS",
    "ClientTraffic",
    "RoundTime",
    "client_seconds",
    "round_time",
]

#: Flower's control plane per round: the edge pulls its instruction, then pushes its reply.
CONTROL_ROUND_TRIPS = 2
#: The data plane per round: Fetch (manifest and segments in one call), PushUpdate.
DATA_PLANE_ROUND_TRIPS = 2


@dataclass(frozen=True)
class ClientTraffic:
    """What one client did in one round.

    Attributes
    ----------
    partition
        The client's partition id (its identity across runs).
    bytes_down, bytes_up
        Bytes it received and sent, counted on the wire (all planes).
    round_trips
        Request/response exchanges it started.
    compute_s
        Measured local work, in seconds (training, and for fedsqueeze clients also
        decoding and encoding).
    data_down, data_up
        The data plane's part of ``bytes_down`` and ``bytes_up``.
    """

    partition: int
    bytes_down: int
    bytes_up: int
    round_trips: int
    compute_s: float
    data_down: int = 0
    data_up: int = 0

    def __post_init__(self) -> None:
        if min(self.bytes_down, self.bytes_up, self.round_trips) < 0 or self.compute_s < 0:
            raise ValueError("bytes, round trips and compute must be >= 0")


@dataclass(frozen=True)
class RoundTime:
    """A round on the simulated clock.

    Attributes
    ----------
    seconds
        Its duration: the slowest kept client's time, or the deadline when clients were
        dropped.
    client_seconds
        Each client's own time, by partition id.
    dropped
        Partition ids of the stragglers that missed the deadline, sorted.
    """

    seconds: float
    client_seconds: dict[int, float]
    dropped: tuple[int, ...]


def client_seconds(link: LinkProfile, traffic: ClientTraffic) -> float:
    """Seconds one client needs for its round on ``link``."""
    clock = LinkClock(link)
    clock.add_bytes(LinkDirection.DOWN, traffic.bytes_down)
    clock.add_bytes(LinkDirection.UP, traffic.bytes_up)
    clock.add_round_trips(traffic.round_trips)
    return clock.elapsed_s + traffic.compute_s


def round_time(
    clients: Sequence[tuple[LinkProfile, ClientTraffic]], deadline_s: float | None = None
) -> RoundTime:
    """The round's duration and its stragglers.

    Parameters
    ----------
    clients
        Each sampled client's link and traffic.
    deadline_s
        Round deadline in seconds, or ``None`` to wait for everyone.
    """
    if deadline_s is not None and not deadline_s > 0:
        raise ValueError("deadline_s must be > 0 (or None)")
    times = {traffic.partition: client_seconds(link, traffic) for link, traffic in clients}
    if deadline_s is None:
        return RoundTime(max(times.values(), default=0.0), times, ())
    dropped = tuple(sorted(p for p, t in times.items() if t > deadline_s))
    seconds = deadline_s if dropped else max(times.values(), default=0.0)
    return RoundTime(seconds, times, dropped)
