"""Learn the peer id behind a TCP address given without /p2p/<id> (`--initial-peer /dns4/boot/tcp/31337`).

A libp2p peer proves its id in the Noise handshake: its handshake payload carries its public key
and a signature over the Noise static key, and the peer id is the hash of that key. So dialling the
address and running the handshake as initiator with no expected id (py-libp2p's
`handshake_outbound(conn, None)`) yields the id of whoever answers there. That is trust in the
address (as in DNS), not in an id: an address with /p2p/<id> stays the way to pin a peer.

The handshake runs in a child process (`python -m protocols.transport.peer_id_lookup ADDR...`):
py-libp2p runs under trio and its protobuf package `crypto.pb` cannot be loaded next to
hivemind's (protocols/transport/light.py), while `peer join` runs asyncio and hivemind. The child
answers one JSON object on stdout, {ADDR: {"peer_id": ID} | {"error": REASON}}.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

HANDSHAKE_TIMEOUT_S = 10.0  # one dial plus the handshake; a live peer answers in milliseconds
MAX_RETRY_DELAY_S = 5.0


class LookupFailed(Exception):
    """The address could not be dialled, or what answered is not a libp2p peer."""


def lookup_target(addr: str) -> tuple[str, int, int] | None:
    """(host, port, address family) of `/ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT`, or None for an
    address this lookup cannot dial (one with /p2p/, QUIC, a relay, anything after the port)."""
    parts = addr.rstrip("/").split("/")
    if len(parts) != 5 or parts[0] != "" or parts[3] != "tcp" or not parts[4].isdigit():
        return None
    family = {"ip4": socket.AF_INET, "dns4": socket.AF_INET, "ip6": socket.AF_INET6, "dns6": socket.AF_INET6,
              "dns": socket.AF_UNSPEC}.get(parts[1])
    if family is None or not parts[2] or not 0 < int(parts[4]) <= 65535:
        return None
    return parts[2], int(parts[4]), family


def retry_delay(attempt: int, started: float, now: float, wait_s: float) -> float | None:
    """Seconds to wait before attempt `attempt + 1`, or None when `wait_s` (counted from
    `started`) is used up. Doubling from 0.5 s, at most MAX_RETRY_DELAY_S, never past the end."""
    left = started + wait_s - now
    if left <= 0:
        return None
    return min(0.5 * 2 ** attempt, MAX_RETRY_DELAY_S, left)


async def handshake_peer_id(addr: str, timeout: float = HANDSHAKE_TIMEOUT_S) -> str:
    """The peer id proven by whatever answers a Noise handshake at `addr` (trio)."""
    import trio
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as create_noise_key_pair
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.security.security_multistream import SecurityMultistream
    from libp2p.transport.tcp.tcp import TCP
    from multiaddr import Multiaddr

    target = lookup_target(addr)
    if target is None:
        raise LookupFailed("not a TCP address (/ip4|/ip6|/dns4/HOST/tcp/PORT)")
    host, port, family = target
    try:
        # the system resolver: /etc/hosts and the search domains of a Kubernetes pod's resolv.conf
        infos = await trio.socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise LookupFailed(f"cannot resolve {host} ({e.strerror})") from None
    key = create_new_key_pair()  # a throwaway identity: nothing is asked of the remote but its id
    security = SecurityMultistream({NOISE: NoiseTransport(key, noise_privkey=create_noise_key_pair().private_key)})
    last = "no address"
    for fam, _, _, _, sockaddr in infos:
        ip = sockaddr[0]
        maddr = Multiaddr(f"/{'ip4' if fam == socket.AF_INET else 'ip6'}/{ip}/tcp/{port}")
        with trio.move_on_after(timeout) as scope:
            try:
                raw = await TCP().dial(maddr)
            except Exception as e:
                last = ("connection refused: is the peer running, on that port?" if _refused(e)
                        else f"cannot connect ({e.__cause__ or e})")
                continue
            try:
                secure = await security.secure_outbound(raw, None)
                return secure.get_remote_peer().to_base58()
            except Exception as e:
                last = f"it answered, but not as a libp2p peer ({type(e).__name__})"
            finally:
                await raw.close()
        if scope.cancelled_caught:
            last = f"no answer within {timeout:g} s (firewall, NAT or a wrong address?)"
    raise LookupFailed(last)


def _refused(e: BaseException | None) -> bool:
    """Whether a ConnectionRefusedError is behind `e` (libp2p and trio wrap it, trio in a group)."""
    while e is not None:
        if isinstance(e, ConnectionRefusedError):
            return True
        if isinstance(e, BaseExceptionGroup) and any(_refused(x) for x in e.exceptions):
            return True
        e = e.__cause__ or e.__context__
    return False


async def _lookup_all(addrs: list[str], wait_s: float) -> dict[str, dict[str, str]]:
    import trio

    out: dict[str, dict[str, str]] = {}
    for addr in addrs:
        started, attempt = time.monotonic(), 0
        while True:
            try:
                out[addr] = {"peer_id": await handshake_peer_id(addr)}
                break
            except LookupFailed as e:
                delay = retry_delay(attempt, started, time.monotonic(), wait_s)
                if delay is None:
                    out[addr] = {"error": str(e)}
                    break
                if attempt == 0:
                    print(f"waiting up to {wait_s:g} s for {addr} to answer ({e})", file=sys.stderr, flush=True)
                attempt += 1
                await trio.sleep(delay)
    return out


def learn_peer_ids(addrs: list[str], wait_s: float = 0.0) -> dict[str, str | LookupFailed]:
    """address -> its peer id, or LookupFailed saying why; each address is tried until `wait_s`
    has passed (0: once). Runs the handshakes in a child process (see the module docstring)."""
    if not addrs:
        return {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_root(), os.environ.get("PYTHONPATH")]))}
    limit = len(addrs) * (wait_s + HANDSHAKE_TIMEOUT_S + MAX_RETRY_DELAY_S) + 30
    try:
        child = subprocess.run([sys.executable, "-m", __name__, "--wait-s", str(wait_s), *addrs], stdout=subprocess.PIPE,
                               text=True, env=env, timeout=limit)
        replies = json.loads(child.stdout)
    except subprocess.TimeoutExpired:
        return {a: LookupFailed(f"no answer within {limit:.0f} s") for a in addrs}
    except ValueError:
        return {a: LookupFailed(f"the lookup process failed (exit {child.returncode})") for a in addrs}
    return {a: replies[a]["peer_id"] if "peer_id" in replies.get(a, {}) else LookupFailed(replies.get(a, {}).get("error", "no reply"))
            for a in addrs}


def _root() -> str:
    """The folder holding the `protocols` package (a source tree is not always on sys.path)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str]) -> int:
    import logging

    import trio

    logging.disable(logging.CRITICAL)  # py-libp2p logs every failed dial at ERROR; the reply says why
    wait_s = 0.0
    if argv[:1] == ["--wait-s"]:
        wait_s, argv = float(argv[1]), argv[2:]
    print(json.dumps(trio.run(_lookup_all, argv, wait_s)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
