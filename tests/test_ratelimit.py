"""Bandwidth caps, fair sharing and size-aware deadlines (protocols/ratelimit.py), on fake clocks.

Nothing here sleeps for real or asserts on wall-clock time. Pure objects get `now` directly;
single-task shells get a fake clock whose sleep advances it; concurrent tasks run on an event
loop whose clock is virtual (`run_virtual`): when every task waits, time jumps to the next timer.
The real-socket check at the end runs only with PEER_RATELIMIT_REAL=1 and asserts no timing.
"""

from __future__ import annotations

import asyncio
import math
import os
import selectors
import time

import numpy as np
import pytest

from protocols.codec import DEFAULT_LIMITS, TensorSpec, read_payload, write_payload
from protocols.ratelimit import (
    MAX_CHUNK,
    MIN_CHUNK,
    LinkEstimator,
    RateLimitedStream,
    RateLimiter,
    TokenBucket,
    chunk_bytes_for,
)
from protocols.transport.base import CountingStream
from protocols.transport.memory import MemoryNetwork


# --- clocks ---

class _VirtualSelector(selectors.DefaultSelector):
    """Instead of blocking for `timeout`, advances the virtual clock by it (no real I/O is waited on)."""

    def __init__(self):
        super().__init__()
        self.now = 0.0

    def select(self, timeout=None):
        if timeout is None:  # nothing ready and no timer: every task waits for something that never comes
            raise RuntimeError("deadlock: all tasks wait and no timer is set")
        if timeout > 0:
            self.now += timeout
        return super().select(0)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self):
        self._vsel = _VirtualSelector()
        super().__init__(self._vsel)

    def time(self) -> float:
        return self._vsel.now


def run_virtual(coro):
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coro)


def vclock() -> float:
    return asyncio.get_running_loop().time()


class FakeClock:
    """For one task: sleeping advances the clock by exactly the delay, and is recorded."""

    def __init__(self, t: float = 100.0):
        self.t = t
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    async def sleep(self, d: float) -> None:
        self.sleeps.append(d)
        self.t += d


# --- fake streams ---

class SinkStream:
    """Records every write with the (virtual) time it happened."""

    def __init__(self, name: str = "sink", max_write: int | None = None):
        self.remote_peer = name
        self.writes: list[tuple[float, bytes]] = []
        self.closed = False
        if max_write is not None:
            self.max_write = max_write

    async def write(self, data) -> None:
        self.writes.append((asyncio.get_running_loop().time(), bytes(data)))

    async def read_exactly(self, n: int) -> bytes:
        raise AssertionError("not read from")

    async def close(self) -> None:
        self.closed = True

    @property
    def data(self) -> bytes:
        return b"".join(d for _, d in self.writes)


