"""When the client tries again: deadlines, and exponential backoff with jitter.

Only ``UNAVAILABLE`` is retried (the server is restarting, the connection dropped): every
other status is an answer, not an accident. Attempts that made progress (new verified
segments) do not count towards :attr:`RetryPolicy.max_attempts`, so a link that keeps
dropping still completes a fetch as long as each attempt moves it forward.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from fedsqueeze.errors import UnavailableError


@dataclass(frozen=True)
class RetryPolicy:
    """Deadlines and retries of one client operation (a fetch or an upload).

    Parameters
    ----------
    deadline_s
        Time allowed for the whole operation, retries included, in seconds.
    max_attempts
        Consecutive ``UNAVAILABLE`` attempts without progress before giving up.
    initial_backoff_s, max_backoff_s, multiplier
        Backoff before retry ``k`` (1-based) is
        ``min(max_backoff_s, initial_backoff_s · multiplier^(k-1))``, scaled by jitter.
    jitter
        Fraction of the backoff drawn at random: the wait is uniform in
        ``[b · (1 − jitter), b]``, so clients that failed together do not retry together.
    max_segment_refetches
        How many times one segment may fail its sha256 check before the fetch fails.
    max_manifest_refreshes
        How many times a fetch asks for the manifest again (after the server lost it).
    """

    deadline_s: float = 60.0
    max_attempts: int = 6
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5
    max_segment_refetches: int = 3
    max_manifest_refreshes: int = 3

    def __post_init__(self) -> None:
        if not self.deadline_s > 0:
            raise ValueError("deadline_s must be > 0")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not (0 < self.initial_backoff_s <= self.max_backoff_s):
            raise ValueError("need 0 < initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1:
            raise ValueError("multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be in [0, 1]")
        if self.max_segment_refetches < 0 or self.max_manifest_refreshes < 0:
            raise ValueError("refetch and refresh limits must be >= 0")

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        if retry < 1:
            raise ValueError("retry is 1-based")
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return base * (1.0 - self.jitter * rng.random())


class Deadline:
    """The time left for one operation.

    Parameters
    ----------
    seconds
        Time allowed from now.
    """

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left; raises :class:`UnavailableError` when none are."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise UnavailableError("deadline exceeded")
        return left

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or raise :class:`UnavailableError` if the deadline comes first."""
        left = self.remaining()
        if seconds >= left:
            time.sleep(left)
            raise UnavailableError("deadline exceeded while backing off")
        time.sleep(seconds)
