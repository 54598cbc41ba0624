"""A userspace switch over TUN devices that adds latency, loss and a bandwidth cap, for kernels
without `tc netem`.

Every peer namespace of a run gets one TUN device (10.232.0.0/16, created by
`peer/experiment/network.py`). This process holds the other end of every TUN: it reads the IPv4
packets a peer sends, looks at the destination address, and writes each packet into the
destination's TUN once the conditions allow. Per packet from A to B:

    A's loss (seeded RNG) -> A's egress token bucket (A's rate) -> A's delay -> B's ingress token bucket (B's rate) -> B

which is what the bridge path does with netem + tbf on A's egress and tbf toward B: a peer's round
trip to anyone grows by its own `delay_ms`, and its cap holds for uploads and downloads.

Invariants (tested in tests/test_delayswitch.py with a fake clock):
- Order per flow: packets from A to B leave in the order A sent them. A's egress bucket is one
  FIFO, A's delay is constant, the heap breaks ties by arrival sequence and B's ingress bucket
  is served in heap order, so release times per (A, B) never decrease.
- Token buckets run in virtual time (GCRA): a late wake-up delivers everything that is due, so
  the long-run rate is the configured one however coarse the timer is; only the burst size
  (`BURST_BYTES`, tbf's `burst 64kbit` on the bridge path) may exceed it momentarily.
- A packet that would wait more than `queue_s` for a bucket is dropped, as tbf drops beyond its
  `latency 400ms`: queues stay bounded, TCP sees loss and backs off. Bytes held in total are
  capped (`MAX_HELD_BYTES`) so nothing can make the switch grow without bound.
- Loss is drawn from `random.Random(seed)`, one draw per packet of a lossy sender only, so a
  lossless peer never shifts the sequence of draws.
- Packets that are not IPv4 or go to an address without a port (multicast: the daemons' UPnP
  discovery, IGMP) are dropped and counted (`no_route_to` names up to 16 such addresses), never
  forwarded.

Measured on the 2-core development machine with `scripts/netbench.py` (one Python TCP stream per
pair of namespaces, counted at the receiver; commands and the rest in docs/experiments.md):

    conditions per peer              goodput per stream           connect time   switch CPU
    none                             1160 Mbit/s (the switch's limit)  0.4 ms   77 % of a core
    20 Mbit/s                        19.3 Mbit/s (tbf on veth: 19.1)   0.4 ms    9 %
    50 ms + 20 Mbit/s                18.7 Mbit/s                     100.9 ms    9 %
    50 ms + 20 Mbit/s, 4 peers ring  17.0-18.4 Mbit/s (70.8 in all)  101.0 ms   22 %
    25 ms, 4 peers ring, no cap      162-179 Mbit/s (685 in all)      50.9 ms   58 %

Python is far above the ~20 Mbit/s per peer the scenarios ask for, so there is no C helper. The
delay is a floor, not exact: the switch wakes on a millisecond timer (+0.5-1 ms per round trip)
and competes for CPU with the peers. It renices itself to -10 when it can; with two busy
processes on the two cores the median connect time at 50 ms per side stayed 101.0 ms (max 113.6).

Why a separate process and not a thread of the runner: it has its own interpreter lock, so the
runner's polling and live display never hold packets back, and it can be reniced on its own. The
TUN devices live exactly as long as this process: the runner passes the open TUN file
descriptors to it and closes its own copies, so when the switch exits (or is killed) the kernel
removes every TUN.

    python peer/experiment/delayswitch.py --port FD,ADDR,DELAY_MS,LOSS_PCT,RATE_MBIT [--port ...] [--seed N] [--watch-stdin]

It prints `ready` once it polls, and one JSON line of counters when it gets SIGTERM or SIGINT
(or, with --watch-stdin, when its stdin reaches its end: the runner started it with a pipe there,
so even a runner killed with SIGKILL takes the switch and every TUN with it).
Standard library only: it runs by path, without the rest of the package.
"""

from __future__ import annotations

import argparse
import fcntl
import heapq
import ipaddress
import json
import os
import random
import select
import signal
import struct
import sys
import time
from dataclasses import dataclass, field

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
BURST_BYTES = 8000             # tbf's `burst 64kbit` on the bridge path
QUEUE_S = 0.4                  # tbf's `latency 400ms` on the bridge path
MAX_HELD_BYTES = 64 << 20      # everything waiting in the switch, all peers together
READ_BATCH = 64                # packets read from one TUN before the others get a turn