class IntoStream:
    """A source with read_into: hands out `data` in pieces of at most `piece` bytes, then 0 (EOF)."""

    def __init__(self, data: bytes, piece: int = 1 << 20):
        self.remote_peer = "src"
        self.data, self.pos, self.piece = data, 0, piece
        self.asked: list[int] = []

    async def read_exactly(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise asyncio.IncompleteReadError(self.data[self.pos :], n)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    async def read_into(self, view: memoryview) -> int:
        self.asked.append(len(view))
        n = min(len(view), self.piece, len(self.data) - self.pos)
        view[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n

    async def write(self, data) -> None:
        raise AssertionError("not written to")

    async def close(self) -> None:
        pass


# --- TokenBucket ---

def test_bucket_serves_reservations_in_order_with_exact_delays():
    b = TokenBucket(1000.0, 100)
    assert b.reserve(100, 0.0) == 0.0  # starts full: the burst goes at once
    assert b.reserve(100, 0.0) == pytest.approx(0.100, abs=1e-12)  # queued behind nothing but the empty bucket
    assert b.reserve(50, 0.0) == pytest.approx(0.150, abs=1e-12)  # behind the previous one: FIFO
    # 0.1 s later 100 tokens came back, but 150 were owed: the next one waits for the debt and itself
    assert b.reserve(100, 0.1) == pytest.approx(0.150, abs=1e-12)
    assert b.reserve(0, 0.1) == pytest.approx(0.150, abs=1e-12)  # 0 bytes: the time until the queue clears
    assert b.reserve(0, 0.25) == 0.0


def test_bucket_refills_at_the_rate_and_never_above_the_burst():
    b = TokenBucket(1000.0, 200)
    assert b.reserve(200, 5.0) == 0.0  # the first reserve fixes the start, whatever `now` is
    assert b.reserve(100, 5.05) == pytest.approx(0.05, abs=1e-12)  # 50 came back, 50 more to wait for
    # a long idle period refills to the burst only: 300 at once owes 100
    assert b.reserve(300, 1000.0) == pytest.approx(0.1, abs=1e-12)


def test_bucket_clock_stepping_back_adds_no_tokens():
    b = TokenBucket(1000.0, 100)
    b.reserve(100, 10.0)
    assert b.reserve(100, 9.0) == pytest.approx(0.1, abs=1e-12)  # as if no time passed
    assert b.reserve(100, 10.0) == pytest.approx(0.2, abs=1e-12)


@pytest.mark.parametrize("rate", [0, 0.0, math.inf])
def test_bucket_unlimited_rates_never_delay(rate):
    b = TokenBucket(rate, 1)
    assert b.unlimited
    assert all(b.reserve(10**9, 0.0) == 0.0 for _ in range(5))
    b.refund(10, 0.0)
    assert b.reserve(10**9, 0.0) == 0.0


def test_bucket_refund_gives_back_a_reservation_that_never_went():
    b = TokenBucket(1000.0, 100)
    b.reserve(100, 0.0)
    assert b.reserve(500, 0.0) == pytest.approx(0.5, abs=1e-12)
    b.refund(500, 0.0)
    assert b.reserve(100, 0.0) == pytest.approx(0.1, abs=1e-12)  # as if the 500 had never been asked
    b.refund(10**6, 10.0)  # never above the burst
    assert b.reserve(200, 10.0) == pytest.approx(0.1, abs=1e-12)


def test_chunk_size_is_fifty_ms_of_the_rate_within_4_and_64_kib():
    assert chunk_bytes_for(1_000_000) == 50_000
    assert chunk_bytes_for(12_500_000) == MAX_CHUNK == 64 * 1024  # 100 Mbit/s
    assert chunk_bytes_for(10_000) == MIN_CHUNK == 4 * 1024
    assert chunk_bytes_for(0) == chunk_bytes_for(math.inf) == MAX_CHUNK
    assert RateLimiter(1_000_000).chunk_bytes == 50_000


# --- RateLimiter ---

def test_limiter_moves_n_bytes_in_n_over_rate_on_a_fake_clock():
    clock = FakeClock(t=100.0)
    lim = RateLimiter(200_000, clock=clock, sleep=clock.sleep)
    chunk = lim.chunk_bytes
    assert chunk == 10_000 and lim.bucket.burst == chunk  # burst defaults to one chunk
    n = 2_000_000

    async def send():
        for _ in range(n // chunk):
            await lim.acquire(chunk)

    asyncio.run(send())
    elapsed = clock.t - 100.0
    assert abs(elapsed - n / 200_000) <= chunk / 200_000 + 1e-9  # 10 s, give or take one chunk
    assert lim.total == n
    assert all(d <= chunk / 200_000 + 1e-9 for d in clock.sleeps)  # paced chunk by chunk, no big stalls
    assert lim.rate_bps(clock.t) == pytest.approx(200_000, rel=0.06)  # the last 4 s, within one slot
    assert lim.rate_bps(clock.t + 4.5) == 0.0  # idle for longer than the window


def test_unlimited_limiter_passes_through_and_still_counts():
    clock = FakeClock()
    lim = RateLimiter(0, clock=clock, sleep=clock.sleep)

    async def send():
        for _ in range(100):
            await lim.acquire(10**6)

    asyncio.run(send())
    assert clock.sleeps == [] and lim.total == 10**8 and lim.unlimited


def test_three_senders_share_fairly_and_a_late_fourth_is_not_starved():
    rate, payload = 100_000, 300_000
    lim = RateLimiter(rate, clock=vclock)  # the loop's virtual clock and asyncio.sleep
    chunk = lim.chunk_bytes  # 5000 B = 50 ms
    sinks = {name: SinkStream(name) for name in "abcd"}

    async def send(name: str, start: float) -> float:
        await asyncio.sleep(start)
        await RateLimitedStream(sinks[name], up=lim).write(bytes(payload))  # one write of the whole payload
        return vclock()

    async def main():
        return await asyncio.gather(send("a", 0), send("b", 0), send("c", 0), send("d", 3.0))

    finish = dict(zip("abcd", run_virtual(main())))
    tick = chunk / rate
    assert all(len(s.data) == payload for s in sinks.values())
    assert all(len(d) <= chunk for s in sinks.values() for _, d in s.writes)
    # a, b, c: 1/3 each until 3 s (100 kB each), then 1/4 each until done (200 kB more: 8 s) -> 11 s
    # at every moment, what a, b and c have sent differs by at most two chunks...
    for t in np.arange(0.25, 10.5, 0.25):
        sent = [sum(len(data) for w, data in sinks[k].writes if w <= t) for k in "abc"]
        assert max(sent) - min(sent) <= 2 * chunk, (t, sent)
    # ...so they finish within two rounds of the four-way rotation of each other (0.4 s of 11 s)
    assert max(finish[k] for k in "abc") - min(finish[k] for k in "abc") <= 8 * tick
    assert max(finish[k] for k in "abc") == pytest.approx(11.0, abs=2 * tick)
    # d waits behind at most one chunk of each other sender, then gets 1/4 of the rate
    assert sinks["d"].writes[0][0] - 3.0 <= 4 * tick
    d_by_11 = sum(len(data) for t, data in sinks["d"].writes if t <= 11.0)
    assert d_by_11 == pytest.approx((11.0 - 3.0) * rate / 4, abs=2 * chunk)
    assert finish["d"] == pytest.approx(4 * payload / rate, abs=2 * tick)  # the link was never idle
    assert lim.total == 4 * payload


def test_a_cancelled_send_gives_its_reservation_back():
    lim = RateLimiter(100_000, clock=vclock)

    async def main():
        await lim.acquire(lim.chunk_bytes)  # the burst: the bucket is now empty
        big = asyncio.create_task(lim.acquire(1_000_000))  # would wait 10 s
        await asyncio.sleep(1.0)
        big.cancel()
        with pytest.raises(asyncio.CancelledError):
            await big
        t0 = vclock()
        await lim.acquire(lim.chunk_bytes)
        return vclock() - t0

    waited = run_virtual(main())
    assert waited == 0.0  # 1 s refilled the bucket past one chunk: the cancelled megabyte is not owed
    assert lim.total == 2 * lim.chunk_bytes  # the cancelled bytes never passed


def test_received_bytes_stay_spent_when_the_pacing_wait_is_cancelled():
    lim = RateLimiter(100_000, clock=vclock)

    async def main():
        await lim.acquire(lim.chunk_bytes, already_passed=True)
        task = asyncio.create_task(lim.acquire(500_000, already_passed=True))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        t0 = vclock()
        await lim.acquire(lim.chunk_bytes)
        return vclock() - t0

    waited = run_virtual(main())
    # the 500 kB arrived: the budget they used stays used (owed at 0.5 s: 500 kB - 50 kB, then our chunk)
    assert waited == pytest.approx((500_000 - 50_000 + lim.chunk_bytes) / 100_000, abs=1e-9)
    assert lim.total == 2 * lim.chunk_bytes + 500_000


# --- RateLimitedStream ---

def test_limited_write_splits_into_chunks_in_order_and_keeps_max_write_within_a_chunk():
    async def main():
        lim = RateLimiter(1_000_000, clock=vclock)  # 50 kB chunks
        sink = SinkStream(max_write=16 << 20)
        s = RateLimitedStream(sink, up=lim)
        payload = np.arange(300_001, dtype="<f4")  # not a multiple of the chunk
        await s.write(memoryview(payload))  # a float32 view: split by bytes, not elements
        await s.write(b"")
        return sink, payload, s

    sink, payload, s = run_virtual(main())
    assert sink.data == payload.tobytes()
    assert max(len(d) for _, d in sink.writes) == 50_000
    assert s.max_write == 50_000  # 16 MiB inner, capped at the limiter's chunk
    assert RateLimitedStream(SinkStream(max_write=1000), up=RateLimiter(1_000_000)).max_write == 1000
    assert RateLimitedStream(SinkStream(), up=RateLimiter(1_000_000)).max_write == 50_000
    assert RateLimitedStream(SinkStream(max_write=16 << 20)).max_write == 16 << 20
    assert RateLimitedStream(SinkStream(max_write=16 << 20), up=RateLimiter(0)).max_write == 16 << 20
    assert RateLimitedStream(SinkStream()).max_write is None
    # through CountingStream, which the daemon puts outside
    assert CountingStream(RateLimitedStream(SinkStream(max_write=16 << 20), up=RateLimiter(1_000_000)), {}).max_write == 50_000


async def _memory_pair():
    net = MemoryNetwork(clock=vclock)
    server, client = net.transport("server"), net.transport("client")
    await server.start()
    await client.start()
    accepted: asyncio.Queue = asyncio.Queue()

    async def handler(stream):
        done = asyncio.get_running_loop().create_future()
        await accepted.put((stream, done))
        await done  # keep the stream open until the test is through with it

    await server.set_handler("/test/1", handler)
    out = await client.open("server", "/test/1")
    inbound, done = await accepted.get()
    return out, inbound, done


@pytest.mark.parametrize("limited", ["up", "down"])
def test_payload_over_the_memory_transport_arrives_exact_at_the_capped_rate(limited):
    rate = 200_000
    specs = [TensorSpec("w", "float32", (150_000,)), TensorSpec("b", "float16", (1001,))]
    arrays = [np.random.default_rng(0).standard_normal(150_000).astype("<f4"), np.arange(1001, dtype="<f2")]
    nbytes = sum(a.nbytes for a in arrays)

    async def main():
        out, inbound, done = await _memory_pair()
        up = RateLimiter(rate, clock=vclock) if limited == "up" else None
        down = RateLimiter(rate, clock=vclock) if limited == "down" else None
        sent_counts, recv_counts = {}, {}
        sender = CountingStream(RateLimitedStream(out, up=up), sent_counts, read_timeout=10.0)
        receiver = CountingStream(RateLimitedStream(inbound, down=down), recv_counts, read_timeout=10.0)
        assert not hasattr(receiver, "read_into")  # the memory stream has none, so neither do the wrappers
        t0 = vclock()
        got, sent = await asyncio.gather(read_payload(receiver, specs, DEFAULT_LIMITS), write_payload(sender, arrays, DEFAULT_LIMITS))
        elapsed = vclock() - t0
        done.set_result(None)
        await sender.close()
        return got, sent, elapsed, sent_counts, recv_counts, (up or down)

    got, sent, elapsed, sent_counts, recv_counts, lim = run_virtual(main())
    assert sent == nbytes and all(np.array_equal(g, a) for g, a in zip(got, arrays))
    assert sent_counts["bytes_sent"] == recv_counts["bytes_received"] == lim.total == nbytes
    assert elapsed == pytest.approx(nbytes / rate, abs=2 * lim.chunk_bytes / rate)  # 3 s


def test_limited_read_into_asks_for_a_chunk_at_most_and_passes_eof_through_counting_stream():
    data = np.arange(100_000, dtype="<f4").tobytes()

    async def main():
        down = RateLimiter(400_000, clock=vclock)  # 20 kB chunks
        src = IntoStream(data, piece=7_777)
        counts = {}
        s = CountingStream(RateLimitedStream(src, down=down), counts, read_timeout=5.0)
        t0 = vclock()
        (arr,) = await read_payload(s, [TensorSpec("x", "float32", (100_000,))])
        elapsed = vclock() - t0
        # the source is now empty: a further read returns 0 through both wrappers
        assert await s.read_into(memoryview(bytearray(10))) == 0
        truncated = CountingStream(RateLimitedStream(IntoStream(data[:1000]), down=down), {}, read_timeout=5.0)
        with pytest.raises(EOFError):
            await read_payload(truncated, [TensorSpec("x", "float32", (100_000,))])
        return arr, src, counts, elapsed, down

    arr, src, counts, elapsed, down = run_virtual(main())
    assert arr.tobytes() == data and counts["bytes_received"] == len(data)
    assert max(src.asked) <= down.chunk_bytes == 20_000
    assert elapsed == pytest.approx(len(data) / 400_000, abs=2 * down.chunk_bytes / 400_000)
    assert down.total == len(data) + 1000


def test_unlimited_or_absent_limiters_pass_reads_and_writes_through_whole():
    data = bytes(range(256)) * 1000

    async def main():
        src = IntoStream(data)
        s = RateLimitedStream(src, down=RateLimiter(math.inf))
        view = memoryview(bytearray(len(data)))
        n = await s.read_into(view)
        sink = SinkStream()
        await RateLimitedStream(sink, up=RateLimiter(0)).write(data)
        await RateLimitedStream(sink).write(data)
        head = await RateLimitedStream(IntoStream(data)).read_exactly(len(data))
        return n, src, sink, head, vclock()

    n, src, sink, head, now = run_virtual(main())
    assert n == len(data) and src.asked == [len(data)]  # not cut to a chunk
    assert [len(d) for _, d in sink.writes] == [len(data), len(data)] and head == data
    assert now == 0.0


def test_limited_read_exactly_paces_large_reads_by_chunk():
    data = bytes(range(256)) * 400  # 102400 B

    async def main():
        down = RateLimiter(100_000, clock=vclock)  # 5000 B chunks
        s = RateLimitedStream(IntoStream(data), down=down)
        t0 = vclock()
        got = await s.read_exactly(len(data))
        return got, vclock() - t0, down

    got, elapsed, down = run_virtual(main())
    assert got == data and down.total == len(data)
    assert elapsed == pytest.approx((len(data) - down.chunk_bytes) / 100_000, abs=1e-6)


# --- LinkEstimator ---

def test_estimator_before_any_observation_uses_the_prior_rate():
    est = LinkEstimator()
    assert est.rate(0.0) is None and est.prior == 1_000_000
    assert est.deadline(10_000_000, 0.0) == pytest.approx(5.0 + 10_000_000 / (1_000_000 * 0.5))  # 25 s
    assert est.expected_s(10_000_000) == pytest.approx(10.0)
    capped = LinkEstimator(prior_rate_bytes_per_s=250_000)  # e.g. a 2 Mbit/s cap
    assert capped.deadline(1_000_000, 0.0) == pytest.approx(5.0 + 8.0)


def test_estimator_ignores_transfers_that_measure_latency_not_rate():
    est = LinkEstimator()
    assert not est.observe(60_000, 1.0, now=1.0)  # under 64 KiB
    assert not est.observe(10_000_000, 0.01, now=2.0)  # under 50 ms
    assert not est.observe(10_000_000, 0.0, now=3.0)
    assert est.rate(3.0) is None and est.samples == 0
    assert est.observe(64 * 1024, 0.05, now=4.0)


def test_estimator_converges_toward_a_steady_rate_with_a_half_life_in_transfers():
    est = LinkEstimator(half_life=4)
    for i in range(10):
        assert est.observe(4_000_000, 4.0, now=i)  # 1 MB/s
    assert est.rate(10.0) == pytest.approx(1_000_000)
    for i in range(4):
        est.observe(4_000_000, 1.0, now=20 + i)  # the link got 4x faster
    # after one half-life the seconds-per-byte estimate is half way between the old and the new
    assert 1 / est.rate(30.0) == pytest.approx((1 / 1e6 + 1 / 4e6) / 2)
    previous = est.rate(30.0)
    for i in range(30):
        est.observe(4_000_000, 1.0, now=40 + i)
        assert est.rate(100.0) >= previous  # monotone toward the new rate
        previous = est.rate(100.0)
    assert est.rate(100.0) == pytest.approx(4_000_000, rel=0.02)
    assert est.last_observed_at == 69 and est.samples == 44


def test_estimator_scales_by_concurrency_and_clamps_samples():
    est = LinkEstimator()
    est.observe(1_000_000, 2.0, now=0.0, concurrent=4)  # 0.5 MB/s each, 2 MB/s for the link
    assert est.rate(0.0) == pytest.approx(2_000_000)
    slow = LinkEstimator(min_rate_bytes_per_s=10_000)
    slow.observe(100_000, 3600.0, now=0.0)  # 28 B/s: a stalled peer, clamped
    assert slow.rate(0.0) == 10_000
    assert slow.deadline(100 * 10**6, 0.0) == 600.0  # and the deadline is capped at max_s


def test_deadline_grows_linearly_with_size_and_with_concurrent_transfers():
    est = LinkEstimator()
    est.observe(10_000_000, 2.0, now=0.0)  # 5 MB/s
    d = [est.deadline(n, 1.0) for n in (0, 10_000_000, 20_000_000, 30_000_000)]
    assert d[0] == 5.0
    step = d[1] - d[0]
    assert step == pytest.approx(10_000_000 / (5e6 * 0.5))  # twice the expected 2 s
    assert d[2] - d[1] == pytest.approx(step) and d[3] - d[2] == pytest.approx(step)
    assert est.deadline(10_000_000, 1.0, concurrent=3) - 5.0 == pytest.approx(3 * step)
    assert est.expected_s(10_000_000, concurrent=3) == pytest.approx(6.0)
    assert est.deadline(10**12, 1.0) == 600.0


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: TokenBucket(-1, 10), "rate_bytes_per_s"),
        (lambda: TokenBucket(float("nan"), 10), "rate_bytes_per_s"),
        (lambda: TokenBucket(100, 0), "burst_bytes"),
        (lambda: TokenBucket(100, 1.5), "burst_bytes"),
        (lambda: TokenBucket(100, 10).reserve(-1, 0.0), "n"),
        (lambda: RateLimiter(-5), "rate_bytes_per_s"),
        (lambda: RateLimiter(100, burst_bytes=0), "burst_bytes"),
        (lambda: RateLimiter(100, rate_window_s=0), "rate_window_s"),
        (lambda: LinkEstimator(prior_rate_bytes_per_s=0), "prior_rate_bytes_per_s"),
        (lambda: LinkEstimator(prior_rate_bytes_per_s=1.0), "prior_rate_bytes_per_s"),
        (lambda: LinkEstimator(base_s=-1), "base_s"),
        (lambda: LinkEstimator(safety=0), "safety"),
        (lambda: LinkEstimator(safety=1.5), "safety"),
        (lambda: LinkEstimator(max_s=1.0), "max_s"),
        (lambda: LinkEstimator(max_s=math.inf), "max_s"),
        (lambda: LinkEstimator(half_life=0), "half_life"),
        (lambda: LinkEstimator(min_bytes=-1), "min_bytes"),
        (lambda: LinkEstimator(min_seconds=-0.1), "min_seconds"),
        (lambda: LinkEstimator(min_rate_bytes_per_s=0), "min_rate_bytes_per_s"),
        (lambda: LinkEstimator(max_rate_bytes_per_s=1.0), "max_rate_bytes_per_s"),
        (lambda: LinkEstimator().observe(-1, 1.0, 0.0), "nbytes"),
        (lambda: LinkEstimator().observe(10**6, float("nan"), 0.0), "seconds"),
        (lambda: LinkEstimator().observe(10**6, 1.0, 0.0, concurrent=0), "concurrent"),
        (lambda: LinkEstimator().deadline(10, 0.0, concurrent=0), "concurrent"),
        (lambda: LinkEstimator().expected_s(-1), "nbytes"),
    ],
)
def test_bad_parameters_raise_one_clear_value_error(make, name):
    with pytest.raises(ValueError) as info:
        make()
    message = str(info.value)
    assert message.startswith(name + " ") and " must " in message and "\n" not in message


