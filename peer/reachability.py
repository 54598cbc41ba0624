"""Is this daemon reachable from other peers? The verdict `peer join` prints at start and
`peer doctor` reports, decided from what was observed (`verdict`, no I/O).

Inputs: the daemon's addresses, the `--announce` ones, and the outcome of a dial-back through a
peer of the run (`protocols/dialback.py`), or why there was none. A peer that could dial back one
of our addresses proves we are reachable from where it is; a peer that tried and failed proves we
are not (from there); without a dial-back only the addresses speak, and the verdict says it is
untested. The fix names what the volunteer can change: a fixed listen port, forwarding it,
`--announce`, or `--relay` (a peer of the run started with `--relay-service`). A relayed address
(`/p2p-circuit`, from a relay reservation: protocols/transport/nat.py) is not an address of this
machine: it proves the peer is reachable through that relay, and it is never dialled back.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from protocols.dialback import tcp_endpoint
from protocols.transport.nat import is_relayed, relay_of


@dataclass(frozen=True)
class DialBack:
    """What one peer of the run reported when asked to dial us back, or why no peer could be asked."""

    peer: str | None = None  # the peer that answered
    dialled: dict[str, str] = field(default_factory=dict)  # address -> "ok" or why it failed
    observed: list[str] = field(default_factory=list)  # hosts that peer sees us connect from
    error: str | None = None  # set when there is no answer: no peer to ask, or none offers dial-back


@dataclass(frozen=True)
class Verdict:
    level: str  # "ok", "warn" or "fail"
    reachable: bool | None  # None: not tested
    what: str
    fix: str = ""

    def line(self) -> str:
        return f"reachability: {self.what}" + (f" — {self.fix}" if self.fix else "")


def _scope(host: str) -> str:
    ip = ipaddress.ip_address(host)
    return "loopback" if ip.is_loopback else "private" if (ip.is_private or ip.is_link_local) else "public"


def verdict(addrs: list[str], announce: list[str], dialback: DialBack | None) -> Verdict:
    """The reachability verdict from the daemon's addresses, `--announce` and a dial-back result."""
    relayed = [a for a in addrs if is_relayed(a)]
    endpoints = [e for e in (tcp_endpoint(a) for a in [*announce, *addrs] if not is_relayed(a)) if e is not None]
    scopes = {_scope(h) for h, _ in endpoints}
    ports = sorted({p for _, p in endpoints})
    port = str(ports[0]) if ports else "PORT"
    public_seen = next((h for h in (dialback.observed if dialback else []) if _scope(h) == "public"), None)
    announce_hint = f"--announce /ip4/{public_seen or '<public IP>'}/tcp/{port}"
    fix_direct = (f"forward TCP port {port} of your router to this machine (and open it in the firewall), "
                  f"then restart with {announce_hint}")
    fix_unreachable = (fix_direct + "; if you cannot, join through a relay: --relay <the address of a peer of the "
                       "run started with --relay-service> (auto-relay, on by default, looks for one by itself for "
                       "up to 3 minutes)")
    if relayed and not (dialback is not None and any(r == "ok" for r in dialback.dialled.values())):
        via = (relay_of(relayed[0]) or "?")[:12] + "…"
        return Verdict("ok", True, f"reachable through relay {via} ({len(relayed)} relayed address"
                       f"{'es' if len(relayed) > 1 else ''}); direct connections from outside are not proven",
                       "" if announce else "for direct connections (no relay in between): " + fix_direct)
    if dialback is None or dialback.error is not None:
        why = dialback.error if dialback is not None else "no dial-back asked"
        if announce or "public" in scopes:
            return Verdict("ok", None, f"not tested ({why}); this peer announces a public address")
        if scopes == {"loopback"}:
            return Verdict("warn", None, f"not tested ({why}); listening on loopback only, so only this machine can "
                           "reach it", "listen on all interfaces: --listen /ip4/0.0.0.0/tcp/PORT")
        return Verdict("warn", None, f"not tested ({why}); only private addresses, so peers outside this network "
                       "may not reach it", "run `peer doctor` once the run has other peers, or " + fix_unreachable)
    reached = [a for a, r in dialback.dialled.items() if r == "ok"]
    who = (dialback.peer or "?")[:12] + "…"
    if reached:
        scope = _scope(tcp_endpoint(reached[0])[0]) if tcp_endpoint(reached[0]) else "public"
        where = "from outside" if scope == "public" else "on this network" if scope == "private" else "on this machine"
        return Verdict("ok", True, f"reachable {where}: peer {who} dialled back {reached[0]}")
    if not dialback.dialled:
        return Verdict("warn", None, f"not tested: peer {who} found no address of ours to dial on the host it sees "
                       f"({', '.join(dialback.observed) or 'none: a relayed connection'})", fix_unreachable)
    failures = "; ".join(f"{a}: {r}" for a, r in dialback.dialled.items())
    fix = fix_unreachable
    if ports == [0] or not ports:
        fix = "listen on a fixed port (--listen /ip4/0.0.0.0/tcp/31337), then " + fix
    return Verdict("fail", False, f"not reachable: peer {who} could not dial back ({failures})", fix)


async def check_at_start(p2p, addrs: list[str], announce: list[str], max_peers: int = 3) -> Verdict:
    """Ask up to `max_peers` connected peers in turn to dial `addrs` back; the verdict."""
    from protocols.dialback import DialBackError, ask

    try:
        peers = list(dict.fromkeys(info.peer_id.to_base58() for info in await p2p._client.list_peers()))
    except Exception as e:
        return verdict(addrs, announce, DialBack(error=f"p2pd did not list its peers: {e}"))
    if not peers:
        return verdict(addrs, announce, DialBack(error=NOBODY_YET))
    errors = []
    for peer in peers[:max_peers]:
        try:
            reply = await ask(p2p, peer, [*announce, *addrs])
        except DialBackError as e:
            errors.append(str(e))
            continue
        return verdict(addrs, announce, DialBack(peer, reply.dialled, reply.observed))
    return verdict(addrs, announce, DialBack(error="; ".join(dict.fromkeys(errors))))


NOBODY_YET = "no other peer of the run is connected yet"


async def recheck_once_connected(p2p, addrs, announce: list[str], wait_s: float = 900.0, poll_s: float = 2.0) -> Verdict | None:
    """For a peer whose start-up verdict was `NOBODY_YET` (the first peer of a run): wait until a
    peer connects, up to `wait_s`, and ask again; None when nobody came. `addrs` is called for the
    daemon's addresses at that moment (a relayed one may have appeared since)."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while loop.time() < deadline:
        await asyncio.sleep(poll_s)
        try:
            connected = await p2p._client.list_peers()
        except Exception:
            continue
        if connected:
            return await check_at_start(p2p, addrs(), announce)
    return None