def open_tun(name: str) -> int:
    """Create TUN device `name` (IP packets, no extra header) in this process's network namespace
    and return its file descriptor (non-blocking). The device disappears when the last
    descriptor is closed; moving it to another namespace keeps the descriptor attached."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


class TokenBucket:
    """A FIFO token bucket in virtual time (GCRA). `reserve` returns when a packet of `size`
    bytes offered at `now` may leave, or None (nothing reserved) if it would wait > max_wait.
    Calls must come with non-decreasing `now`."""

    def __init__(self, rate_bytes_s: float, burst: float = BURST_BYTES, max_wait: float = QUEUE_S):
        self.rate, self.burst, self.max_wait = rate_bytes_s, burst, max_wait
        self.tat = 0.0  # when the bucket would be full again were nothing else sent

    def reserve(self, now: float, size: int) -> float | None:
        if self.rate <= 0:
            return now
        tat = max(self.tat, now) + size / self.rate
        leave = max(now, tat - self.burst / self.rate)
        if leave - now > self.max_wait:
            return None
        self.tat = tat
        return leave


@dataclass
class Link:
    """One peer's conditions, as `[[heterogeneity]]` gives them."""
    delay_s: float = 0.0
    loss: float = 0.0          # probability 0..1
    rate_mbit: float = 0.0     # both ways; 0: no cap
    egress: TokenBucket = field(init=False)
    ingress: TokenBucket = field(init=False)

    def __post_init__(self):
        self.egress = TokenBucket(self.rate_mbit * 1e6 / 8)
        self.ingress = TokenBucket(self.rate_mbit * 1e6 / 8)


class Schedule:
    """The pure part of the switch: which packet goes where, when. No devices, no clock: the
    caller passes `now` (seconds, non-decreasing) to `ingest` and `due`."""

    def __init__(self, links: dict[bytes, Link], seed: int = 0, queue_s: float = QUEUE_S,
                 max_held: int = MAX_HELD_BYTES):
        self.links = links
        for link in links.values():
            link.egress.max_wait = link.ingress.max_wait = queue_s
        self.rng = random.Random(seed)
        self.max_held = max_held
        self.heap: list[tuple[float, int, int, bytes, bytes]] = []  # (time, seq, stage, dst, packet)
        self.seq = 0
        self.held = 0
        self.stats = {"forwarded": 0, "bytes": 0, "lost": 0, "queue_drops": 0, "not_ipv4": 0, "no_route": 0}
        self.no_route_to: dict[bytes, int] = {}

    def _push(self, t: float, stage: int, dst: bytes, pkt: bytes) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, stage, dst, pkt))

    def ingest(self, now: float, src: bytes, pkt: bytes) -> None:
        """A packet read from the TUN of the peer with address `src`."""
        if len(pkt) < 20 or pkt[0] >> 4 != 4:
            self.stats["not_ipv4"] += 1
            return
        dst = pkt[16:20]
        if dst not in self.links or dst == src:
            self.stats["no_route"] += 1
            where = self.no_route_to
            if len(where) < 16 or dst in where:  # bounded: a few addresses say what was dialled
                where[dst] = where.get(dst, 0) + 1
            return
        s = self.links[src]
        if s.loss and self.rng.random() < s.loss:
            self.stats["lost"] += 1
            return
        if self.held + len(pkt) > self.max_held:
            self.stats["queue_drops"] += 1
            return
        t = s.egress.reserve(now, len(pkt))
        if t is None:
            self.stats["queue_drops"] += 1
            return
        self.held += len(pkt)
        self._push(t + s.delay_s, 0, dst, pkt)

    def next_time(self) -> float | None:
        return self.heap[0][0] if self.heap else None

    def due(self, now: float) -> list[tuple[bytes, bytes]]:
        """(destination address, packet) for every packet to write now, in order."""
        out = []
        heap = self.heap
        while heap and heap[0][0] <= now:
            t, _, stage, dst, pkt = heapq.heappop(heap)
            if stage == 0:
                bucket = self.links[dst].ingress
                if bucket.rate > 0:
                    # reserved at the packet's own arrival time, not at `now`: a late wake-up
                    # must not shift the bucket, or the rate would depend on the timer
                    leave = bucket.reserve(t, len(pkt))
                    if leave is None:
                        self.held -= len(pkt)
                        self.stats["queue_drops"] += 1
                        continue
                    if leave > now:
                        self._push(leave, 1, dst, pkt)
                        continue
            self.held -= len(pkt)
            self.stats["forwarded"] += 1
            self.stats["bytes"] += len(pkt)
            out.append((dst, pkt))
        return out


