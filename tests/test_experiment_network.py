"""Network conditions for experiments: namespaces on a bridge, and a bandwidth cap that holds.

Needs root and `ip`/`tc` (skipped otherwise). Only a lower bound on time is asserted: a slow
machine can only make a capped transfer slower, never faster than the cap allows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from peer.experiment import network

pytestmark = pytest.mark.skipif(network.probe(need_netem=False) is not None, reason="needs root, ip and tc (tbf)")

SERVER = """
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 5555)); s.listen(); c, _ = s.accept(); n = 0
while d := c.recv(1 << 20):
    n += len(d)
print(n)
"""
CLIENT = """
import socket, sys, time
for _ in range(50):
    try:
        s = socket.create_connection((sys.argv[1], 5555), timeout=5); break
    except OSError:
        time.sleep(0.1)
s.sendall(b"x" * int(sys.argv[2])); s.close()
"""


def transfer(dst: tuple[list[str], str], src: tuple[list[str], str], nbytes: int) -> float:
    srv = subprocess.Popen([*dst[0], sys.executable, "-c", SERVER, dst[1]], stdout=subprocess.PIPE, text=True)
    try:
        t = time.monotonic()
        subprocess.run([*src[0], sys.executable, "-c", CLIENT, dst[1], str(nbytes)], check=True, timeout=60)
        out, _ = srv.communicate(timeout=60)
        elapsed = time.monotonic() - t
    finally:
        srv.kill()
        srv.wait()
    assert int(out) == nbytes
    return elapsed


def test_namespaces_connect_and_cap_bandwidth_both_ways():
    ns = network.Namespaces(f"t{os.getpid() % 10000}")
    try:
        ns.up()
        capped = ns.add(0, rate_mbit=8)
        free = ns.add(1)
        assert capped[1] != free[1] and capped[0][:3] == [network.IP, "netns", "exec"]
        # 2 MB at 8 Mbit/s is 2 s on the wire; allow the token bucket's burst, never much faster
        assert transfer(capped, free, 2_000_000) >= 1.5, "download to the capped peer was not shaped"
        assert transfer(free, capped, 2_000_000) >= 1.5, "upload from the capped peer was not shaped"
    finally:
        ns.down()
    listed = subprocess.run([network.IP, "netns", "list"], capture_output=True, text=True).stdout
    assert f"px{ns.tag}n" not in listed, "namespaces left behind"


def test_probe_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(network, "TC", "/nonexistent/tc")
    assert network.probe(need_netem=True) == "the ip and tc tools are not installed"
