"""The delay switch (peer/experiment/delayswitch.py): its schedule with a fake clock and no
devices, then two real namespaces behind it (root and /dev/net/tun only).

Only lower bounds on time are asserted: a loaded machine can only make a delayed packet later.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peer.experiment import delayswitch as ds
from peer.experiment import network

A, B, C = bytes([10, 232, 1, 2]), bytes([10, 232, 1, 3]), bytes([10, 232, 1, 4])


def packet(src: bytes, dst: bytes, n: int, size: int = 100) -> bytes:
    """A minimal IPv4-looking packet; the switch reads only the version and the destination."""
    head = bytes([0x45, 0]) + size.to_bytes(2, "big") + n.to_bytes(4, "big") + bytes(4) + src + dst
    return head + bytes(size - len(head))


def tag(pkt: bytes) -> int:
    return int.from_bytes(pkt[4:8], "big")


def drain(s: ds.Schedule, until: float, step: float = 0.0005) -> list[tuple[float, bytes, bytes]]:
    """Every delivery up to `until`, stamped with the fake time it came out."""
    out, t = [], 0.0
    while t <= until:
        out += [(t, d, p) for d, p in s.due(t)]
        t = round(t + step, 6)
    return out


def test_release_time_is_the_senders_delay_only():
    s = ds.Schedule({A: ds.Link(delay_s=0.05), B: ds.Link(delay_s=0.02)})
    s.ingest(1.0, A, packet(A, B, 1))
    s.ingest(1.0, B, packet(B, A, 2))
    assert s.next_time() == pytest.approx(1.02)
    assert s.due(1.019) == []
    assert [tag(p) for _, p in s.due(1.02)] == [2]
    assert [(d, tag(p)) for d, p in s.due(1.05)] == [(B, 1)]
    assert s.next_time() is None and s.held == 0


def test_fifo_per_destination_and_per_flow_with_mixed_delays():
    s = ds.Schedule({A: ds.Link(delay_s=0.05), B: ds.Link(), C: ds.Link(delay_s=0.01)})
    for i in range(20):  # A and C both send to B, interleaved, over 10 ms
        s.ingest(i * 0.0005, A, packet(A, B, 100 + i))
        s.ingest(i * 0.0005, C, packet(C, B, 200 + i))
    got = drain(s, 0.2)
    from_a = [tag(p) for _, _, p in got if tag(p) < 200]
    from_c = [tag(p) for _, _, p in got if tag(p) >= 200]
    assert from_a == list(range(100, 120)) and from_c == list(range(200, 220))
    assert all(d == B for _, d, _ in got)
    # C's 10 ms packets are not held behind A's 50 ms ones (no head-of-line blocking across senders)
    assert max(t for t, _, p in got if tag(p) >= 200) < min(t for t, _, p in got if tag(p) < 200)


def test_equal_release_times_keep_arrival_order():
    s = ds.Schedule({A: ds.Link(), B: ds.Link()})
    for i in range(50):
        s.ingest(0.0, A, packet(A, B, i))
    assert [tag(p) for _, p in s.due(0.0)] == list(range(50))


def test_loss_is_seeded_and_only_lossy_senders_draw():
    def run(seed: int, with_c: bool) -> list[int]:
        s = ds.Schedule({A: ds.Link(loss=0.3), B: ds.Link(), C: ds.Link()}, seed=seed)
        for i in range(1000):
            s.ingest(0.0, A, packet(A, B, i))
            if with_c:
                s.ingest(0.0, C, packet(C, B, 10_000 + i))  # lossless: must not consume draws
        return [tag(p) for _, p in s.due(0.0) if tag(p) < 10_000]

    kept = run(7, False)
    assert kept == run(7, False) == run(7, True), "same seed, same drops, whatever lossless peers send"
    assert kept != run(8, False)
    assert 620 <= len(kept) <= 780  # 30 % of 1000, well within binomial spread


def test_token_bucket_paces_to_the_rate_after_the_burst():
    b = ds.TokenBucket(1000.0, burst=300, max_wait=10)  # 1000 bytes/s, 300 bytes of burst
    leaves = [b.reserve(0.0, 100) for _ in range(13)]
    assert leaves[:3] == pytest.approx([0.0, 0.0, 0.0])  # the burst goes at once
    assert leaves[3:] == pytest.approx([0.1 * k for k in range(1, 11)])  # then 100 bytes per 0.1 s
    assert b.reserve(5.0, 100) == 5.0  # idle long enough: full again


def test_token_bucket_drops_beyond_max_wait_without_reserving():
    b = ds.TokenBucket(1000.0, burst=100, max_wait=0.25)
    got = [b.reserve(0.0, 100) for _ in range(4)]
    assert got[:3] == pytest.approx([0.0, 0.1, 0.2]) and got[3] is None
    assert b.reserve(0.0, 50) == pytest.approx(0.25)  # the dropped packet took no tokens


def test_rate_cap_holds_both_ways_through_the_schedule():
    mbit = 8.0  # 1 MB/s
    for sender, receiver, _capped in ((A, B, A), (B, A, A)):  # upload from, download to the capped peer
        s = ds.Schedule({A: ds.Link(rate_mbit=mbit), B: ds.Link()}, queue_s=10)
        for i in range(200):  # 200 x 1000 bytes offered at once: 0.2 s at 1 MB/s
            s.ingest(0.0, sender, packet(sender, receiver, i, 1000))
        got = drain(s, 1.0)
        assert [tag(p) for _, _, p in got] == list(range(200))
        assert got[-1][0] == pytest.approx(0.2 - ds.BURST_BYTES / 1e6, abs=0.002)


def test_delay_and_cap_compose_like_netem_rate_then_delay():
    s = ds.Schedule({A: ds.Link(delay_s=0.05, rate_mbit=8.0), B: ds.Link()}, queue_s=10)
    for i in range(20):
        s.ingest(0.0, A, packet(A, B, i, 1000))
    got = drain(s, 1.0)
    assert got[0][0] == pytest.approx(0.05, abs=0.001)
    assert got[-1][0] == pytest.approx(0.05 + (20_000 - ds.BURST_BYTES) / 1e6, abs=0.001)


def test_queue_drop_tail_and_non_ipv4_and_unknown_destinations_are_counted():
    s = ds.Schedule({A: ds.Link(rate_mbit=8.0), B: ds.Link()}, queue_s=0.1005)
    for i in range(200):
        s.ingest(0.0, A, packet(A, B, i, 1000))
    assert s.stats["queue_drops"] == 200 - 108  # 8 KB of burst + 100 ms at 1 MB/s
    s.ingest(0.0, A, b"\x60" + bytes(47))  # IPv6
    s.ingest(0.0, A, packet(A, bytes([10, 232, 9, 9]), 1))
    assert (s.stats["not_ipv4"], s.stats["no_route"]) == (1, 1)
    small = ds.Schedule({A: ds.Link(delay_s=1), B: ds.Link()}, max_held=1000)
    for i in range(20):
        small.ingest(0.0, A, packet(A, B, i))
    assert small.held == 1000 and small.stats["queue_drops"] == 10


# --- real namespaces --------------------------------------------------------------------------

REASON = network.probe_switch() if sys.platform == "linux" else "Linux only"

SERVER = """
import hashlib, socket, sys
s = socket.socket(); s.bind((sys.argv[1], 5599)); s.listen(); print("listening", flush=True)
c, _ = s.accept(); c.close()  # the connect-time probe
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while d := c.recv(1 << 16):
    h.update(d); n += len(d)
