"""Bandwidth caps, fair sharing of a cap among streams, and transfer deadlines from the link rate.

The decisions live in objects that do no I/O and read no clock: `TokenBucket` (when may n bytes
go) and `LinkEstimator` (how fast is the link, so how long may a transfer of n bytes take) take
`now` and return numbers. `RateLimiter` and `RateLimitedStream` are the thin asyncio shell: they
read an injected clock, sleep with an injected sleep, and move bytes.

What must stay true:
- A bucket lets at most `burst + rate * t` bytes pass in any span of t seconds (a reservation
  passes when its delay has run out); reservations cancelled before passing are given back.
- Reservations are served in the order they were made (FIFO): the bucket goes negative and each
  reservation waits for everything reserved before it. A limiter shared by N streams that each
  reserve at most `chunk_bytes` at a time therefore interleaves them, ~1/N of the rate each, and a
  stream that starts late waits behind at most one chunk per other stream, never whole payloads.
- A rate of 0 or infinity means unlimited: no delay, nothing queued.
- `RateLimitedStream.write` hands the inner stream at most `chunk_bytes` per limited write and,
  like every stream here, keeps no reference to `data` once it returns.
- Reads are paced after the bytes arrive (they already used the link); a limited read asks the
  inner stream for at most `chunk_bytes`, so pacing is fine-grained and a read that returns 0
  (EOF) passes through untouched.

None of these objects is thread-safe; each belongs to one event loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import Awaitable, Callable

from protocols.codec import Stream

KIB = 1024
MIN_CHUNK = 4 * KIB
MAX_CHUNK = 64 * KIB
# a chunk is at most this many seconds of the rate: concurrent streams take turns this often
CHUNK_SECONDS = 0.05


def _is_unlimited(rate: float) -> bool:
    return rate == 0 or rate == math.inf


def _check_rate(name: str, rate: float) -> float:
    rate = float(rate)
    if math.isnan(rate) or rate < 0:
        raise ValueError(f"{name} must be >= 0 bytes/s (0 or inf = unlimited), got {rate!r}")
    return rate


def _check_count(name: str, n: int, minimum: int = 0) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {n!r}")
    return n


def _check_positive(name: str, x: float, *, allow_zero: bool = False, allow_inf: bool = False) -> float:
    x = float(x)
    ok = (x >= 0 if allow_zero else x > 0) and not math.isnan(x) and (allow_inf or math.isfinite(x))
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}{'' if allow_inf else ' and finite'}, got {x!r}")
    return x


class TokenBucket:
    """Token bucket whose reservations queue up: `reserve` may drive it negative, and the delay it
    returns is the time until the bucket is back at zero, so reservations pass in FIFO order.

    Starts full (`burst_bytes` tokens) at the first `reserve`. A clock that steps back is taken as
    no time passing.
    """

    def __init__(self, rate_bytes_per_s: float, burst_bytes: int):
        self.rate = _check_rate("rate_bytes_per_s", rate_bytes_per_s)
        self.burst = _check_count("burst_bytes", burst_bytes, minimum=1)
        self.tokens = float(self.burst)
        self.last: float | None = None

    @property
    def unlimited(self) -> bool:
        return _is_unlimited(self.rate)

    def _refill(self, now: float) -> None:
        if self.last is None:
            self.last = now
            return
        if now > self.last:
            self.tokens = min(float(self.burst), self.tokens + (now - self.last) * self.rate)
            self.last = now

    def reserve(self, n: int, now: float) -> float:
        """Reserve n bytes; returns the delay in seconds after which they may go (0 = now)."""
        _check_count("n", n)
        if self.unlimited:
            return 0.0
        self._refill(now)
        self.tokens -= n
        return max(0.0, -self.tokens / self.rate)

    def refund(self, n: int, now: float) -> None:
        """Give back a reservation whose bytes never went (its wait was cancelled).

        Reservations made after it keep their delays; only later ones benefit, so the bound on
        what passes in any span still holds.
        """
        _check_count("n", n)
        if self.unlimited:
            return
        self._refill(now)
        self.tokens = min(float(self.burst), self.tokens + n)


def chunk_bytes_for(rate_bytes_per_s: float) -> int:
    """How much one stream reserves at a time: CHUNK_SECONDS of the rate, within [4 KiB, 64 KiB]."""
    if _is_unlimited(rate_bytes_per_s):
        return MAX_CHUNK
    return max(MIN_CHUNK, min(MAX_CHUNK, int(rate_bytes_per_s * CHUNK_SECONDS)))


class _WindowRate:
    """Bytes passed in the last `window_s` seconds, divided by `window_s`, kept in time slots so
    memory stays bounded whatever the byte rate (error: at most one slot's worth of bytes)."""

    SLOTS = 20

    def __init__(self, window_s: float):
        self.window = window_s
        self.slot = window_s / self.SLOTS
        self.slots: deque[list] = deque()  # [slot index, bytes], oldest first

    def add(self, n: int, now: float) -> None:
        idx = math.floor(now / self.slot)
        if self.slots and self.slots[-1][0] >= idx:  # same slot, or a clock that stepped back
            self.slots[-1][1] += n
        else:
            self.slots.append([idx, n])
        self._prune(idx)

    def _prune(self, idx: int) -> None:
        while self.slots and self.slots[0][0] <= idx - self.SLOTS:
            self.slots.popleft()

    def rate(self, now: float) -> float:
        idx = math.floor(now / self.slot)
        self._prune(idx)
        return sum(n for _, n in self.slots) / self.window


class RateLimiter:
    """A token bucket under asyncio: `acquire(n)` waits until n bytes may pass.

    One limiter may be shared by many streams (e.g. all uploads of a peer); each should reserve at
    most `chunk_bytes` at a time (RateLimitedStream does) so they interleave fairly.
    `burst_bytes` defaults to one chunk: an idle limiter lets one chunk go at once, never more.
    """

    def __init__(
        self,
        rate_bytes_per_s: float,
        burst_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        rate_window_s: float = 4.0,
    ):
        rate = _check_rate("rate_bytes_per_s", rate_bytes_per_s)
        self._chunk = chunk_bytes_for(rate)
        self.bucket = TokenBucket(rate, self._chunk if burst_bytes is None else burst_bytes)
        self.clock, self.sleep = clock, sleep
        self.total = 0  # bytes that have passed (acquired and not cancelled)
        self._window = _WindowRate(_check_positive("rate_window_s", rate_window_s))

    @property
    def rate(self) -> float:
        return self.bucket.rate

    @property
    def unlimited(self) -> bool:
        return self.bucket.unlimited

    @property
    def chunk_bytes(self) -> int:
        """How much to reserve at once: small enough that streams sharing the limiter take turns
        every ~50 ms, big enough that a fast link is not paced by per-chunk overhead."""
        return self._chunk

    def _passed(self, n: int) -> None:
        self.total += n
        self._window.add(n, self.clock())

    async def acquire(self, n: int, *, already_passed: bool = False) -> None:
        """Wait until n bytes may pass.

        Before sending (`already_passed=False`): the bytes count as passed once the wait is over;
        if the wait is cancelled they never went, and the reservation is given back.
        After receiving (`already_passed=True`): the bytes have used the link, so they count at
        once and stay spent even if the wait is cancelled; the wait paces the next read.
        """
        delay = self.bucket.reserve(n, self.clock())
        if already_passed:
            self._passed(n)
        if delay > 0:
            try:
                await self.sleep(delay)
            except BaseException:
                if not already_passed:
                    self.bucket.refund(n, self.clock())
                raise
        if not already_passed:
            self._passed(n)

    def rate_bps(self, now: float) -> float:
        """Bytes per second that passed over the last `rate_window_s` seconds (not bits)."""
        return self._window.rate(now)


class RateLimitedStream:
    """Wraps a stream (the `Stream` interface, as CountingStream does) with an upload limiter for
    `write` and a download limiter for reads; either may be None (unlimited, not counted).

    Composes under CountingStream: `CountingStream(RateLimitedStream(raw, up, down), counters,
    read_timeout)`. Then each timed read includes its pacing wait, which is about one chunk per
    stream sharing the download limiter (well under a second at home-link rates).
    `read_into` exists exactly when the inner stream has it.
    """

    def __init__(self, inner: Stream, up: RateLimiter | None = None, down: RateLimiter | None = None):
        self.inner = inner
        self.remote_peer = inner.remote_peer
        self.up, self.down = up, down
        if hasattr(inner, "read_into"):
            self.read_into = self._read_into

    @property
    def max_write(self) -> int | None:
        """The inner stream's max_write, never above the upload limiter's chunk size."""
        inner = getattr(self.inner, "max_write", None)
        if self.up is None or self.up.unlimited:
            return inner
        return self.up.chunk_bytes if inner is None else min(inner, self.up.chunk_bytes)

    async def write(self, data: bytes | memoryview) -> None:
        up = self.up
        if up is None:
            await self.inner.write(data)
            return
        view = memoryview(data)
        if view.format != "B" or view.itemsize != 1:
            view = view.cast("B")
        if up.unlimited or not view:
            await up.acquire(len(view))
            await self.inner.write(data)
            return
        step = up.chunk_bytes
        for start in range(0, len(view), step):
            piece = view[start : start + step]
            await up.acquire(len(piece))
            await self.inner.write(piece)

    async def read_exactly(self, n: int) -> bytes:
        down = self.down
        if down is None:
            return await self.inner.read_exactly(n)
        step = down.chunk_bytes
        if down.unlimited or n <= step:
            data = await self.inner.read_exactly(n)
            await down.acquire(len(data), already_passed=True)
            return data
        parts = []
        for start in range(0, n, step):
            part = await self.inner.read_exactly(min(step, n - start))
            await down.acquire(len(part), already_passed=True)
            parts.append(part)
        return b"".join(parts)

    async def _read_into(self, view: memoryview) -> int:
        down = self.down
        if down is None:
            return await self.inner.read_into(view)
        if not down.unlimited:
            view = view[: down.chunk_bytes]
        n = await self.inner.read_into(view)
        if n:  # 0 is EOF: nothing to pace, and the caller must see the 0
            await down.acquire(n, already_passed=True)
        return n

    async def close(self) -> None:
        await self.inner.close()


DEFAULT_PRIOR_RATE = 1_000_000.0


class LinkEstimator:
    """Learns a link's goodput from finished transfers and turns it into transfer deadlines.

    `deadline(nbytes, now, concurrent)` = `base_s + nbytes * concurrent / (rate * safety)`, at most
    `max_s`: the fixed part covers connection set-up and latency, and `safety` = 0.5 allows twice
    the expected time. Before any observation the rate is `prior_rate_bytes_per_s`, 1 MB/s by
    default (8 Mbit/s): below the slowest home uplink we serve (10 Mbit/s), so a first transfer
    over such a link still fits its allowance. A daemon with a cap below it should pass the cap.

    The estimate is an EWMA of seconds per byte (the quantity a deadline budgets), with a
    half-life counted in transfers, so one slow transfer widens deadlines more than one fast one
    shrinks them. Transfers under `min_bytes` or `min_seconds` measure latency, not rate, and are
    ignored; each sample is clamped to [min_rate, max_rate]. The estimate does not age with time
    (`now` is kept as `last_observed_at`, for status), so a transfer that timed out should be
    observed with the bytes it did move: otherwise a link that got slower would never be learnt,
    its transfers all timing out unobserved.
    """

    def __init__(
        self,
        prior_rate_bytes_per_s: float = DEFAULT_PRIOR_RATE,
        base_s: float = 5.0,
        safety: float = 0.5,
        max_s: float = 600.0,
        half_life: float = 4.0,
        min_bytes: int = 64 * KIB,
        min_seconds: float = 0.05,
        min_rate_bytes_per_s: float = 10_000.0,
        max_rate_bytes_per_s: float = 10e9,
    ):
        self.min_rate = _check_positive("min_rate_bytes_per_s", min_rate_bytes_per_s)
        self.max_rate = _check_positive("max_rate_bytes_per_s", max_rate_bytes_per_s, allow_inf=True)
        if self.max_rate < self.min_rate:
            raise ValueError(f"max_rate_bytes_per_s ({self.max_rate!r}) must be >= min_rate_bytes_per_s ({self.min_rate!r})")
        prior = _check_positive("prior_rate_bytes_per_s", prior_rate_bytes_per_s)
        if not self.min_rate <= prior <= self.max_rate:
            raise ValueError(f"prior_rate_bytes_per_s must lie in [{self.min_rate!r}, {self.max_rate!r}], got {prior!r}")
        self.prior = prior
        self.base_s = _check_positive("base_s", base_s, allow_zero=True)
        self.safety = _check_positive("safety", safety)
        if self.safety > 1:
            raise ValueError(f"safety must be in (0, 1] (0.5 allows twice the expected time), got {self.safety!r}")
        self.max_s = _check_positive("max_s", max_s)
        if self.max_s < self.base_s:
            raise ValueError(f"max_s ({self.max_s!r}) must be >= base_s ({self.base_s!r})")
        self.half_life = _check_positive("half_life", half_life)
        self.min_bytes = _check_count("min_bytes", min_bytes)
        self.min_seconds = _check_positive("min_seconds", min_seconds, allow_zero=True)
        self._alpha = 1.0 - 0.5 ** (1.0 / self.half_life)  # weight of each new sample
        self._spb: float | None = None  # estimated seconds per byte
        self.samples = 0
        self.last_observed_at: float | None = None

    def observe(self, nbytes: int, seconds: float, now: float, concurrent: int = 1) -> bool:
        """Learn from a transfer of nbytes that took `seconds` while `concurrent` transfers (this
        one included) shared the link. Returns whether it was used (False: too small or short)."""
        _check_count("nbytes", nbytes)
        _check_count("concurrent", concurrent, minimum=1)
        seconds = float(seconds)
        if math.isnan(seconds) or seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        if nbytes < self.min_bytes or seconds < self.min_seconds or seconds == 0:
            return False
        rate = min(self.max_rate, max(self.min_rate, nbytes * concurrent / seconds))
        spb = 1.0 / rate
        self._spb = spb if self._spb is None else self._spb + self._alpha * (spb - self._spb)
        self.samples += 1
        self.last_observed_at = now
        return True

    def rate(self, now: float) -> float | None:
        """The estimated link goodput in bytes/s, or None before any observation."""
        return None if self._spb is None else 1.0 / self._spb

    def _rate_or_prior(self) -> float:
        return self.prior if self._spb is None else 1.0 / self._spb

    def expected_s(self, nbytes: int, concurrent: int = 1) -> float:
        """Seconds a transfer of nbytes should take at the estimated (or prior) rate, no margin."""
        _check_count("nbytes", nbytes)
        _check_count("concurrent", concurrent, minimum=1)
        return nbytes * concurrent / self._rate_or_prior()

    def deadline(self, nbytes: int, now: float, concurrent: int = 1) -> float:
        """Seconds to allow a transfer of nbytes while `concurrent` transfers share the link."""
        _check_count("nbytes", nbytes)
        _check_count("concurrent", concurrent, minimum=1)
        allowed = self.base_s + nbytes * concurrent / (self._rate_or_prior() * self.safety)
        return min(self.max_s, allowed)
