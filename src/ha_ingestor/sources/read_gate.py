"""When a connection reads its socket: paused for back-pressure, and coalesced at a trickle.

Every socket read wakes the event loop once. At a home's rates — a few messages a second, each
in its own TCP segment — those wake-ups, not the messages, are most of what the ingestor costs.
So after a small read the gate pauses reading for ``interval``: the next read holds everything
that came meanwhile, in one wake-up. A read that brings a lot means a burst, which is then read
continuously (no added latency, no cap on the rate) until an interval brings little again.
"""

from __future__ import annotations

import asyncio

# Reasons reading is paused, as bits: reading resumes when no reason is left.
BACK_PRESSURE = 1
COALESCING = 2
#: Fewer bytes than this per coalescing interval is a trickle.
TRICKLE_BYTES = 32 * 1024


class ReadGate:
    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        """``interval`` 0 switches coalescing off (pausing for back-pressure still works)."""
        self.transport: asyncio.Transport | None = None  # set once connected
        self.paused = 0  # BACK_PRESSURE | COALESCING
        self._loop = loop
        self._interval = interval
        self._continuous = False  # a burst: read without coalescing
        self._window_start = 0.0
        self._window_bytes = 0
        self._timer: asyncio.TimerHandle | None = None

    def pause(self, reason: int) -> None:
        transport = self.transport
        if transport is not None and not self.paused and not transport.is_closing():
            transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        was_paused = self.paused
        self.paused &= ~reason
        transport = self.transport
        if was_paused and not self.paused and transport and not transport.is_closing():
            transport.resume_reading()

    def after_read(self, size: int, now: float, *, may_pause: bool = True) -> None:
        """Called after each read of ``size`` bytes at monotonic time ``now``. ``may_pause``
        false: the caller needs what comes next at once (an answer it waits for)."""
        interval = self._interval
        if not interval:
            return
        if self._continuous:
            self._window_bytes += size
            if now - self._window_start < interval:
                return
            if self._window_bytes >= TRICKLE_BYTES:
                self._window_start, self._window_bytes = now, 0
                return
            self._continuous = False
        elif size >= TRICKLE_BYTES:
            self._continuous = True
            self._window_start, self._window_bytes = now, 0
            return
        if may_pause and not self.paused:
            self.pause(COALESCING)
            self._timer = self._loop.call_later(interval, self._end_coalescing)

    def read_now(self) -> None:
        """End a coalescing pause at once."""
        if self._timer is not None:
            self._timer.cancel()
            self._end_coalescing()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _end_coalescing(self) -> None:
        self._timer = None
        self.resume(COALESCING)
