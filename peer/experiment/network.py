"""Per-peer network conditions for experiments: one network namespace per peer on a bridge,
shaped with `tc`: delay and loss (`netem`) on the peer's egress, so its round trip to anyone
grows by the delay; a bandwidth cap (`tbf`, or netem's rate) both ways. Needs root and the `ip`/`tc` tools; `probe` says in one line why not.

Every peer of a shaped run lives in its own namespace (an unshaped one simply gets no qdisc),
because a peer in a namespace cannot reach 127.0.0.1 of another. The control sockets are files,
so `peer status`/`peer leave` work across namespaces unchanged.
"""

from __future__ import annotations

import os
import shutil
import subprocess

IP = shutil.which("ip") or "/usr/sbin/ip"
TC = shutil.which("tc") or "/usr/sbin/tc"


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True)


def probe(need_netem: bool) -> str | None:
    """None if the conditions can be applied here, else the one-line reason they cannot."""
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


class Namespaces:
    """Create, shape and remove the namespaces of one run (names carry the runner's pid)."""

    def __init__(self, tag: str | None = None):
        self.tag = tag or f"{os.getpid() % 100000}"
        self.bridge = f"pxbr{self.tag}"
        self.created: list[str] = []
        self.links: list[str] = []

    def _must(self, *cmd: str) -> None:
        r = _run(*cmd)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")

    def up(self) -> None:
        self._must(IP, "link", "add", self.bridge, "type", "bridge")
        self.links.append(self.bridge)
        self._must(IP, "addr", "add", "10.231.0.1/16", "dev", self.bridge)
        self._must(IP, "link", "set", self.bridge, "up")

    def add(self, slot: int, delay_ms: float = 0, rate_mbit: float = 0, loss_pct: float = 0) -> tuple[list[str], str]:
        """A namespace for peer `slot`: (command prefix to run inside it, its IP address)."""
        ns, host, inner = f"px{self.tag}n{slot}", f"pxh{self.tag}s{slot}"[:15], f"pxi{self.tag}s{slot}"[:15]
        addr = f"10.231.{1 + slot // 250}.{2 + slot % 250}"
        self._must(IP, "netns", "add", ns)
        self.created.append(ns)
        self._must(IP, "link", "add", host, "type", "veth", "peer", "name", inner)
        self.links.append(host)
        self._must(IP, "link", "set", inner, "netns", ns)
        self._must(IP, "link", "set", host, "master", self.bridge, "up")
        inside = [IP, "netns", "exec", ns]
        self._must(*inside, IP, "addr", "add", f"{addr}/16", "dev", inner)
        self._must(*inside, IP, "link", "set", inner, "up")
        self._must(*inside, IP, "link", "set", "lo", "up")
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

    def down(self) -> None:
        for ns in self.created:
            _run(IP, "netns", "del", ns)
        for link in reversed(self.links):
            _run(IP, "link", "del", link)
        self.created, self.links = [], []
