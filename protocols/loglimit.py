"""Log lines about peers' misbehaviour, rate-limited so a flood cannot fill the disk.

Each (peer, reason) gets at most one line per `period` seconds; the next line after a quiet spell
says how many were suppressed. Counters (in `peer status`) still count every event.
"""

from __future__ import annotations

import logging
import time


class LogLimiter:
    def __init__(self, logger: logging.Logger, period: float = 60.0, max_keys: int = 4096):
        self.log, self.period, self.max_keys = logger, period, max_keys
        self._last: dict[tuple, float] = {}
        self._suppressed: dict[tuple, int] = {}
        self._pruned = -float("inf")
        self.overflow = 0

    def info(self, key: tuple, msg: str, *args) -> bool:
        """Log `msg % args` unless `key` was logged within the period; True if it was written."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.period:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        if last is None and len(self._last) >= self.max_keys:
            if now - self._pruned >= 1.0:  # at most one O(keys) pass a second
                self._pruned = now
                self._last = {k: t for k, t in self._last.items() if now - t < self.period}
                self._suppressed = {k: n for k, n in self._suppressed.items() if k in self._last}
            if len(self._last) >= self.max_keys:
                self.overflow += 1  # too many distinct offenders at once: count, do not log
                return False
        self._last[key] = now
        hidden = self._suppressed.pop(key, 0)
        self.log.info(msg + (f" (+{hidden} like it not logged)" if hidden else ""), *args)
        return True
