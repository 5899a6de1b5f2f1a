"""Server-side fault injection for tests and experiments.

A :class:`FaultInjector` handed to the transfer server can cut segment streams (``Fetch``
and ``StreamSegments`` calls) after a number of segments (the client sees
``UNAVAILABLE``, as on a dropped connection), corrupt chosen segments' payloads on the
wire, and hold a stream still until released (to stop the server in the middle of a
fetch). Each fault fires a given number of times; the injector is thread-safe.
"""

from __future__ import annotations

import threading
from enum import Enum


class StreamAction(Enum):
    """What the server does after sending a segment."""

    CONTINUE = 1
    CUT = 2


class FaultInjector:
    """Faults to inject into segment streams (``Fetch`` and ``StreamSegments``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cut_after: int | None = None
        self._cuts_left = 0
        self._corrupt: dict[int, int] = {}
        self._pause_after: int | None = None
        self.paused = threading.Event()
        self.release = threading.Event()
        self._stopping = False  # set with release when the server stops: held streams end
        self.cuts = 0
        self.corruptions = 0

    def cut_streams_after(self, segments: int, times: int = 1) -> None:
        """Cut the next ``times`` streams once they have sent ``segments`` segments."""
        with self._lock:
            self._cut_after = segments
            self._cuts_left = times

    def corrupt_segment(self, segment_id: int, times: int = 1) -> None:
        """Flip a byte of segment ``segment_id`` the next ``times`` times it is sent."""
        with self._lock:
            self._corrupt[segment_id] = times

    def pause_streams_after(self, segments: int) -> None:
        """Hold a stream after ``segments`` segments until :attr:`release` is set.

        :attr:`paused` is set when a stream reaches that point.
        """
        with self._lock:
            self._pause_after = segments

    def take_corruption(self, segment_id: int) -> bool:
        """Whether to corrupt ``segment_id`` this time (counts the fault as used)."""
        with self._lock:
            left = self._corrupt.get(segment_id, 0)
            if left <= 0:
                return False
            self._corrupt[segment_id] = left - 1
            self.corruptions += 1
            return True

    @staticmethod
    def corrupted(payload: bytes | memoryview) -> bytes:
        """``payload`` with its last byte flipped."""
        if not payload:
            return b"\x00"
        return bytes(payload[:-1]) + bytes([payload[-1] ^ 0xFF])

    def before_segment(self, sent_in_call: int) -> StreamAction:
        """Called before each segment a stream sends (``sent_in_call`` sent so far in it)."""
        with self._lock:
            pause = self._pause_after is not None and sent_in_call == self._pause_after
            if pause:
                self._pause_after = None
            cut = (
                self._cut_after is not None
                and self._cuts_left > 0
                and sent_in_call >= self._cut_after
            )
            if cut:
                self._cuts_left -= 1
                self.cuts += 1
        if pause:
            self.paused.set()
            self.release.wait(timeout=60.0)
            with self._lock:
                # A stream held while its server stops ends there, however late gRPC's
                # cancellation reaches it (it could otherwise send the rest first).
                cut = cut or self._stopping
        return StreamAction.CUT if cut else StreamAction.CONTINUE

    def release_for_stop(self) -> None:
        """Release held streams because their server stops: each ends at once."""
        with self._lock:
            self._stopping = True
        self.release.set()
