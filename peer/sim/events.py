"""The simulator's clock: a heap of timestamped events, run in time order on one thread.

Nothing sleeps: `run` pops the earliest event, sets `now` to its time and calls it; a callback
schedules later events with `at`/`after`. Events at the same instant run in the order they were
scheduled (a sequence number breaks ties), so a run is a pure function of its inputs and seeds.
A cancelled event stays in the heap and is skipped when popped (cancelling costs O(1)).
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable


class Event:
    __slots__ = ("time", "fn", "cancelled")

    def __init__(self, time: float, fn: Callable[[], None]):
        self.time, self.fn, self.cancelled = time, fn, False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    def __init__(self, start: float = 0.0):
        self.now = start
        # (time, sequence number, event): tuples compare in C, and the sequence breaks ties
        self._heap: list[tuple[float, int, Event]] = []
        self._seq = itertools.count()
        self.processed = 0
        self._stopped = False

    def at(self, time: float, fn: Callable[[], None]) -> Event:
        """Run `fn` at virtual time `time` (never before now: the past cannot be scheduled)."""
        if time < self.now:
            raise ValueError(f"event at {time} is before now ({self.now})")
        ev = Event(time, fn)
        heapq.heappush(self._heap, (time, next(self._seq), ev))
        return ev

    def after(self, delay: float, fn: Callable[[], None]) -> Event:
        return self.at(self.now + max(0.0, delay), fn)

    def stop(self) -> None:
        """End `run` before its next event (`now` stays where it is)."""
        self._stopped = True

    def run(self, until: float, on_tick: Callable[[float], None] | None = None, tick_s: float = 1.0) -> None:
        """Run every event with time <= `until`; `now` ends at `until`, or where `stop` was
        called. `on_tick(now)` is called each time virtual time passes a multiple of `tick_s`
        (a progress bar, a stopping rule)."""
        next_tick = self.now + tick_s
        self._stopped = False
        while self._heap and self._heap[0][0] <= until and not self._stopped:
            ev = heapq.heappop(self._heap)[2]
            if ev.cancelled:
                continue
            self.now = ev.time
            if on_tick is not None and self.now >= next_tick:
                on_tick(self.now)
                next_tick = self.now + tick_s
            ev.fn()
            self.processed += 1
        if not self._stopped:
            self.now = max(self.now, until)

    def __len__(self) -> int:
        return len(self._heap)