def serve(ports: dict[int, tuple[bytes, Link]], seed: int = 0, queue_s: float = QUEUE_S,
          ready=None, clock=time.monotonic, parent: int | None = None) -> dict:
    """Forward between the TUN descriptors in `ports` (fd -> (address, conditions)) until SIGTERM
    or SIGINT, or until the pipe `parent` (a descriptor) reaches its end; return the counters."""
    sched = Schedule({addr: link for addr, link in ports.values()}, seed=seed, queue_s=queue_s)
    fd_of = {addr: fd for fd, (addr, _) in ports.items()}
    addr_of = {fd: addr for fd, (addr, _) in ports.items()}
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    # An idle switch waits in epoll with no timeout, and Python retries an interrupted wait: the
    # signal must also wake it through a descriptor, or SIGTERM would go unanswered until a packet.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(wake_w)
    ep = select.epoll()
    ep.register(wake_r, select.EPOLLIN)
    for fd in ports:
        ep.register(fd, select.EPOLLIN)
    if parent is not None:
        ep.register(parent, select.EPOLLIN)
    if ready:
        ready()
    stats = sched.stats
    stats["write_errors"] = 0
    while not stop:
        nxt = sched.next_time()
        timeout = -1 if nxt is None else max(0.0, nxt - clock())  # epoll rounds up to whole ms
        try:
            events = ep.poll(timeout)
        except InterruptedError:
            continue
        now = clock()
        for fd, _ in events:
            if fd == wake_r:
                while True:
                    try:
                        os.read(wake_r, 512)
                    except (BlockingIOError, InterruptedError):
                        break
                continue
            if fd == parent:
                if not os.read(parent, 512):  # the runner is gone, however it ended: so are we
                    stop.append(1)
                continue
            src = addr_of[fd]
            for _ in range(READ_BATCH):
                try:
                    pkt = os.read(fd, 65536)
                except (BlockingIOError, InterruptedError):
                    break
                sched.ingest(now, src, pkt)
        for dst, pkt in sched.due(clock()):
            try:
                os.write(fd_of[dst], pkt)
            except OSError:
                stats["write_errors"] += 1
    ep.close()
    stats["no_route_to"] = {".".join(map(str, a)): n for a, n in sched.no_route_to.items()}
    signal.set_wakeup_fd(old_wakeup)
    os.close(wake_r)
    os.close(wake_w)
    return stats


def parse_port(spec: str) -> tuple[int, bytes, Link]:
    """FD,ADDR,DELAY_MS,LOSS_PCT,RATE_MBIT"""
    fd, addr, delay_ms, loss_pct, rate = spec.split(",")
    return int(fd), ipaddress.IPv4Address(addr).packed, Link(float(delay_ms) / 1000, float(loss_pct) / 100, float(rate))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", action="append", required=True, type=parse_port,
                    help="FD,ADDR,DELAY_MS,LOSS_PCT,RATE_MBIT: an inherited TUN descriptor and its peer's address and conditions")
    ap.add_argument("--seed", type=int, default=0, help="seed of the loss draws")
    ap.add_argument("--queue-ms", type=float, default=QUEUE_S * 1000, help="drop a packet that would wait longer for a bucket")
    ap.add_argument("--watch-stdin", action="store_true", help="exit when stdin (a pipe from the runner) is closed")
    args = ap.parse_args(argv)
    try:
        os.nice(-10)  # stands in for the kernel's forwarding: it must not queue behind the peers' training
    except OSError:
        pass
    ports = {fd: (addr, link) for fd, addr, link in args.port}
    t0, c0 = time.monotonic(), os.times()
    stats = serve(ports, seed=args.seed, queue_s=args.queue_ms / 1000, ready=lambda: print("ready", flush=True),
                  parent=sys.stdin.fileno() if args.watch_stdin else None)
    c1 = os.times()
    stats["cpu_s"] = round(c1.user + c1.system - c0.user - c0.system, 3)
    stats["wall_s"] = round(time.monotonic() - t0, 3)
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
