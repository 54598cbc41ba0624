"""Network conditions for experiments: which way the runner applies them (or refuses), then
namespaces on a bridge and a bandwidth cap that holds.

The real-network tests need root and `ip`/`tc` (skipped otherwise). Only a lower bound on time is
asserted: a slow machine can only make a capped transfer slower, never faster than the cap allows.
The delay switch has its own tests in tests/test_delayswitch.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peer.experiment import network

REPO = Path(__file__).resolve().parents[1]
needs_tbf = pytest.mark.skipif(network.probe(need_netem=False) is not None, reason="needs root, ip and tc (tbf)")
C = network.Condition
ROOT = "network namespaces need root"
NO_NETEM = "tc netem is not available in this kernel (Error: Specified qdisc kind is unknown.)"


def probes(netem: str | None = None, tbf: str | None = None, switch: str | None = None, calls: list | None = None):
    """Fake (probe, probe_switch) answering as a machine with the given failures would."""
    def bridge(need_netem: bool):
        if calls is not None:
            calls.append("netem" if need_netem else "tbf")
        return tbf or (netem if need_netem else None)

    def sw():
        if calls is not None:
            calls.append("switch")
        return switch

    return bridge, sw


def test_plan_nothing_asked_touches_nothing():
    calls: list = []
    p = network.plan({0: C(), 1: C()}, probes=probes(calls=calls))
    assert (p.via, p.missing, calls) == (None, {}, [])


def test_plan_prefers_tc_and_falls_back_to_the_switch_for_delay():
    asked = {0: C(delay_ms=50, rate_mbit=20), 1: C(rate_mbit=100), 2: C()}
    assert network.plan(asked, probes=probes()).via == "bridge"  # netem here
    p = network.plan(asked, probes=probes(netem=NO_NETEM))
    assert (p.via, p.conditions, p.missing) == ("switch", asked, {})  # the cap goes through the switch too
    assert network.plan({0: C(rate_mbit=20)}, probes=probes(netem=NO_NETEM)).via == "bridge"  # tbf for a cap alone
    assert network.plan({0: C(rate_mbit=20)}, probes=probes(tbf="no tbf")).via == "switch"


def test_plan_names_what_cannot_be_applied_and_keeps_what_can():
    asked = {0: C(delay_ms=50, rate_mbit=20), 1: C(loss_pct=1), 2: C(rate_mbit=100)}
    p = network.plan(asked, probes=probes(netem=NO_NETEM, switch="/dev/net/tun is missing"))
    assert p.via == "bridge" and p.conditions == {0: C(rate_mbit=20), 1: C(), 2: C(rate_mbit=100)}
    assert p.missing == {0: C(delay_ms=50), 1: C(loss_pct=1)}
    assert network.Plan.describe(p.missing) == "p0 50ms delay, p1 1% loss"
    assert p.why == f"{NO_NETEM} and the delay switch cannot run: /dev/net/tun is missing"
    p = network.plan(asked, probes=probes(tbf=ROOT, switch=ROOT))
    assert p.via is None and p.missing == asked and p.why == ROOT  # one reason, not the same one twice


def test_plan_shaper_choice_is_obeyed():
    calls: list = []
    assert network.plan({0: C(delay_ms=5)}, "switch", probes=probes(calls=calls)).via == "switch" and calls == ["switch"]
    calls.clear()
    p = network.plan({0: C(delay_ms=5)}, "netem", probes=probes(netem=NO_NETEM, calls=calls))
    assert p.via is None and p.missing == {0: C(delay_ms=5)} and "switch" not in calls
    with pytest.raises(ValueError):
        network.plan({0: C(delay_ms=5)}, "ifb")


def test_runner_refuses_in_one_line_when_a_delay_cannot_be_applied(tmp_path):
    if network.probe(need_netem=True) is None:
        pytest.skip("tc netem works here: the runner would apply the delay and start")
    sc = tmp_path / "delay.toml"
    sc.write_text('peers = 2\nduration_s = 10\n[[heterogeneity]]\npeers = [1]\ndelay_ms = 50\n')
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "scripts/experiment.py", str(sc), "--out", str(out), "--quiet", "--shaper", "netem"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("experiment: network conditions p1 50ms delay cannot be applied: ")
    assert "refusing to start (--allow-unshaped runs without them)" in r.stderr
    assert not out.exists(), "nothing is started or written for a refused run"

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


@pytest.mark.slow  # real namespaces and tbf, over 4 s: the full suite runs it, the fast tier does not
@needs_tbf
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