# --- opt-in: a real loopback TCP socket (prints a figure, asserts no timing) ---

@pytest.mark.skipif(os.environ.get("PEER_RATELIMIT_REAL") != "1", reason="real-time check; set PEER_RATELIMIT_REAL=1")
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_real_loopback_upload_cap(loop, capsys):
    rate, total = 2_000_000, 4_000_000

    class TcpStream:
        def __init__(self, reader, writer):
            self.remote_peer = "loopback"
            self.reader, self.writer = reader, writer

        async def read_exactly(self, n):
            return await self.reader.readexactly(n)

        async def write(self, data):
            self.writer.write(data)
            await self.writer.drain()

        async def close(self):
            self.writer.close()
            await self.writer.wait_closed()

    async def main():
        received = asyncio.get_running_loop().create_future()

        async def serve(reader, writer):
            t0 = time.monotonic()
            got = 0
            while got < total:
                data = await reader.read(1 << 20)
                if not data:
                    break
                got += len(data)
            received.set_result((got, time.monotonic() - t0))
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        stream = RateLimitedStream(TcpStream(reader, writer), up=RateLimiter(rate))
        t0 = time.monotonic()
        await write_payload(stream, [np.zeros(total, dtype=np.uint8)])
        send_s = time.monotonic() - t0
        got, recv_s = await received
        await stream.close()
        server.close()
        await server.wait_closed()
        return got, send_s, recv_s

    if loop == "uvloop":
        import uvloop
        got, send_s, recv_s = uvloop.run(main())
    else:
        got, send_s, recv_s = asyncio.run(main())
    assert got == total
    with capsys.disabled():
        print(f"\n[{loop}] {total / 1e6:.0f} MB under a {rate / 1e6:.0f} MB/s cap: sent in {send_s:.3f} s, "
              f"received in {recv_s:.3f} s ({total / recv_s / 1e6:.3f} MB/s; ideal {(total - 64 * 1024) / rate:.3f} s)")
