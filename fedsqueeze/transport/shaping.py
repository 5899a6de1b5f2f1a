"""Link emulation for experiments: bandwidth and round-trip time per connection.

A :class:`LinkProfile` describes an edge's link. A :class:`LinkShaper` attached to one
client connection sees every message the client sends or receives (through its
:class:`~fedsqueeze.transport.accounting.WireCounter`) and every call it starts, and

* always advances a :class:`LinkClock` by ``bytes · 8 / bandwidth`` per message and one
  RTT per call: simulated seconds, with no real waiting, so a simulation of thousands of
  edges runs at full speed;
* in :attr:`ShapingMode.REAL` mode also sleeps: a token bucket per direction holds the
  byte rate to the bandwidth, and each call waits one RTT before it starts.

The simulated clock adds transfers and round trips one after the other (it does not
model TCP slow start, or overlap between directions), which is what a per-round time
budget needs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from fedsqueeze.transport.accounting import Direction


class LinkDirection(Enum):
    """Direction on the link: down is coordinator → edge, up is edge → coordinator."""

    DOWN = 1
    UP = 2


class ShapingMode(Enum):
    """Whether shaping only accounts simulated time or also really waits."""

    SIMULATED = 1
    REAL = 2


@dataclass(frozen=True)
class LinkProfile:
    """An edge's link.

    Parameters
    ----------
    down_bps
        Downlink bandwidth (coordinator → edge), in **bits** per second.
    up_bps
        Uplink bandwidth (edge → coordinator), in bits per second.
    rtt_s
        Round-trip time, in seconds.
    """

    down_bps: float
    up_bps: float
    rtt_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.down_bps > 0 and self.up_bps > 0):
            raise ValueError("bandwidths must be > 0 bits per second")
        if not self.rtt_s >= 0:
            raise ValueError("rtt_s must be >= 0")

    @classmethod
    def from_mbit(cls, down_mbit: float, up_mbit: float, rtt_ms: float = 0.0) -> LinkProfile:
        """A profile from megabits per second (10^6 bits) and milliseconds."""
        return cls(down_mbit * 1e6, up_mbit * 1e6, rtt_ms / 1e3)

    def bytes_per_s(self, direction: LinkDirection) -> float:
        """The bandwidth in bytes per second."""
        bps = self.down_bps if direction is LinkDirection.DOWN else self.up_bps
        return bps / 8.0

    def transfer_s(self, nbytes: int, direction: LinkDirection) -> float:
        """Seconds to move ``nbytes`` in ``direction`` (no RTT)."""
        return nbytes / self.bytes_per_s(direction)


class LinkClock:
    """Simulated seconds spent on one link; thread-safe.

    Parameters
    ----------
    profile
        The link.
    """

    def __init__(self, profile: LinkProfile) -> None:
        self.profile = profile
        self._lock = threading.Lock()
        self._seconds = 0.0
        self._bytes = {LinkDirection.DOWN: 0, LinkDirection.UP: 0}
        self._round_trips = 0

    def add_bytes(self, direction: LinkDirection, nbytes: int) -> float:
        """Account a transfer; returns the seconds it takes on this link."""
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        seconds = self.profile.transfer_s(nbytes, direction)
        with self._lock:
            self._seconds += seconds
            self._bytes[direction] += nbytes
        return seconds

    def add_round_trips(self, count: int = 1) -> float:
        """Account ``count`` round trips; returns their seconds."""
        if count < 0:
            raise ValueError("count must be >= 0")
        seconds = count * self.profile.rtt_s
        with self._lock:
            self._seconds += seconds
            self._round_trips += count
        return seconds

    @property
    def elapsed_s(self) -> float:
        """Simulated seconds so far."""
        with self._lock:
            return self._seconds

    @property
    def round_trips(self) -> int:
        """Round trips accounted so far."""
        with self._lock:
            return self._round_trips

    def bytes_moved(self, direction: LinkDirection) -> int:
        """Bytes accounted in ``direction`` so far."""
        with self._lock:
            return self._bytes[direction]


class TokenBucket:
    """Holds a byte rate by making callers wait; thread-safe.

    Parameters
    ----------
    rate
        Sustained rate, in bytes per second.
    burst
        Bucket size, in bytes: how much may go at once after an idle period.
    monotonic, sleep
        Clock and sleep functions (injectable for tests).
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not (rate > 0 and burst > 0):
            raise ValueError("rate and burst must be > 0")
        self.rate = rate
        self.burst = burst
        self._monotonic = monotonic
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = burst
        self._last = monotonic()

    def take(self, nbytes: int) -> float:
        """Take ``nbytes`` tokens, sleeping while the bucket is in debt; returns the wait."""
        with self._lock:
            now = self._monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= nbytes
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


class LinkShaper:
    """Emulates one link for one client connection.

    Parameters
    ----------
    profile
        The link.
    mode
        :attr:`ShapingMode.SIMULATED` (account only) or :attr:`ShapingMode.REAL`.
    burst_s
        Token bucket size, in seconds of bandwidth (REAL mode).
    monotonic, sleep
        Clock and sleep functions (injectable for tests).
    """

    def __init__(
        self,
        profile: LinkProfile,
        mode: ShapingMode = ShapingMode.SIMULATED,
        *,
        burst_s: float = 0.01,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.profile = profile
        self.mode = mode
        self.clock = LinkClock(profile)
        self._monotonic = monotonic
        self._sleep = sleep
        self._lock = threading.Lock()
        self._waited = 0.0
        self._buckets = {
            d: TokenBucket(
                profile.bytes_per_s(d),
                max(profile.bytes_per_s(d) * burst_s, 1.0),
                monotonic=monotonic,
                sleep=self._wait,
            )
            for d in LinkDirection
        }

    def _wait(self, seconds: float) -> None:
        started = self._monotonic()
        self._sleep(seconds)
        waited = self._monotonic() - started
        with self._lock:
            self._waited += waited

    @property
    def waited_s(self) -> float:
        """Seconds really spent waiting so far, as the clock measured them (0 unless REAL).

        Lets a caller that times an operation take the emulated link's waits out of it
        (the simulated clock accounts the link from the bytes and round trips instead).
        """
        with self._lock:
            return self._waited

    def on_message(self, direction: Direction, wire_bytes: int) -> None:
        """A client-side message: sent ones go up the link, received ones come down."""
        link = LinkDirection.UP if direction is Direction.SENT else LinkDirection.DOWN
        self.clock.add_bytes(link, wire_bytes)
        if self.mode is ShapingMode.REAL:
            self._buckets[link].take(wire_bytes)

    def on_call(self) -> None:
        """A call starts: one round trip."""
        seconds = self.clock.add_round_trips(1)
        if self.mode is ShapingMode.REAL and seconds > 0:
            self._wait(seconds)
