"""Per-peer network conditions for experiments: every peer of a shaped run in its own network
namespace, its round trip to anyone grown by its `delay_ms`, its packets dropped at `loss_pct`,
its bandwidth capped at `rate_mbit` both ways. Needs root and the `ip`/`tc` tools.

Two ways to join the namespaces, chosen by `plan`:
- `bridge`: a veth pair per peer on a bridge (10.231.0.0/16), shaped with `tc`: netem (delay,
  loss, and its `rate` when combined) on the peer's egress, tbf toward the peer for downloads,
  tbf both ways when only a cap is asked for. Used for caps alone, and for delay/loss where the
  kernel has netem.
- `switch`: a TUN device per peer (10.232.0.0/16), all of them served by one userspace process,
  `peer/experiment/delayswitch.py`, that applies delay, loss and the cap itself. Used for delay
  or loss when the kernel has no netem (or when asked to). Every peer of such a run is behind
  the switch, so every pair of peers meets the same model of the network.

A condition that cannot be applied either way is named in `Plan.missing` with the reason in
`Plan.why`; the runner refuses to start unless told to run without it, so nothing is dropped
silently. Every peer of a shaped run lives in its own namespace (an unshaped one simply gets no
qdisc and no delay), because a peer in a namespace cannot reach 127.0.0.1 of another. The
control sockets are files, so `peer status`/`peer leave` work across namespaces unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from peer.experiment import delayswitch

IP = shutil.which("ip") or "/usr/sbin/ip"
TC = shutil.which("tc") or "/usr/sbin/tc"
TUN = "/dev/net/tun"
SWITCH = Path(delayswitch.__file__)
SHAPERS = ("auto", "netem", "switch")


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True)


def probe(need_netem: bool) -> str | None:
    """None if the bridge path can apply its qdisc here (netem, or tbf), else the one-line reason."""
    if not (os.path.exists(IP) and os.path.exists(TC)):
        return "the ip and tc tools are not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"pxp{os.getpid() % 100000}"
    try:
        r = _run(IP, "link", "add", name, "type", "veth", "peer", "name", name + "b")
        if r.returncode:
            return f"cannot create veth pairs ({r.stderr.strip()[:60]})"
        kind = ["netem", "delay", "1ms"] if need_netem else ["tbf", "rate", "1mbit", "burst", "32kbit", "latency", "400ms"]
        r = _run(TC, "qdisc", "add", "dev", name, "root", *kind)
        if r.returncode:
            return f"tc {kind[0]} is not available in this kernel ({r.stderr.strip()[:60]})"
        return None
    finally:
        _run(IP, "link", "del", name)


def probe_switch() -> str | None:
    """None if the delay switch can run here (a TUN device moved into a namespace), else why not."""
    if not os.path.exists(IP):
        return "the ip tool is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not os.path.exists(TUN):
        return f"{TUN} is missing"
    name, ns = f"pxq{os.getpid() % 100000}", f"pxq{os.getpid() % 100000}ns"
    try:
        fd = delayswitch.open_tun(name)
    except OSError as e:
        return f"cannot create TUN devices ({e.strerror})"
    try:
        r = _run(IP, "netns", "add", ns)
        if r.returncode:
            return f"cannot create network namespaces ({r.stderr.strip()[:60]})"
        r = _run(IP, "link", "set", name, "netns", ns)
        if r.returncode:
            return f"cannot move a TUN device into a namespace ({r.stderr.strip()[:60]})"
        return None
    finally:
        os.close(fd)  # the last descriptor: the device goes with it, wherever it is
        _run(IP, "netns", "del", ns)


@dataclass(frozen=True)
class Condition:
    """What one peer slot asks for."""
    delay_ms: float = 0.0
    rate_mbit: float = 0.0
    loss_pct: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.delay_ms or self.rate_mbit or self.loss_pct)

    def describe(self) -> str:
        parts = ((self.delay_ms, "ms delay"), (self.rate_mbit, "Mbit/s"), (self.loss_pct, "% loss"))
        return " ".join(f"{v:g}{unit}" for v, unit in parts if v)


@dataclass
class Plan:
    via: str | None                       # "bridge", "switch", or None: every peer on 127.0.0.1
    conditions: dict[int, Condition]      # what will hold, per slot (every slot of the run)
    missing: dict[int, Condition] = field(default_factory=dict)  # asked for but cannot be applied
    why: str | None = None                # one line: why `missing` cannot be applied

    @staticmethod
    def describe(conds: dict[int, Condition]) -> str:
        return ", ".join(f"p{i} {c.describe()}" for i, c in sorted(conds.items()) if c)


def plan(asked: dict[int, Condition], shaper: str = "auto", probes=None) -> Plan:
    """How to apply `asked` (slot -> conditions) here. `shaper`: auto (the bridge path where the
    kernel can, else the switch), netem (bridge only) or switch (the switch for any condition).
    `probes` replaces (probe, probe_switch) in tests."""
    if shaper not in SHAPERS:
        raise ValueError(f"shaper must be one of {', '.join(SHAPERS)}, got {shaper!r}")
    p_bridge, p_switch = probes or (probe, probe_switch)
    none = {i: Condition() for i in asked}
    if not any(asked.values()):
        return Plan(None, none)
    needs_netem = any(c.delay_ms or c.loss_pct for c in asked.values())
    reasons: list[str] = []
    if shaper != "switch":
        why = p_bridge(need_netem=needs_netem)
        if why is None:
            return Plan("bridge", dict(asked))
        reasons.append(why)
    if shaper != "netem":
        why = p_switch()
        if why is None:
            return Plan("switch", dict(asked))
        reasons.append(why if why in reasons else f"the delay switch cannot run: {why}")
    why = " and ".join(dict.fromkeys(reasons))
    if needs_netem and shaper != "switch":
        # delay and loss cannot be applied; a bandwidth cap alone may still be (tbf)
        caps = {i: Condition(rate_mbit=c.rate_mbit) for i, c in asked.items()}
        missing = {i: Condition(delay_ms=c.delay_ms, loss_pct=c.loss_pct) for i, c in asked.items()}
        if any(caps.values()) and p_bridge(need_netem=False) is None:
            return Plan("bridge", caps, {i: c for i, c in missing.items() if c}, why)
    return Plan(None, none, {i: c for i, c in asked.items() if c}, why)


class Namespaces:
    """Create, shape and remove the namespaces of one run (names carry the runner's pid).

    `via="bridge"`: veth pairs on a bridge shaped with tc. `via="switch"`: a TUN device per peer
    and the delay switch process; call `start()` after the last `add()`. `down()` removes
    everything, whatever state a failure left (also after a failed `add`).
    """

    def __init__(self, tag: str | None = None, via: str = "bridge", seed: int = 0):
        if via not in ("bridge", "switch"):
            raise ValueError(f"via must be bridge or switch, got {via!r}")
        self.tag = tag or f"{os.getpid() % 100000}"
        self.via, self.seed = via, seed
        self.bridge = f"pxbr{self.tag}"
        self.created: list[str] = []
        self.links: list[str] = []
        self.ports: list[tuple[int, str, Condition]] = []  # (TUN descriptor, address, conditions) until start()
        self.switch: subprocess.Popen | None = None
        self.switch_stats: dict | None = None

    def _must(self, *cmd: str) -> None:
        r = _run(*cmd)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")

    def up(self) -> None:
        if self.via == "switch":
            return  # the TUN devices are the only links
        self._must(IP, "link", "add", self.bridge, "type", "bridge")
        self.links.append(self.bridge)
        self._must(IP, "addr", "add", "10.231.0.1/16", "dev", self.bridge)
        self._must(IP, "link", "set", self.bridge, "up")

    def add(self, slot: int, delay_ms: float = 0, rate_mbit: float = 0, loss_pct: float = 0) -> tuple[list[str], str]:
        """A namespace for peer `slot`: (command prefix to run inside it, its IP address)."""
        ns = f"px{self.tag}n{slot}"
        self._must(IP, "netns", "add", ns)
        self.created.append(ns)
        inside = [IP, "netns", "exec", ns]
        self._must(IP, "-n", ns, "link", "set", "lo", "up")
        if self.via == "switch":
            return inside, self._add_tun(ns, slot, Condition(delay_ms, rate_mbit, loss_pct))
        host, inner = f"pxh{self.tag}s{slot}"[:15], f"pxi{self.tag}s{slot}"[:15]
        addr = f"10.231.{1 + slot // 250}.{2 + slot % 250}"
        self._must(IP, "link", "add", host, "type", "veth", "peer", "name", inner)
        self.links.append(host)
        self._must(IP, "link", "set", inner, "netns", ns)
        self._must(IP, "link", "set", host, "master", self.bridge, "up")
        self._must(*inside, IP, "addr", "add", f"{addr}/16", "dev", inner)
        self._must(*inside, IP, "link", "set", inner, "up")
        if delay_ms or loss_pct:
            q = ["netem"] + (["delay", f"{delay_ms}ms"] if delay_ms else []) + (["loss", f"{loss_pct}%"] if loss_pct else [])
            q += ["rate", f"{rate_mbit}mbit"] if rate_mbit else []
            self._must(*inside, TC, "qdisc", "add", "dev", inner, "root", *q)
        elif rate_mbit:
            self._must(*inside, TC, "qdisc", "add", "dev", inner, "root", "tbf", "rate", f"{rate_mbit}mbit",
                       "burst", "64kbit", "latency", "400ms")
        if rate_mbit:  # the cap holds for downloads too: shape the bridge side's egress toward the peer
            self._must(TC, "qdisc", "add", "dev", host, "root", "tbf", "rate", f"{rate_mbit}mbit",
                       "burst", "64kbit", "latency", "400ms")
        return inside, addr

    def _add_tun(self, ns: str, slot: int, cond: Condition) -> str:
        dev, addr = f"pxt{self.tag}s{slot}"[:15], f"10.232.{1 + slot // 250}.{2 + slot % 250}"
        try:
            fd = delayswitch.open_tun(dev)  # in this (the root) namespace, then moved: the descriptor stays attached
        except OSError as e:
            raise RuntimeError(f"cannot create TUN device {dev}: {e.strerror}") from None
        self.ports.append((fd, addr, cond))  # from here on down() closes it, which removes the device
        self._must(IP, "link", "set", dev, "netns", ns)
        self._must(IP, "-n", ns, "addr", "add", f"{addr}/16", "dev", dev)  # the /16 routes every peer via the TUN
        self._must(IP, "-n", ns, "link", "set", dev, "addrgenmode", "none")  # no IPv6 link-local chatter into the switch
        self._must(IP, "-n", ns, "link", "set", dev, "up")
        return addr

    def start(self) -> None:
        """Start the delay switch over every TUN added so far (nothing to do on the bridge path).
        The switch then holds the only descriptors: the devices live as long as it does."""
        if self.via != "switch" or not self.ports:
            return
        fds = [fd for fd, _, _ in self.ports]
        cmd = [sys.executable, str(SWITCH), "--seed", str(self.seed), "--watch-stdin"]
        cmd += [f"--port={fd},{addr},{c.delay_ms:g},{c.loss_pct:g},{c.rate_mbit:g}" for fd, addr, c in self.ports]
        # its own session: a Ctrl-C at the terminal stops the peers first, the network last (down());
        # the stdin pipe ends the switch with this process, however this process ends
        self.switch = subprocess.Popen(cmd, pass_fds=fds, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, start_new_session=True)
        for fd in fds:
            os.close(fd)
        self.ports = []
        if self.switch.stdout.readline().strip() != "ready":
            self.switch.kill()
            _, err = self.switch.communicate()
            raise RuntimeError(f"the delay switch did not start: {err.strip()[-300:]}")

    def failure(self) -> str | None:
        """Why the network of this run no longer works (the delay switch exited), or None."""
        if self.switch is not None and self.switch.poll() is not None:
            return f"the delay switch exited with code {self.switch.returncode}: {self.switch.stderr.read().strip()[-300:]}"
        return None

    def __enter__(self) -> Namespaces:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def down(self) -> dict | None:
        """Remove everything; return the delay switch's counters (None on the bridge path)."""
        if self.switch is not None:
            if self.switch.poll() is None:
                self.switch.send_signal(signal.SIGTERM)
            try:
                out, _ = self.switch.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.switch.kill()
                out, _ = self.switch.communicate()
            lines = (out or "").strip().splitlines()
            try:
                self.switch_stats = json.loads(lines[-1]) if lines else None
            except ValueError:
                self.switch_stats = None
            self.switch = None
        for fd, _, _ in self.ports:
            os.close(fd)
        self.ports = []
        for ns in self.created:
            _run(IP, "netns", "del", ns)
        for link in reversed(self.links):
            _run(IP, "link", "del", link)
        self.created, self.links = [], []
        return self.switch_stats
