"""Dial-back `/peer/dialback/1`: a peer of the run tells another whether it can be reached.

The asker sends the addresses it listens on; the answering peer opens a fresh TCP connection to
a few of them and reports, per address, whether a libp2p node answered there (every libp2p
listener sends the multistream-select header `/multistream/1.0.0` first, before the dialler says
anything). A fresh TCP connection is the point: the connection the question came over proves
nothing about reaching the asker, and p2pd would reuse it for a libp2p dial to the same peer id.

What must stay true, so that the service cannot be turned against third parties:
- only the host the asking connection comes from is dialled (its own addresses on that host, and
  that host with each port it names: the address a NAT maps its port to), so a peer can make
  others connect only to itself;
- at most `MAX_TARGETS` connections per question, each bounded by `DIAL_TIMEOUT_S`, and one
  question per asker per `MIN_INTERVAL_S` (`Limiter`);
- nothing is sent on the connections we open: we read the listener's greeting and close.

hivemind's P2P exposes no AutoNAT result (go-libp2p keeps its reachability inside p2pd; the
control protocol has no request for it), so this is how a peer learns whether it is reachable.
The service speaks p2pd's unary wire format: a daemon calls it through its p2pd, `peer doctor`
through py-libp2p (`protocols/transport/light.py: LightClient.call_unary`). On the daemon's
guarded P2P (`protocols/dht_guard.py`) it is served like the DHT RPCs, under the same per-peer and
total stream caps and deadlines, and counted in `peer status`'s `dht_rpcs` under `PROTOCOL`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from dataclasses import dataclass, field

import msgpack

PROTOCOL = "/peer/dialback/1"
MAX_TARGETS = 4
MAX_REQUEST_ADDRS = 16
MAX_ADDR_CHARS = 256
DIAL_TIMEOUT_S = 3.0
MIN_INTERVAL_S = 10.0
GREETING = b"\x13/multistream/1.0.0\n"  # varint length 19, then the protocol id


class DialBackError(Exception):
    """The question could not be asked or the answer was unusable; the message says why."""


@dataclass(frozen=True)
class Reply:
    dialled: dict[str, str]  # "/ip4/HOST/tcp/PORT" -> "ok" or why it failed
    observed: list[str]  # the hosts the answering peer sees the asker connect from


def encode_request(addrs: list[str]) -> bytes:
    return msgpack.packb({"addrs": [a for a in addrs if len(a) <= MAX_ADDR_CHARS][:MAX_REQUEST_ADDRS]})


def decode_request(data: bytes) -> list[str]:
    try:
        raw = msgpack.unpackb(data, raw=False, max_str_len=MAX_ADDR_CHARS, max_array_len=MAX_REQUEST_ADDRS, max_map_len=4)
        addrs = raw["addrs"]
    except Exception:
        raise DialBackError("malformed request") from None
    if not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs):
        raise DialBackError("malformed request")
    return addrs


def encode_reply(reply: Reply) -> bytes:
    return msgpack.packb({"dialled": reply.dialled, "observed": reply.observed})


def decode_reply(data: bytes) -> Reply:
    try:
        raw = msgpack.unpackb(data, raw=False, max_str_len=1024, max_array_len=64, max_map_len=64)
        dialled, observed = raw["dialled"], raw["observed"]
        if not (isinstance(dialled, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in dialled.items())
                and isinstance(observed, list) and all(isinstance(h, str) for h in observed)):
            raise ValueError
    except Exception:
        raise DialBackError("the peer's dial-back answer is unreadable") from None
    return Reply(dict(list(dialled.items())[:MAX_TARGETS]), observed[:8])


def tcp_endpoint(addr: str) -> tuple[str, int] | None:
    """('1.2.3.4', 5) for '/ip4/1.2.3.4/tcp/5[/p2p/..]' (ip4 or ip6 and TCP only), else None; None
    for a relayed address too (its host and port are the relay's)."""
    if "/p2p-circuit" in addr:
        return None
    parts = addr.split("/")
    if len(parts) < 5 or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp" or not parts[4].isdigit():
        return None
    try:
        host = str(ipaddress.ip_address(parts[2]))
    except ValueError:
        return None
    port = int(parts[4])
    return (host, port) if 0 < port < 65536 else None


def maddr(host: str, port: int) -> str:
    return f"/{'ip6' if ':' in host else 'ip4'}/{host}/tcp/{port}"


def plan(requested: list[str], observed_hosts: list[str], max_targets: int = MAX_TARGETS) -> list[tuple[str, int]]:
    """The (host, port) pairs to dial for one question: the asker's addresses on a host it connects
    from, then each observed host with each port it names; never another host; at most `max_targets`."""
    hosts = []
    for h in observed_hosts:
        try:
            ip = ipaddress.ip_address(h)
        except ValueError:
            continue
        if not ip.is_unspecified and not ip.is_multicast and str(ip) not in hosts:
            hosts.append(str(ip))
    endpoints = [e for e in (tcp_endpoint(a) for a in requested) if e is not None]
    targets: list[tuple[str, int]] = []
    for host, port in endpoints:
        if host in hosts and (host, port) not in targets:
            targets.append((host, port))
    for port in dict.fromkeys(p for _, p in endpoints):
        for host in hosts:
            if (host, port) not in targets:
                targets.append((host, port))
    return targets[:max_targets]


@dataclass
class Limiter:
    """One question per asker per `interval` s; remembers at most `max_askers` (the oldest go)."""

    interval: float = MIN_INTERVAL_S
    max_askers: int = 1024
    last: dict[str, float] = field(default_factory=dict)

    def allow(self, asker: str, now: float) -> bool:
        t = self.last.get(asker)
        if t is not None and now - t < self.interval:
            return False
        self.last.pop(asker, None)
        self.last[asker] = now
        while len(self.last) > self.max_askers:
            self.last.pop(next(iter(self.last)))
        return True


async def dial(host: str, port: int, timeout: float = DIAL_TIMEOUT_S) -> str:
    """'ok' if a libp2p node greets us on a fresh TCP connection to host:port, else why not."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            greeting = await reader.readexactly(len(GREETING))
    except TimeoutError:
        return f"no answer within {timeout:g} s (a firewall or NAT drops it)"
    except asyncio.IncompleteReadError:
        return "connected, but it closed without a libp2p greeting"
    except ConnectionRefusedError:
        return "connection refused (nothing listens on that port from outside)"
    except OSError as e:
        return f"cannot connect ({e.strerror or e})"
    finally:
        if writer is not None:
            writer.close()
    return "ok" if greeting == GREETING else "connected, but not to a libp2p node"


class _Request:
    """A question as hivemind's unary handlers take one (`FromString`); a payload that is not one
    is `Malformed`, so the guard counts it and answers `malformed request`."""

    def __init__(self, addrs: list[str]):
        self.addrs = addrs

    @classmethod
    def FromString(cls, data: bytes) -> _Request:
        from protocols.dht_guard import Malformed

        try:
            return cls(decode_request(data))
        except DialBackError:
            raise Malformed("dial-back request") from None


@dataclass(frozen=True)
class _Encoded:
    data: bytes

    def SerializeToString(self) -> bytes:
        return self.data


async def serve(p2p, limiter: Limiter | None = None, clock=time.monotonic) -> None:
    """Answer dial-back questions on hivemind's `p2p`: through `add_protobuf_handler`, so a guarded
    P2P (protocols/dht_guard.py) serves them under its stream bounds."""
    from protocols.dht_guard import Refusal

    limiter = limiter or Limiter()

    async def handle(request: _Request, context) -> _Encoded:
        caller = context.remote_id
        if not limiter.allow(caller.to_base58(), clock()):
            raise Refusal(f"asked again within {MIN_INTERVAL_S:g} s")
        observed = [e[0] for info in await p2p._client.list_peers() if info.peer_id == caller
                    for e in (tcp_endpoint(str(a)) for a in info.addrs) if e is not None]
        targets = plan(request.addrs, observed)
        results = await asyncio.gather(*(dial(h, p) for h, p in targets))
        return _Encoded(encode_reply(Reply({maddr(h, p): r for (h, p), r in zip(targets, results)}, list(dict.fromkeys(observed)))))

    await p2p.add_protobuf_handler(PROTOCOL, handle, _Request)


async def ask(p2p, peer_id: str, addrs: list[str], timeout: float = 2 * DIAL_TIMEOUT_S + 2) -> Reply:
    """Ask `peer_id` (connected through `p2p`) to dial `addrs` back; DialBackError says why it could not."""
    from hivemind.p2p import PeerID

    try:
        async with asyncio.timeout(timeout):
            data = await p2p._client.call_unary_handler(PeerID.from_base58(peer_id), PROTOCOL, encode_request(addrs))
    except TimeoutError:
        raise DialBackError(f"no dial-back answer within {timeout:g} s") from None
    except Exception as e:
        text = str(e)
        # the answering peer's own words: `refused: ...` from a guarded peer, an exception's repr
        # from an unguarded one
        inner = re.search(r"^refused: (.*)$|(?:DialBackError|Refusal)\(['\"](.*)['\"]\)", text, re.MULTILINE)
        if inner:
            raise DialBackError(f"the peer refused: {inner.group(1) or inner.group(2)}") from None
        if "protocol" in text.lower() and ("not supported" in text.lower() or "negotiate" in text.lower()):
            raise DialBackError("the peer does not offer dial-back (an older version)") from None
        raise DialBackError(f"dial-back failed: {text.splitlines()[-1][:200] if text else type(e).__name__}") from None
    return decode_reply(data)