c.sendall(f"{n} {h.hexdigest()}".encode()); c.close()
"""
CLIENT = """
import os, socket, sys, time
t = time.monotonic(); socket.create_connection((sys.argv[1], 5599), timeout=10).close(); rtt = time.monotonic() - t
data = bytes.fromhex(sys.argv[2]) * 5000
s = socket.create_connection((sys.argv[1], 5599), timeout=10); s.sendall(data); s.shutdown(socket.SHUT_WR)
reply = b""
while d := s.recv(4096):
    reply += d
print(rtt, reply.decode())
"""


@pytest.mark.skipif(REASON is not None, reason=f"the delay switch cannot run here: {REASON}")
@pytest.mark.timeout(120)
def test_two_namespaces_behind_the_switch_get_the_delay_and_the_bytes():
    ns = network.Namespaces(f"d{os.getpid() % 10000}", via="switch", seed=1)
    server = None
    try:
        ns.up()
        a = ns.add(0, delay_ms=30)
        b = ns.add(1, delay_ms=30)
        assert a[1].startswith("10.232.") and b[1].startswith("10.232.") and a[1] != b[1]
        ns.start()
        server = subprocess.Popen([*b[0], sys.executable, "-c", SERVER, b[1]], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "listening"
        chunk = os.urandom(200)  # 1 MB of it: many packets, in order and intact
        r = subprocess.run([*a[0], sys.executable, "-c", CLIENT, b[1], chunk.hex()], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        rtt, n, digest = r.stdout.split()
        assert float(rtt) >= 0.055, f"connect took {float(rtt) * 1000:.1f} ms; 30 ms each way should make it >= 60"
        assert (int(n), digest) == (len(chunk) * 5000, hashlib.sha256(chunk * 5000).hexdigest())
        assert ns.failure() is None
    finally:
        if server is not None:
            server.kill()
            server.wait()
        stats = ns.down()
    assert stats is not None and stats["forwarded"] > 0 and stats["lost"] == 0
    assert not leftovers(ns.tag)


def leftovers(tag: str) -> list[str]:
    netns = subprocess.run([network.IP, "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run([network.IP, "-o", "link"], capture_output=True, text=True).stdout
    return [line for line in (netns + links).splitlines() if f"px{tag}n" in line or f"pxt{tag}s" in line]


@pytest.mark.skipif(REASON is not None, reason=f"the delay switch cannot run here: {REASON}")
def test_down_removes_everything_after_a_failed_add():
    ns = network.Namespaces(f"e{os.getpid() % 10000}", via="switch")
    try:
        ns.up()
        ns.add(0, delay_ms=10)
        with pytest.raises(RuntimeError):
            ns.add(0, delay_ms=10)  # the same slot again: its namespace exists
    finally:
        ns.down()
    assert not leftovers(ns.tag)


@pytest.mark.skipif(REASON is not None, reason=f"the delay switch cannot run here: {REASON}")
@pytest.mark.timeout(60)
def test_an_idle_switch_stops_on_sigterm_and_reports():
    ns = network.Namespaces(f"f{os.getpid() % 10000}", via="switch")
    try:
        ns.up()
        ns.add(0, delay_ms=10)
        ns.add(1)
        ns.start()
        assert ns.failure() is None
    finally:
        stats = ns.down()  # no traffic at all: SIGTERM alone must end it (a SIGKILL leaves no counters)
    assert stats is not None and stats["forwarded"] == 0 and stats["not_ipv4"] == 0, stats
    assert not leftovers(ns.tag)


HOLDER = """
import sys
from peer.experiment import network
ns = network.Namespaces(sys.argv[1], via="switch")
ns.up(); ns.add(0, delay_ms=10); ns.add(1); ns.start()
print(ns.switch.pid, flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(REASON is not None, reason=f"the delay switch cannot run here: {REASON}")
@pytest.mark.timeout(60)
def test_a_runner_killed_outright_takes_the_switch_and_its_tuns_along():
    tag = f"g{os.getpid() % 10000}"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, tag], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(network.__file__).parents[2])})
    try:
        pid = int(holder.stdout.readline())
        holder.kill()  # SIGKILL: no finally, no down()
        holder.wait()
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{pid}"), "the switch outlived its runner"
        links = [line for line in leftovers(tag) if f"pxt{tag}s" in line]
        for ns_name in (f"px{tag}n0", f"px{tag}n1"):
            links += [line for line in subprocess.run([network.IP, "-n", ns_name, "-o", "link"], capture_output=True,
                                                      text=True).stdout.splitlines() if "pxt" in line]
        assert links == [], "TUN devices outlived the switch"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        for ns_name in (f"px{tag}n0", f"px{tag}n1"):  # namespaces are the runner's to remove; it was killed
            subprocess.run([network.IP, "netns", "del", ns_name], capture_output=True)
    assert not leftovers(tag)
