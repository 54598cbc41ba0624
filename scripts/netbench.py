#!/usr/bin/env python3
"""Measure what the experiment network gives: TCP goodput and connect round trip between peer
namespaces, and the CPU the delay switch uses (peer/experiment/network.py, delayswitch.py).

    sudo scripts/netbench.py [--via switch|bridge] [--peers 4] [--ring] [--delay-ms 50] [--rate-mbit 20] [--seconds 8] [--burn 2]

Peers 0..N-1 each get the same conditions. Goodput: one TCP stream per pair (0->1, 2->3, ...),
or with --ring one per peer (0->1, 1->2, ..., N-1->0: every peer sends and receives), all at
once, counted at the receiver. --burn N keeps N busy processes running throughout (training
peers' CPU load). Round trip: the median TCP connect time from peer 0 to
peer 1 (one SYN, one SYN-ACK: both peers' delays). CPU: the switch's user+system seconds over
the goodput phase, as a share of one core. Run it under `flock /tmp/peer-heavy.lock`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


from peer.experiment import network  # noqa: E402

SINK = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], 5601)); s.listen()
print("listening", flush=True)
c, _ = s.accept(); n = 0; t0 = None
while d := c.recv(1 << 20):
    t0 = t0 or time.monotonic(); n += len(d)
print(n, time.monotonic() - t0, flush=True)
"""
SOURCE = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 5601), timeout=10); end = time.monotonic() + float(sys.argv[2]); b = b"x" * 65536
while time.monotonic() < end:
    s.sendall(b)
s.close()
"""
CONNECT = """
import socket, sys, time
times = []
for _ in range(int(sys.argv[2])):
    t = time.monotonic(); s = socket.create_connection((sys.argv[1], 5602), timeout=10); times.append(time.monotonic() - t); s.close()
    time.sleep(0.05)
print(" ".join(f"{x * 1000:.2f}" for x in times))
"""
ACCEPT = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], 5602)); s.listen(64)
print("listening", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""


def cpu_s(pid: int) -> float:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--via", choices=("switch", "bridge"), default="switch")
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--delay-ms", type=float, default=0)
    ap.add_argument("--rate-mbit", type=float, default=0)
    ap.add_argument("--loss-pct", type=float, default=0)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--connects", type=int, default=20)
    ap.add_argument("--ring", action="store_true")
    ap.add_argument("--burn", type=int, default=0)
    a = ap.parse_args()
    ns = network.Namespaces(f"b{os.getpid() % 10000}", via=a.via)
    procs: list[subprocess.Popen] = []
    try:
        ns.up()
        peers = [ns.add(i, a.delay_ms, a.rate_mbit, a.loss_pct) for i in range(a.peers)]
        ns.start()
        py = sys.executable
        procs += [subprocess.Popen([py, "-c", "while True: pass"]) for _ in range(a.burn)]
        flows = [(i, (i + 1) % a.peers) for i in range(a.peers)] if a.ring else [(i - 1, i) for i in range(1, a.peers, 2)]
        acc = subprocess.Popen([*peers[1][0], py, "-c", ACCEPT, peers[1][1]], stdout=subprocess.PIPE, text=True)
        procs.append(acc)
        acc.stdout.readline()
        r = subprocess.run([*peers[0][0], py, "-c", CONNECT, peers[1][1], str(a.connects)], capture_output=True, text=True, check=True)
        rtts = [float(x) for x in r.stdout.split()]
        sinks = []
        for _, i in flows:
            p = subprocess.Popen([*peers[i][0], py, "-c", SINK, peers[i][1]], stdout=subprocess.PIPE, text=True)
            procs.append(p)
            p.stdout.readline()
            sinks.append(p)
        c0, t0 = (cpu_s(ns.switch.pid) if ns.switch else 0.0), time.monotonic()
        sources = [subprocess.Popen([*peers[i][0], py, "-c", SOURCE, peers[j][1], str(a.seconds)]) for i, j in flows]
        procs += sources
        for p in sources:
            p.wait(timeout=a.seconds + 60)
        rates = []
        for p in sinks:
            n, dt = p.stdout.readline().split()
            rates.append(int(n) * 8 / float(dt) / 1e6)
        c1, t1 = (cpu_s(ns.switch.pid) if ns.switch else 0.0), time.monotonic()
        cond = network.Condition(a.delay_ms, a.rate_mbit, a.loss_pct).describe() or "no conditions"
        print(f"via {a.via}, {a.peers} peers, {cond} each, {'ring' if a.ring else 'pairs'}, {a.burn} busy processes")
        print(f"connect round trip p0->p1 over {len(rtts)}: median {statistics.median(rtts):.1f} ms, min {min(rtts):.1f}, max {max(rtts):.1f}")
        print("goodput per stream (Mbit/s): " + ", ".join(f"{x:.1f}" for x in rates) + f"; total {sum(rates):.1f}")
        if ns.switch:
            print(f"switch CPU over the goodput phase: {100 * (c1 - c0) / (t1 - t0):.0f} % of one core")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        stats = ns.down()
        if stats:
            print(f"switch counters: {stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
