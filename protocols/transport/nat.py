"""NAT traversal settings and the p2pd flags they become (`p2pd_options`, no I/O).

hivemind's p2pd (go-libp2p 0.32, learning-at-home/go-libp2p-daemon) does the work; this module
only decides what to ask of it:

- the relay client is always on (`-relay=1`, hivemind's default): this peer can dial others
  through a relay, and its streams may run over a relayed connection;
- **auto-relay** (`auto_relay`, default on): when p2pd's AutoNAT finds this peer unreachable, it
  reserves a slot on a relay among the peers p2pd knows and announces the relayed address
  (`.../p2p/<relay>/p2p-circuit/p2p/<us>`). go-libp2p waits for 4 candidate relays or 3 minutes
  before it reserves, so in a small run a reservation takes up to 3 minutes;
- **`relays`** (`--relay MADDR`): reserve on these peers only, as soon as AutoNAT says private
  (about 15 s after start); auto-relay's discovery is then off;
- **hole punching** (`hole_punching`, default on): DCUtR upgrades a relayed connection to a direct
  one. p2pd ties it to its AutoNAT service (`-autonat`: dialling back peers that ask whether they
  are reachable), so one setting turns both on or off. It needs a public address on at least
  one side, which AutoNAT or identify must have seen;
- **relay service** (`relay_service`, default off): carry other peers' relayed connections, with
  this process's own hop service (`protocols/relay.py`, bounded and counted) in place of p2pd's,
  whose relayed connections carry at most 128 KiB each way (why: that module). Off, the hop
  protocol is withdrawn: p2pd serves it whatever its flags say. Either way p2pd gets
  `-relayService=0` (its default is on), or a peer that AutoNAT finds public would start a relay
  of p2pd's that takes the hop protocol back.

UPnP/NAT-PMP port mapping (`-natPortMap=1`) stays on as hivemind sets it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class NatSettings:
    relays: list[str] = field(default_factory=list)  # relay peers' addresses, each with /p2p/<id>
    auto_relay: bool = True
    hole_punching: bool = True
    relay_service: bool = False


@dataclass(frozen=True)
class P2PdOptions:
    create_kwargs: dict[str, Any]  # for hivemind's P2P.create
    extra_flags: dict[str, Any]  # p2pd flags P2P.create has no parameter for
    serve_relay_hop: bool  # serve hop with protocols/relay.py; False: withdraw p2pd's


def p2pd_options(nat: NatSettings) -> P2PdOptions:
    """What to pass to p2pd for `nat`."""
    kwargs: dict[str, Any] = {"use_relay": True, "auto_nat": nat.hole_punching}
    extra: dict[str, Any] = {}
    if nat.relays:
        kwargs.update(use_auto_relay=True, trusted_relays=list(nat.relays))
        # static relays only: with discovery on, go-libp2p would wait for 4 candidates or 3 minutes
        extra["relayDiscovery"] = False
    elif nat.auto_relay:
        kwargs["use_auto_relay"] = True
    else:
        kwargs["use_auto_relay"] = False
    extra["relayService"] = False  # p2pd's relay never serves: ours does (protocols/relay.py) or none
    return P2PdOptions(kwargs, extra, serve_relay_hop=nat.relay_service)


def is_relayed(addr: str) -> bool:
    """True for an address reached through a relay (`.../p2p-circuit/...`)."""
    return "/p2p-circuit" in addr


def relay_of(addr: str) -> str | None:
    """The relay's peer id in a relayed address, else None."""
    head, sep, _ = addr.partition("/p2p-circuit")
    if not sep or "/p2p/" not in head:
        return None
    return head.rsplit("/p2p/", 1)[1]


def relay_news(before: list[str], after: list[str], peer_id: str) -> str | None:
    """One log line when our relayed addresses change between two reads of p2pd's addresses (a
    reservation granted, renewed on another relay, or lost), else None. The join line printed at
    start predates any reservation, so a peer behind NAT says here what others can paste."""
    old = {a for a in before if is_relayed(a)}
    new = {a for a in after if is_relayed(a)}
    if new == old:
        return None
    if not new:
        return "no relay carries this peer any more: peers that cannot reach it directly lose it until a relay takes it again"
    full = sorted(a if a.endswith(f"/p2p/{peer_id}") else f"{a}/p2p/{peer_id}" for a in new)
    return "reachable through a relay; a peer that cannot reach this machine directly can join with " + " ".join(
        f"--initial-peer {a}" for a in full)
